"""The bundle signing key: an Ed25519 private key kept in Vault, and the public key file that verifies it."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance import signing_keys
from appliance.errors import BadInput
from appliance.site import BundleSigning, Site


def settings(site: Site) -> BundleSigning:
    if site.bundle is None:
        raise BadInput(
            f"site {site.site.name} has no `bundle:` section",
            hint="add bundle: {public_key_file: ...} (see examples/rack.yaml)",
        )
    return site.bundle


def keygen(site: Site, state_dir: Path | None, *, force: bool = False) -> str:
    """A new signing key into Vault and its public key to the site's public_key_file; returns the key id."""
    return signing_keys.keygen(site, settings(site), state_dir, what="bundle", force=force)


def signing_key(site: Site, state_dir: Path | None) -> Ed25519PrivateKey:
    """The private key, read from Vault for the moment of signing (never written to disk)."""
    hint = f"create it once with `appliance bundle keygen --site {site.site.name}`"
    return signing_keys.signing_key(site, settings(site), state_dir, what="bundle", keygen_hint=hint)


def trusted_key(site: Site | None, public_key_file: Path | None) -> Ed25519PublicKey:
    """The key a bundle must be signed with: --public-key, else the site's bundle.public_key_file."""
    path = public_key_file or (settings(site).public_key_file if site is not None else None)
    if path is None:
        raise BadInput(
            "which key signs the bundle?", hint="pass --public-key FILE or --site SITE (bundle.public_key_file)"
        )
    return signing_keys.load_trusted(path)
