"""The offline image pipeline end to end on a synthetic tree: assemble, sign, verify, tamper, flash, erase.

The root and ESP trees are synthetic (a few files, a stand-in kernel and initrd: nothing boots them here; the
real rootfs and boot chain come from `appliance edge build`). Everything else is real: mke2fs, cryptsetup,
mtools, sfdisk, bmaptool, the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_image import disk, esp, luks
from edge_image.build import BuildSpec, assemble
from edge_image.errors import ImageBadInput
from edge_image.manifest import ImageManifest
from edge_image.verify import verify
from runtime.common.signed_manifest import MANIFEST, sign
from tests.image.test_edge_flash import enrollment_file, mtools_read

pytestmark = pytest.mark.image

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
APPLIANCE = str(REPO / ".venv" / "bin" / "appliance")
SPEC = BuildSpec(site="lab", profile="engineering-laptop", version="0.0.0-test", root_size=128 * MIB, esp_size=64 * MIB)


def _trees(base: Path) -> tuple[Path, Path]:
    root, esp_tree = base / "root", base / "esp"
    (root / "etc" / "membria").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("membria-edge\n")
    (root / "etc" / "membria" / "edge-profile.json").write_text('{"profile": "engineering-laptop"}\n')
    (root / "usr" / "bin" / "blob").write_bytes(os.urandom(3 * MIB + 123))
    (root / "usr" / "bin" / "blob").chmod(0o755)
    (root / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    esp_tree.mkdir()
    (esp_tree / "vmlinuz").write_bytes(b"synthetic kernel: nothing boots it in this tier\n" * 1000)
    (esp_tree / "initrd.img").write_bytes(os.urandom(256 * 1024))
    return root, esp_tree


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> tuple[Path, ImageManifest]:
    base = tmp_path_factory.mktemp("edge-build")
    root, esp_tree = _trees(base)
    out = base / "out"
    manifest = assemble(SPEC, root, esp_tree, out, signer=lambda data: sign(data, signing_key))
    return out, manifest


@pytest.fixture
def copy(built: tuple[Path, ImageManifest], tmp_path: Path) -> Iterator[Path]:
    """A sparse copy of the built image directory, free to tamper with."""
    target = tmp_path / "copy"
    subprocess.run(["cp", "-r", "--sparse=always", str(built[0]), str(target)], check=True)
    yield target


def _failed(directory: Path, key: Ed25519PrivateKey, **kwargs: object) -> dict[str, str]:
    _, checks = verify(directory, key.public_key(), **kwargs)  # type: ignore[arg-type]
    return {c.name: c.detail for c in checks if not c.ok}


def test_build_outputs_and_layout(built: tuple[Path, ImageManifest]) -> None:
    out, manifest = built
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([manifest.image, manifest.bmap, "manifest.json", "manifest.sig"])
    assert not list(out.parent.glob(".out.partial-*"))
    image = out / manifest.image
    # sparse: only the filesystem's used blocks, the ESP and the headers take space
    assert image.stat().st_blocks * 512 < 40 * MIB < image.stat().st_size
    assert [p.name for p in manifest.layout.partitions] == [disk.ESP_NAME, disk.ROOT_NAME]
    assert manifest.layout.partition(disk.ROOT_NAME).type_guid == disk.ROOT_TYPE
    assert manifest.luks.cipher == "aes-xts-plain64" and manifest.luks.key_bits == 512
    assert manifest.luks.pbkdf == "argon2id"
    assert "membria/bootstrap.cpio" in manifest.esp and "loader/loader.conf" in manifest.esp


def test_verify_passes_on_the_built_image(built: tuple[Path, ImageManifest], signing_key: Ed25519PrivateKey) -> None:
    out, manifest = built
    found, checks = verify(out / manifest.image, signing_key.public_key(), fsck=True)
    assert found == manifest
    assert [c.name for c in checks if not c.ok] == []
    assert {c.name for c in checks} == {
        "signature", "files", "block map", "partition table", "EFI system partition", "LUKS2 header", "root filesystem"
    }  # fmt: skip
    assert "e2fsck clean" in next(c.detail for c in checks if c.name == "root filesystem")


def test_header_and_keys_as_promised(built: tuple[Path, ImageManifest], tmp_path: Path) -> None:
    """The header in the image: one argon2id slot opened by the ESP's bootstrap key, which is not the volume key."""
    out, manifest = built
    image = out / manifest.image
    root = manifest.layout.partition(disk.ROOT_NAME)
    header = tmp_path / "hdr"
    with image.open("rb") as src:
        src.seek(root.start)
        header.write_bytes(src.read(manifest.luks.data_offset))
    parsed = luks.read_header(header)
    assert list(parsed.keyslots) == ["0"] and parsed.keyslots["0"].kdf.type == "argon2id"
    assert parsed.uuid == manifest.luks.uuid
    key = esp.cpio_member(esp.read_file(image, manifest.layout.partition(disk.ESP_NAME).start,
                                        "membria/bootstrap.cpio"), esp.BOOTSTRAP_KEY_PATH)  # fmt: skip
    assert len(key) == 32 and luks.opens(header, key) and not luks.opens(header, os.urandom(32))
    assert key not in manifest.to_bytes() and key.hex() not in manifest.to_bytes().decode()


def test_a_changed_ciphertext_byte_fails(
    copy: Path, built: tuple[Path, ImageManifest], signing_key: Ed25519PrivateKey
) -> None:
    manifest = built[1]
    image = copy / manifest.image
    root = manifest.layout.partition(disk.ROOT_NAME)
    first = next(o for o, _ in disk.data_ranges(image, root.start + manifest.luks.data_offset, root.start + root.size))
    with image.open("r+b") as handle:
        handle.seek(first + 4096 * 3 + 17)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    failed = _failed(copy, signing_key)
    assert set(failed) == {"files", "root filesystem"}
    assert "sha256 differs" in failed["files"] and "ciphertext changed" in failed["root filesystem"]


def test_a_changed_header_byte_fails(
    copy: Path, built: tuple[Path, ImageManifest], signing_key: Ed25519PrivateKey
) -> None:
    manifest = built[1]
    image = copy / manifest.image
    with image.open("r+b") as handle:
        handle.seek(manifest.layout.partition(disk.ROOT_NAME).start + 0x1000 + 10)  # inside the JSON area
        handle.write(b"#")
    failed = _failed(copy, signing_key)
    assert "files" in failed and "LUKS2 header" in failed


def test_a_changed_manifest_byte_fails_the_signature(copy: Path, signing_key: Ed25519PrivateKey) -> None:
    data = (copy / MANIFEST).read_bytes()
    (copy / MANIFEST).write_bytes(data.replace(b'"profile": "engineering-laptop"', b'"profile": "engineering-laptoq"'))
    failed = _failed(copy, signing_key)
    assert list(failed) == ["signature"] and "signature does not match" in failed["signature"]


def test_another_key_and_a_wrong_bootstrap_key_fail(
    built: tuple[Path, ImageManifest], signing_key: Ed25519PrivateKey
) -> None:
    out = built[0]
    assert list(_failed(out, Ed25519PrivateKey.generate())) == ["signature"]
    failed = _failed(out, signing_key, bootstrap_key=os.urandom(32))
    assert list(failed) == ["root filesystem"] and "opens no" in failed["root filesystem"].lower()


def test_a_changed_esp_file_and_an_extra_file_fail(
    copy: Path, built: tuple[Path, ImageManifest], signing_key: Ed25519PrivateKey
) -> None:
    manifest = built[1]
    image = copy / manifest.image
    offset = manifest.layout.partition(disk.ESP_NAME).start
    conf = esp.read_file(image, offset, "loader/loader.conf").replace(b"editor no", b"editor yes")
    esp.write_file(image, offset, "loader/loader.conf", conf)
    (copy / "notes.txt").write_text("left by someone\n")
    failed = _failed(copy, signing_key)
    assert "notes.txt: not in the manifest" in failed["files"]
    assert "loader/loader.conf: changed" in failed["EFI system partition"]
    assert "editor no" in failed["EFI system partition"]


def test_cli_exit_codes(
    copy: Path, built: tuple[Path, ImageManifest], signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    pub = tmp_path / "image-signing.pub"
    pub.write_bytes(
        signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    ok = subprocess.run(
        [APPLIANCE, "edge", "verify", str(copy), "--public-key", str(pub)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact" in ok.stdout
    (copy / built[1].bmap).write_text("not a block map")
    bad = subprocess.run(
        [APPLIANCE, "edge", "verify", str(copy), "--public-key", str(pub)], capture_output=True, text=True
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAILED" in bad.stdout and "Traceback" not in bad.stderr
    missing = subprocess.run([APPLIANCE, "edge", "verify", str(tmp_path / "nope"), "--public-key", str(pub)],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "no such image" in missing.stderr


def test_cli_flash_to_a_file_then_erase(
    built: tuple[Path, ImageManifest], signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    out, manifest = built
    pub = tmp_path / "image-signing.pub"
    pub.write_bytes(
        signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    target = tmp_path / "laptop-disk.raw"
    target.write_bytes(b"old data " * 100_000)
    refused = subprocess.run([APPLIANCE, "edge", "flash", str(out), str(target), "--public-key", str(pub)],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert target.read_bytes().startswith(b"old data ")
    done = subprocess.run([APPLIANCE, "edge", "flash", str(out), str(target), "--public-key", str(pub), "--yes"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MB/s" in done.stdout and "read back" in done.stdout
    assert disk.read_table(target) == manifest.layout
    # the wipe path: luksErase destroys every keyslot, so the bootstrap key opens nothing any more
    root = manifest.layout.partition(disk.ROOT_NAME)
    part = tmp_path / "root.part"
    with target.open("rb") as src:
        src.seek(root.start)
        part.write_bytes(src.read(manifest.luks.data_offset))
    key = esp.cpio_member(esp.read_file(target, manifest.layout.partition(disk.ESP_NAME).start,
                                        "membria/bootstrap.cpio"), esp.BOOTSTRAP_KEY_PATH)  # fmt: skip
    assert luks.opens(part, key)
    subprocess.run(["cryptsetup", "luksErase", "--batch-mode", str(part)], check=True, capture_output=True)
    assert luks.read_header(part).keyslots == {} and not luks.opens(part, key)


def test_cli_flash_with_an_enrollment_file(
    built: tuple[Path, ImageManifest], signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Refused files (exit 2: expired, another site's, not JSON) leave the target as it was, image included; a good
    one lands in the ESP, byte for byte. The token is never printed."""
    out, manifest = built
    pub = tmp_path / "image-signing.pub"
    pub.write_bytes(
        signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    target = tmp_path / "laptop-disk.raw"
    target.write_bytes(b"old data " * 100_000)
    before = target.read_bytes()

    def flash(enrollment: Path) -> subprocess.CompletedProcess[str]:
        argv = [APPLIANCE, "edge", "flash", str(out), str(target), "--public-key", str(pub), "--yes"]
        return subprocess.run([*argv, "--enrollment", str(enrollment)], capture_output=True, text=True)

    garbled = tmp_path / "garbled.json"
    garbled.write_text('{"format": 1, "token": "s.half-a-file')
    refusals = {
        "expired at": enrollment_file(tmp_path / "expired.json", expires_at="2020-01-01T00:00:00Z"),
        "is for site 'other', the image for 'lab'": enrollment_file(tmp_path / "site.json", site="other"),
        "not JSON": garbled,
    }  # each field's own refusal: tests/unit/test_edge_enrollment_file.py
    for why, path in refusals.items():
        refused = flash(path)
        assert refused.returncode == 2, (why, refused.stdout + refused.stderr)
        assert why in " ".join((refused.stdout + refused.stderr).split()), refused.stdout + refused.stderr
        assert "Traceback" not in refused.stderr and "s.test-" not in refused.stdout + refused.stderr
        assert "s.half-a-file" not in refused.stdout + refused.stderr
        assert target.read_bytes() == before

    good = enrollment_file(tmp_path / "enroll.json")
    token = json.loads(good.read_text())["token"]
    done = flash(good)
    assert done.returncode == 0, done.stdout + done.stderr
    assert token not in done.stdout + done.stderr
    assert "lt-0042" in done.stdout and "membria/enroll.json" in done.stdout
    assert disk.read_table(target) == manifest.layout
    assert mtools_read(target, manifest.layout.partition(disk.ESP_NAME).start, "membria/enroll.json") == (
        good.read_bytes()
    )


def test_refusals_leave_nothing_behind(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    root, esp_tree = _trees(tmp_path)
    signer = lambda data: sign(data, signing_key)  # noqa: E731
    (root / "big").write_bytes(os.urandom(100 * MIB))
    with pytest.raises(ImageBadInput, match=r"takes \d+ MiB.*15% to spare") as too_big:
        assemble(SPEC, root, esp_tree, tmp_path / "out", signer=signer)
    assert too_big.value.hint and "at least" in too_big.value.hint
    (root / "big").unlink()
    (esp_tree / "vmlinuz").unlink()
    with pytest.raises(ImageBadInput, match="must hold the kernel"):
        assemble(SPEC, root, esp_tree, tmp_path / "out", signer=signer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esp", "root"]  # no out, no staging left
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(ImageBadInput, match="already exists"):
        assemble(SPEC, root, esp_tree, tmp_path / "taken", signer=signer)
    assert (tmp_path / "taken" / "x").read_text() == "mine"
    shutil.rmtree(tmp_path / "taken")
