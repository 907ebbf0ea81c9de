"""The edge image's manifest: what the image holds and how it was made, signed with the site's image key.

It records the disk layout, the LUKS2 parameters, the root filesystem's plaintext sha256 (what verify proves by
decrypting), every ESP file, the packages, wheels and models inside, and {file: sha256, size} for every output.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_image.disk import Layout
from edge_image.errors import ImageBadInput, ImageCheckFailed
from runtime.common.signed_manifest import MANIFEST, FileEntry, SignatureProblem, signed_bytes

KIND: Literal["membria-edge-image"] = "membria-edge-image"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LuksRecord(_Model):
    uuid: str
    label: str
    cipher: str
    key_bits: int
    sector_size: int
    data_offset: int
    pbkdf: str
    pbkdf_memory_kib: int
    pbkdf_iterations: int
    pbkdf_parallel: int


class RootRecord(_Model):
    """The plaintext filesystem inside LUKS: its size is the whole encrypted segment as built."""

    fs_type: Literal["ext4"] = "ext4"
    fs_uuid: str
    label: str
    size: int
    used_bytes: int
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PackageRecord(_Model):
    name: str
    version: str
    arch: str


class WheelRecord(_Model):
    name: str
    version: str


class ModelFileRecord(_Model):
    path: str
    sha256: str
    size: int


class ImageManifest(_Model):
    format: Literal[1] = 1
    kind: Literal["membria-edge-image"] = KIND
    site: str
    profile: str
    appliance_version: str
    created_at: datetime
    debian_suite: str
    image: str
    bmap: str
    layout: Layout
    luks: LuksRecord
    root: RootRecord
    esp: dict[str, FileEntry]
    tpm2_pcrs: list[int]
    packages: list[PackageRecord]
    wheels: list[WheelRecord]
    models: list[ModelFileRecord]
    files: dict[str, FileEntry]

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def check_signature(directory: Path, public_key: Ed25519PublicKey) -> ImageManifest:
    """The manifest, once its signature is proven with public_key; ImageCheckFailed (exit 1) otherwise."""
    try:
        data = signed_bytes(
            directory,
            public_key,
            what="edge image",
            hint="check the site's edge.signing.public_key_file, or --public-key",
        )
    except SignatureProblem as exc:
        raise ImageCheckFailed(exc.message, hint=exc.hint) from None
    try:
        return ImageManifest.model_validate_json(data)
    except ValidationError as exc:
        raise ImageBadInput(
            f"{directory / MANIFEST}: signed, but not an image manifest this version reads: {exc.errors()[0]['msg']}"
        ) from None
