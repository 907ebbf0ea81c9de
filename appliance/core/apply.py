"""Everything `core plan|apply` do before and around the play, without a console: the CLI shows its spinners
through the callbacks, and the Pulumi CoreNode provider (appliance/iac/core_node.py) calls the same code."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import BadInput, ServiceError
from appliance.site import NAME_PATTERN, Site

if TYPE_CHECKING:
    from appliance.backends import Backends
    from appliance.core.runner import EventHandler, RunResult

# A spinner (or nothing) around a slow step: the CLI passes `console.status`-like factories.
Status = Callable[[str], AbstractContextManager[Any]]


def _quiet(_: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Prepared:
    site: Site
    state: Path
    inventory: Path
    envvars: dict[str, str]
    nodes: list[str]
    plans: dict[str, Any]

    @property
    def private_data_dir(self) -> Path:
        return self.state / "core" / "runner"

    def run(
        self, *, check: bool, limit: str | None, tags: list[str] | None, on_event: EventHandler | None
    ) -> RunResult:
        """The play on this inventory: `check` is `core plan` (check + diff), else `core apply`."""
        from appliance.core.runner import run_playbook

        return run_playbook(
            self.site,
            check=check,
            diff=check,
            limit=limit,
            tags=tags,
            on_event=on_event,
            private_data_dir=self.private_data_dir,
            envvars=self.envvars,
            inventory=self.inventory,
        )


def check_tags(tags: list[str] | None) -> list[str] | None:
    """--tags as role names (repeatable or comma separated); an unknown role is bad input."""
    from appliance.core.runner import roles_dir

    wanted = [t.strip() for item in tags or [] for t in item.split(",") if t.strip()]
    if not wanted:
        return None
    roles = sorted(p.name for p in roles_dir().iterdir() if p.is_dir() and (p / "tasks").is_dir())
    unknown = [t for t in wanted if t not in roles and t != "always"]
    if unknown:
        raise BadInput(f"unknown role tag(s): {', '.join(unknown)}; the roles are {', '.join(roles)}")
    return wanted


def limited(site: Site, limit: str | None) -> list[str]:
    """The nodes a limit names, to issue Vault credentials for. A plain list of names is checked against the
    site; any other host pattern is left to Ansible (every node gets credentials)."""
    names = [n.name for n in site.core_nodes]
    if not limit:
        return names
    parts = [p for p in re.split(r"[,:]", limit) if p]
    if not all(re.fullmatch(NAME_PATTERN, p) for p in parts):
        return names
    parts = [p for p in parts if p not in ("all", "core_nodes")] or names
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise BadInput(f"--limit names unknown core node(s): {', '.join(unknown)}; the site has {', '.join(names)}")
    return [n for n in names if n in parts]


def backends_for(site: Site, state: Path) -> Backends:
    from appliance.backends import Backends
    from appliance.lab.state import LabState

    return Backends(site, LabState.at(state) if site.embedded["vault"] else None)


def existing_role_ids(backends: Backends, nodes: list[str]) -> dict[str, str | None]:
    """For `plan`: the AppRole role ids Vault already has, changing nothing (no role, no secret id made)."""
    import hvac.exceptions

    from appliance.core.vault_access import APPROLE_MOUNT, approle_name

    client = backends.vault()
    out: dict[str, str | None] = {}
    for node in nodes:
        try:
            answer = client.auth.approle.read_role_id(approle_name(node), mount_point=APPROLE_MOUNT)
            out[node] = str(answer["data"]["role_id"])
        except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):
            out[node] = None  # not made yet: `apply` makes it
        except hvac.exceptions.VaultError as exc:
            raise ServiceError(f"Vault refused to read the AppRole of {node}: {exc}") from exc
    return out


def read_vars(path: Path | None, site: Site) -> dict[str, dict[str, Any]]:
    """--vars FILE as per-node variables; a bad file exits 2 naming it."""
    if path is None:
        return {}
    from pydantic import RootModel

    from runtime.common.yamldoc import load_model

    # yamldoc names the file, the YAML path and the line of a bad entry (exit 2).
    data = load_model(path, RootModel[dict[str, dict[str, Any]] | None]).root
    names = {n.name for n in site.core_nodes}
    if data is None:
        return {}
    unknown = sorted(set(data) - names - {"all"})
    if unknown:
        raise BadInput(f"{path}: unknown core node(s) {', '.join(unknown)}; the site has {', '.join(sorted(names))}")
    shared = data.get("all", {})
    return {name: {**shared, **data.get(name, {})} for name in names}


def bundle_id(bundle: Path) -> str:
    """A bundle's identity: its manifest's digest (the manifest lists every file's sha256)."""
    return hashlib.sha256((bundle.resolve() / "manifest.json").read_bytes()).hexdigest()[:16]


def verified_bundle(
    site: Site, bundle: Path, *, status: Status | None = None, on_verified: Callable[[str], None] | None = None
) -> dict[str, str]:
    """Verify the bundle against the site before anything else; its role variables (`membria_bundle`)."""
    from appliance.bundle import keys
    from appliance.bundle.verify import verify

    key = keys.trusted_key(site, None)
    with (status or _quiet)(f"verifying the bundle {bundle}"):
        manifest = verify(bundle, key, site)
    root = bundle.resolve()
    if on_verified is not None:
        on_verified(f"bundle {bundle} verified ({len(manifest.debs)} Debian packages, {len(manifest.wheels)} wheels)")
    return {"id": bundle_id(bundle), "apt_repo": str(root / "debs"), "wheelhouse": str(root / "wheels")}


def prepare(
    site_file: Path,
    state_dir: Path | None,
    limit: str | None,
    *,
    mint_secrets: bool,
    vars_file: Path | None = None,
    bundle: Path | None = None,
    status: Status | None = None,
    on_bundle_verified: Callable[[str], None] | None = None,
) -> Prepared:
    """The inventory for a run, written under the state dir; with `mint_secrets` (apply) each node's AppRole is
    made sure of and a fresh secret id reaches the play only through `envvars`."""
    from appliance.core.inventory import build_inventory, core_state_dir, llm_plan, secret_id_env, write_inventory
    from appliance.site import load_site

    site = load_site(site_file)
    # The serving plan first: a model that cannot fit is refused (with its arithmetic) before anything else.
    plans = {node.name: llm_plan(site, node) for node in site.core_nodes}
    nodes = limited(site, limit)
    extra = read_vars(vars_file, site)  # bad input is refused before Vault is asked anything
    bundle_vars = (
        verified_bundle(site, bundle, status=status, on_verified=on_bundle_verified) if bundle is not None else None
    )
    state = core_state_dir(site, state_dir)
    backends = backends_for(site, state)
    envvars: dict[str, str] = {}
    role_ids: dict[str, str | None]
    if mint_secrets:
        from appliance.core.vault_access import node_credentials

        role_ids = {}
        with (status or _quiet)("Vault: node identities"):
            for node in nodes:
                role_ids[node], envvars[secret_id_env(node)] = node_credentials(site, node, backends)
    else:
        role_ids = existing_role_ids(backends, nodes)
    for node, role_id in role_ids.items():
        extra.setdefault(node, {})["membria_vault_role_id"] = role_id
    inventory = build_inventory(site, extra_hostvars=extra, state_dir=state, site_file=site_file, bundle=bundle_vars)
    return Prepared(site, state, write_inventory(inventory, state), envvars, nodes, plans)
