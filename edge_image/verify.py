"""`appliance edge verify`: prove an image is the one that was signed, and that what it claims is true.

Every check runs and is listed (a field technician wants all problems at once); the signature comes first, and
nothing else is trusted without it. The root filesystem is proven intact by decrypting it offline with the bootstrap
key, sector by sector, since device-mapper is not available here (nor needed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_image import bmap, disk, esp, luks
from edge_image.build import FIRST_BOOT_ENTRY
from edge_image.errors import ImageBadInput, ImageCheckFailed, ImageError
from edge_image.manifest import ImageManifest, check_signature
from edge_image.tools import run
from runtime.common.signed_manifest import MANIFEST, SIGNATURE, FileEntry, hash_file

MIB = 1 << 20
# ext4 superblock: 1024 bytes in; the magic at 0x38, the filesystem UUID at 0x68.
SUPERBLOCK, MAGIC_AT, UUID_AT, EXT4_MAGIC = 1024, 0x38, 0x68, 0xEF53

Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _no_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def image_dir(path: Path) -> Path:
    """The build's output directory, given it or the image file in it."""
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    raise ImageBadInput(f"{path}: no such image or image directory")


class _Checks:
    def __init__(self) -> None:
        self.items: list[Check] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.items.append(Check(name, ok, detail))
        return ok

    def guard(self, name: str, run_check: Callable[[], str]) -> bool:
        """Run one check; an ImageError inside it is that check's failure, not the end of the verify."""
        try:
            return self.add(name, True, run_check())
        except ImageError as exc:
            return self.add(name, False, exc.message)


def verify(
    path: Path,
    public_key: Ed25519PublicKey,
    *,
    bootstrap_key: bytes | None = None,
    fsck: bool = False,
    progress: Progress | None = None,
) -> tuple[ImageManifest | None, list[Check]]:
    """All checks of the image at path (its directory or the .img); the manifest is None if unsigned."""
    directory = image_dir(path)
    progress = progress or _no_progress
    checks = _Checks()
    try:
        manifest = check_signature(directory, public_key)
    except ImageError as exc:
        checks.add("signature", False, exc.message)
        return None, checks.items
    checks.add(
        "signature", True, f"manifest signed by the trusted key; site {manifest.site}, profile {manifest.profile}"
    )
    image = directory / manifest.image
    if not checks.guard("files", lambda: _check_files(directory, manifest, progress)) and not image.is_file():
        return manifest, checks.items
    block_map: bmap.BlockMap | None = None
    try:
        block_map = bmap.parse(directory / manifest.bmap)
        checks.add(
            "block map", True, f"{block_map.mapped_bytes / MIB:.0f} MiB mapped in {len(block_map.ranges)} ranges"
        )
    except ImageError as exc:
        checks.add("block map", False, exc.message)
    checks.guard("partition table", lambda: _check_gpt(image, manifest))
    checks.guard("EFI system partition", lambda: _check_esp(image, manifest))
    with luks.private_dir() as private:
        header = private / "luks-header"
        if not checks.guard("LUKS2 header", lambda: _check_header(image, manifest, header)):
            return manifest, checks.items
        checks.guard(
            "root filesystem",
            lambda: _check_root(image, manifest, header, block_map, bootstrap_key, fsck, progress),
        )
    return manifest, checks.items


def _check_files(directory: Path, manifest: ImageManifest, progress: Progress) -> str:
    problems = []
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{name}: {path.stat().st_size} bytes, signed as {entry.size}")
        elif hash_file(path, progress(f"sha256 of {name}", entry.size)).sha256 != entry.sha256:
            problems.append(f"{name}: sha256 differs from the signed manifest (the file was changed)")
    listed = set(manifest.files) | {MANIFEST, SIGNATURE}
    problems += [f"{p.name}: not in the manifest" for p in sorted(directory.iterdir()) if p.name not in listed]
    if problems:
        raise ImageError("; ".join(problems))
    return f"{len(manifest.files)} files, sizes and sha256 as signed"


def _check_gpt(image: Path, manifest: ImageManifest) -> str:
    layout = disk.read_table(image)
    if layout != manifest.layout:
        raise ImageError(f"the GPT differs from the signed layout: {_layout_diff(layout, manifest.layout)}")
    problems = disk.verify_table(image)
    if problems:
        raise ImageError("sfdisk --verify: " + "; ".join(problems))
    parts = ", ".join(f"{p.name} {p.size // MIB} MiB at {p.start // MIB} MiB" for p in layout.partitions)
    return f"GPT as signed: {parts}"


def _layout_diff(found: disk.Layout, signed: disk.Layout) -> str:
    if found.disk_size != signed.disk_size or found.disk_guid != signed.disk_guid:
        return f"disk {found.disk_size} bytes {found.disk_guid}, signed {signed.disk_size} bytes {signed.disk_guid}"
    for a, b in zip(found.partitions, signed.partitions, strict=False):
        if a != b:
            return f"partition {a.number} is {a.model_dump()}, signed {b.model_dump()}"
    return f"{len(found.partitions)} partitions, signed {len(signed.partitions)}"


def _check_esp(image: Path, manifest: ImageManifest) -> str:
    offset = manifest.layout.partition(disk.ESP_NAME).start
    with tempfile.TemporaryDirectory(prefix="membria-esp-") as tmp:
        tree = Path(tmp) / "esp"
        esp.read_tree(image, offset, tree)
        found = {p.relative_to(tree).as_posix(): hash_file(p) for p in sorted(tree.rglob("*")) if p.is_file()}
        loader = (tree / "loader" / "loader.conf").read_text() if (tree / "loader" / "loader.conf").is_file() else ""
        entries = {p.name: p.read_text() for p in sorted((tree / "loader" / "entries").glob("*.conf"))}
    problems = _tree_diff(found, manifest.esp)
    if "editor no" not in loader.splitlines():
        problems.append("loader.conf lets the kernel command line be edited (no `editor no`)")
    wanted = f"rd.luks.name={manifest.luks.uuid}=root"
    problems += [f"{name} does not unlock LUKS {manifest.luks.uuid}" for name, t in entries.items() if wanted not in t]
    if FIRST_BOOT_ENTRY not in entries:
        problems.append(f"no first-boot entry {FIRST_BOOT_ENTRY}")
    if problems:
        raise ImageError("; ".join(problems))
    return f"{len(found)} files as signed, {len(entries)} boot entries for LUKS {manifest.luks.uuid}"


def _tree_diff(found: dict[str, FileEntry], signed: dict[str, FileEntry]) -> list[str]:
    problems = [f"{name}: missing" for name in signed if name not in found]
    problems += [f"{name}: not signed" for name in found if name not in signed]
    problems += [f"{name}: changed" for name, entry in found.items() if name in signed and signed[name] != entry]
    return problems


def _copy_range(src: Path, offset: int, length: int, dst: Path) -> None:
    with src.open("rb") as fin, dst.open("wb") as fout:
        os.fchmod(fout.fileno(), 0o600)
        fin.seek(offset)
        remaining = length
        while remaining and (chunk := fin.read(min(remaining, 4 * MIB))):
            fout.write(chunk)
            remaining -= len(chunk)


def _check_header(image: Path, manifest: ImageManifest, header_copy: Path) -> str:
    """The header area copied out of the image (cryptsetup wants a file) and checked against the manifest."""
    root = manifest.layout.partition(disk.ROOT_NAME)
    want = manifest.luks
    _copy_range(image, root.start, want.data_offset, header_copy)
    header = luks.read_header(header_copy)
    problems = []
    segment = header.segment
    found = {
        "uuid": header.uuid,
        "cipher": segment.encryption,
        "sector size": segment.sector_size,
        "data offset": header.data_offset,
    }
    expected = {
        "uuid": want.uuid,
        "cipher": want.cipher,
        "sector size": want.sector_size,
        "data offset": want.data_offset,
    }
    problems += [f"{k} is {found[k]}, signed {expected[k]}" for k in found if found[k] != expected[k]]
    if segment.iv_tweak != 0:
        problems.append(f"segment iv_tweak is {segment.iv_tweak}, expected 0")
    if set(header.keyslots) != {"0"}:
        problems.append(f"keyslots {sorted(header.keyslots)}, expected only the bootstrap slot 0")
    slot = header.keyslots.get("0")
    if slot is not None:
        kdf = slot.kdf
        got = (slot.key_size * 8, kdf.type, kdf.memory, kdf.time, kdf.cpus)
        wanted = (want.key_bits, want.pbkdf, want.pbkdf_memory_kib, want.pbkdf_iterations, want.pbkdf_parallel)
        if got != wanted:
            problems.append(f"slot 0 is (key bits, pbkdf, memory KiB, iterations, threads) {got}, signed {wanted}")
    if header.tokens:
        problems.append(f"tokens present before first boot: {sorted(t.type for t in header.tokens.values())}")
    if header.reencrypting:
        problems.append("an unfinished re-encryption is recorded")
    if problems:
        raise ImageError("; ".join(problems))
    return f"{want.cipher} {want.key_bits}-bit, {want.sector_size}-byte sectors, slot 0 {want.pbkdf}, no tokens"


def _bootstrap_key(image: Path, manifest: ImageManifest) -> bytes:
    offset = manifest.layout.partition(disk.ESP_NAME).start
    archive = esp.read_file(image, offset, "membria/bootstrap.cpio")
    return esp.cpio_member(archive, esp.BOOTSTRAP_KEY_PATH)


def _check_root(
    image: Path,
    manifest: ImageManifest,
    header_copy: Path,
    block_map: bmap.BlockMap | None,
    bootstrap_key: bytes | None,
    fsck: bool,
    progress: Progress,
) -> str:
    if block_map is None:
        raise ImageError("not checked: the block map is unreadable")
    if fsck:
        with tempfile.TemporaryDirectory(prefix=".membria-fsck-", dir=image.parent) as tmp:
            plain = Path(tmp) / "root.ext4"
            digest, fs_uuid = _plaintext(image, manifest, header_copy, block_map, bootstrap_key, progress, plain)
            run(["e2fsck", "-fn", plain], what="e2fsck of the decrypted root filesystem")
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        digest, fs_uuid = _plaintext(image, manifest, header_copy, block_map, bootstrap_key, progress, None)
    problems = _root_problems(manifest, digest, fs_uuid)
    if problems:
        raise ImageError("; ".join(problems))
    return f"decrypted with the bootstrap key: {manifest.root.size // MIB} MiB, sha256 and ext4 UUID as signed" + (
        ", e2fsck clean" if fsck else ""
    )


def _plaintext(
    image: Path,
    manifest: ImageManifest,
    header_copy: Path,
    block_map: bmap.BlockMap,
    bootstrap_key: bytes | None,
    progress: Progress,
    copy_to: Path | None,
    *,
    key_bits: int = luks.LuksParams.key_bits,
) -> tuple[str, str | None]:
    """The root filesystem decrypted with the bootstrap key: its sha256 and ext4 UUID (and a sparse copy)."""
    key = bootstrap_key if bootstrap_key is not None else _bootstrap_key(image, manifest)
    volume_key = luks.dump_volume_key(header_copy, key)
    root = manifest.layout.partition(disk.ROOT_NAME)
    mapped = bmap.ranges_within(block_map, root.start, root.start + root.size)
    chunks = luks.plaintext_chunks(
        image,
        base=root.start,
        volume_key=volume_key,
        length=manifest.root.size,
        mapped=mapped,
        params=luks.LuksParams(
            key_bits=key_bits, sector_size=manifest.luks.sector_size, data_offset=manifest.luks.data_offset
        ),
    )
    on_bytes = progress("decrypting the root filesystem", manifest.root.size)
    return _consume(chunks, on_bytes, copy_to)


def _root_problems(manifest: ImageManifest, digest: str, fs_uuid: str | None) -> list[str]:
    problems = []
    if digest != manifest.root.sha256:
        problems.append("the decrypted filesystem's sha256 differs from the signed one (ciphertext changed)")
    if fs_uuid != manifest.root.fs_uuid:
        problems.append(f"ext4 UUID is {fs_uuid}, signed {manifest.root.fs_uuid}")
    return problems


def read_manifest(path: Path, public_key: Ed25519PublicKey | None = None) -> ImageManifest:
    """The image's manifest: signature-checked with public_key, or only parsed (ImageBadInput when unreadable)."""
    directory = image_dir(path)
    if public_key is not None:
        return check_signature(directory, public_key)
    try:
        return ImageManifest.model_validate_json((directory / MANIFEST).read_bytes())
    except OSError as exc:
        raise ImageBadInput(f"{directory / MANIFEST}: cannot read the image manifest ({exc.strerror})") from None
    except ValueError as exc:
        raise ImageBadInput(f"{directory / MANIFEST}: not an image manifest: {str(exc).splitlines()[0]}") from None


def decrypt_root(
    path: Path,
    dest: Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    bootstrap_key: bytes | None = None,
    progress: Progress | None = None,
) -> ImageManifest:
    """Decrypt the image's root filesystem (ext4) into dest, a new sparse file (0600), with the bootstrap key.

    Offline, as verify does: the header is read from a private copy, only the block map's ranges are decrypted and
    holes stay holes. The plaintext must match the manifest's sha256 and ext4 UUID (ImageCheckFailed otherwise, and
    dest is removed). With public_key the manifest's signature is checked first. The caller owns dest (and its
    directory: keep it private, the plaintext is everything on the laptop's disk before first boot).
    """
    directory = image_dir(path)
    manifest = read_manifest(directory, public_key)
    image = directory / manifest.image
    if not image.is_file():
        raise ImageBadInput(f"{image}: the manifest's image file is missing")
    block_map = bmap.parse(directory / manifest.bmap)
    root = manifest.layout.partition(disk.ROOT_NAME)
    try:
        with luks.private_dir() as private:
            header = private / "luks-header"
            _copy_range(image, root.start, manifest.luks.data_offset, header)
            digest, fs_uuid = _plaintext(
                image,
                manifest,
                header,
                block_map,
                bootstrap_key,
                progress or _no_progress,
                dest,
                key_bits=manifest.luks.key_bits,  # what the image says: an audit reads images it would fail
            )
        problems = _root_problems(manifest, digest, fs_uuid)
        if problems:
            raise ImageCheckFailed(f"{image}: " + "; ".join(problems))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return manifest


def _consume(chunks: Iterator[bytes], on_bytes: Callable[[int], None], copy_to: Path | None) -> tuple[str, str | None]:
    """sha256 of the plaintext and its ext4 UUID; with copy_to, also a sparse plaintext copy for e2fsck."""
    digest = hashlib.sha256()
    fs_uuid: str | None = None
    first = True
    out = copy_to.open("wb") if copy_to else None
    try:
        if out is not None:
            os.fchmod(out.fileno(), 0o600)
        for chunk in chunks:
            digest.update(chunk)
            if first:
                fs_uuid = _ext4_uuid(chunk)
                first = False
            if out is not None:
                if chunk.count(0) == len(chunk):
                    out.seek(len(chunk), os.SEEK_CUR)  # keep the copy sparse
                else:
                    out.write(chunk)
            on_bytes(len(chunk))
        if out is not None:
            out.truncate()
    finally:
        if out is not None:
            out.close()
    return digest.hexdigest(), fs_uuid


def _ext4_uuid(head: bytes) -> str | None:
    if len(head) < SUPERBLOCK + UUID_AT + 16:
        return None
    (magic,) = struct.unpack_from("<H", head, SUPERBLOCK + MAGIC_AT)
    if magic != EXT4_MAGIC:
        return None
    return str(uuid.UUID(bytes=head[SUPERBLOCK + UUID_AT : SUPERBLOCK + UUID_AT + 16]))
