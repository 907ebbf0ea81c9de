"""Content digests: a resource whose digest input changes is updated by `pulumi up` (stacks/DESIGN.md, §3)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

DEFAULT_EXCLUDE = ("__pycache__", "*.pyc", "*.retry")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
