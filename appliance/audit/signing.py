"""The report's signature: an Ed25519 signature over a small manifest of the report files' SHA-256.

`audit-report.sig.json` sits next to the files it covers::

    {
      "algorithm": "ed25519",
      "manifest": {
        "files": {"audit-report.html": "<sha256>", "audit-report.json": "<sha256>", "audit-report.xml": "<sha256>"},
        "key_id": "ed25519:<16 hex>",
        "schema": "membria-audit-signature/1",
        "signed_at": "2026-01-31T12:00:00Z"
      },
      "signature": "<base64 of the Ed25519 signature over canonical_json(manifest)>"
    }

The signature covers the canonical JSON of "manifest" (runtime.common.license.canonical_json: sorted keys, no
spaces, UTF-8), so re-indenting the file keeps it valid and changing any value does not. `key_id` names the key
for a better message when the wrong public key is used; trust comes from the signature alone.

verify: a changed, missing or wrongly signed file is a failed check (CheckFailed, exit 1); a signature file that
cannot be read or is not one is bad input (BadInput, exit 2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.errors import BadInput, CheckFailed
from runtime.common import atomic
from runtime.common.license import canonical_json, key_id

SCHEMA = "membria-audit-signature/1"
ALGORITHM = "ed25519"
SUFFIX = ".sig.json"
SIGNATURE_FILE = "audit-report.sig.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HINT = "check the public key (--public-key, or the site's audit.signing.public_key_file)"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _name_in(directory: Path, path: Path) -> str:
    """`path` relative to the signature's directory (POSIX); the signature only covers files beside or below it."""
    try:
        rel = path.resolve().relative_to(directory.resolve())
    except ValueError:
        raise BadInput(f"{path}: not in {directory}, where the signature file goes") from None
    return rel.as_posix()


def _safe_name(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return (
        bool(parts) and not name.startswith("/") and "\\" not in name and all(p not in ("", ".", "..") for p in parts)
    )


def sign(files: Sequence[Path], key: Ed25519PrivateKey, out: Path) -> Path:
    """Write the signature file `out` over `files` (all in out's directory); returns `out`."""
    out = Path(out)
    if not out.name.endswith(SUFFIX):
        raise BadInput(f"{out}: a signature file's name ends in {SUFFIX}")
    directory = out.parent
    listed: dict[str, str] = {}
    for path in files:
        name = _name_in(directory, Path(path))
        if name == _name_in(directory, out):
            continue  # the signature file cannot cover itself
        if not Path(path).is_file():
            raise BadInput(f"{path}: no such file to sign")
        listed[name] = sha256_file(Path(path))
    if not listed:
        raise BadInput("nothing to sign: no report file was given")
    manifest = {
        "files": dict(sorted(listed.items())),
        "key_id": key_id(key.public_key()),
        "schema": SCHEMA,
        "signed_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    document = {
        "algorithm": ALGORITHM,
        "manifest": manifest,
        "signature": base64.b64encode(key.sign(canonical_json(manifest))).decode("ascii"),
    }
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic.write_text(out, text, mode=0o644)
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _read(sig_file: Path) -> dict[str, Any]:
    """The signature document, parsed; BadInput when it cannot be read or is not one."""
    try:
        raw = sig_file.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{sig_file}: no such signature file") from None
    except IsADirectoryError:
        raise BadInput(f"{sig_file}: a directory, not a signature file") from None
    except OSError as exc:
        raise BadInput(f"{sig_file}: cannot read the signature file: {exc.strerror or exc}") from None
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{sig_file}: not an audit report signature (not JSON: {exc})") from None
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("manifest"), dict)
        or not isinstance(document.get("signature"), str)
        or document.get("algorithm", ALGORITHM) != ALGORITHM
    ):
        raise BadInput(f"{sig_file}: not an audit report signature (needs algorithm ed25519, manifest and signature)")
    return document


def _listed_files(sig_file: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """The signed manifest's files, once it is proven to be signed; BadInput when it is not a manifest we read."""
    files = manifest.get("files")
    problem = None
    if manifest.get("schema") != SCHEMA:
        problem = f"schema {manifest.get('schema')!r}, this version reads {SCHEMA}"
    elif not isinstance(files, dict) or not files:
        problem = "no files listed"
    else:
        for name, digest in files.items():
            if not _safe_name(name) or not isinstance(digest, str) or not _SHA256.match(digest):
                problem = f"a bad entry {name!r}"
                break
    if problem:
        raise BadInput(f"{sig_file}: signed, but not a manifest this version reads ({problem})")
    assert isinstance(files, dict)
    return {str(k): str(v) for k, v in files.items()}


def _signature_for(report_file: Path) -> Path:
    """The signature file beside `report_file` that lists it."""
    if not report_file.exists():
        raise BadInput(f"{report_file}: no such file")
    directory = report_file.parent
    listing = []
    for candidate in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            document = json.loads(candidate.read_bytes())
            files = document["manifest"]["files"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(files, dict) and report_file.name in files:
            listing.append(candidate)
    if not listing:
        raise CheckFailed(
            f"{report_file}: no signature file beside it lists it (unsigned, or its {SUFFIX} was removed)",
            hint=f"the {SIGNATURE_FILE} written with the report must stay in the same directory",
        )
    preferred = [c for c in listing if c.name == SIGNATURE_FILE]
    return (preferred or listing)[0]


def _signature_in(directory: Path) -> Path:
    found = sorted(directory.glob(f"*{SUFFIX}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckFailed(f"{directory}: no signature file ({SUFFIX}) in it: the reports are not signed")
    raise BadInput(
        f"{directory}: several signature files ({', '.join(p.name for p in found)})", hint="name the one to check"
    )


def verify(sig_file: Path, public_key: Ed25519PublicKey) -> list[str]:
    """Check the signature and the files it lists; returns the names of the verified files.

    `sig_file` may also be the report directory (its one `.sig.json`) or a report file: then the signature file
    beside it that lists it is used, and only that file is checked against it.
    """
    sig_file = Path(sig_file)
    only: str | None = None
    if sig_file.is_dir():
        sig_file = _signature_in(sig_file)
    elif not sig_file.name.endswith(SUFFIX):
        only = sig_file.name
        sig_file = _signature_for(sig_file)
    document = _read(sig_file)
    manifest: dict[str, Any] = document["manifest"]
    try:
        raw = base64.b64decode(document["signature"], validate=True)
        signed = canonical_json(manifest)
    except (binascii.Error, ValueError):
        raise BadInput(f"{sig_file}: not an audit report signature (the signature is not base64)") from None
    if len(raw) != 64:
        raise BadInput(f"{sig_file}: not an Ed25519 signature ({len(raw)} bytes, not 64)")
    try:
        public_key.verify(raw, signed)
    except InvalidSignature:
        trusted, named = key_id(public_key), manifest.get("key_id")
        if isinstance(named, str) and named != trusted:
            raise CheckFailed(
                f"{sig_file}: signed by key {named}, but the trusted key is {trusted}", hint=_HINT
            ) from None
        raise CheckFailed(
            f"{sig_file}: the signature does not match its manifest (the signature file was edited, or another "
            f"key signed it)",
            hint=_HINT,
        ) from None
    files = _listed_files(sig_file, manifest)
    if only is not None:
        files = {only: files[only]}
    problems = []
    for name, digest in sorted(files.items()):
        path = sig_file.parent / name
        if not path.is_file():
            problems.append(f"{name}: missing (the signature lists it)")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 differs from the signed manifest (the file was changed after signing)")
    if problems:
        raise CheckFailed(f"{sig_file.name}: " + "; ".join(problems), hint="the report is not as it was signed")
    return sorted(files)
