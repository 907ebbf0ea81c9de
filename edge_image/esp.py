"""The EFI system partition: systemd-boot's loader.conf and BLS entries, the first-boot cpio and the FAT32 image.

The FAT image is made with `mkfs.vfat -C` and filled with mtools (`mcopy -i FILE@@OFFSET`), so nothing is mounted:
the same functions read and write the ESP inside a disk image or on a flashed block device.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from edge_image import tools
from edge_image.errors import ImageBadInput, ImageCheckFailed, ImageError

MIB = 1 << 20
ESP_LABEL = "MEMBRIA-ESP"
BOOTSTRAP_KEY_PATH = "etc/membria/bootstrap.key"  # inside the first-boot cpio
MIN_FAT_SIZE = 64 * MIB  # below this mkfs.vfat -F 32 has too few clusters for a FAT32 that firmware accepts

# mtools checks the media's geometry against the boot sector and refuses an image file or a partition otherwise.
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}
# Fixed timestamp of the cpio members, so the same key gives the same archive (the kernel applies it as is).
_CPIO_MTIME = 0
_ALL_CODES = tuple(range(256))


# --- boot loader text ---------------------------------------------------------------------------------------------


def _one_line(what: str, value: str) -> str:
    if not value.strip() or any(c in value for c in "\r\n\0"):
        raise ImageBadInput(f"{what} must be one non-empty line, not {value!r}")
    return value


def loader_conf(default: str) -> str:
    """systemd-boot's loader.conf: boot the default entry at once, no command-line editing."""
    _one_line("default entry", default)
    lines = ["timeout 0", "editor no", f"default {default}", "console-mode keep"]
    return "\n".join(lines) + "\n"


def boot_entry(*, title: str, linux: str, initrds: list[str], options: str, version: str | None = None) -> str:
    """A Boot Loader Specification type 1 entry: paths are from the ESP's root, initrds loaded in the given order."""
    lines = [f"title {_one_line('title', title)}"]
    if version is not None:
        lines.append(f"version {_one_line('version', version)}")
    lines.append(f"linux {_one_line('linux path', linux)}")
    lines.extend(f"initrd {_one_line('initrd path', initrd)}" for initrd in initrds)
    lines.append(f"options {_one_line('options', options)}")
    return "\n".join(lines) + "\n"


def kernel_options(luks_uuid: str, *, first_boot: bool) -> str:
    """The kernel command line that opens the LUKS root (TPM2 token; on first boot the bootstrap key from the cpio).

    The UUID is written in lower case, as udev's /dev/disk/by-uuid names it.
    """
    try:
        luks = str(uuid.UUID(luks_uuid))
    except ValueError as exc:
        raise ImageBadInput(f"not a LUKS UUID: {luks_uuid!r}") from exc
    options = [f"rd.luks.name={luks}=root"]
    if first_boot:
        # The key file from the appended cpio opens it, and no tpm2-device=: systemd-cryptsetup 252 tries the TPM2
        # first and, finding no token (none exists before first boot), drops the key file with it and asks for a
        # passphrase (seen in the boot test: "Please enter passphrase for disk membria-root").
        options += [f"rd.luks.options={luks}=discard", f"rd.luks.key={luks}=/{BOOTSTRAP_KEY_PATH}"]
    else:
        options.append(f"rd.luks.options={luks}=tpm2-device=auto,discard")
    options += ["root=/dev/mapper/root", "rw"]
    # Both consoles: the screen, and the first serial port (the boot test's console log; nothing on most laptops).
    # The last console= is /dev/console: systemd's status lines and an emergency shell go to the serial port.
    options += ["console=tty0", "console=ttyS0,115200", "quiet"]
    return " ".join(options)


# --- first-boot cpio ----------------------------------------------------------------------------------------------


def bootstrap_cpio(key: bytes) -> bytes:
    """A newc cpio (appended as a second initrd) holding /etc/membria/bootstrap.key, 0400 root:root; reproducible."""
    if not key:
        raise ImageBadInput("the bootstrap key is empty")
    with tempfile.TemporaryDirectory(prefix="membria-bootstrap-") as private:  # mkdtemp: 0700
        stage = Path(private) / "stage"
        etc = stage / "etc"
        membria = etc / "membria"
        membria.mkdir(parents=True)
        key_file = stage / BOOTSTRAP_KEY_PATH
        key_file.write_bytes(key)
        # Explicit modes (not the umask's): the kernel applies a directory's mode even to an /etc that exists.
        for path, mode in ((key_file, 0o400), (membria, 0o700), (etc, 0o755)):
            path.chmod(mode)
            os.utime(path, (_CPIO_MTIME, _CPIO_MTIME))
        members = ["etc", "etc/membria", BOOTSTRAP_KEY_PATH]
        result = tools.run(
            ["cpio", "-o", "-H", "newc", "--reproducible", "--owner", "0:0", "--quiet"],
            what="making the bootstrap cpio",
            stdin=("\n".join(members) + "\n").encode(),
            cwd=stage,
        )
    return result.stdout


def _fnmatch_literal(name: str) -> str:
    # cpio matches its arguments as shell patterns; escape them so a name only matches itself.
    return re.sub(r"([\\*?\[\]])", r"\\\1", name)


def cpio_member(archive: bytes, name: str) -> bytes:
    """The content of one member of a cpio archive (a leading '/' in `name` is ignored)."""
    wanted = name.lstrip("/")
    with tempfile.TemporaryDirectory(prefix="membria-cpio-") as private:
        where = Path(private)  # cpio -i never writes here with --to-stdout; a private cwd all the same
        listing = tools.run(
            ["cpio", "-i", "-t", "--quiet"],
            what="listing a cpio archive",
            stdin=archive,
            ok_codes=_ALL_CODES,
            cwd=where,
        )
        if listing.returncode != 0:
            raise ImageCheckFailed("the data is not a readable cpio archive: " + _stderr_tail(listing))
        names = listing.stdout.decode(errors="surrogateescape").splitlines()
        stored = next((n for n in names if n.lstrip("/").removeprefix("./") == wanted), None)
        if stored is None:
            raise ImageCheckFailed(f"the cpio archive has no member {wanted!r} (members: {', '.join(names) or 'none'})")
        result = tools.run(
            ["cpio", "-i", "--to-stdout", "--quiet", "--", _fnmatch_literal(stored)],
            what=f"extracting {wanted} from a cpio archive",
            stdin=archive,
            cwd=where,
        )
    return result.stdout


# --- FAT image with mtools ----------------------------------------------------------------------------------------


def _stderr_tail(result: subprocess.CompletedProcess[bytes]) -> str:
    return " / ".join(result.stderr.decode(errors="replace").strip().splitlines()[-3:]) or f"exit {result.returncode}"


def _check_mtools_path(image: Path) -> None:
    # mtools reads ':' as a drive letter separator and '@@' as the offset marker.
    if ":" in str(image) or "@@" in str(image):
        raise ImageBadInput(f"mtools cannot take a path holding ':' or '@@': {image}")


def _drive(image: Path, offset: int) -> str:
    """mtools' `-i` argument for the FAT at `offset` of `image`."""
    _check_mtools_path(image)
    if offset < 0:
        raise ImageBadInput(f"negative offset {offset}")
    if not image.exists():
        raise ImageBadInput(f"{image} does not exist")
    return f"{image}@@{offset}" if offset else str(image)


def _mtools(argv: Sequence[str | Path], *, what: str, image: Path, offset: int) -> subprocess.CompletedProcess[bytes]:
    """Run an mtools command; a FAT that is not there is ImageCheckFailed, other failures are left to the caller."""
    # stdin empty: mtools asks on the terminal about name clashes, and must never wait for an answer.
    result = tools.run(argv, what=what, stdin=b"", ok_codes=_ALL_CODES, env=_MTOOLS_ENV)
    stderr = result.stderr.decode(errors="replace")
    if result.returncode != 0 and ("non DOS media" in stderr or "Cannot initialize" in stderr):
        raise ImageCheckFailed(f"no FAT filesystem at offset {offset} of {image}: " + _stderr_tail(result))
    return result


def _check_tree(tree: Path) -> None:
    """Refuse what FAT cannot hold: symlinks, special files, names that differ only in case."""
    for directory, dirnames, filenames in os.walk(tree):
        seen: dict[str, str] = {}
        for entry in dirnames + filenames:
            path = Path(directory) / entry
            mode = path.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ImageBadInput(f"{path} is neither a file nor a directory; a FAT filesystem cannot hold it")
            folded = entry.casefold()
            if folded in seen:
                raise ImageBadInput(f"{path} and {seen[folded]!r} differ only in case; FAT cannot hold both")
            seen[folded] = entry


def make_fat(tree: Path, out: Path, size: int, *, label: str = ESP_LABEL, volume_id: str | None = None) -> None:
    """A FAT32 image file of `size` bytes holding the tree's content at its root."""
    if size % MIB or size < MIN_FAT_SIZE:
        raise ImageBadInput(f"an ESP image must be a multiple of 1 MiB and at least 64 MiB, not {size} bytes")
    if not tree.is_dir():
        raise ImageBadInput(f"{tree} is not a directory")
    if out.exists() or out.is_symlink():
        raise ImageBadInput(f"{out} already exists (mkfs.vfat -C makes a new file)")
    if not label or len(label) > 11 or not label.isascii() or not label.isprintable():
        raise ImageBadInput(f"a FAT label is 1-11 ASCII characters, not {label!r}")
    if volume_id is not None and not re.fullmatch(r"[0-9A-Fa-f]{8}", volume_id):
        raise ImageBadInput(f"a FAT volume ID is 8 hex digits, not {volume_id!r}")
    _check_tree(tree)
    _check_mtools_path(out)
    try:
        argv: list[str | Path] = ["mkfs.vfat", "-C", "-F", "32", "-n", label]
        if volume_id is not None:
            argv += ["-i", volume_id]
        tools.run([*argv, out, str(size // 1024)], what=f"making the FAT filesystem {out}")
        entries = sorted(tree.iterdir())
        if entries:
            # -s recursive (empty directories included), -m keep mtimes, -Q stop at the first failure.
            result = _mtools(
                ["mcopy", "-s", "-m", "-Q", "-i", out, *entries, "::/"],
                what=f"copying {tree} into {out}",
                image=out,
                offset=0,
            )
            if result.returncode != 0:
                if "Disk full" in result.stderr.decode(errors="replace"):
                    raise ImageBadInput(f"{tree} does not fit in a {size // MIB} MiB FAT filesystem")
                raise ImageError(f"copying {tree} into {out} failed: " + _stderr_tail(result))
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def read_tree(image: Path, offset: int, dest: Path) -> None:
    """Copy every file and directory of the FAT at byte `offset` of `image` into `dest` (created if missing)."""
    drive = _drive(image, offset)
    dest.mkdir(parents=True, exist_ok=True)
    result = _mtools(
        ["mcopy", "-s", "-n", "-m", "-i", drive, "::/", dest],
        what=f"reading the ESP of {image}",
        image=image,
        offset=offset,
    )
    if result.returncode != 0:
        raise ImageCheckFailed(f"reading the FAT at offset {offset} of {image} failed: " + _stderr_tail(result))


def _list(image: Path, offset: int) -> list[str]:
    """Every path in the FAT, relative to its root; directories end with '/'."""
    result = _mtools(
        ["mdir", "-/", "-b", "-i", _drive(image, offset), "::/"],
        what=f"listing the ESP of {image}",
        image=image,
        offset=offset,
    )
    if result.returncode != 0:
        out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
        if "No files" in out or "not found" in out:
            return []  # an empty root
        raise ImageCheckFailed(f"listing the FAT at offset {offset} of {image} failed: " + _stderr_tail(result))
    return [
        line.removeprefix("::/")
        for line in result.stdout.decode(errors="replace").splitlines()
        if line.startswith("::/")
    ]


def _fat_path(path: str) -> list[str]:
    parts = path.strip("/").split("/")
    if not path.strip("/") or any(part in ("", ".", "..") for part in parts):
        raise ImageBadInput(f"not a usable path inside the ESP: {path!r}")
    return parts


def read_file(image: Path, offset: int, path: str) -> bytes:
    """One file of the FAT at `offset` of `image`, e.g. "loader/loader.conf"."""
    parts = _fat_path(path)
    result = _mtools(
        ["mcopy", "-n", "-i", _drive(image, offset), "::/" + "/".join(parts), "-"],
        what=f"reading {path} from the ESP of {image}",
        image=image,
        offset=offset,
    )
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")
        if "not found" in stderr:
            raise ImageCheckFailed(f"the ESP of {image} has no file {path}")
        raise ImageCheckFailed(f"reading {path} from the ESP of {image} failed: " + _stderr_tail(result))
    return result.stdout


def write_file(image: Path, offset: int, path: str, data: bytes) -> None:
    """Create or replace one file of the FAT at `offset` of `image` (a disk image or a block device), parents too."""
    parts = _fat_path(path)
    drive = _drive(image, offset)
    # FAT names are case-insensitive: compare folded.
    existing = {entry.casefold() for entry in _list(image, offset)}
    missing: list[str] = []
    for depth in range(1, len(parts)):
        parent = "/".join(parts[:depth])
        if parent.casefold() in existing:
            raise ImageBadInput(f"{parent} is a file in the ESP of {image}; cannot put {path} under it")
        if parent.casefold() + "/" not in existing:
            missing.append("::/" + parent)
    if "/".join(parts).casefold() + "/" in existing:
        raise ImageBadInput(f"{path} is a directory in the ESP of {image}")
    if missing:
        result = _mtools(
            ["mmd", "-i", drive, *missing], what=f"making {missing[-1]} in the ESP", image=image, offset=offset
        )
        if result.returncode != 0:
            raise ImageError(f"making {', '.join(missing)} in the ESP of {image} failed: " + _stderr_tail(result))
    with tempfile.TemporaryDirectory(prefix="membria-esp-") as private:
        source = Path(private) / parts[-1]
        source.write_bytes(data)
        result = _mtools(
            ["mcopy", "-o", "-i", drive, source, "::/" + "/".join(parts)],
            what=f"writing {path} into the ESP of {image}",
            image=image,
            offset=offset,
        )
    if result.returncode != 0:
        if "Disk full" in result.stderr.decode(errors="replace"):
            raise ImageBadInput(f"{path} ({len(data)} bytes) does not fit in the ESP of {image}")
        raise ImageError(f"writing {path} into the ESP of {image} failed: " + _stderr_tail(result))
