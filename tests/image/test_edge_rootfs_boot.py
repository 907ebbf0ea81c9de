"""The image's Debian base and boot chain with the real tools: mmdebstrap (cached), dracut in the chroot, lsinitrd.

The first run builds the cached rootfs tarball (a few minutes); later runs unpack it (seconds) and spend most of
their time in dracut.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_image import boot, chroot, rootfs
from edge_image.chroot import run_in
from edge_image.errors import ImageCheckFailed, ImageError
from edge_image.spec import BASE_PACKAGES

pytestmark = pytest.mark.image

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class Booted:
    tree: Path
    esp: Path
    luks_uuid: str
    kernel: str
    initrd: str
    kver: str
    mounts_after: list[str]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The base rootfs, unpacked once for this module (and removed after: it is most of a gigabyte)."""
    tar = rootfs.rootfs_tar(BASE_PACKAGES)
    dest = tmp_path_factory.mktemp("edge-rootfs") / "root"
    rootfs.unpack(tar, dest)
    yield dest
    chroot.unmount_all(dest)
    shutil.rmtree(dest.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def booted(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Booted:
    esp = tmp_path_factory.mktemp("edge-esp")
    luks_uuid = str(uuid.uuid4())
    boot.configure(tree, luks_uuid=luks_uuid, tpm2_pcrs=[7])
    with chroot.prepared(tree):
        kernel, initrd, kver = boot.make_boot_files(tree, esp)
    return Booted(tree, esp, luks_uuid, kernel, initrd, kver, chroot.mounts_under(tree))


def payload_after_early_cpio(data: bytes) -> bytes:
    """The initrd's main archive: dracut may put an uncompressed early cpio (microcode) in front of it."""
    if not data.startswith(b"070701"):
        return data
    end = data.index(b"TRAILER!!!") + len(b"TRAILER!!!")
    while end < len(data) and data[end] == 0:
        end += 1
    return data[end:]


def test_base_packages_installed(tree: Path) -> None:
    packages = rootfs.installed_packages(tree)
    assert packages == sorted(packages)
    versions = {name: version for name, version, _arch in packages}
    for name in ("systemd", "systemd-boot", "dracut", "cryptsetup-bin", "tpm2-tools", "linux-image-amd64"):
        assert versions.get(name), f"{name} is not installed"
    assert all(arch in ("amd64", "all") for _n, _v, arch in packages)
    kver = rootfs.kernel_version(tree)
    assert [p.name for p in (tree / "lib" / "modules").iterdir()] == [kver]
    assert versions.get(f"linux-image-{kver}")
    assert (tree / "boot" / f"vmlinuz-{kver}").is_file()


def test_rootfs_is_cached_generic_and_small(tree: Path) -> None:
    started = time.monotonic()
    tar = rootfs.rootfs_tar(list(reversed(BASE_PACKAGES)))  # the same set in another order: the same tarball
    assert time.monotonic() - started < 5
    assert tar == rootfs.tar_path(BASE_PACKAGES)
    assert not tar.with_suffix(".partial.tar").exists()
    # The kernel's postinst made no initrd with Debian's defaults (boot.py makes the one that boots).
    assert not list((tree / "boot").glob("initrd.img*"))
    # No documentation, man pages or translations; the copyright files stay.
    assert (tree / "usr/share/doc/systemd/copyright").is_file()
    assert not list((tree / "usr/share/doc/systemd").glob("changelog*"))
    assert not any((tree / "usr/share/man").rglob("*.gz"))
    assert not (tree / "usr/share/locale/de").exists()


def test_deb_files_from_apt_index(tree: Path) -> None:
    debs = rootfs.deb_files(tree)
    installed = rootfs.installed_packages(tree)
    assert {name for name, _v, _a in installed} == set(debs)
    sha, size = debs["systemd"]
    assert len(sha) == 64 and size > 1_000_000


def test_boot_files(booted: Booted) -> None:
    kver = booted.kver
    assert (booted.kernel, booted.initrd) == (f"membria/{kver}/linux", f"membria/{kver}/initrd")
    assert booted.mounts_after == []
    kernel = booted.esp / booted.kernel
    assert kernel.read_bytes() == (booted.tree / "boot" / f"vmlinuz-{kver}").read_bytes()
    for loader in ("EFI/BOOT/BOOTX64.EFI", "EFI/systemd/systemd-bootx64.efi"):
        assert (booted.esp / loader).read_bytes()[:2] == b"MZ"  # a PE/COFF executable
    initrd = (booted.esp / booted.initrd).read_bytes()
    assert payload_after_early_cpio(initrd)[:4] == ZSTD_MAGIC
    # The copy outside the tree is listed through a scratch copy inside it.
    assert boot.check_initrd(booted.tree, booted.esp / booted.initrd) == []
    assert not list((booted.tree / "boot").glob("initrd.img*"))
    assert not list((booted.tree / "tmp").iterdir())


def test_configuration_in_tree(booted: Booted) -> None:
    etc = booted.tree / "etc"
    cmdline = (etc / "kernel" / "cmdline").read_text()
    assert f"rd.luks.name={booted.luks_uuid}=root" in cmdline
    assert "rd.luks.key" not in cmdline  # that one is the first-boot entry's alone
    assert (etc / "kernel" / "entry-token").read_text().strip() == "membria"
    install = dict(line.split("=", 1) for line in (etc / "kernel" / "install.conf").read_text().split())
    assert install == {"layout": "bls", "initrd_generator": "dracut", "BOOT_ROOT": "/efi"}
    conf = (etc / "dracut.conf.d" / "10-membria.conf").read_text()
    assert 'hostonly="no"' in conf and "tpm2-tss" in conf and boot.TOKEN_PLUGIN in conf
    assert not (etc / "crypttab").exists()


def test_check_initrd_finds_what_debians_default_initrd_lacks(booted: Booted) -> None:
    """dracut with Debian's defaults only (what the kernel's postinst makes): crypt is in, the TPM pieces are not.

    --no-kernel keeps it quick; the kernel modules it then lacks are reported too.
    """
    with chroot.prepared(booted.tree):
        (booted.tree / "tmp" / "no-conf.d").mkdir()
        run_in(
            booted.tree,
            ["dracut", "--quiet", "--force", "--no-hostonly", "--no-kernel", "--conf", "/dev/null",
             "--confdir", "/tmp/no-conf.d", "--kver", booted.kver, "/tmp/plain.img"],
            what="building an initrd with Debian's defaults",
        )  # fmt: skip
        problems = boot.check_initrd(booted.tree, booted.tree / "tmp" / "plain.img")
    text = "\n".join(problems)
    assert "dracut module tpm2-tss not included" in problems
    assert f"{boot.TOKEN_PLUGIN} missing" in problems
    assert "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 missing" in problems
    assert "kernel module dm_crypt missing" in text
    # In Debian's default initrd too, so not reported: the check names only what is absent.
    assert "systemd-cryptsetup" not in text
    # tpm_crb and tpm_tis are built into Debian's kernel, so no initrd needs them as modules.
    assert "tpm_crb" not in text and "tpm_tis" not in text


def test_make_boot_files_refuses_an_initrd_without_the_tpm_pieces(booted: Booted, tmp_path: Path) -> None:
    conf = booted.tree / boot.DRACUT_CONF
    saved = conf.read_text()
    # The drop-in without tpm2-tss and the explicit libraries; no_kernel only to keep the test quick.
    conf.write_text(saved.replace(" tpm2-tss", "").replace("install_items", "# install_items") + 'no_kernel="yes"\n')
    try:
        with chroot.prepared(booted.tree), pytest.raises(ImageCheckFailed) as caught:
            boot.make_boot_files(booted.tree, tmp_path)
    finally:
        conf.write_text(saved)
    assert "libcryptsetup-token-systemd-tpm2.so missing" in caught.value.message
    assert "dracut module tpm2-tss not included" in caught.value.message
    assert not (tmp_path / "membria").exists()  # nothing copied onto the ESP
    assert chroot.mounts_under(booted.tree) == []


def test_unknown_package_is_named_and_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache of its own: it must leave nothing behind, and must not wait behind another worker's cold build.
    monkeypatch.setattr(rootfs, "CACHE_DIR", tmp_path)
    with pytest.raises(ImageError) as caught:
        rootfs.rootfs_tar(["systemd", "membria-no-such-package"])
    assert "membria-no-such-package" in caught.value.message
    assert caught.value.exit_code == 2
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_unpack_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(ImageError, match="not empty"):
        rootfs.unpack(tmp_path / "none.tar", tmp_path)
    assert (tmp_path / "x").exists()


def test_kernel_version_needs_exactly_one(tmp_path: Path) -> None:
    modules = tmp_path / "usr" / "lib" / "modules"
    modules.mkdir(parents=True)
    with pytest.raises(ImageError, match="found 0"):
        rootfs.kernel_version(tmp_path)
    (modules / "6.1.0-1-amd64").mkdir()
    (modules / "6.1.0-2-amd64").mkdir()
    with pytest.raises(ImageError, match=re.escape("6.1.0-1-amd64, 6.1.0-2-amd64")):
        rootfs.kernel_version(tmp_path)
