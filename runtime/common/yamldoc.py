"""Load a user-written YAML file into a pydantic model, reporting every problem with its YAML path and line.

Used for the site file, RBAC policies and, later, waivers; it lives in runtime.common so that runtime services can
load their files too. The file is read with ruamel.yaml's round-trip loader only to keep line numbers; the model
sees plain dicts, lists and scalars.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.scalarbool import ScalarBoolean

M = TypeVar("M", bound=BaseModel)

Loc = tuple[int | str, ...]

ECHO_LIMIT = 60  # longest piece of user input repeated in a message


@dataclass(frozen=True)
class FileIssue:
    """One problem in a file. `path` is like "core_nodes[0].hardware.gpus[1].memory_gb", "" for the document."""

    path: str
    line: int | None  # 1-based
    message: str

    def format(self, file: Path | str) -> str:
        """`FILE:LINE: PATH: message`, the form editors and CI annotate."""
        where = f"{file}:{self.line}" if self.line is not None else str(file)
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class InvalidFile(ValueError):
    """A file that cannot be used, with every problem found in it.

    The message's first line summarises; the following lines are the issues, so an error handler shows them
    without knowing about this class. Independent of `appliance` so runtime services can load their files too;
    the CLI maps it onto exit code 2 (bad input).
    """

    exit_code = 2

    def __init__(self, file: Path, issues: list[FileIssue]) -> None:
        self.file = file
        self.issues = issues
        count = f"{len(issues)} error" + ("" if len(issues) == 1 else "s")
        self.message = "\n".join([f"{file}: {count}", *(issue.format(file) for issue in issues)])
        super().__init__(self.message)

    @property
    def summary(self) -> str:
        return self.message.splitlines()[0]


# --- loading --------------------------------------------------------------------------------------------


def load_model(path: Path, model: type[M]) -> M:
    """Read, parse and validate `path`; raise InvalidFile listing every problem found."""
    text = _read(path)
    data = _parse(path, text)
    return validate_document(data, model, file=path)


def validate_document(data: Any, model: type[M], *, file: Path = Path("<document>")) -> M:
    """Validate already-parsed YAML (ideally ruamel round-trip data, which carries line numbers)."""
    if data is None:
        raise InvalidFile(file, [FileIssue("", None, "the file is empty")])
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single {type(data).__name__} value"
        line = _node_line(data)
        raise InvalidFile(file, [FileIssue("", line or 1, f"the top level must be a mapping (key: value), not {kind}")])
    try:
        return model.model_validate(plain(data))
    except ValidationError as exc:
        issues = [_issue(data, model, err) for err in exc.errors(include_url=False, include_input=True)]
        raise InvalidFile(file, _sorted_unique(issues)) from None


def _read(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidFile(path, [FileIssue("", None, "no such file")]) from None
    except IsADirectoryError:
        raise InvalidFile(path, [FileIssue("", None, "is a directory, not a file")]) from None
    except OSError as exc:
        raise InvalidFile(path, [FileIssue("", None, f"cannot read: {exc.strerror or exc}")]) from None
    try:
        return raw.decode("utf-8-sig")  # tolerate a BOM some Windows editors add
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        message = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        raise InvalidFile(path, [FileIssue("", line, message)]) from None


def _yaml() -> YAML:
    yaml = YAML(typ="rt")  # round-trip: the only loader that keeps line numbers on every mapping and sequence
    yaml.allow_duplicate_keys = False
    return yaml


def _parse(path: Path, text: str) -> Any:
    try:
        return _yaml().load(text)
    except DuplicateKeyError as exc:
        # ruamel stops at the first one and its message quotes values; find them all ourselves, values left out.
        # Keys equal only once converted (`1` and `0x1`) are not seen by the textual walk: fall back to ruamel's.
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        raise InvalidFile(path, _duplicate_keys(text) or [FileIssue("", line, "duplicate key")]) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "syntax error"
        message = f"invalid YAML: {problem}"
        if exc.context and exc.problem and exc.context_mark is not None:
            message += f" ({exc.context}, line {exc.context_mark.line + 1})"
        raise InvalidFile(path, [FileIssue("", line, message)]) from None
    except YAMLError as exc:  # reader errors (control characters) carry no mark
        raise InvalidFile(path, [FileIssue("", None, f"invalid YAML: {_shorten(str(exc))}")]) from None


def _duplicate_keys(text: str) -> list[FileIssue]:
    """Every repeated key, at the line of the repetition; the composer builds nodes without checking keys."""
    issues: list[FileIssue] = []
    seen: set[int] = set()  # aliases reuse nodes; recursive anchors would otherwise loop

    def walk(node: Node, loc: Loc) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                if not isinstance(key, ScalarNode) or key.value == "<<":  # merge keys may repeat
                    continue
                line = key.start_mark.line + 1
                if key.value in first:
                    message = f"duplicate key {_shorten(key.value)!r} (first defined on line {first[key.value]})"
                    issues.append(FileIssue(_format_path((*loc, key.value)), line, message))
                else:
                    first[key.value] = line
                walk(value, (*loc, key.value))
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*loc, index))

    root = _yaml().compose(text)
    if root is not None:
        walk(root, ())
    return issues


def plain(data: Any) -> Any:
    """ruamel's round-trip types (ScalarFloat, PlainScalarString, CommentedMap...) as built-in Python types."""
    if isinstance(data, dict):
        return {plain(k): plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    if isinstance(data, (bool, ScalarBoolean)):  # ScalarBoolean (an anchored bool) is an int subclass
        return bool(data)
    for base in (str, int, float):
        if isinstance(data, base):
            return base(data)
    return data  # dates, tagged scalars: left for the model to reject with a type error


# --- mapping pydantic errors onto the YAML -------------------------------------------------------------


def _issue(root: dict[Any, Any], model: type[BaseModel], err: ErrorDetails) -> FileIssue:
    loc: Loc = tuple(err["loc"])
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if isinstance(ctx.get("at"), list):  # custom validators name the item or key the problem is really at
        loc = (*loc, *ctx["at"])
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # about the `backend:` key, not the whole service
        loc = (*loc, str(ctx.get("discriminator", "")).strip("'"))
    path, line, found = _locate(root, loc)
    if kind in ("missing", "union_tag_not_found"):
        message = f"missing required field {_shorten(loc[-1])!r}"
    elif kind == "extra_forbidden":
        message = f"unknown key {_shorten(loc[-1])!r}"
        allowed = _allowed_keys(model, loc[:-1])
        if allowed:
            message += f" (allowed: {', '.join(allowed)})"
    else:
        message = _without_long_input(err["msg"], err.get("input"))
        if kind == "string_pattern_mismatch" and found:
            description = _field_description(model, loc)
            if description:
                message += f" ({description})"
    return FileIssue(path, line, message)


def _locate(root: dict[Any, Any], loc: Loc) -> tuple[str, int | None, bool]:
    """YAML path, 1-based line and whether the whole loc exists in the YAML.

    pydantic puts union tags and model names in loc; they are not keys in the YAML, so any element that is not
    a key or index of the current node is skipped, except a trailing one: the name of a missing field, which
    belongs in the path while the line stays the parent mapping's.
    """
    node: Any = root
    line = _node_line(root)
    parts: list[int | str] = []
    found = True
    for i, key in enumerate(loc):
        if _has_child(node, key):
            parts.append(key)
            line = _child_line(node, key) or line
            node = node[key]
        elif i == len(loc) - 1:
            parts.append(key)
            found = False
    return _format_path(tuple(parts)), line, found


def _has_child(node: Any, key: int | str) -> bool:
    if isinstance(node, dict):
        return key in node
    if isinstance(node, list):
        return isinstance(key, int) and 0 <= key < len(node)
    return False


def _child_line(node: Any, key: int | str) -> int | None:
    """1-based line of a mapping's key or a sequence's item; None for plain data and merged (`<<`) keys."""
    try:
        if isinstance(node, CommentedMap):
            return int(node.lc.key(key)[0]) + 1
        if isinstance(node, CommentedSeq):
            return int(node.lc.item(key)[0]) + 1
    except (KeyError, TypeError, IndexError):
        pass
    return None


def _node_line(node: Any) -> int | None:
    lc = getattr(node, "lc", None)
    return int(lc.line) + 1 if lc is not None and lc.line is not None else None


def _format_path(loc: Loc) -> str:
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _shorten(value: object) -> str:
    text = str(value)
    return text if len(text) <= ECHO_LIMIT else text[: ECHO_LIMIT - 3] + "..."


def _without_long_input(message: str, value: Any) -> str:
    """pydantic repeats some inputs (union tags); keep long ones out of the message."""
    if isinstance(value, str) and len(value) > ECHO_LIMIT:
        return message.replace(repr(value), repr(_shorten(value))).replace(value, _shorten(value))
    return message


def _sorted_unique(issues: list[FileIssue]) -> list[FileIssue]:
    unique = list(dict.fromkeys(issues))
    return sorted(unique, key=lambda issue: issue.line or 0)


# --- reading the model classes (for "allowed keys" and field descriptions) -----------------------------


def _expand(annotation: Any) -> list[Any]:
    """Unwrap Annotated and unions (Optional included) into the concrete types a value may have."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _expand(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [t for arg in get_args(annotation) for t in _expand(arg) if t is not type(None)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _has_tag(model: type[BaseModel], tag: str) -> bool:
    """Whether a Literal field of `model` allows `tag` (a discriminated union's tag), or `tag` is its name."""
    if model.__name__ == tag:
        return True
    return any(
        get_origin(f.annotation) is Literal and tag in get_args(f.annotation) for f in model.model_fields.values()
    )


def _models_at(model: type[BaseModel], loc: Loc) -> list[Any]:
    """The types the value at `loc` may have, following fields, list items and union tags."""
    candidates: list[Any] = [model]
    for key in loc:
        expanded = [t for c in candidates for t in _expand(c)]
        if isinstance(key, int):
            nxt = [get_args(t)[0] for t in expanded if get_origin(t) in (list, tuple, set) and get_args(t)]
        else:
            models = [t for t in expanded if _is_model(t)]
            nxt = [t.model_fields[key].annotation for t in models if key in t.model_fields]
            nxt = nxt or [t for t in models if _has_tag(t, key)]
        if not nxt:
            return []
        candidates = nxt
    return [t for c in candidates for t in _expand(c)]


def _allowed_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    models = [t for t in _models_at(model, loc) if _is_model(t)]
    if len(models) != 1:  # ambiguous or unknown: say nothing rather than something wrong
        return []
    return [f.alias or name for name, f in models[0].model_fields.items()]


def _field_description(model: type[BaseModel], loc: Loc) -> str | None:
    if not loc or not isinstance(loc[-1], str):
        return None
    models = [t for t in _models_at(model, loc[:-1]) if _is_model(t) and loc[-1] in t.model_fields]
    return models[0].model_fields[loc[-1]].description if len(models) == 1 else None
