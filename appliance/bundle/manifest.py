"""The bundle's manifest (what it holds, the sha256 of every file) and its Ed25519 signature.

The signature covers the exact bytes of manifest.json; the manifest covers every other file by sha256, so
one signature check plus the checksums proves the whole tree. The private key lives in Vault (KV, the
site's `bundle.signing_key_vault_path`) and is read only for the moment of signing.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from appliance.errors import BadInput, CheckFailed
from runtime.common.signed_manifest import (
    MANIFEST,
    SIGNATURE,
    FileEntry,
    Signature,
    SignatureProblem,
    hash_file,
    sign,
    signed_bytes,
    walk,
)

__all__ = ["MANIFEST", "SIGNATURE", "FileEntry", "Signature", "hash_file", "sign", "walk"]

FORMAT = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


def check_signature(bundle: Path, public_key: Ed25519PublicKey) -> Manifest:
    """The manifest, once its signature is proven with public_key; CheckFailed (exit 1) otherwise."""
    try:
        data = signed_bytes(
            bundle, public_key, what="bundle", hint="check the site's bundle.public_key_file, or --public-key"
        )
    except SignatureProblem as exc:
        raise CheckFailed(exc.message, hint=exc.hint) from None
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise BadInput(
            f"{bundle / MANIFEST}: signed, but not a manifest this version reads: {exc.errors()[0]['msg']}"
        ) from None
