"""An edge image's root filesystem, decrypted and mounted read-only for the audit's chroot checks.

The image is never changed: its root filesystem is decrypted offline with the bootstrap key from its ESP
(`edge_image.verify.decrypt_root`, the way `appliance edge verify` proves it) into a sparse plaintext file in a
private directory (0700, the file 0600), loop-mounted `ro,noload` (no journal replay: nothing is written even to the
copy), and both are gone when the block ends, whatever happens inside it. The plaintext is sensitive: before first
boot it is everything a laptop will hold, so it never outlives the audit.

Also here: the root partition's LUKS2 header as cryptsetup reads it, for the checks of the image file itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.errors import CheckFailed, MissingEnvironment
from edge_image import disk, luks
from edge_image.errors import ImageError
from edge_image.manifest import ImageManifest
from edge_image.verify import decrypt_root, read_manifest

PLAINTEXT = "root.ext4"
MOUNT_POINT = "root"
# The LUKS2 binary header: magic (6), version (2), hdr_size (8), big-endian.
_HEAD = struct.Struct(">6sHQ")
_LUKS2_MAGIC = b"LUKS\xba\xbe"
_MAX_HEADER_AREA = 64 << 20  # LUKS2 allows 4 MiB metadata copies and a keyslot area well below this


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError:
        raise MissingEnvironment(f"{argv[0]} is not installed ({what})") from None


@contextlib.contextmanager
def mounted_root(
    image_dir: Path, *, public_key: Ed25519PublicKey | None = None, workdir: Path | None = None
) -> Iterator[Path]:
    """The image's root filesystem, mounted read-only; unmounted and its plaintext deleted on exit.

    image_dir: the directory `appliance edge build` wrote (or the .img in it). public_key: check the manifest's
    signature first (the site's edge.signing key). workdir: where the private directory goes (default: the
    system's temporary directory; the plaintext takes the filesystem's used size, not its full size).
    Needs root (mount). Raises CheckFailed when the image cannot be decrypted or mounted.
    """
    if os.geteuid() != 0:
        raise MissingEnvironment("mounting an image's root filesystem needs root")
    private = Path(tempfile.mkdtemp(prefix="membria-audit-image-", dir=workdir))  # mkdtemp: 0700
    plain = private / PLAINTEXT
    mount_point = private / MOUNT_POINT
    mounted = False
    try:
        try:
            decrypt_root(image_dir, plain, public_key=public_key)
        except ImageError as exc:
            raise CheckFailed(f"cannot decrypt the root filesystem of {image_dir}: {exc.message}") from None
        mount_point.mkdir(mode=0o700)
        result = _run(
            ["mount", "-t", "ext4", "-o", "loop,ro,noload,nodev,nosuid", str(plain), str(mount_point)],
            "mounting the decrypted root filesystem",
        )
        if result.returncode != 0:
            raise CheckFailed(f"mounting the decrypted root filesystem of {image_dir} failed: {result.stderr.strip()}")
        mounted = True
        yield mount_point
    finally:
        try:
            if mounted:
                _unmount(mount_point)
        finally:
            shutil.rmtree(private, ignore_errors=True)


def _unmount(mount_point: Path) -> None:
    result = _run(["umount", str(mount_point)], "unmounting the image's root filesystem")
    if result.returncode != 0:
        # A process still inside (a check that hung): detach it now, the kernel finishes when it is free, and the
        # loop device (autoclear) goes with it.
        lazy = _run(["umount", "--lazy", str(mount_point)], "unmounting the image's root filesystem")
        if lazy.returncode != 0:
            raise CheckFailed(f"cannot unmount {mount_point}: {result.stderr.strip()} / {lazy.stderr.strip()}")


def manifest(image_dir: Path) -> ImageManifest:
    """The image's manifest, parsed (its signature is `appliance edge verify`'s business)."""
    try:
        return read_manifest(image_dir)
    except ImageError as exc:
        raise CheckFailed(exc.message) from None


def image_file(image_dir: Path) -> Path:
    path = image_dir / manifest(image_dir).image
    if not path.is_file():
        raise CheckFailed(f"{path}: the image file named by the manifest is missing")
    return path


def root_header(image: Path) -> luks.LuksHeader:
    """The LUKS2 header of the disk image's root partition, found through the image's own GPT (not the manifest).

    The header area (both metadata copies and the keyslots) is copied out first: cryptsetup silently repairs a
    damaged copy in place, and the audit never writes to what it audits. Both copies are checksummed
    (`edge_image.luks.read_header`); a missing or damaged header raises ImageCheckFailed.
    """
    part = disk.read_table(image).partition(disk.ROOT_NAME)
    with image.open("rb") as fh:
        head = os.pread(fh.fileno(), 4096, part.start)
        magic, version, hdr_size = _HEAD.unpack_from(head.ljust(_HEAD.size, b"\0"))
        if magic != _LUKS2_MAGIC or version != 2:
            raise CheckFailed(
                f"{image}: partition {disk.ROOT_NAME} holds no LUKS2 header (magic {magic!r}, version {version})"
            )
        try:
            raw = os.pread(fh.fileno(), max(0, min(hdr_size, 4 << 20) - 4096), part.start + 4096)
            metadata = json.loads(raw.split(b"\0", 1)[0])
            area = 2 * hdr_size + int(metadata["config"]["keyslots_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckFailed(f"{image}: unreadable LUKS2 metadata on {disk.ROOT_NAME} ({exc})") from None
        area = min(area, part.size, _MAX_HEADER_AREA)
        with luks.private_dir() as private:
            copy = private / "root-header"
            with copy.open("wb") as out:
                for pos in range(0, area, 1 << 20):
                    block = os.pread(fh.fileno(), min(1 << 20, area - pos), part.start + pos)
                    if block.count(0) != len(block):
                        os.pwrite(out.fileno(), block, pos)
                out.truncate(area)
            return luks.read_header(copy)
