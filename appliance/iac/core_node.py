"""One core node as a Pulumi resource (stacks/DESIGN.md §2 "CoreNode"): check, apply (create/update) and diff
on plain dicts. stacks/components/core_node.py wraps these in the dynamic provider's types."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, CheckFailed

# Inputs; `diff` compares the first group for an update and `node` for a replacement.
UPDATED_BY = ("content_hash", "site_file", "state_dir", "vars_file", "bundle", "tags")
INPUTS = ("site_file", "workdir", "node", "state_dir", "content_hash", "vars_file", "bundle", "tags")
REQUIRED = ("site_file", "workdir", "node", "state_dir", "content_hash")
# What the engine sends for a value not known yet at preview (pulumi.runtime.rpc.UNKNOWN; no pulumi import here).
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"
CHANGED = "site or roles changed between preview and up"


def inputs(props: Mapping[str, Any]) -> dict[str, Any]:
    """The resource's own inputs: without `__provider` and the output placeholders the engine also sends."""
    return {key: props.get(key) for key in INPUTS}


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


def node_hash(props: Mapping[str, Any]) -> str:
    """The content hash for these inputs, as the program computed it (inside `workdir`)."""
    from appliance.core.apply import bundle_id
    from appliance.iac.content_hash import core_node_hash
    from appliance.site import load_site

    site_file = Path(props["site_file"])
    bundle = _path(props.get("bundle"))
    with contextlib.chdir(props["workdir"]):
        return core_node_hash(
            load_site(site_file),
            props["node"],
            site_file=site_file,
            vars_file=_path(props.get("vars_file")),
            bundle_id=bundle_id(bundle) if bundle else None,
            tags=props.get("tags") or None,
        )


def check(props: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(property, reason) for each input that cannot work; values unknown at preview are left alone."""
    failures = [(key, f"{key} is required") for key in REQUIRED if not props.get(key)]
    if failures:
        return failures
    for key in ("site_file", "workdir", "state_dir", "vars_file", "bundle"):
        value = props.get(key)
        if value and value != UNKNOWN and not Path(value).is_absolute():
            failures.append((key, f"{key} must be an absolute path, not {value}"))
    workdir = props["workdir"]
    if failures or workdir == UNKNOWN or not Path(workdir).is_dir():
        return failures or ([("workdir", f"{workdir} is not a directory")] if workdir != UNKNOWN else [])
    with contextlib.chdir(workdir):
        failures += _check_in_workdir(props)
    return failures


def _check_in_workdir(props: Mapping[str, Any]) -> list[tuple[str, str]]:
    from appliance.core.apply import check_tags, read_vars
    from appliance.site import load_site

    try:
        site = load_site(Path(props["site_file"]))
    except (ApplianceError, ValueError, OSError) as exc:  # yamldoc.InvalidFile is a ValueError naming the file
        return [("site_file", str(exc))]
    failures: list[tuple[str, str]] = []
    names = [n.name for n in site.core_nodes]
    if props["node"] != UNKNOWN and props["node"] not in names:
        failures.append(("node", f"unknown core node {props['node']}; the site has {', '.join(names)}"))
    vars_file = props.get("vars_file")
    if vars_file and vars_file != UNKNOWN:
        try:
            read_vars(Path(vars_file), site)
        except (ApplianceError, ValueError, OSError) as exc:
            failures.append(("vars_file", str(exc)))
    bundle = props.get("bundle")
    if bundle and bundle != UNKNOWN and not (Path(bundle) / "manifest.json").is_file():
        failures.append(("bundle", f"{bundle} is not a bundle (no manifest.json)"))
    tags = props.get("tags")
    if tags and UNKNOWN not in tags:
        try:
            check_tags(list(tags))
        except ApplianceError as exc:
            failures.append(("tags", exc.message))
    return failures


def apply(props: Mapping[str, Any]) -> dict[str, Any]:
    """Provision the node (create and update alike: the roles are idempotent). Raises when the run did not
    succeed, so Pulumi records nothing and the next `up` tries again."""
    import appliance
    from appliance.core.apply import check_tags, prepare

    node = props["node"]
    with contextlib.chdir(props["workdir"]):
        if node_hash(props) != props["content_hash"]:
            raise CheckFailed(f"{node}: {CHANGED}", hint="run `pulumi preview` again, then `pulumi up`")
        prepared = prepare(
            Path(props["site_file"]),
            Path(props["state_dir"]),
            node,
            mint_secrets=True,
            vars_file=_path(props.get("vars_file")),
            bundle=_path(props.get("bundle")),
        )
        result = prepared.run(check=False, limit=node, tags=check_tags(props.get("tags")), on_event=None)
    if result.broken_hosts or result.rc != 0 or node not in result.recap:
        if result.failures:
            first = result.failures[0]
            what = f"{first.host} {first.role}: {first.task}: {first.message}"
        else:
            what = result.errors[0].splitlines()[0] if result.errors else f"status {result.status}, rc {result.rc}"
        raise CheckFailed(f"{node}: apply failed: {what}; every event is in {result.events_path}")
    return {
        **inputs(props),
        "recap": asdict(result.recap[node]),
        "changes": len([c for c in result.changes if c.host == node]),
        "notes": [f"{n.role}: {n.text}" for n in result.notes if n.host == node],
        "events_path": str(result.events_path),
        "applied_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "appliance_version": appliance.__version__,
    }


def resource_id(props: Mapping[str, Any]) -> str:
    from appliance.site import load_site

    with contextlib.chdir(props["workdir"]):
        return f"{load_site(Path(props['site_file'])).site.name}/{props['node']}"


def diff(olds: Mapping[str, Any], news: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """(changes, replaces). `olds` are the last outputs (inputs echoed), `__provider` and outputs are ignored;
    a value unknown at preview counts as changed."""
    replaces = ["node"] if _differs(olds.get("node"), news.get("node")) else []
    changed = any(_differs(olds.get(key), news.get(key)) for key in UPDATED_BY)
    return bool(replaces) or changed, replaces


def _differs(old: Any, new: Any) -> bool:
    if new == UNKNOWN or (isinstance(new, list) and UNKNOWN in new):
        return True
    return (old or None) != (new or None)  # absent, None, "" and [] all mean "not set"
