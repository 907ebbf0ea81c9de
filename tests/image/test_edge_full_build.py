"""The lab profile's real image, built through the CLI against the lab's OpenBao, then verified (`make test-slow`).

Cold (no cached rootfs, no portable llama.cpp wheel) this takes tens of minutes on 2 cores; it is the `slow` tier.
The boot tier boots what this builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.bundle import sbom
from edge_image import boot, chroot, disk, esp, rootfs
from edge_image.manifest import ImageManifest
from edge_image.spec import BASE_PACKAGES
from tests.conftest import appliance_cli as _cli

pytestmark = [pytest.mark.image, pytest.mark.slow]


@pytest.fixture(scope="module")
def built(lab_edge_image: tuple[Path, Path, ImageManifest]) -> tuple[Path, Path, ImageManifest]:
    """The session's lab-profile build (tests/conftest.py), which the boot tier boots as well."""
    return lab_edge_image


def test_the_image_verifies(built: tuple[Path, Path, ImageManifest]) -> None:
    site, out, _ = built
    result = _cli("edge", "verify", str(out), "--site", str(site), "--fsck")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact" in result.stdout and "e2fsck clean" in result.stdout


def test_manifest_lists_what_the_image_holds(built: tuple[Path, Path, ImageManifest]) -> None:
    _, out, manifest = built
    packages = {p.name for p in manifest.packages}
    assert {"systemd", "systemd-boot", "dracut", "cryptsetup-bin", "python3", "nftables"} <= packages
    assert any(name.startswith("linux-image-") for name in packages)
    wheels = {w.name for w in manifest.wheels}
    assert {"membria-appliance", "llama-cpp-python", "torch", "sentence-transformers", "sqlite-vec"} <= wheels
    assert "ansible-core" not in wheels and "boto3" not in wheels  # the control plane stays off the laptop
    assert len(manifest.models) == 1
    assert manifest.models[0].path.startswith("/var/lib/membria/models/") and manifest.models[0].path.endswith(".gguf")
    document = (out / "sbom.cdx.json").read_text()
    sbom.validate(document)
    kinds = {
        p["value"] for c in json.loads(document)["components"] for p in c["properties"] if p["name"].endswith("kind")
    }
    assert kinds == {"deb", "wheel", "model"}


def test_listing_and_identity(built: tuple[Path, Path, ImageManifest]) -> None:
    _, out, _ = built
    lines = (out / "rootfs.sha256sums").read_text().splitlines()
    paths = {line.split("  ")[-1] for line in lines}
    assert "/opt/membria/runtime/bin/python3" in paths or any(p.startswith("/opt/membria/runtime/") for p in paths)
    assert "/etc/membria/edge-profile.json" in paths and "/etc/systemd/system/membria-edge-agent.service" in paths
    assert not any(p.startswith("/etc/ssh/ssh_host_") for p in paths)  # every laptop makes its own
    machine_id = next(line for line in lines if line.endswith("  /etc/machine-id"))
    assert machine_id.split("  ")[1] == "0"  # empty: systemd makes one per laptop at first boot
    assert not any(p.startswith("/var/cache/apt/archives/") and p.endswith(".deb") for p in paths)


def test_the_initrd_can_unlock_with_the_tpm(built: tuple[Path, Path, ImageManifest], tmp_path: Path) -> None:
    """Read back from the image's ESP (not from the build's tree) and listed by the rootfs's own lsinitrd."""
    _, out, manifest = built
    image = out / manifest.image
    offset = manifest.layout.partition(disk.ESP_NAME).start
    entry = esp.read_file(image, offset, "loader/entries/firstboot-membria.conf").decode()
    assert f"rd.luks.name={manifest.luks.uuid}=root" in entry
    initrd_path = next(line.split()[1] for line in entry.splitlines() if line.startswith("initrd "))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(esp.read_file(image, offset, initrd_path.lstrip("/")))
    tree = tmp_path / "root"
    rootfs.unpack(rootfs.rootfs_tar(sorted(BASE_PACKAGES)), tree)
    with chroot.prepared(tree):
        assert boot.check_initrd(tree, initrd) == []
