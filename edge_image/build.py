"""Assemble a signed edge disk image from a root tree and an ESP tree, offline: no mounts, loop devices or dm.

ext4 from the tree (`mke2fs -d`), LUKS2 header on the partition file (`cryptsetup luksFormat`), only the
filesystem's data ranges encrypted (`luks.encrypt_into`), the ESP as a FAT image (mtools), a GPT around both, the
block map, the manifest and its signature. Everything is staged beside OUT and renamed into place once signed, so an
interrupted build leaves nothing that looks like an image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from edge_image import bmap, disk, esp, luks
from edge_image.errors import ImageBadInput
from edge_image.manifest import (
    ImageManifest,
    LuksRecord,
    ModelFileRecord,
    PackageRecord,
    RootRecord,
    WheelRecord,
)
from edge_image.tools import run
from runtime.common.signed_manifest import MANIFEST, SIGNATURE, FileEntry, hash_file

MIB = 1 << 20
ROOT_LABEL = "membria-root"
FIRST_BOOT_ENTRY = "firstboot-membria.conf"
# The tree must fit with this share of the filesystem to spare (logs, the agent's knowledge, upgrades).
SPARE = 0.15


class Reporter:
    """Progress for a long build; the CLI shows it with rich, tests pass this silent one."""

    def step(self, text: str) -> None:
        pass

    def detail(self, text: str) -> None:
        pass

    def progress(self, label: str, total: int) -> Callable[[int], None]:
        return lambda _n: None


@dataclass(frozen=True)
class BuildSpec:
    """What the image is and holds; `appliance edge build` fills it from the site and the profile."""

    site: str
    profile: str
    version: str
    debian_suite: str = "bookworm"
    root_size: int = 4096 * MIB
    esp_size: int = 512 * MIB
    tpm2_pcrs: tuple[int, ...] = (7,)
    kernel: str = "vmlinuz"  # boot files, relative to the ESP tree
    initrd: str = "initrd.img"
    kernel_version: str = "image"
    luks: luks.LuksParams = field(default_factory=luks.LuksParams)
    luks_uuid: str | None = None  # given when the tree already names it (/etc/kernel/cmdline); else made here
    packages: tuple[PackageRecord, ...] = ()
    wheels: tuple[WheelRecord, ...] = ()
    models: tuple[ModelFileRecord, ...] = ()

    @property
    def image_name(self) -> str:
        return f"membria-edge-{self.site}-{self.profile}-{self.version}.img"

    @property
    def fs_size(self) -> int:
        return self.root_size - self.luks.data_offset


def _tree_bytes(tree: Path) -> int:
    """Allocated bytes of the tree (what `du` counts), without following links."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _check_fits(spec: BuildSpec, tree: Path) -> int:
    used = _tree_bytes(tree)
    room = int(spec.fs_size * (1 - SPARE))
    if used > room:
        needed = int(used / (1 - SPARE) + spec.luks.data_offset) // MIB + 1
        raise ImageBadInput(
            f"the root tree {tree} takes {used / MIB:.0f} MiB, but a {spec.root_size // MIB} MiB root partition "
            f"holds {spec.fs_size // MIB} MiB of filesystem, {room // MIB} MiB with {SPARE:.0%} to spare",
            hint=f"raise the profile's image.root_size_mb to at least {needed}",
        )
    return used


def _stream_sha256(path: Path, on_bytes: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk)
            on_bytes(len(chunk))
    return digest.hexdigest()


def make_root_fs(spec: BuildSpec, tree: Path, out: Path, fs_uuid: str) -> None:
    """ext4 of exactly the segment's size from the tree; unused blocks stay holes (lazy inode tables)."""
    with out.open("wb") as handle:
        handle.truncate(spec.fs_size)
    run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", ROOT_LABEL, "-U", fs_uuid, "-d", tree,
            "-E", "lazy_itable_init=1,lazy_journal_init=0,root_owner=0:0", out,
        ],
        what=f"making the root filesystem from {tree}",
    )  # fmt: skip
    run(["e2fsck", "-fn", out], what="checking the new root filesystem")


def write_boot_files(spec: BuildSpec, esp_tree: Path, luks_uuid: str, bootstrap_key: bytes) -> None:
    """loader.conf, the normal entry, the first-boot entry and the bootstrap cpio it loads."""
    for name in (spec.kernel, spec.initrd):
        if not (esp_tree / name).is_file():
            raise ImageBadInput(f"{esp_tree / name}: missing (the ESP tree must hold the kernel and the initrd)")
    (esp_tree / "loader" / "entries").mkdir(parents=True, exist_ok=True)
    (esp_tree / "membria").mkdir(exist_ok=True)
    (esp_tree / "loader" / "loader.conf").write_text(esp.loader_conf(FIRST_BOOT_ENTRY))
    linux, initrd = "/" + spec.kernel, "/" + spec.initrd
    (esp_tree / "loader" / "entries" / f"membria-{spec.kernel_version}.conf").write_text(
        esp.boot_entry(
            title="Membria",
            version=spec.kernel_version,
            linux=linux,
            initrds=[initrd],
            options=esp.kernel_options(luks_uuid, first_boot=False),
        )
    )
    (esp_tree / "loader" / "entries" / FIRST_BOOT_ENTRY).write_text(
        esp.boot_entry(
            title="Membria (first boot: enrolling this laptop)",
            version=spec.kernel_version,
            linux=linux,
            initrds=[initrd, "/membria/bootstrap.cpio"],
            options=esp.kernel_options(luks_uuid, first_boot=True),
        )
    )
    (esp_tree / "membria" / "bootstrap.cpio").write_bytes(esp.bootstrap_cpio(bootstrap_key))


def _esp_files(esp_tree: Path) -> dict[str, FileEntry]:
    return {
        path.relative_to(esp_tree).as_posix(): hash_file(path) for path in sorted(esp_tree.rglob("*")) if path.is_file()
    }


def assemble(
    spec: BuildSpec,
    tree: Path,
    esp_tree: Path,
    out: Path,
    *,
    signer: Callable[[bytes], bytes],
    report: Reporter | None = None,
    extras: dict[str, Path] | None = None,
) -> ImageManifest:
    """Build the signed image into OUT (which must not exist, or be an empty directory); returns its manifest.

    signer: the manifest's bytes -> manifest.sig's bytes (the caller holds the key, read from Vault).
    extras: more output files (name -> file to copy in: the SBOM, the rootfs listing), hashed into the manifest.
    """
    report = report or Reporter()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImageBadInput(
            f"{out} already exists", hint="choose a new output directory (images are never overwritten)"
        )
    for path, what in ((tree, "root tree"), (esp_tree, "ESP tree")):
        if not path.is_dir():
            raise ImageBadInput(f"{path}: the {what} is not a directory")
    used = _check_fits(spec, tree)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for name, source in (extras or {}).items():
            shutil.copyfile(source, staging / name)
        manifest = _assemble_into(spec, tree, esp_tree, staging, used, report)
        data = manifest.to_bytes()
        report.step("signing the manifest (Ed25519)")
        (staging / MANIFEST).write_bytes(data)
        (staging / SIGNATURE).write_bytes(signer(data))
        if out.exists():
            out.rmdir()  # an empty directory the user made for it
        staging.rename(out)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _assemble_into(
    spec: BuildSpec, tree: Path, esp_tree: Path, staging: Path, used: int, report: Reporter
) -> ImageManifest:
    started = time.monotonic()
    work = staging / ".work"
    work.mkdir()
    fs_uuid, luks_uuid = str(uuid.uuid4()), spec.luks_uuid or str(uuid.uuid4())
    # Both keys live in memory only; luks.py hands them to cryptsetup through files on tmpfs and deletes them.
    volume_key = os.urandom(spec.luks.key_bits // 8)
    bootstrap_key = os.urandom(32)

    report.step(f"root filesystem: ext4 of {spec.fs_size // MIB} MiB from {tree} ({used / MIB:.0f} MiB used)")
    plain = work / "root.ext4"
    make_root_fs(spec, tree, plain, fs_uuid)
    plain_sha = _stream_sha256(plain, report.progress("sha256 of the plaintext", spec.fs_size))

    report.step(f"LUKS2 ({spec.luks.cipher}, {spec.luks.key_bits}-bit, {spec.luks.pbkdf}) and encryption")
    partition = work / "root.luks"
    with partition.open("wb") as handle:
        handle.truncate(spec.root_size)
    luks.luks_format(
        partition, volume_key=volume_key, passphrase=bootstrap_key, params=spec.luks, label=ROOT_LABEL, uuid=luks_uuid
    )
    encrypted = luks.encrypt_into(
        plain, partition, volume_key=volume_key, params=spec.luks, on_bytes=report.progress("encrypting", used)
    )
    del volume_key
    plain.unlink()

    report.step(f"EFI system partition ({spec.esp_size // MIB} MiB FAT32, systemd-boot entries)")
    esp_dir = work / "esp"
    shutil.copytree(esp_tree, esp_dir, symlinks=False)
    write_boot_files(spec, esp_dir, luks_uuid, bootstrap_key)
    esp_files = _esp_files(esp_dir)
    fat = work / "esp.fat"
    esp.make_fat(esp_dir, fat, spec.esp_size)

    report.step("GPT disk image")
    image = staging / spec.image_name
    layout = disk.write_table(image, disk.plan(spec.esp_size, spec.root_size))
    disk.copy_sparse(fat, image, layout.partition(disk.ESP_NAME).start)
    disk.copy_sparse(partition, image, layout.partition(disk.ROOT_NAME).start)
    shutil.rmtree(work)

    report.step("block map (bmaptool) and checksums")
    bmap_path = staging / (spec.image_name + ".bmap")
    block_map = bmap.create(image, bmap_path)
    report.detail(f"{block_map.mapped_bytes / MIB:.0f} MiB mapped of {block_map.image_size / MIB:.0f} MiB")
    files = {
        path.name: hash_file(path, report.progress(f"sha256 of {path.name}", path.stat().st_size))
        for path in sorted(p for p in staging.iterdir() if p.is_file())
    }
    report.detail(f"assembled in {time.monotonic() - started:.0f} s")
    p = spec.luks
    return ImageManifest(
        site=spec.site,
        profile=spec.profile,
        appliance_version=spec.version,
        created_at=datetime.now(UTC).replace(microsecond=0),
        debian_suite=spec.debian_suite,
        image=image.name,
        bmap=bmap_path.name,
        layout=layout,
        luks=LuksRecord(
            uuid=luks_uuid,
            label=ROOT_LABEL,
            cipher=p.cipher,
            key_bits=p.key_bits,
            sector_size=p.sector_size,
            data_offset=p.data_offset,
            pbkdf=p.pbkdf,
            pbkdf_memory_kib=p.pbkdf_memory_kib,
            pbkdf_iterations=p.pbkdf_iterations,
            pbkdf_parallel=p.pbkdf_parallel,
        ),
        root=RootRecord(fs_uuid=fs_uuid, label=ROOT_LABEL, size=spec.fs_size, used_bytes=encrypted, sha256=plain_sha),
        esp=esp_files,
        tpm2_pcrs=list(spec.tpm2_pcrs),
        packages=list(spec.packages),
        wheels=list(spec.wheels),
        models=list(spec.models),
        files=files,
    )
