"""The audit report signing key: Ed25519 in Vault (`audit.signing` in the site file), its public key file verifies.

Its own key, not the bundle's or the images': whoever checks reports gets this public key and nothing else.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance import signing_keys
from appliance.errors import BadInput
from appliance.site import AuditReportSigning, Site

WHAT = "audit report"


def settings(site: Site) -> AuditReportSigning:
    if site.audit is None:
        raise BadInput(
            f"site {site.site.name} has no `audit:` section",
            hint="add audit: {signing: {public_key_file: ...}} (see examples/rack.yaml)",
        )
    return site.audit.signing


def keygen(site: Site, state_dir: Path | None, *, force: bool = False) -> str:
    """A new signing key into Vault and its public key to audit.signing.public_key_file; returns the key id."""
    return signing_keys.keygen(site, settings(site), state_dir, what=WHAT, force=force)


def signing_key(site: Site, state_dir: Path | None) -> Ed25519PrivateKey:
    """The private key, read from Vault for the moment of signing (never written to disk)."""
    hint = f"create it once with `appliance audit keygen SITE` (SITE: the site file of {site.site.name})"
    return signing_keys.signing_key(site, settings(site), state_dir, what=WHAT, keygen_hint=hint)


def trusted_key(site: Site | None, public_key_file: Path | None) -> Ed25519PublicKey:
    """The key a report must be signed with: --public-key, else the site's audit.signing.public_key_file."""
    path = public_key_file or (settings(site).public_key_file if site is not None else None)
    if path is None:
        raise BadInput(
            "which key signs the report?",
            hint="pass --public-key FILE or --site SITE (audit.signing.public_key_file)",
        )
    return signing_keys.load_trusted(path)
