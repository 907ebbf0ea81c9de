"""The bundle's manifest (what it holds, the sha256 of every file) and its Ed25519 signature.

The signature covers the exact bytes of manifest.json; the manifest covers every other file by sha256, so
one signature check plus the checksums proves the whole tree. The private key lives in Vault (KV, the
site's `bundle.signing_key_vault_path`) and is read only for the moment of signing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.errors import BadInput, CheckFailed
from runtime.common.license import key_id

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Model):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class NeedRecord(_Model):
    group: str
    kind: Literal["apt", "wheels"]
    items: list[str]
    why: str
    included: bool


class DebRecord(_Model):
    name: str
    version: str
    arch: str
    file: str
    group: str


class WheelRecord(_Model):
    name: str
    version: str
    file: str
    group: str


class ModelRecord(_Model):
    package: str
    wheel: str
    member: str
    sha256: str
    size: int


class Manifest(_Model):
    format: Literal[1] = 1
    site: str
    site_file: str
    appliance_version: str
    created_at: datetime
    debian_suite: str
    needs: list[NeedRecord]
    debs: list[DebRecord]
    wheels: list[WheelRecord]
    models: list[ModelRecord]
    files: dict[str, FileEntry]

    @property
    def skipped(self) -> list[str]:
        return [n.group for n in self.needs if not n.included]

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


class Signature(_Model):
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


def check_signature(bundle: Path, public_key: Ed25519PublicKey) -> Manifest:
    """The manifest, once its signature is proven with public_key; CheckFailed (exit 1) otherwise."""
    manifest_path, signature_path = bundle / MANIFEST, bundle / SIGNATURE
    for path in (manifest_path, signature_path):
        if not path.is_file():
            raise CheckFailed(f"{path}: missing; {bundle} is not a complete bundle")
    data = manifest_path.read_bytes()
    try:
        signature = Signature.model_validate_json(signature_path.read_bytes())
        raw = base64.b64decode(signature.signature, validate=True)
    except (ValidationError, binascii.Error, ValueError):
        raise CheckFailed(f"{signature_path}: not a bundle signature") from None
    expected = key_id(public_key)
    if signature.key_id != expected:
        raise CheckFailed(
            f"{signature_path}: signed by key {signature.key_id}, but the trusted key is {expected}",
            hint="check the site's bundle.public_key_file, or --public-key",
        )
    try:
        public_key.verify(raw, data)
    except InvalidSignature:
        raise CheckFailed(f"{manifest_path}: the signature does not match (the manifest was changed)") from None
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise BadInput(
            f"{manifest_path}: signed, but not a manifest this version reads: {exc.errors()[0]['msg']}"
        ) from None
