"""Write an image to a laptop's disk (or a regular file) through bmaptool, then prove it by reading every range back.

bmaptool copies only the mapped ranges and checks the image's bytes against the bmap as it reads them; it does not
check the target, show usable progress or read back. This module adds those and copies nothing itself. With an
enrollment file (`appliance edge enroll-token`'s), it then puts that file into the target's ESP with mtools and reads
it back; the file is checked before anything is written, and its token is never shown.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import mmap
import os
import re
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from edge_image import bmap, disk, esp, tools
from edge_image.errors import ImageBadInput, ImageCheckFailed, ImageError

Progress = Callable[[int, int], None]

# Mount points whose disk is the running system; refused with their own message, before the generic mount check.
_SYSTEM_MOUNTS = ("/", "/usr", "/boot", "/efi", "/boot/efi")
_CHUNK = 4 << 20
_ALIGN = 4096  # O_DIRECT wants buffer, offset and length aligned to the logical block size; 4 KiB covers 512 too
_POLL_S = 0.2
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

ENROLLMENT_PATH = "membria/enroll.json"  # on the ESP: first boot posts its token (DESIGN.md, "Enrollment protocol")
ENROLLMENT_FORMAT = 1
_ENROLLMENT_MAX_BYTES = 64 << 10
# appliance/edge/enrollment.py's device-name rule (edge_image cannot import appliance); mint checks its own output
# against EnrollmentFile, so the two cannot drift apart unnoticed.
_DEVICE_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MINT_HINT = "mint a new one with `appliance edge enroll-token`"


class TargetInfo(BaseModel):
    """What will be written: a regular file (grown to the image size) or a whole disk, with what sysfs says of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    kind: Literal["file", "block"]
    size: int
    disk: str | None
    model: str | None
    transport: str | None


class FlashReport(BaseModel):
    """A finished flash; `mb_per_s` is mapped bytes (10^6) per second of bmaptool's run, its final fsync included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: TargetInfo
    mapped_bytes: int
    image_size: int
    copy_seconds: float
    readback_seconds: float
    mb_per_s: float
    enrollment: str | None = None  # the ESP path the enrollment file was written to and read back from


# --- the enrollment file ------------------------------------------------------------------------------------------


def check_hostname(name: str) -> str:
    """A host name as /etc/hosts takes it (RFC 1123: dot-separated labels of letters, digits and '-', at most 253
    characters, not all-digit at the end), lower-cased; ValueError otherwise."""
    folded = name.lower()
    labels = folded.split(".")
    if len(folded) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{name!r} is not a host name (dot-separated labels of letters, digits and '-', 1-63 characters each, "
            "no '-' at either end of a label)"
        )
    if labels[-1].isdigit():
        raise ValueError(f"{name!r} is not a host name (its last label is all digits: an address?)")
    return folded


def check_address(address: str) -> str:
    """An IPv4 or IPv6 address in its canonical spelling; ValueError otherwise (a zone such as %eth0 too: it names
    an interface of this machine, not of the laptop)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IPv4 or IPv6 address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError(f"{address!r} carries an interface zone; give the address alone")
    return str(ip)


def check_resolve(entries: Mapping[str, str]) -> dict[str, str]:
    """The enrollment file's `resolve` (host name -> address, for the laptop's /etc/hosts), checked and canonical."""
    out: dict[str, str] = {}
    for name, address in entries.items():
        host = check_hostname(name)
        if host in out:
            raise ValueError(f"{name!r} is given twice")
        out[host] = check_address(address)
    return out


class EnrollmentFile(BaseModel):
    """`appliance edge enroll-token`'s file as flash checks it before writing it onto the ESP. The token is a
    SecretStr, so no repr, log line or error message can show it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1]
    site: str = Field(min_length=1)
    device: str = Field(pattern=_DEVICE_NAME)
    token: SecretStr = Field(min_length=1)
    expires_at: AwareDatetime
    gateways: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    resolve: dict[str, str] | None = None

    @field_validator("resolve")
    @classmethod
    def _resolve(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else check_resolve(value)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Enrollment:
    """A checked enrollment file: its exact bytes (what goes onto the ESP) and what they say."""

    source: Path
    data: bytes = field(repr=False)
    file: EnrollmentFile

    @property
    def device(self) -> str:
        return self.file.device

    @property
    def expires(self) -> str:
        return _when(self.file.expires_at)

    def check_unexpired(self, now: datetime | None = None) -> None:
        moment = now or datetime.now(UTC)
        if self.file.expires_at <= moment:
            raise ImageBadInput(
                f"{self.source}: the enrollment token of {self.device} expired at {self.expires}", hint=_MINT_HINT
            )


def check_enrollment(data: bytes, *, source: Path, site: str | None = None, now: datetime | None = None) -> Enrollment:
    """Check an enrollment file's bytes: JSON, format, fields, device name, not expired and, when `site` is given, for
    that site. ImageBadInput (exit 2) names the file and the field; no message quotes a value of the file."""
    try:
        doc = json.loads(data.decode("utf-8"))  # json.loads(bytes) would take UTF-16 and UTF-32 too
    except UnicodeDecodeError:
        raise ImageBadInput(f"{source}: not an enrollment file (not UTF-8 text)", hint=_MINT_HINT) from None
    except json.JSONDecodeError as exc:
        raise ImageBadInput(
            f"{source}: not an enrollment file (not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno})",
            hint=_MINT_HINT,
        ) from None
    if not isinstance(doc, dict):
        raise ImageBadInput(f"{source}: not an enrollment file (a JSON object is expected)", hint=_MINT_HINT)
    if doc.get("format") != ENROLLMENT_FORMAT:
        raise ImageBadInput(
            f"{source}: field format: this version reads enrollment files of format {ENROLLMENT_FORMAT} only",
            hint=_MINT_HINT,
        )
    try:
        parsed = EnrollmentFile.model_validate(doc)
    except ValidationError as exc:
        # errors()'s msg, never its input: the input could be the token
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ImageBadInput(f"{source}: field {where}: {first['msg']}", hint=_MINT_HINT) from None
    enrollment = Enrollment(source, data, parsed)
    enrollment.check_unexpired(now)
    if site is not None and parsed.site != site:
        raise ImageBadInput(
            f"{source}: the enrollment token of {parsed.device} is for site {parsed.site!r}, the image for {site!r}",
            hint="mint the token on the image's site",
        )
    return enrollment


def load_enrollment(path: Path, *, site: str | None = None, now: datetime | None = None) -> Enrollment:
    """Read an enrollment file and check it (check_enrollment)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageBadInput(f"{path}: no such enrollment file", hint=_MINT_HINT) from None
    except OSError as exc:
        raise ImageBadInput(f"cannot read the enrollment file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageBadInput(f"{path}: the enrollment file is not a regular file")
    if st.st_size > _ENROLLMENT_MAX_BYTES:
        raise ImageBadInput(f"{path}: {st.st_size} bytes is too large for an enrollment file", hint=_MINT_HINT)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageBadInput(f"cannot read the enrollment file {path}: {exc.strerror}") from None
    return check_enrollment(data, source=path, site=site, now=now)


def esp_offset(image: Path) -> int:
    """Where the image's ESP starts (bytes); ImageBadInput if the image has none."""
    try:
        return disk.read_table(image).partition(disk.ESP_NAME).start
    except ImageCheckFailed as exc:
        raise ImageBadInput(f"{image}: {exc.message}; an enrollment file goes onto the image's ESP") from None


def write_enrollment(target: Path, offset: int, enrollment: Enrollment) -> float:
    """Write the enrollment file into the ESP at `offset` of TARGET as membria/enroll.json, then read it back from the
    disk (flushed, page cache dropped) and compare it byte for byte; ImageCheckFailed if it differs. The seconds."""
    start = time.monotonic()
    try:
        block = stat.S_ISBLK(os.stat(target).st_mode)
    except OSError as exc:
        raise ImageBadInput(f"cannot stat {target}: {exc.strerror}") from exc
    # On a disk our exclusive claim is held throughout: mtools opens the device without O_EXCL, and nothing can mount
    # the ESP meanwhile. The descriptor also serves to flush and drop the cache before the read-back.
    fd = _claim(target, os.O_RDONLY) if block else os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        esp.write_file(target, offset, ENROLLMENT_PATH, enrollment.data)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        back = esp.read_file(target, offset, ENROLLMENT_PATH)
    finally:
        os.close(fd)
    if back != enrollment.data:
        raise ImageCheckFailed(
            f"{ENROLLMENT_PATH} read back from the ESP of {target} is not {enrollment.source} "
            f"({len(back)} bytes read, {len(enrollment.data)} written)"
        )
    return time.monotonic() - start


@dataclass(frozen=True)
class _Mount:
    dev: tuple[int, int]
    point: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo and swaps write space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _devno(text: str) -> tuple[int, int]:
    major, minor = text.strip().split(":")
    return int(major), int(minor)


def _mounts(proc: Path) -> list[_Mount]:
    out = []
    for line in (proc / "self" / "mountinfo").read_text().splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)  # optional fields (shared:N, master:N) sit between the mount point and "-"
        out.append(_Mount(_devno(fields[2]), _unescape(fields[4]), _unescape(fields[dash + 2])))
    return out


def _swap_names(proc: Path) -> set[str]:
    names = set()
    for line in (proc / "swaps").read_text().splitlines()[1:]:
        if line.startswith("/dev/"):
            names.add(Path(_unescape(line.split()[0])).name)
    return names


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _sys_dir(sys: Path, dev: tuple[int, int]) -> Path | None:
    link = sys / "dev" / "block" / f"{dev[0]}:{dev[1]}"
    return link.resolve() if link.exists() else None


def _disks_under(sys: Path, dev: tuple[int, int]) -> set[str]:
    """Names of the devices a mounted device sits on, down through dm/md slaves to whole disks."""
    start = _sys_dir(sys, dev)
    stack, names = ([start] if start else []), set()
    while stack:
        node = stack.pop()
        disk = node.parent if (node / "partition").is_file() else node
        names |= {node.name, disk.name}
        slaves = node / "slaves"
        if slaves.is_dir():
            stack.extend((sys / "class" / "block" / s.name).resolve() for s in slaves.iterdir())
    return names


def _transport(disk_dir: Path) -> str | None:
    if (disk_dir / "loop").is_dir():
        return "loop"
    where = str(disk_dir)
    for marker, name in (("/usb", "usb"), ("/nvme", "nvme"), ("/mmc", "mmc"), ("/ata", "sata"), ("/virtio", "virtio")):
        if marker in where:
            return name
    return "scsi" if "/host" in where else None


def _check_block(
    path: Path, major: int, minor: int, image_size: int, *, image: Path | None, proc: Path, sys: Path
) -> TargetInfo:
    """The block-device half of check_target, from the device number on (unit tests feed sample proc/sys trees)."""
    node = _sys_dir(sys, (major, minor))
    if node is None:
        raise ImageBadInput(f"{path}: no {sys}/dev/block/{major}:{minor}; not a disk this kernel knows")
    if (node / "partition").is_file():
        raise ImageBadInput(
            f"{path} is a partition of /dev/{node.parent.name}; flash writes whole disks",
            hint=f"give /dev/{node.parent.name}",
        )
    disk = node.name
    if _read(node / "ro") == "1":
        raise ImageBadInput(f"{path} (/dev/{disk}) is read-only")
    parts = {p.name: p for p in node.iterdir() if (p / "partition").is_file()}
    devices = {disk: node, **parts}
    devnos = {_devno(_read(d / "dev") or "0:0") for d in devices.values()} | {(major, minor)}
    mounts = _mounts(proc)
    for m in mounts:
        if m.point in _SYSTEM_MOUNTS and disk in _disks_under(sys, m.dev):
            raise ImageBadInput(f"{path} (/dev/{disk}) holds {m.point} of the running system")
    for m in mounts:
        if m.dev in devnos or (m.source.startswith("/dev/") and Path(m.source).name in devices):
            raise ImageBadInput(
                f"{path}: {m.source} ({m.dev[0]}:{m.dev[1]}) on /dev/{disk} is mounted on {m.point}",
                hint="unmount it first",
            )
    swapping = sorted(_swap_names(proc) & devices.keys())
    if swapping:
        raise ImageBadInput(f"{path}: /dev/{swapping[0]} on /dev/{disk} is in use as swap", hint="swapoff it first")
    for name, d in devices.items():
        holders = sorted(h.name for h in (d / "holders").iterdir()) if (d / "holders").is_dir() else []
        if holders:
            raise ImageBadInput(
                f"{path}: /dev/{name} is held by {', '.join(holders)} (device-mapper, md or LVM)",
                hint="close or stop those devices first",
            )
    backing = _read(node / "loop" / "backing_file")
    if image is not None and backing and Path(backing).exists() and Path(backing).samefile(image):
        raise ImageBadInput(f"{path} is a loop device backed by the image {image} itself")
    size = int(_read(node / "size") or 0) * 512  # sysfs counts 512-byte sectors whatever the logical block size
    if size < image_size:
        raise ImageBadInput(f"{path} (/dev/{disk}) holds {size} bytes; the image needs {image_size}")
    model = _read(node / "device" / "model")
    return TargetInfo(path=path, kind="block", size=size, disk=disk, model=model, transport=_transport(node))


def _check_file(target: Path, image: Path, image_size: int, *, sys: Path) -> TargetInfo:
    if target.exists():
        if image.exists() and target.samefile(image):
            raise ImageBadInput(f"{target} is the image itself")
        for backing_file in sorted(sys.glob("block/loop*/loop/backing_file")):
            backing = (_read(backing_file) or "").removesuffix(" (deleted)")
            if backing and Path(backing).exists() and Path(backing).samefile(target):
                loop = backing_file.parent.parent.name
                raise ImageBadInput(f"{target} backs /dev/{loop}", hint=f"losetup -d /dev/{loop} first")
    elif not target.parent.is_dir():
        raise ImageBadInput(f"{target}: {target.parent} is not a directory")
    return TargetInfo(path=target, kind="file", size=image_size, disk=None, model=None, transport=None)


def check_target(
    target: Path, image: Path, image_size: int, *, proc: Path = Path("/proc"), sys: Path = Path("/sys")
) -> TargetInfo:
    """Say what TARGET is, or refuse it (ImageBadInput): only a regular file or a whole, unused, big-enough disk."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return _check_file(target, image, image_size, sys=sys)
    except OSError as exc:
        raise ImageBadInput(f"cannot stat {target}: {exc.strerror}") from exc
    if stat.S_ISREG(st.st_mode):
        return _check_file(target, image, image_size, sys=sys)
    if stat.S_ISBLK(st.st_mode):
        dev = st.st_rdev
        return _check_block(target, os.major(dev), os.minor(dev), image_size, image=image, proc=proc, sys=sys)
    raise ImageBadInput(f"{target} is neither a regular file nor a block device")


def _claim(target: Path, flags: int) -> int:
    """Open a block device with O_EXCL: the kernel refuses it while anything is mounted from or claims the disk.
    EBUSY is retried briefly: udev's partition rescan after a write claims the disk for a moment."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            return os.open(target, flags | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise ImageBadInput(f"cannot open {target}: {exc.strerror}") from exc
            if time.monotonic() > deadline:
                raise ImageBadInput(
                    f"{target} is in use (the kernel refused an exclusive open: mounted or claimed)",
                    hint="unmount its partitions and close what holds it",
                ) from exc
        time.sleep(0.1)


def _discard(target: Path) -> None:
    # -f: we hold the O_EXCL claim ourselves, which blkdiscard's own O_EXCL open would hit; -f also skips its
    # refusal of a disk that holds a file system. "Not supported" (no TRIM) is fine: bmaptool still writes all data.
    result = tools.run(["blkdiscard", "-f", target], what=f"discarding {target}", ok_codes=(0, 1))
    err = result.stderr.decode(errors="replace").strip()
    if result.returncode != 0 and "not supported" not in err.lower():
        raise ImageError(f"discarding {target} failed (blkdiscard exit {result.returncode}): {err}")


def _bmaptool_error(output: bytes) -> str:
    lines = _ANSI.sub("", output.decode(errors="replace")).strip().splitlines()
    last = max((i for i, line in enumerate(lines) if "ERROR:" in line), default=len(lines) - 5)
    text = " / ".join(line.strip() for line in lines[max(last, 0) :] if line.strip())
    return text.split("ERROR:", 1)[-1].strip()


def _copy(image: Path, bmap_path: Path, target: Path, mapped: int, on_progress: Progress | None) -> float:
    argv = [tools.require("bmaptool"), "copy", "--bmap", str(bmap_path), "--no-sig-verify", str(image), str(target)]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: nobody reads a pipe while we poll
        start = time.monotonic()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            while True:
                try:
                    rc = child.wait(timeout=_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                # wchar counts every byte written, its few log lines included, hence the clamp
                io = _read(Path("/proc") / str(child.pid) / "io") or ""
                wchar = next((int(v) for k, _, v in (li.partition(": ") for li in io.splitlines()) if k == "wchar"), 0)
                if on_progress is not None:
                    on_progress(min(wchar, mapped), mapped)
        except BaseException:
            child.kill()
            child.wait()
            raise
        seconds = time.monotonic() - start
        if rc != 0:
            log.seek(0)
            message = _bmaptool_error(log.read())
            if "exclusive mode" in message:  # something claimed the disk after our own exclusive open was closed
                raise ImageBadInput(f"{target} is in use: {message}")
            raise ImageCheckFailed(f"bmaptool could not copy {image} to {target} (exit {rc}): {message}")
    if on_progress is not None:
        on_progress(mapped, mapped)
    return seconds


def flash(
    image: Path,
    bmap_path: Path,
    target: Path,
    *,
    discard: bool = True,
    on_progress: Progress | None = None,
    on_readback: Progress | None = None,
    enrollment: Enrollment | None = None,
    proc: Path = Path("/proc"),
    sys: Path = Path("/sys"),
) -> FlashReport:
    """Check the target, discard it, copy the mapped ranges with bmaptool and read every one back; then, given an
    enrollment file (load_enrollment), write it into the target's ESP and read it back."""
    bm = bmap.parse(bmap_path)
    if not image.is_file():
        raise ImageBadInput(f"image {image} is not a regular file")
    size = image.stat().st_size
    if size != bm.image_size:
        raise ImageBadInput(f"{image} is {size} bytes but {bmap_path} describes an image of {bm.image_size}")
    tools.require("bmaptool")
    offset = None
    if enrollment is not None:
        # before the target is touched: a token that lapsed while the user confirmed, an image without an ESP
        enrollment.check_unexpired()
        tools.require("mcopy")
        offset = esp_offset(image)
    info = check_target(target, image, bm.image_size, proc=proc, sys=sys)
    if info.kind == "block":
        # Held through the checks and the discard. bmaptool opens the disk O_EXCL itself and the kernel allows one
        # claim, so ours is handed over just before it starts and taken again for the read-back.
        fd = _claim(target, os.O_RDWR)
        try:
            if discard:
                _discard(target)
        finally:
            os.close(fd)
    elif discard:
        # bmaptool truncates a file target too (it opens it "wb+"); done here as well so it does not rely on that
        with open(target, "wb"):
            pass
        os.truncate(target, bm.image_size)
    copy_seconds = _copy(image, bmap_path, target, bm.mapped_bytes, on_progress)
    readback_seconds = read_back(target, bm, on_progress=on_readback)
    if enrollment is not None and offset is not None:
        write_enrollment(target, offset, enrollment)
    return FlashReport(
        target=info,
        mapped_bytes=bm.mapped_bytes,
        image_size=bm.image_size,
        copy_seconds=copy_seconds,
        readback_seconds=readback_seconds,
        mb_per_s=bm.mapped_bytes / max(copy_seconds, 1e-9) / 1e6,
        enrollment=ENROLLMENT_PATH if enrollment is not None else None,
    )


def _open_for_readback(target: Path) -> int:
    try:
        st = os.stat(target)
    except OSError as exc:
        raise ImageBadInput(f"cannot read back {target}: {exc.strerror}") from exc
    if stat.S_ISBLK(st.st_mode):
        return _claim(target, os.O_RDONLY | os.O_DIRECT)  # O_DIRECT: the device's bytes, not the page cache's
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    # fsync first: DONTNEED drops only clean pages, and the read must come from the disk, not from what was written
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def read_back(target: Path, bm: bmap.BlockMap, *, on_progress: Progress | None = None) -> float:
    """Read every mapped range of TARGET and compare it with the bmap's sha256; the seconds it took."""
    start = time.monotonic()
    total, done = bm.mapped_bytes, 0
    fd = _open_for_readback(target)
    buf = mmap.mmap(-1, _CHUNK + _ALIGN)  # anonymous mmap: page-aligned, as O_DIRECT needs
    try:
        with memoryview(buf) as view:
            for r, (offset, length, sha) in zip(bm.ranges, bm.byte_ranges(), strict=True):
                digest, pos, end = hashlib.sha256(), offset, offset + length
                while pos < end:
                    lo = pos - pos % _ALIGN
                    want = min(_CHUNK, end - pos)
                    span = -(-(pos - lo + want) // _ALIGN) * _ALIGN
                    got = min(os.preadv(fd, [view[:span]], lo) - (pos - lo), want)
                    if got <= 0:
                        raise ImageCheckFailed(
                            f"read-back of {target} ended at byte {pos}, inside blocks "
                            f"{r.first}-{r.last} (the image has {bm.image_size} bytes)"
                        )
                    digest.update(view[pos - lo : pos - lo + got])
                    pos, done = pos + got, done + got
                    if on_progress is not None:
                        on_progress(done, total)
                if digest.hexdigest() != sha:
                    raise ImageCheckFailed(
                        f"read-back of {target} differs from the image in blocks {r.first}-{r.last} "
                        f"(bytes {offset}-{end - 1}): sha256 {digest.hexdigest()}, the bmap says {sha}"
                    )
    finally:
        buf.close()
        os.close(fd)
    return time.monotonic() - start
