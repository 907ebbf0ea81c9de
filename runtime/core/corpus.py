"""Loading a corpus laid out as `<directory>/<department>/<files>` (see `examples/corpus/`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from runtime.common.ingest import EXTENSIONS
from runtime.core.store import validate_department

T = TypeVar("T")

# ingest_fn(department, filename, data) -> whatever the caller's ingestion returns
IngestFn = Callable[[str, str, bytes], T]


def corpus_files(directory: Path) -> list[tuple[str, Path]]:
    """(department, file) for every supported file, departments and files in name order.

    Sub-folders whose names are not department names are refused rather than skipped: a typo would
    otherwise silently leave a department empty."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"corpus directory {directory} does not exist")
    out: list[tuple[str, Path]] = []
    for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        department = validate_department(sub.name)
        for path in sorted(sub.rglob("*")):
            if path.is_file() and path.suffix.lower() in EXTENSIONS and not path.name.startswith("."):
                out.append((department, path))
    return out


def ingest_corpus(directory: Path, ingest_fn: IngestFn[T]) -> list[tuple[str, Path, T]]:
    """Call `ingest_fn(department, filename, data)` for each corpus file; returns (department, file, result).

    With a `CoreService`: `ingest_corpus(Path("examples/corpus"), core.ingest_file)`."""
    return [(dept, path, ingest_fn(dept, path.name, path.read_bytes())) for dept, path in corpus_files(directory)]
