"""EdgeImageProvider on real images: a signed image already at the hashed directory is adopted (an `up` interrupted
after the build), and one that is not this site's signed image is refused and kept. The image is the synthetic
one of test_edge_image.py (real mke2fs, cryptsetup, sfdisk, bmaptool; a stand-in kernel). A real build through
`create`, then `update` after a profile change, is the `slow` tier (tens of minutes)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ruamel.yaml import YAML

from appliance import __version__, signing_keys
from appliance.errors import CheckFailed
from appliance.iac.edge_image import CHECKOUT, edge_image_hash, image_dir
from appliance.site import Site, load_site
from edge_image.build import BuildSpec, assemble
from edge_image.manifest import ImageManifest
from edge_image.verify import verify
from runtime.common.signed_manifest import MANIFEST, SIGNATURE, sign
from stacks.components.edge_image import EdgeImageProvider
from tests.conftest import lab_site_data, write_site
from tests.image.test_edge_image import _trees

pytestmark = pytest.mark.image

MIB = 1 << 20
PROFILE = "engineering-laptop"


class Lab:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.site_file = write_site(base / "site.yaml", lab_site_data(base / "state"))
        self.site: Site = load_site(self.site_file)
        assert self.site.edge is not None
        self.key = Ed25519PrivateKey.generate()
        signing_keys.write_public(self.key, self.site.edge.signing.public_key_file)
        self.content_hash = edge_image_hash(self.site, PROFILE, workdir=CHECKOUT)

    def props(self, output_root: Path) -> dict[str, Any]:
        return {
            "site_file": str(self.site_file),
            "workdir": str(CHECKOUT),
            "profile": PROFILE,
            "output_root": str(output_root),
            "state_dir": str(self.base / "state"),
            "content_hash": self.content_hash,
            "__provider": "pickled provider",
        }


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return Lab(tmp_path_factory.mktemp("edge-stack"))


@pytest.fixture(scope="module")
def built(lab: Lab) -> tuple[Path, ImageManifest]:
    """The synthetic image, signed with the site's key, where `create` looks for it."""
    target = image_dir(lab.base / "images", PROFILE, lab.content_hash)
    spec = BuildSpec(site=lab.site.site.name, profile=PROFILE, version=__version__, root_size=128 * MIB,
                     esp_size=64 * MIB)  # fmt: skip
    root, esp_tree = _trees(lab.base / "trees")
    manifest = assemble(spec, root, esp_tree, target, signer=lambda data: sign(data, lab.key))
    return target, manifest


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_create_adopts_the_signed_image(lab: Lab, built: tuple[Path, ImageManifest]) -> None:
    target, manifest = built
    before = _listing(target)
    props = lab.props(lab.base / "images")
    provider = EdgeImageProvider()
    assert provider.check({}, props).failures == []
    created = provider.create(props)
    assert created.id == f"{lab.site.site.name}/{PROFILE}"
    outs = created.outs
    assert outs is not None
    assert outs["sha256"] == manifest.files[manifest.image].sha256
    assert outs["manifest_sha256"] == hashlib.sha256((target / MANIFEST).read_bytes()).hexdigest()
    assert outs["image_path"] == str(target / manifest.image)
    assert (outs["version"], outs["built_at"]) == (__version__, manifest.created_at.isoformat())
    assert outs["build_seconds"] is None  # adopted: another run built it
    assert {k: outs[k] for k in props if k != "__provider"} == {k: v for k, v in props.items() if k != "__provider"}
    assert "__provider" not in outs
    assert sorted(p.name for p in (lab.base / "images").iterdir()) == [target.name]  # nothing else built
    assert _listing(target) == before  # adopted as it was
    # The next `up`: no diff, and an update adopts the same image again.
    assert provider.diff(created.id, {**outs, "__provider": "x"}, props).changes is False
    updated = provider.update(created.id, outs, props)
    assert updated.outs == outs


def _copy(source: Path, lab: Lab, name: str) -> tuple[Path, dict[str, Any]]:
    """The built image copied (sparse) to the hashed directory of another output root, free to tamper with."""
    props = lab.props(lab.base / name)
    target = image_dir(Path(props["output_root"]), PROFILE, lab.content_hash)
    target.parent.mkdir()
    subprocess.run(["cp", "-r", "--sparse=always", str(source), str(target)], check=True)
    return target, props


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _resign(target: Path, key: Ed25519PrivateKey, **changes: Any) -> None:
    manifest = ImageManifest.model_validate_json((target / MANIFEST).read_bytes()).model_copy(update=changes)
    data = manifest.to_bytes()
    (target / MANIFEST).write_bytes(data)
    (target / SIGNATURE).write_bytes(sign(data, key))


def _tamper_manifest(target: Path, lab: Lab, manifest: ImageManifest) -> None:
    text = (target / MANIFEST).read_text()
    (target / MANIFEST).write_text(text.replace(manifest.root.sha256, "0" * 64))


def _other_key(target: Path, lab: Lab, manifest: ImageManifest) -> None:
    _resign(target, Ed25519PrivateKey.generate())


def _other_version(target: Path, lab: Lab, manifest: ImageManifest) -> None:
    _resign(target, lab.key, appliance_version="0.0.0-older")


def _changed_image(target: Path, lab: Lab, manifest: ImageManifest) -> None:
    image = target / manifest.image
    start = manifest.layout.partitions[0].start
    with image.open("r+b") as handle:  # inside the ESP's written blocks: same size, other bytes
        handle.seek(start + 4096)
        byte = handle.read(1)
        handle.seek(start + 4096)
        handle.write(bytes([byte[0] ^ 0x01]))


TAMPERING = {
    "manifest edited": (_tamper_manifest, "cannot be adopted"),
    "signed by another key": (_other_key, "cannot be adopted"),
    "another version, re-signed": (_other_version, "0.0.0-older"),
    "image file changed": (_changed_image, "not as signed"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_an_image_that_is_not_ours_is_refused_and_kept(lab: Lab, built: tuple[Path, ImageManifest], case: str) -> None:
    tamper, message = TAMPERING[case]
    target, props = _copy(built[0], lab, case.replace(" ", "-").replace(",", ""))
    tamper(target, lab, built[1])
    before = _listing(target)
    with pytest.raises(CheckFailed) as caught:
        EdgeImageProvider().create(props)
    assert message in str(caught.value) and f"move {target} away" in str(caught.value)
    assert _listing(target) == before  # kept as it was: evidence, never rebuilt over
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # and no build was started


@pytest.fixture
def vault_lab(tmp_path: Path) -> Iterator[Path]:
    """A lab site with its OpenBao bootstrapped and an image signing key in it (the build reads Vault)."""
    from tests.conftest import appliance_cli
    from tests.integration.vault_support import bootstrapped_vault

    with bootstrapped_vault(tmp_path / "lab"):
        site = tmp_path / "lab" / "site.yaml"
        keygen = appliance_cli("edge", "keygen", "--site", str(site))
        assert keygen.returncode == 0, keygen.stdout + keygen.stderr
        yield site


@pytest.mark.slow
def test_create_builds_then_update_rebuilds_after_a_profile_change(vault_lab: Path, tmp_path: Path) -> None:
    provider = EdgeImageProvider()
    props: dict[str, Any] = {
        "site_file": str(vault_lab),
        "workdir": str(CHECKOUT),
        "profile": PROFILE,
        "output_root": str(tmp_path / "images"),
        "state_dir": str(vault_lab.parent / "state"),
        "content_hash": edge_image_hash(load_site(vault_lab), PROFILE, workdir=CHECKOUT),
    }
    created = provider.create(props)
    first = created.outs
    assert first is not None and isinstance(first["build_seconds"], float)
    public = signing_keys.load_trusted(load_site(vault_lab).edge.signing.public_key_file)  # type: ignore[union-attr]
    _, checks = verify(Path(first["image_path"]), public)
    assert [c.name for c in checks if not c.ok] == []

    data = YAML(typ="safe").load(vault_lab.read_text())
    next(p for p in data["edge_profiles"] if p["name"] == PROFILE)["routing"]["theta"] = 0.4
    write_site(vault_lab, data)
    news = {**props, "content_hash": edge_image_hash(load_site(vault_lab), PROFILE, workdir=CHECKOUT)}
    assert provider.diff(created.id, first, news).changes
    second = provider.update(created.id, first, news).outs
    assert second is not None
    assert second["sha256"] != first["sha256"]
    assert Path(second["image_path"]).parent != Path(first["image_path"]).parent
    assert os.path.exists(first["image_path"])  # the old image is kept
