"""The edge image signing key: Ed25519 in Vault (`edge.signing` in the site file), its public key file verifies."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance import signing_keys
from appliance.errors import BadInput
from appliance.site import EdgeImageSigning, Site


def settings(site: Site) -> EdgeImageSigning:
    if site.edge is None:
        raise BadInput(
            f"site {site.site.name} has no `edge:` section",
            hint="add edge: {signing: {public_key_file: ...}} (see examples/rack.yaml)",
        )
    return site.edge.signing


def keygen(site: Site, state_dir: Path | None, *, force: bool = False) -> str:
    return signing_keys.keygen(site, settings(site), state_dir, what="edge image", force=force)


def signing_key(site: Site, state_dir: Path | None) -> Ed25519PrivateKey:
    hint = f"create it once with `appliance edge keygen --site {site.site.name}`"
    return signing_keys.signing_key(site, settings(site), state_dir, what="edge image", keygen_hint=hint)


def trusted_key(site: Site | None, public_key_file: Path | None) -> Ed25519PublicKey:
    """--public-key, else the site's edge.signing.public_key_file."""
    path = public_key_file or (settings(site).public_key_file if site is not None else None)
    if path is None:
        raise BadInput(
            "which key signs the image?", hint="pass --public-key FILE or --site SITE (edge.signing.public_key_file)"
        )
    return signing_keys.load_trusted(path)
