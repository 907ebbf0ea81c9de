"""A signed manifest: `manifest.json` lists files by sha256, `manifest.sig` is an Ed25519 signature of its exact bytes.

One signature check plus the checksums proves a whole tree. Shared by the offline bundle (`appliance/bundle/`) and
the edge image (`edge_image/`); each wraps `SignatureProblem` in its own error type.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.common.license import key_id

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


class SignatureProblem(Exception):
    """The signature is missing, malformed, by another key, or does not match."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str
    signature: str


def walk(root: Path) -> Iterator[Path]:
    """Every regular file under root except the manifest and its signature, sorted, as relative paths."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and str(rel) not in (MANIFEST, SIGNATURE):
            yield rel


def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return FileEntry(sha256=digest.hexdigest(), size=size)


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    signature = Signature(
        key_id=key_id(key.public_key()), signature=base64.b64encode(key.sign(manifest_bytes)).decode()
    )
    return (signature.model_dump_json(indent=2) + "\n").encode()


def signed_bytes(directory: Path, public_key: Ed25519PublicKey, *, what: str, hint: str) -> bytes:
    """manifest.json's bytes once its signature is proven with public_key; SignatureProblem otherwise.

    `what` names the tree in messages ("bundle", "edge image"); `hint` says where the trusted key comes from.
    """
    manifest_path, signature_path = directory / MANIFEST, directory / SIGNATURE
    for path in (manifest_path, signature_path):
        if not path.is_file():
            raise SignatureProblem(f"{path}: missing; {directory} is not a complete {what}")
    data = manifest_path.read_bytes()
    try:
        signature = Signature.model_validate_json(signature_path.read_bytes())
        raw = base64.b64decode(signature.signature, validate=True)
    except (ValidationError, binascii.Error, ValueError):
        raise SignatureProblem(f"{signature_path}: not a {what} signature") from None
    expected = key_id(public_key)
    if signature.key_id != expected:
        raise SignatureProblem(
            f"{signature_path}: signed by key {signature.key_id}, but the trusted key is {expected}", hint=hint
        )
    try:
        public_key.verify(raw, data)
    except InvalidSignature:
        raise SignatureProblem(f"{manifest_path}: the signature does not match (the manifest was changed)") from None
    return data
