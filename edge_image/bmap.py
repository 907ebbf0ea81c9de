"""bmaptool's block map (bmap 2.0 XML): which blocks of a sparse image hold data, with a sha256 per range.

`bmaptool create` writes it and `bmaptool copy` consumes it; this module makes one (through the tool) and reads one,
checking it the way bmaptool 3.6 does, so that flash can report progress and read the target back range by range.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from edge_image import tools
from edge_image.errors import ImageBadInput

_HEX64 = re.compile(r"[0-9a-f]{64}")


class Range(BaseModel):
    """A run of mapped blocks, `first` to `last` inclusive, and the sha256 of their bytes (clipped at the image end)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first: int
    last: int
    sha256: str


class BlockMap(BaseModel):
    """A parsed bmap file; `ranges` are sorted, disjoint and inside the image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    image_size: int
    block_size: int
    blocks_count: int
    mapped_blocks: int
    ranges: list[Range]

    def byte_ranges(self) -> list[tuple[int, int, str]]:
        """(offset, length, sha256) per range; the image's last block may be partial, and bmaptool hashes (and
        copies) only the bytes that exist, so the length is clamped to the image size."""
        out = []
        for r in self.ranges:
            offset = r.first * self.block_size
            end = min((r.last + 1) * self.block_size, self.image_size)
            out.append((offset, end - offset, r.sha256))
        return out

    @property
    def mapped_bytes(self) -> int:
        """Bytes bmaptool copies: the mapped blocks, the last one clamped at the image end."""
        return sum(length for _, length, _ in self.byte_ranges())


def create(image: Path, out: Path) -> BlockMap:
    """Run `bmaptool create -o OUT IMAGE` (holes are found with SEEK_HOLE/FIEMAP) and return the parsed map."""
    if not image.is_file():
        raise ImageBadInput(f"image {image} is not a regular file")
    tools.run(["bmaptool", "create", "-o", out, image], what=f"making the block map of {image}")
    return parse(out)


def _bad(path: Path, why: str) -> ImageBadInput:
    return ImageBadInput(f"{path} is not a usable bmap file: {why}")


def _int(root: ET.Element, tag: str, path: Path) -> int:
    node = root.find(tag)
    text = (node.text or "").strip() if node is not None else ""
    if not text.isdigit():
        raise _bad(path, f"<{tag}> is missing or not a number")
    return int(text)


def _text(root: ET.Element, tag: str, path: Path) -> str:
    node = root.find(tag)
    if node is None or not (node.text or "").strip():
        raise _bad(path, f"<{tag}> is missing")
    return (node.text or "").strip()


def _check_file_checksum(raw: bytes, stated: str, path: Path) -> None:
    # bmaptool's rule (BmapCopy._verify_bmap_checksum): the first occurrence of the stated value in the file is
    # replaced by 64 ASCII zeros and the whole file hashed; create computed it with the zeros in place.
    at = raw.find(stated.encode())
    if at < 0:  # not stored as plain ASCII (another encoding): bmaptool could not check it either
        raise _bad(path, "BmapFileChecksum is not stored as plain text")
    zeroed = raw[:at] + b"0" * len(stated) + raw[at + len(stated) :]
    calculated = hashlib.sha256(zeroed).hexdigest()
    if calculated != stated:
        raise _bad(path, f"BmapFileChecksum mismatch (calculated {calculated}, the file says {stated})")


def _parse_range(node: ET.Element, path: Path) -> Range:
    text = (node.text or "").strip()
    # "first-last" or a single block, as bmaptool writes them (it also tolerates spaces around the dash)
    parts = [p.strip() for p in text.split("-", 1)]
    if not all(p.isdigit() for p in parts):
        raise _bad(path, f"bad <Range> {text!r}")
    first, last = int(parts[0]), int(parts[-1])
    sha = node.get("chksum", "")
    if first > last:
        raise _bad(path, f"bad <Range> {text!r} (first > last)")
    if not _HEX64.fullmatch(sha):
        raise _bad(path, f"<Range> {text!r} has no sha256 chksum")
    return Range(first=first, last=last, sha256=sha)


def parse(path: Path) -> BlockMap:
    """Read and check a bmap 2.x file: structure, geometry, ranges and its own BmapFileChecksum."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImageBadInput(f"cannot read bmap file {path}: {exc.strerror}") from exc
    # bmaptool never writes a DTD; refusing one rules out entity expansion tricks before expat sees the file.
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise _bad(path, "it declares a DTD")
    try:
        root = ET.fromstring(raw)  # noqa: S314 - no DTD allowed above, so no entities to expand
    except ET.ParseError as exc:
        raise _bad(path, f"not XML ({exc})") from exc
    if root.tag != "bmap":
        raise _bad(path, f"the root element is <{root.tag}>, not <bmap>")
    version = root.get("version", "")
    if version.split(".", 1)[0] != "2":
        raise _bad(path, f"bmap format version {version or '(none)'} is not supported (2.x only)")
    checksum_type = _text(root, "ChecksumType", path)
    if checksum_type != "sha256":
        raise _bad(path, f"checksum type {checksum_type} is not supported (sha256 only)")
    stated = _text(root, "BmapFileChecksum", path)
    if not _HEX64.fullmatch(stated):
        raise _bad(path, "BmapFileChecksum is not a sha256")
    _check_file_checksum(raw, stated, path)

    image_size = _int(root, "ImageSize", path)
    block_size = _int(root, "BlockSize", path)
    blocks_count = _int(root, "BlocksCount", path)
    mapped_blocks = _int(root, "MappedBlocksCount", path)
    if block_size == 0 or blocks_count != -(-image_size // block_size):
        raise _bad(path, f"{blocks_count} blocks of {block_size} bytes do not make an image of {image_size} bytes")
    block_map = root.find("BlockMap")
    if block_map is None:
        raise _bad(path, "<BlockMap> is missing")
    ranges = [_parse_range(node, path) for node in block_map.findall("Range")]
    previous = -1
    for r in ranges:
        # bmaptool writes them in order; overlaps or blocks past the end would make the counts below meaningless
        if r.first <= previous or r.last >= blocks_count:
            raise _bad(path, f"range {r.first}-{r.last} overlaps another or lies past block {blocks_count - 1}")
        previous = r.last
    counted = sum(r.last - r.first + 1 for r in ranges)
    if counted != mapped_blocks:
        raise _bad(path, f"the ranges hold {counted} blocks but MappedBlocksCount says {mapped_blocks}")
    return BlockMap(
        version=version,
        image_size=image_size,
        block_size=block_size,
        blocks_count=blocks_count,
        mapped_blocks=mapped_blocks,
        ranges=ranges,
    )


def ranges_within(bm: BlockMap, start: int, end: int) -> list[tuple[int, int]]:
    """Mapped byte ranges clipped to [start, end), as (offset relative to start, length): which parts of a partition
    at that offset hold data."""
    out = []
    for offset, length, _ in bm.byte_ranges():
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            out.append((lo - start, hi - lo))
    return out
