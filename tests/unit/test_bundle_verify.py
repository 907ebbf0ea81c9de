"""`bundle verify` on small signed bundles made here: each check passes on a good bundle and fails on its bad case.

The real build (apt closure, wheels, SBOM) is exercised by the hosts tier (tests/hosts/test_core_apply.py's
bundle variant); these cases cover every way verification must refuse, quickly.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import __version__
from appliance.bundle.manifest import (
    MANIFEST,
    SIGNATURE,
    DebRecord,
    Manifest,
    NeedRecord,
    WheelRecord,
    hash_file,
    sign,
    walk,
)
from appliance.bundle.needs import DISTRIBUTION, site_needs
from appliance.bundle.verify import SITE_COPY, verify
from appliance.errors import BadInput, CheckFailed
from appliance.site import Site, load_site

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _wheel_name(requirement: str) -> tuple[str, str]:
    name = requirement.split("[", 1)[0].split("==", 1)[0]
    version = requirement.split("==", 1)[1] if "==" in requirement else __version__
    return name, version


def make_bundle(root: Path, site: Site, key: Ed25519PrivateKey, *, leave_out: str | None = None) -> Path:
    """A bundle tree with one small file per package the site needs, signed like a real one."""
    bundle = root / "bundle"
    (bundle / "debs").mkdir(parents=True)
    (bundle / "wheels").mkdir()
    shutil.copyfile(REPO / "examples" / "lab.yaml", bundle / SITE_COPY)
    debs, wheels, needs = [], [], []
    for need in site_needs(site):
        included = need.group != leave_out
        needs.append(
            NeedRecord(group=need.group, kind=need.kind, items=list(need.items), why=need.why, included=included)
        )
        if not included:
            continue
        for item in need.items:
            if need.kind == "apt":
                file = f"debs/{item}_1.0_amd64.deb"
                debs.append(DebRecord(name=item, version="1.0", arch="amd64", file=file, group=need.group))
            else:
                name, version = _wheel_name(item)
                file = f"wheels/{name.replace('-', '_')}-{version}-py3-none-any.whl"
                wheels.append(WheelRecord(name=name, version=version, file=file, group=need.group))
            (bundle / file).write_bytes(f"contents of {file}".encode())
    (bundle / "debs" / "Packages").write_text("Package: x\n")
    files = {str(rel): hash_file(bundle / rel) for rel in walk(bundle)}
    manifest = Manifest(
        site=site.site.name,
        site_file="examples/lab.yaml",
        appliance_version=__version__,
        created_at=datetime.now(UTC),
        debian_suite="bookworm",
        needs=needs,
        debs=debs,
        wheels=wheels,
        models=[],
        files=files,
    )
    data = manifest.to_bytes()
    (bundle / MANIFEST).write_bytes(data)
    (bundle / SIGNATURE).write_bytes(sign(data, key))
    return bundle


@pytest.fixture
def site() -> Site:
    return load_site(REPO / "examples" / "lab.yaml")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_a_good_bundle_verifies(tmp_path: Path, site: Site, key: Ed25519PrivateKey) -> None:
    bundle = make_bundle(tmp_path, site, key)
    manifest = verify(bundle, key.public_key(), site)
    assert manifest.site == site.site.name
    assert {d.name for d in manifest.debs} >= {"openssh-server", "nftables", "python3-venv"}
    assert DISTRIBUTION in {w.name for w in manifest.wheels}
    # without a site, against the copy signed into the bundle
    assert verify(bundle, key.public_key(), None).site == site.site.name


def test_a_tampered_file_is_named(tmp_path: Path, site: Site, key: Ed25519PrivateKey) -> None:
    bundle = make_bundle(tmp_path, site, key)
    target = bundle / "debs" / "openssh-server_1.0_amd64.deb"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01  # same size, one bit changed
    target.write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match=r"debs/openssh-server_1\.0_amd64\.deb: sha256 differs"):
        verify(bundle, key.public_key(), site)


def test_a_missing_file_is_named(tmp_path: Path, site: Site, key: Ed25519PrivateKey) -> None:
    bundle = make_bundle(tmp_path, site, key)
    (bundle / "debs" / "nftables_1.0_amd64.deb").unlink()
    with pytest.raises(CheckFailed, match=r"debs/nftables_1\.0_amd64\.deb: missing"):
        verify(bundle, key.public_key(), site)


def test_an_added_file_is_refused(tmp_path: Path, site: Site, key: Ed25519PrivateKey) -> None:
    bundle = make_bundle(tmp_path, site, key)
    (bundle / "debs" / "evil_1.0_amd64.deb").write_bytes(b"not signed")
    with pytest.raises(CheckFailed, match=r"debs/evil_1\.0_amd64\.deb: not in the manifest"):
        verify(bundle, key.public_key(), site)


def test_a_changed_manifest_breaks_the_signature(tmp_path: Path, site: Site, key: Ed25519PrivateKey) -> None:
    bundle = make_bundle(tmp_path, site, key)
    text = (bundle / MANIFEST).read_text()
    (bundle / MANIFEST).write_text(text.replace('"version": "1.0"', '"version": "1.1"', 1))
    with pytest.raises(CheckFailed, match="signature does not match"):
        verify(bundle, key.public_key(), site)


def test_another_key_is_refused(tmp_path: Path, site: Site, key: Ed25519PrivateKey) -> None:
    bundle = make_bundle(tmp_path, site, key)
    with pytest.raises(CheckFailed, match="trusted key is"):
        verify(bundle, Ed25519PrivateKey.generate().public_key(), site)


def test_a_skipped_part_is_incomplete(tmp_path: Path, site: Site, key: Ed25519PrivateKey) -> None:
    bundle = make_bundle(tmp_path, site, key, leave_out="runtime")
    with pytest.raises(CheckFailed, match="incomplete: runtime"):
        verify(bundle, key.public_key(), site)


def test_another_sites_bundle_is_refused(tmp_path: Path, site: Site, key: Ed25519PrivateKey) -> None:
    bundle = make_bundle(tmp_path, site, key)
    other = site.model_copy(update={"site": site.site.model_copy(update={"name": "other-plant"})})
    with pytest.raises(CheckFailed, match="built for site lab, not other-plant"):
        verify(bundle, key.public_key(), other)


def test_not_a_directory_is_bad_input(tmp_path: Path, site: Site, key: Ed25519PrivateKey) -> None:
    with pytest.raises(BadInput):
        verify(tmp_path / "nothing", key.public_key(), site)


def test_a_rack_needs_nvidia_and_vllm_and_the_lab_does_not(site: Site) -> None:
    rack = load_site(REPO / "examples" / "rack.yaml")
    rack_groups = {n.group for n in site_needs(rack)}
    assert {"debian", "runtime", "nvidia-cuda", "vllm"} <= rack_groups
    assert {n.group for n in site_needs(site)} == {"debian", "runtime"}
    lab_runtime = next(n for n in site_needs(site) if n.group == "runtime")
    assert any(item.startswith("llama-cpp-python") for item in lab_runtime.items)
    rack_runtime = next(n for n in site_needs(rack) if n.group == "runtime")
    assert not any(item.startswith(("llama-cpp-python", "chdb", "milvus-lite")) for item in rack_runtime.items)
