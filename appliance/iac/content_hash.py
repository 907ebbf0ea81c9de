"""Content digests: a resource whose digest input changes is updated by `pulumi up` (stacks/DESIGN.md, §3)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.site import Site

DEFAULT_EXCLUDE = ("__pycache__", "*.pyc", "*.retry")


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def tree_digest(root: Path, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> str:
    """sha256 over every file under `root`: its relative path, whether it is executable, and its bytes (a link:
    its target). Names matching `exclude` (files or directories) are skipped. Order-independent of the walk."""
    patterns = tuple(exclude)
    lines: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not _excluded(d, patterns))
        for name in sorted(files):
            if _excluded(name, patterns):
                continue
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                lines.append(f"{relative}\0l\0link:{os.readlink(path)}\n")
            else:
                mode = "x" if path.stat().st_mode & 0o111 else "-"
                lines.append(f"{relative}\0{mode}\0{file_digest(path)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def core_node_hash(
    site: Site,
    node: str,
    *,
    site_file: Path,
    vars_file: Path | None = None,
    bundle_id: str | None = None,
    tags: list[str] | None = None,
    roles_root: Path | None = None,
) -> str:
    """What one core node's apply depends on (stacks/DESIGN.md §3): the validated site (so comments and
    formatting never count), the files the roles copy onto the node, the roles tree, the node's vars, the bundle
    and the tags. Relative paths resolve against the working directory, as `core apply` resolves them."""
    import appliance
    from appliance.core.apply import read_vars
    from appliance.core.inventory import controller_path
    from appliance.core.runner import roles_dir

    del site_file  # the validated model stands for its content (the roles take its path from the inventory)
    licensing = site.licensing
    files = [site.rbac.policy_file, licensing.license_file, licensing.public_key_path]
    document = {
        "format": 1,
        "appliance": appliance.__version__,
        "node": node,
        "site": site.model_dump(mode="json"),
        # A file not there yet (the lab's license before `lab up`) counts as missing; creating it changes the hash.
        "files": {str(p): _digest_or_none(controller_path(p)) for p in files},
        "roles": tree_digest(roles_root or roles_dir()),
        "vars": read_vars(vars_file, site).get(node) or None,  # empty vars are no vars
        "bundle": bundle_id,
        "tags": sorted(tags) if tags else None,
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _digest_or_none(path: Path) -> str | None:
    return file_digest(path) if path.is_file() else None
