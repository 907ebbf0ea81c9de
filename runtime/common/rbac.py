"""Role-based access control: a deny-by-default policy file and the one function that applies it.

A policy names the site's departments (one knowledge collection each), roles (actions plus the departments
they reach) and bindings (which identities hold which roles). An identity that no binding matches holds no
role and may do nothing. Permissions are additive: an action is allowed when the identity's roles that grant it
together cover every department requested.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from runtime.common.identity import Identity, Kind
from runtime.common.yamldoc import load_model

Action = Literal[
    "chat", "embeddings", "search", "read_documents", "write_documents", "sync", "escalate", "audit_read", "admin"
]
ACTIONS: tuple[Action, ...] = get_args(Action)
# Actions that only make sense against some department's knowledge: with no department in scope they are denied
# rather than allowed over nothing (a caller whose certificate has no OU must not look as if it may search).
DEPARTMENT_ACTIONS: frozenset[Action] = frozenset(
    {"chat", "search", "read_documents", "write_documents", "sync", "escalate"}
)

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lower-case name: letters, digits, '-'")]
Scope = list[str] | Literal["own", "*"]


class _Strict(BaseModel):
    # Same rules as the site file: a typo is an error, and `true` is not a department name.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, str_strip_whitespace=True)


def _check_scope(value: Any) -> Any:
    """One clear message per bad scope, instead of pydantic's error for each member of the union."""
    if isinstance(value, str):
        if value in ("own", "*"):
            return value
        raise PydanticCustomError(
            "invalid_scope",
            "departments must be a list of department names, 'own' or '*', not '{value}'",
            {"value": value[:60]},
        )
    if not isinstance(value, list):
        raise PydanticCustomError("invalid_scope", "departments must be a list of department names, 'own' or '*'")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not re.fullmatch(NAME_PATTERN, item) or item == "own":
            raise PydanticCustomError(
                "invalid_department",
                "'{item}' is not a department name (lower-case letters, digits, '-'); "
                "'own' and '*' stand alone, not in a list",
                {"item": str(item)[:60], "at": [index]},
            )
    return value


class Role(_Strict):
    name: Name
    description: str = ""
    actions: list[Action] = Field(min_length=1)
    departments: Scope = Field(
        description="department names, 'own' (the caller's certificate OU) or '*' (admin roles only)"
    )
    admin: bool = Field(default=False, description="an explicit admin role: may use '*' and the admin action")

    @field_validator("departments", mode="before")
    @classmethod
    def _scope(cls, value: Any) -> Any:
        return _check_scope(value)

    @model_validator(mode="after")
    def _admin_only(self) -> Role:
        if self.departments == "*" and not self.admin:
            raise PydanticCustomError(
                "wildcard_not_admin",
                "'*' (every department) is only for admin roles: set `admin: true` on role '{name}' "
                "or list the departments",
                {"name": self.name, "at": ["departments"]},
            )
        if "admin" in self.actions and not self.admin:
            raise PydanticCustomError(
                "admin_action_not_admin",
                "the 'admin' action is only for admin roles: set `admin: true` on role '{name}'",
                {"name": self.name, "at": ["actions"]},
            )
        return self


class Binding(_Strict):
    role: Name
    # The kind is always required: a device certificate named like an administrator must not inherit her role.
    kind: Kind
    subject: str | None = Field(default=None, min_length=1, description="exact certificate CN")
    departments: list[Name] | None = Field(
        default=None, min_length=1, description="only callers whose certificate OU names one of these"
    )

    def matches(self, identity: Identity) -> bool:
        if identity.kind != self.kind:
            return False
        if self.subject is not None and identity.subject != self.subject:
            return False
        return self.departments is None or bool(set(self.departments) & set(identity.departments))


class Policy(_Strict):
    departments: list[Name] = Field(min_length=1, description="every department (knowledge collection) of the site")
    roles: list[Role] = Field(min_length=1)
    bindings: list[Binding] = Field(default_factory=list)

    @field_validator("departments")
    @classmethod
    def _unique_departments(cls, names: list[str]) -> list[str]:
        for index, name in enumerate(names):
            if name == "own":
                raise PydanticCustomError(
                    "reserved_department", "'own' is a keyword of role scopes, not a department name", {"at": [index]}
                )
            if name in names[:index]:
                raise PydanticCustomError(
                    "duplicate_department", "department '{name}' is listed twice", {"name": name, "at": [index]}
                )
        return names

    @field_validator("roles")
    @classmethod
    def _roles(cls, roles: list[Role], info: ValidationInfo) -> list[Role]:
        known = info.data.get("departments")
        seen: dict[str, int] = {}
        for index, role in enumerate(roles):
            if role.name in seen:
                raise PydanticCustomError(
                    "duplicate_role",
                    "role '{name}' is defined twice (items {first} and {index})",
                    {"name": role.name, "first": seen[role.name], "index": index, "at": [index, "name"]},
                )
            seen[role.name] = index
            if known is not None and isinstance(role.departments, list):
                _known_departments(role.departments, known, at=[index, "departments"])
        return roles

    @field_validator("bindings")
    @classmethod
    def _bindings(cls, bindings: list[Binding], info: ValidationInfo) -> list[Binding]:
        roles = info.data.get("roles")
        known = info.data.get("departments")
        for index, binding in enumerate(bindings):
            if roles is not None and binding.role not in {r.name for r in roles}:
                raise PydanticCustomError(
                    "undefined_role",
                    "binding to undefined role '{role}'; roles: {roles}",
                    {"role": binding.role, "roles": ", ".join(r.name for r in roles), "at": [index, "role"]},
                )
            if known is not None and binding.departments is not None:
                _known_departments(binding.departments, known, at=[index, "departments"])
        return bindings

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)

    def roles_for(self, identity: Identity) -> list[Role]:
        """The roles bound to `identity`, in policy order, each once."""
        names = {b.role for b in self.bindings if b.matches(identity)}
        return [r for r in self.roles if r.name in names]

    def scope(self, role: Role, identity: Identity) -> tuple[str, ...]:
        """The departments `role` reaches for this caller, in policy order."""
        if role.departments == "*":
            return tuple(self.departments)
        wanted = set(identity.departments) if role.departments == "own" else set(role.departments)
        return tuple(d for d in self.departments if d in wanted)  # an OU the policy does not know reaches nothing


def _known_departments(names: list[str], known: list[str], *, at: list[int | str]) -> None:
    for offset, name in enumerate(names):
        if name not in known:
            raise PydanticCustomError(
                "unknown_department",
                "unknown department '{name}'; departments: {known}",
                {"name": name, "known": ", ".join(known), "at": [*at, offset]},
            )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    role: str | None  # the role that grants the action (None when no role grants it)
    reason: str
    allowed_departments: tuple[str, ...]  # the scope to apply to searches; empty when denied
    roles: tuple[str, ...] = ()  # every role granting the action

    def __bool__(self) -> bool:
        return self.allowed


def decide(policy: Policy, identity: Identity, action: str, departments: Iterable[str] = ()) -> Decision:
    """May `identity` perform `action` on every one of `departments` (none: on its own scope)?"""
    requested = tuple(dict.fromkeys(departments))
    who = identity.key
    if action not in ACTIONS:
        return Decision(False, None, f"unknown action {action!r}", ())
    bound = policy.roles_for(identity)
    if not bound:
        return Decision(False, None, f"no role is bound to {who}", ())
    granting = [r for r in bound if action in r.actions]
    if not granting:
        held = ", ".join(r.name for r in bound)
        return Decision(False, None, f"{who}'s roles ({held}) do not allow {action!r}", ())
    names = tuple(r.name for r in granting)
    reached = {d for r in granting for d in policy.scope(r, identity)}
    scope = tuple(d for d in policy.departments if d in reached)
    for department in requested:
        if department not in policy.departments:
            # '*' included: a caller cannot widen its scope by asking for everything.
            return Decision(False, names[0], f"{department!r} is not a department of this site", (), names)
        if department not in scope:
            allowed = ", ".join(scope) or "none"
            reason = f"department {department!r} is outside {who}'s scope for {action!r} ({allowed})"
            return Decision(False, names[0], reason, (), names)
    if action in DEPARTMENT_ACTIONS and not scope:
        # 'own' with no OU (or only OUs the policy does not list), or a role listing no department.
        reason = f"{who} reaches no department for {action!r}"
        return Decision(False, names[0], reason, (), names)
    # Name the role that alone covers the request where there is one (admin over employee for 'sales').
    covering = [r.name for r in granting if set(requested) <= set(policy.scope(r, identity))]
    role = covering[0] if covering else names[0]
    return Decision(True, role, f"allowed by role {', '.join(names)}", scope, names)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; raises yamldoc.InvalidFile listing every problem with its line."""
    return load_model(Path(path), Policy)
