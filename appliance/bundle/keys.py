"""The bundle signing key: an Ed25519 private key kept in Vault, and the public key file that verifies it."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.backends import Backends
from appliance.errors import BadInput, MissingEnvironment, ServiceError
from appliance.lab.state import LabState
from appliance.site import BundleSigning, Site
from runtime.common import atomic
from runtime.common.license import LicenseError, key_id, load_public_key


def settings(site: Site) -> BundleSigning:
    if site.bundle is None:
        raise BadInput(
            f"site {site.site.name} has no `bundle:` section",
            hint="add bundle: {public_key_file: ...} (see examples/rack.yaml)",
        )
    return site.bundle


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


def keygen(site: Site, state_dir: Path | None, *, force: bool = False) -> str:
    """A new signing key into Vault and its public key to the site's public_key_file; returns the key id."""
    conf = settings(site)
    store = backends(site, state_dir)
    if _has(store, conf.signing_key_vault_path) and not force:
        raise BadInput(
            f"Vault already holds a bundle signing key at {conf.signing_key_vault_path}",
            hint="pass --force to replace it (bundles signed with the old key stop verifying)",
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    store.write_secret(conf.signing_key_vault_path, {"private_pem": pem.decode()})
    write_public(key, conf.public_key_file)
    return key_id(key.public_key())


def write_public(key: Ed25519PrivateKey, path: Path) -> None:
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic.write_bytes(path, public, mode=0o644)


def signing_key(site: Site, state_dir: Path | None) -> Ed25519PrivateKey:
    """The private key, read from Vault for the moment of signing (never written to disk)."""
    conf = settings(site)
    store = backends(site, state_dir)
    if not _has(store, conf.signing_key_vault_path):
        raise MissingEnvironment(
            f"no bundle signing key in Vault at {conf.signing_key_vault_path}",
            hint=f"create it once with `appliance bundle keygen --site {site.site.name}`",
        )
    data = store.read_secret(conf.signing_key_vault_path).get("private_pem", "")
    try:
        key = serialization.load_pem_private_key(str(data).encode(), password=None)
    except (ValueError, TypeError):
        raise ServiceError(
            f"the bundle signing key at {conf.signing_key_vault_path} is not a PEM private key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ServiceError(f"the bundle signing key at {conf.signing_key_vault_path} is not Ed25519")
    return key


def trusted_key(site: Site | None, public_key_file: Path | None) -> Ed25519PublicKey:
    """The key a bundle must be signed with: --public-key, else the site's bundle.public_key_file."""
    path = public_key_file or (settings(site).public_key_file if site is not None else None)
    if path is None:
        raise BadInput(
            "which key signs the bundle?", hint="pass --public-key FILE or --site SITE (bundle.public_key_file)"
        )
    try:
        return load_public_key(path)
    except LicenseError as exc:
        raise BadInput(exc.message) from None
