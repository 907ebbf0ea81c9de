"""Issuing licenses: the vendor's Ed25519 signing key and the signed license files the gateway verifies.

Only the control plane signs; runtime services verify with the public key (runtime.common.license).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from appliance.errors import BadInput
from runtime.common import atomic
from runtime.common.license import License, canonical_json, key_id


def generate_signing_key(private_path: Path, public_path: Path, *, force: bool = False) -> str:
    """Write a new key pair (private: PKCS8 PEM, 0600; public: SubjectPublicKeyInfo PEM); returns its key id."""
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise BadInput("the private and the public key must go to different files")
    existing = [p for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        # Overwriting the signing key would orphan every license already issued with it.
        raise BadInput(f"{existing[0]} already exists; not overwriting a key", hint="pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic.write_bytes(private_path, private_pem, mode=0o600)
    atomic.write_bytes(public_path, public_pem, mode=0o644)
    return key_id(key.public_key())


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such signing key file", hint="create one with `appliance license keygen`") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the signing key: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):  # TypeError: an encrypted key
        raise BadInput(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def sign_license(lic: License, key: Ed25519PrivateKey) -> dict[str, object]:
    """The signed-file document for `lic`: the signature covers exactly the "license" object written."""
    body = lic.model_dump(mode="json")
    signature = base64.b64encode(key.sign(canonical_json(body))).decode("ascii")
    return {"license": body, "signature": signature, "key_id": key_id(key.public_key())}


def issue_license(
    private_key_path: Path,
    customer: str,
    seats: int,
    expires_at: datetime,
    features: Iterable[str],
    out_path: Path,
    *,
    issued_at: datetime | None = None,
    license_id: str | None = None,
) -> License:
    """Sign a license and write it to `out_path` atomically; returns what was signed."""
    key = load_signing_key(private_key_path)
    try:
        lic = License(
            license_id=license_id or str(uuid.uuid4()),
            customer=customer,
            seats=seats,
            issued_at=issued_at or datetime.now(UTC).replace(microsecond=0),
            expires_at=expires_at,
            features=list(dict.fromkeys(features)),
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'license'}: {e['msg']}" for e in exc.errors())
        raise BadInput(f"cannot issue this license: {problems}") from None
    document = sign_license(lic, key)
    atomic.write_text(Path(out_path), json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return lic
