"""The GPT disk image: its layout, the partition table written and read back with `sfdisk`, and sparse assembly.

Everything works on plain files: no loop device, no mount. The image stays sparse (a hole = never written), so the
block map later lists only what the build really wrote.
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from edge_image import tools
from edge_image.errors import ImageBadInput, ImageCheckFailed, ImageError

MIB = 1 << 20
SECTOR = 512
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # root x86-64 (Discoverable Partitions Specification)
ESP_NAME = "membria-esp"
ROOT_NAME = "membria-root"

GPT_SIGNATURE = b"EFI PART"
# copy_file_range chunk: small enough for progress callbacks, large enough to cost nothing.
_CHUNK = 64 * MIB
# copy_file_range refuses some pairs of files (across filesystems on old kernels, some filesystems, special files).
_FALLBACK_ERRNOS = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
# Lines of `sfdisk --verify` that only describe a healthy table.
_VERIFY_INFO = re.compile(
    r"^(No errors detected\.|Header version: .*|Using \d+ out of \d+ partitions\.|A total of .*)$"
)


def _guid(value: str) -> str:
    """A GUID in sfdisk's spelling (upper case), or ValueError."""
    return str(uuid.UUID(value)).upper()


def _new_guid() -> str:
    return str(uuid.uuid4()).upper()


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Partition(_Model):
    """One GPT entry; start and size in bytes."""

    number: int
    name: str
    type_guid: str
    uuid: str
    start: int
    size: int

    @field_validator("type_guid", "uuid")
    @classmethod
    def _canonical_guid(cls, value: str) -> str:
        # Upper case as sfdisk prints it, so a layout read back compares equal to the planned one.
        return _guid(value)


class Layout(_Model):
    """The whole disk: its size in bytes, the GPT disk GUID and the partitions in table order."""

    disk_size: int
    disk_guid: str
    partitions: list[Partition]

    @field_validator("disk_guid")
    @classmethod
    def _canonical_guid(cls, value: str) -> str:
        return _guid(value)

    def partition(self, name: str) -> Partition:
        """The partition with this GPT name."""
        for part in self.partitions:
            if part.name == name:
                return part
        names = ", ".join(p.name for p in self.partitions) or "none"
        raise ImageCheckFailed(f"the disk has no partition named {name!r} (partitions: {names})")


def plan(
    esp_size: int,
    root_size: int,
    *,
    disk_guid: str | None = None,
    esp_uuid: str | None = None,
    root_uuid: str | None = None,
) -> Layout:
    """The image's layout: ESP at 1 MiB, root right after it, 1 MiB at the end for the backup GPT."""
    for what, size in (("ESP size", esp_size), ("root size", root_size)):
        if size <= 0 or size % MIB:
            raise ImageBadInput(f"{what} must be a positive multiple of 1 MiB, not {size} bytes")
    try:
        esp = Partition(
            number=1,
            name=ESP_NAME,
            type_guid=ESP_TYPE,
            uuid=esp_uuid or _new_guid(),
            start=MIB,
            size=esp_size,
        )
        root = Partition(
            number=2,
            name=ROOT_NAME,
            type_guid=ROOT_TYPE,
            uuid=root_uuid or _new_guid(),
            start=esp.start + esp.size,
            size=root_size,
        )
        return Layout(
            disk_size=root.start + root.size + MIB, disk_guid=disk_guid or _new_guid(), partitions=[esp, root]
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError: a GUID that is not one
        raise ImageBadInput(f"invalid GUID for the disk layout: {exc}") from exc


def _script(layout: Layout) -> str:
    """The sfdisk script for the layout (all in 512-byte sectors)."""
    lines = [
        "label: gpt",
        f"label-id: {layout.disk_guid}",
        "unit: sectors",
        f"first-lba: {MIB // SECTOR}",
    ]
    for index, part in enumerate(layout.partitions, start=1):
        if part.number != index:
            # sfdisk numbers script lines in order; a gap could not be written as planned.
            raise ImageBadInput(f"partition numbers must run 1, 2, ... in order; got {part.number} at place {index}")
        if part.start % SECTOR or part.size % SECTOR or part.size <= 0 or part.start < MIB:
            raise ImageBadInput(f"partition {part.name!r}: start and size must be whole sectors, from 1 MiB on")
        if not part.name or '"' in part.name or "\\" in part.name or not part.name.isprintable() or len(part.name) > 36:
            raise ImageBadInput(f"partition name {part.name!r} cannot go in a GPT entry (1-36 plain characters)")
        lines.append(
            f"start={part.start // SECTOR}, size={part.size // SECTOR}, type={part.type_guid}, "
            f'name="{part.name}", uuid={part.uuid}'
        )
    return "\n".join(lines) + "\n"


def _size(path: Path) -> int:
    """Size in bytes of a file or a block device."""
    with path.open("rb") as handle:
        return handle.seek(0, os.SEEK_END)


def write_table(image: Path, layout: Layout) -> Layout:
    """Write the layout's GPT onto `image` (created or grown, sparse, to the disk size); returns the table read back."""
    if image.exists() and not image.is_file():
        raise ImageBadInput(f"{image} is not a regular file; the partition table is written to an image file only")
    current = image.stat().st_size if image.exists() else 0
    if current > layout.disk_size:
        raise ImageBadInput(
            f"{image} is {current} bytes, larger than the planned disk ({layout.disk_size} bytes): not shrunk"
        )
    script = _script(layout)
    with image.open("ab") as handle:
        handle.truncate(layout.disk_size)  # grows with a hole: nothing is written
    tools.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", image],
        what=f"writing the partition table of {image}",
        stdin=script.encode(),
    )
    written = read_table(image)
    if written != layout:
        raise ImageError(
            f"the partition table read back from {image} differs from the plan",
            hint=f"planned {layout.model_dump_json()}, read {written.model_dump_json()}",
        )
    return written


def _partition_number(node: str, device: str) -> int:
    # sfdisk names a partition <device><n>, or <device>p<n> when the device name ends with a digit.
    tail = node[len(device) :] if node.startswith(device) else node
    found = re.search(r"(\d+)$", tail)
    if found is None:
        raise ImageCheckFailed(f"cannot tell the partition number of {node!r}")
    return int(found.group(1))


def read_table(image: Path) -> Layout:
    """The GPT of `image` as sfdisk reads it (a corrupt primary header silently falls back to the backup)."""
    if not image.exists():
        raise ImageBadInput(f"{image} does not exist")
    result = tools.run(["sfdisk", "--json", image], what=f"reading the partition table of {image}", ok_codes=(0, 1))
    if result.returncode != 0 or not result.stdout.strip():
        raise ImageCheckFailed(f"{image} holds no partition table sfdisk can read")
    try:
        table: dict[str, Any] = json.loads(result.stdout)["partitiontable"]
    except (ValueError, KeyError) as exc:
        raise ImageCheckFailed(f"sfdisk's JSON for {image} cannot be read: {exc}") from exc
    if table.get("label") != "gpt":
        raise ImageCheckFailed(f"{image} has a {table.get('label')!r} partition table, not a GPT")
    sector = int(table.get("sectorsize", SECTOR))
    device = str(table.get("device", image))
    try:
        partitions = [
            Partition(
                number=_partition_number(str(entry["node"]), device),
                name=str(entry.get("name", "")),
                type_guid=str(entry["type"]),
                uuid=str(entry["uuid"]),
                start=int(entry["start"]) * sector,
                size=int(entry["size"]) * sector,
            )
            for entry in table.get("partitions", [])
        ]
        return Layout(disk_size=_size(image), disk_guid=str(table["id"]), partitions=partitions)
    except (KeyError, ValueError, TypeError) as exc:
        raise ImageCheckFailed(f"the GPT of {image} cannot be understood: {exc}") from exc


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def verify_table(image: Path) -> list[str]:
    """Problems with the GPT of `image`: what `sfdisk --verify` reports, and both headers present. Empty = fine."""
    if not image.exists():
        raise ImageBadInput(f"{image} does not exist")
    problems: list[str] = []
    size = _size(image)
    if size < 3 * SECTOR:
        return [f"{image} is too small ({size} bytes) to hold a GPT"]
    # sfdisk falls back to the other header when one is damaged and says so only on stderr, exit status 0.
    if _read_at(image, SECTOR, 8) != GPT_SIGNATURE:
        problems.append("primary GPT header missing (LBA 1 does not start with 'EFI PART')")
    last = (size // SECTOR - 1) * SECTOR
    if _read_at(image, last, 8) != GPT_SIGNATURE:
        problems.append(f"backup GPT header missing (last LBA {last // SECTOR} does not start with 'EFI PART')")
    result = tools.run(["sfdisk", "--verify", image], what=f"verifying the partition table of {image}", ok_codes=(0, 1))
    out = result.stdout.decode(errors="replace").splitlines()
    err = result.stderr.decode(errors="replace").splitlines()
    for line in (line.strip() for line in out + err):
        if not line or line == f"{image}:" or _VERIFY_INFO.match(line):
            continue
        problems.append(f"sfdisk: {line}")
    if result.returncode != 0:
        problems.append(f"sfdisk --verify exited {result.returncode}")
    elif not any(line.strip() == "No errors detected." for line in out):
        problems.append("sfdisk --verify did not report 'No errors detected.'")
    return problems


def data_ranges(path: Path, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(offset, length) of each data range of `path` within [start, end), from SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        stop = size if end is None else min(end, size)
        ranges: list[tuple[int, int]] = []
        offset = max(start, 0)
        while offset < stop:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after offset
                    break
                if exc.errno == errno.EINVAL:  # no hole support here (a block device): all of it is data
                    return [(offset, stop - offset)]
                raise
            if data >= stop:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), stop)
            ranges.append((data, hole - data))
            offset = hole
        return ranges
    finally:
        os.close(fd)


def _copy_range_fallback(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    while length > 0:
        chunk = os.pread(src_fd, min(length, 4 * MIB), src_off)
        if not chunk:
            raise ImageError(f"short read while copying at offset {src_off}")
        view = memoryview(chunk)
        while view:
            written = os.pwrite(dst_fd, view, dst_off)
            view = view[written:]
            dst_off += written
        src_off += len(chunk)
        length -= len(chunk)


def copy_sparse(src: Path, dst: Path, dst_offset: int, *, on_bytes: Callable[[int], None] | None = None) -> int:
    """Copy the data ranges of `src` into `dst` at `dst_offset`; holes are skipped and stay holes in `dst`.

    `dst` must already be large enough (it is never grown, so a partition cannot spill past its end). `on_bytes` is
    called with the bytes copied by each step (a delta, for a progress bar). Returns the bytes copied.
    """
    if dst_offset < 0:
        raise ImageBadInput(f"negative offset {dst_offset}")
    src_size = _size(src)
    dst_size = _size(dst)
    if dst_offset + src_size > dst_size:
        raise ImageBadInput(f"{src} ({src_size} bytes) does not fit in {dst} ({dst_size} bytes) at offset {dst_offset}")
    ranges = data_ranges(src)
    copied = 0
    use_copy_file_range = hasattr(os, "copy_file_range")
    src_fd = os.open(src, os.O_RDONLY)
    try:
        dst_fd = os.open(dst, os.O_WRONLY)
        try:
            for offset, length in ranges:
                done = 0
                while done < length:
                    step = min(_CHUNK, length - done)
                    src_off, dst_off = offset + done, dst_offset + offset + done
                    if use_copy_file_range:
                        try:
                            n = os.copy_file_range(src_fd, dst_fd, step, src_off, dst_off)
                        except OSError as exc:
                            if exc.errno not in _FALLBACK_ERRNOS:
                                raise
                            use_copy_file_range = False
                            continue
                        if n == 0:
                            raise ImageError(f"{src} ended early while copying at offset {src_off}")
                    else:
                        _copy_range_fallback(src_fd, dst_fd, src_off, dst_off, step)
                        n = step
                    done += n
                    copied += n
                    if on_bytes is not None:
                        on_bytes(n)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return copied
