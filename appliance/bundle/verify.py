"""`bundle verify`: the signature, every file's size and sha256, nothing extra, and completeness for the site.

Checks run cheapest first, and the first failure ends the run naming the file (exit 1): a missing or
resized file is reported before any hashing, a changed byte after hashing reaches it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from appliance import __version__
from appliance.bundle.manifest import Manifest, check_signature, hash_file, walk
from appliance.bundle.needs import DISTRIBUTION, site_needs
from appliance.errors import BadInput, CheckFailed
from appliance.site import Site

SITE_COPY = "site.yaml"


def _requirement(item: str) -> tuple[str, str | None]:
    """(canonical name, pinned version or None) of a need's item: a requirement string or the distribution."""
    requirement = Requirement(item)
    pins = [spec.version for spec in requirement.specifier if spec.operator == "=="]
    return canonicalize_name(requirement.name), pins[0] if pins else None


def check_files(bundle: Path, manifest: Manifest, on_bytes: Callable[[int], None] | None = None) -> None:
    for rel, entry in sorted(manifest.files.items()):
        path = bundle / rel
        if not path.is_file():
            raise CheckFailed(f"{rel}: missing from the bundle")
        if path.stat().st_size != entry.size:
            raise CheckFailed(f"{rel}: {path.stat().st_size} bytes, the manifest says {entry.size}")
    extra = [str(rel) for rel in walk(bundle) if str(rel) not in manifest.files]
    if extra:
        raise CheckFailed(f"{extra[0]}: not in the manifest (added after signing)")
    for rel, entry in sorted(manifest.files.items()):
        if hash_file(bundle / rel, on_bytes).sha256 != entry.sha256:
            raise CheckFailed(f"{rel}: sha256 differs from the manifest (the file was changed)")


def check_complete(manifest: Manifest, site: Site) -> None:
    """Everything the site's roles install is in the bundle, built for this site and this appliance."""
    if manifest.site != site.site.name:
        raise CheckFailed(f"the bundle was built for site {manifest.site}, not {site.site.name}")
    if manifest.appliance_version != __version__:
        raise CheckFailed(
            f"the bundle carries appliance {manifest.appliance_version}; this is appliance {__version__}",
            hint="build the bundle with the same appliance release that applies it",
        )
    records = {n.group: n for n in manifest.needs}
    debs = {d.name for d in manifest.debs}
    wheels = {w.name: w.version for w in manifest.wheels}
    for need in site_needs(site):
        record = records.get(need.group)
        if record is None or not record.included:
            raise CheckFailed(
                f"incomplete: {need.group} ({need.why}) is not in the bundle", hint="rebuild without --skip"
            )
        for item in need.items:
            if need.kind == "apt" and item not in debs:
                raise CheckFailed(f"incomplete: Debian package {item} ({need.group}) is not in the bundle")
            if need.kind == "wheels":
                name, pinned = _requirement(item)
                if name not in wheels:
                    raise CheckFailed(f"incomplete: Python package {name} ({need.group}) is not in the bundle")
                if name == DISTRIBUTION:
                    pinned = __version__
                if pinned and wheels[name] != pinned:
                    raise CheckFailed(f"{name}: the bundle has {wheels[name]}, the site needs {pinned}")


def verify(
    bundle: Path, public_key: Ed25519PublicKey, site: Site | None, on_bytes: Callable[[int], None] | None = None
) -> Manifest:
    """The verified manifest. `site` None: checked against the site file signed into the bundle."""
    if not bundle.is_dir():
        raise BadInput(f"{bundle}: not a bundle directory", hint="parts from removable media: `appliance bundle join`")
    manifest = check_signature(bundle, public_key)
    check_files(bundle, manifest, on_bytes)
    if site is None:
        from appliance.site import load_site

        site = load_site(bundle / SITE_COPY)
    check_complete(manifest, site)
    return manifest
