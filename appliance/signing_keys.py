"""Ed25519 signing keys kept in Vault, with the public key file that verifies what they sign.

Used for offline bundles (`bundle:` in the site file) and edge images (`edge.signing:`): two keys, rotated apart.
The private key is read from Vault only for the moment of signing and never written to disk.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.backends import Backends
from appliance.errors import BadInput, MissingEnvironment, ServiceError
from appliance.lab.state import LabState
from appliance.site import SigningKey, Site
from runtime.common import atomic
from runtime.common.license import LicenseError, key_id, load_public_key


def backends(site: Site, state_dir: Path | None) -> Backends:
    # The lab's OpenBao is found through its state directory; a site's own Vault through its URL.
    state = LabState.at(state_dir or site.lab.state_dir) if site.embedded["vault"] else None
    return Backends(site, state)


def _has(store: Backends, path: str) -> bool:
    try:
        store.read_secret(path)
    except ServiceError as exc:
        if "no secret at" in exc.message:
            return False
        raise
    return True


def keygen(site: Site, conf: SigningKey, state_dir: Path | None, *, what: str, force: bool = False) -> str:
    """A new signing key into Vault and its public key to conf.public_key_file; returns the key id."""
    store = backends(site, state_dir)
    if _has(store, conf.signing_key_vault_path) and not force:
        raise BadInput(
            f"Vault already holds a {what} signing key at {conf.signing_key_vault_path}",
            hint=f"pass --force to replace it ({what}s signed with the old key stop verifying)",
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    store.write_secret(conf.signing_key_vault_path, {"private_pem": pem.decode()})
    write_public(key, conf.public_key_file)
    return key_id(key.public_key())


def write_public(key: Ed25519PrivateKey, path: Path) -> None:
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic.write_bytes(path, public, mode=0o644)


def signing_key(
    site: Site, conf: SigningKey, state_dir: Path | None, *, what: str, keygen_hint: str
) -> Ed25519PrivateKey:
    """The private key, read from Vault for the moment of signing (never written to disk)."""
    store = backends(site, state_dir)
    if not _has(store, conf.signing_key_vault_path):
        raise MissingEnvironment(f"no {what} signing key in Vault at {conf.signing_key_vault_path}", hint=keygen_hint)
    data = store.read_secret(conf.signing_key_vault_path).get("private_pem", "")
    try:
        key = serialization.load_pem_private_key(str(data).encode(), password=None)
    except (ValueError, TypeError):
        raise ServiceError(
            f"the {what} signing key at {conf.signing_key_vault_path} is not a PEM private key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ServiceError(f"the {what} signing key at {conf.signing_key_vault_path} is not Ed25519")
    return key


def load_trusted(path: Path) -> Ed25519PublicKey:
    """A public key file; a missing or malformed one is bad input (exit 2)."""
    try:
        return load_public_key(path)
    except LicenseError as exc:
        raise BadInput(exc.message) from None
