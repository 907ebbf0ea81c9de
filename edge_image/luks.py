"""LUKS2 on a partition file without device-mapper: header, volume-key dump, and our own AES-XTS sector crypt.

`cryptsetup luksFormat` writes the header with a volume key we chose; we then encrypt only the plaintext
filesystem's data ranges as dm-crypt's `aes-xts-plain64` would (holes stay holes, so the image stays sparse), and
verify decrypts them again offline. Every read of a header runs cryptsetup on a private copy of the header area:
cryptsetup silently rewrites a damaged header copy from the intact one, which would both hide tampering and
change the image under verification. Secrets only ever touch files in `private_dir()` (tmpfs).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_image import tools
from edge_image.errors import ImageBadInput, ImageCheckFailed, ImageError

MIB = 1 << 20
CHUNK = 4 * MIB
# dm-crypt's plain64 IV counts 512-byte sectors even for 4096-byte LUKS2 sectors: cryptsetup sets
# iv_large_sectors only for plain/BITLK mappings (the cryptsetup cross-check in tests/image proves it).
IV_UNIT = 512
_SHM = Path("/dev/shm")  # noqa: S108 - tmpfs on purpose; mkdtemp makes a private 0700 dir in it
# LUKS2 binary header (the first 512 bytes of each 4096-byte copy; big-endian): magic, version, hdr_size, seqid,
# label, csum_alg, salt, uuid, subsystem, hdr_offset, padding, csum.
_BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM = slice(448, 512)
_MAGICS = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")
_HDR_SIZES = frozenset(16384 << n for n in range(9))  # 16 KiB .. 4 MiB, the sizes LUKS2 allows


@dataclass(frozen=True)
class LuksParams:
    """The LUKS2 parameters of the root partition (DESIGN.md, Disk layout)."""

    cipher: str = "aes-xts-plain64"
    key_bits: int = 512
    sector_size: int = 4096
    pbkdf: str = "argon2id"
    pbkdf_memory_kib: int = 65536
    pbkdf_iterations: int = 4
    pbkdf_parallel: int = 1
    data_offset: int = 16 * MIB  # where the encrypted segment starts (LUKS2's default header size)


@contextmanager
def private_dir() -> Iterator[Path]:
    """A 0700 directory on /dev/shm (tmpfs: keys never reach a disk), removed with every file in it on exit."""
    usable = _SHM.is_dir() and os.access(_SHM, os.W_OK | os.X_OK)
    path = Path(tempfile.mkdtemp(prefix="membria-luks-", dir=_SHM if usable else None))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _write_secret(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")  # LUKS and its token plugins may add fields


class Kdf(_Model):
    type: str
    time: int | None = None
    iterations: int | None = None
    memory: int | None = None
    cpus: int | None = None
    hash: str | None = None
    salt: str | None = None


class KeyslotArea(_Model):
    type: str
    offset: int
    size: int
    encryption: str | None = None
    key_size: int | None = None


class Keyslot(_Model):
    type: str
    key_size: int
    kdf: Kdf = Field(default_factory=lambda: Kdf(type="none"))  # a reencrypt keyslot has none
    area: KeyslotArea


class Segment(_Model):
    type: str
    offset: int
    size: Literal["dynamic"] | int
    iv_tweak: int = 0
    encryption: str | None = None
    sector_size: int | None = None
    flags: list[str] = Field(default_factory=list)


class Token(_Model):
    type: str
    keyslots: list[str]


class Digest(_Model):
    type: str
    keyslots: list[str]
    segments: list[str]
    hash: str | None = None
    iterations: int | None = None


class Requirements(_Model):
    mandatory: list[str] = Field(default_factory=list)


class Config(_Model):
    json_size: int
    keyslots_size: int
    flags: list[str] = Field(default_factory=list)
    requirements: Requirements = Field(default_factory=Requirements)


class LuksHeader(BaseModel):
    """LUKS2 metadata as `cryptsetup luksDump --dump-json-metadata` prints it, plus the binary header's uuid/label."""

    uuid: str
    label: str
    keyslots: dict[str, Keyslot]
    tokens: dict[str, Token]
    segments: dict[str, Segment]
    digests: dict[str, Digest]
    config: Config

    @property
    def segment(self) -> Segment:
        """The one crypt segment (an image mid-reencryption has more: refused)."""
        kinds = [s.type for s in self.segments.values()]
        if kinds != ["crypt"]:
            raise ImageCheckFailed(f"LUKS2 header has segments {kinds}, expected exactly one crypt segment")
        return next(iter(self.segments.values()))

    @property
    def data_offset(self) -> int:
        return self.segment.offset

    @property
    def reencrypting(self) -> bool:
        return any(k.type == "reencrypt" for k in self.keyslots.values()) or any(
            r.startswith("online-reencrypt") for r in self.config.requirements.mandatory
        )


def _check_key(volume_key: bytes, params: LuksParams) -> None:
    if len(volume_key) * 8 != params.key_bits:
        raise ImageBadInput(
            f"volume key is {len(volume_key)} bytes, {params.cipher} with {params.key_bits} bits needs "
            f"{params.key_bits // 8}"
        )


def luks_format(
    partition: Path,
    *,
    volume_key: bytes,
    passphrase: bytes,
    params: LuksParams = LuksParams(),
    label: str = "membria-root",
    uuid: str | None = None,
) -> None:
    """Write a LUKS2 header with our volume key onto an existing (sparse) partition file; the data area stays a hole."""
    _check_key(volume_key, params)
    if not passphrase:
        raise ImageBadInput("the LUKS passphrase is empty")
    if len(label.encode()) >= 48:
        raise ImageBadInput(f"LUKS label {label!r} is longer than 47 bytes")
    if not partition.is_file():
        raise ImageBadInput(f"{partition} is not a file")
    size = partition.stat().st_size
    if params.data_offset % params.sector_size or size % params.sector_size or size <= params.data_offset:
        raise ImageBadInput(
            f"{partition} is {size} bytes: needs a multiple of {params.sector_size} above the "
            f"{params.data_offset}-byte header (itself a multiple of {params.sector_size})"
        )
    with private_dir() as tmp:
        argv: list[str | Path] = [
            "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
            "--cipher", params.cipher, "--key-size", str(params.key_bits), "--sector-size", str(params.sector_size),
            "--pbkdf", params.pbkdf, "--pbkdf-memory", str(params.pbkdf_memory_kib),
            "--pbkdf-force-iterations", str(params.pbkdf_iterations), "--pbkdf-parallel", str(params.pbkdf_parallel),
            # --offset counts 512-byte sectors whatever the encryption sector size
            "--offset", str(params.data_offset // 512), "--label", label,
            "--volume-key-file", _write_secret(tmp / "volume.key", volume_key),
            "--key-file", _write_secret(tmp / "passphrase", passphrase),
        ]  # fmt: skip
        if uuid is not None:
            argv += ["--uuid", uuid]
        tools.run([*argv, partition], what=f"luksFormat on {partition}")
    written = [r for r in data_ranges(partition) if r[0] + r[1] > params.data_offset]
    if written:
        raise ImageError(f"luksFormat wrote into the data area of {partition} (data at {written[-1]})")
    offset = read_header(partition).data_offset
    if offset != params.data_offset:
        raise ImageError(f"luksFormat put the data segment of {partition} at {offset}, not {params.data_offset}")


@dataclass(frozen=True)
class _Binary:
    hdr_size: int
    seqid: int
    label: str
    uuid: str


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def _check_copy(partition: Path, area: bytes, which: int) -> _Binary:
    """One binary header copy: magic, version, offset and sha256 checksum over header + JSON area, checked by us."""
    name = ("primary", "secondary")[which]
    magic, version, hdr_size, seqid, label, csum_alg, _, uuid, _, hdr_offset, _, csum = _BINARY.unpack_from(area)
    if magic != _MAGICS[which] or version != 2 or hdr_size not in _HDR_SIZES or hdr_offset != which * hdr_size:
        raise ImageCheckFailed(f"{partition}: no valid {name} LUKS2 header")
    if _cstr(csum_alg) != "sha256":
        raise ImageCheckFailed(f"{partition}: {name} LUKS2 header checksum {_cstr(csum_alg)!r}, expected sha256")
    copy = area[:hdr_size]
    digest = hashlib.sha256(copy[: _CSUM.start] + bytes(64) + copy[_CSUM.stop :]).digest()
    if len(copy) != hdr_size or csum != digest + bytes(32):
        raise ImageCheckFailed(f"{partition}: {name} LUKS2 header checksum mismatch")
    return _Binary(hdr_size, seqid, _cstr(label), _cstr(uuid))


@contextmanager
def _header_copy(partition: Path) -> Iterator[tuple[Path, _Binary]]:
    """The header area (both metadata copies, keyslots) copied sparsely into a private dir; both copies checked."""
    try:
        fh = partition.open("rb")
    except OSError as exc:
        raise ImageBadInput(f"cannot read {partition}: {exc.strerror}") from exc
    with fh, private_dir() as tmp:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        head = os.pread(fd, 4096, 0)
        if len(head) < _BINARY.size or head[:6] != _MAGICS[0]:
            raise ImageCheckFailed(f"{partition} holds no LUKS2 header")
        hdr_size = _BINARY.unpack_from(head)[2]
        both = os.pread(fd, 2 * hdr_size, 0) if hdr_size in _HDR_SIZES else head
        if len(both) < 2 * hdr_size:
            raise ImageCheckFailed(f"{partition} is too short for its {hdr_size}-byte LUKS2 header copies")
        primary = _check_copy(partition, both, 0)
        secondary = _check_copy(partition, both[hdr_size:], 1)
        if (primary.seqid, primary.uuid, primary.label) != (secondary.seqid, secondary.uuid, secondary.label):
            raise ImageCheckFailed(f"{partition}: primary and secondary LUKS2 headers differ")
        try:
            metadata = json.loads(_cstr(both[4096:hdr_size]))
            area_end = 2 * hdr_size + int(metadata["config"]["keyslots_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageCheckFailed(f"{partition}: unreadable LUKS2 JSON metadata ({exc})") from exc
        if area_end > size:
            raise ImageCheckFailed(f"{partition} is {size} bytes, shorter than its {area_end}-byte LUKS2 header area")
        copy = tmp / "header"
        with copy.open("wb") as out:
            for pos in range(0, area_end, MIB):
                block = os.pread(fd, min(MIB, area_end - pos), pos)
                if block.count(0) != len(block):  # keep the copy as sparse as the keyslot area's zeros allow
                    os.pwrite(out.fileno(), block, pos)
            out.truncate(area_end)
        yield copy, primary


def read_header(partition: Path) -> LuksHeader:
    """The partition's LUKS2 header, both copies checksummed; a missing or damaged header is ImageCheckFailed."""
    with _header_copy(partition) as (copy, binary):
        result = tools.run(["cryptsetup", "luksDump", "--dump-json-metadata", copy], what="luksDump",
                           ok_codes=range(256))  # fmt: skip
        if result.returncode != 0:
            why = result.stderr.decode(errors="replace").strip()
            raise ImageCheckFailed(f"{partition}: cryptsetup refused the LUKS2 header: {why}")
    try:
        data: dict[str, Any] = json.loads(result.stdout)
        return LuksHeader.model_validate({**data, "uuid": binary.uuid, "label": binary.label})
    except (ValueError, ValidationError) as exc:
        raise ImageCheckFailed(f"{partition}: unexpected LUKS2 metadata: {exc}") from exc


def dump_volume_key(partition: Path, passphrase: bytes) -> bytes:
    """The volume key a passphrase unlocks (via a tmpfs file, deleted); opening no keyslot is ImageCheckFailed."""
    with _header_copy(partition) as (copy, _):
        key_file = copy.parent / "volume.key"
        result = tools.run(
            ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--volume-key-file", key_file,
             "--key-file", _write_secret(copy.parent / "passphrase", passphrase), copy],
            what=f"volume-key dump of {partition}", ok_codes=(0, 2),
        )  # fmt: skip
        if result.returncode == 2:  # EPERM: no keyslot opens with this passphrase
            raise ImageCheckFailed(f"the passphrase opens no keyslot of {partition}")
        return key_file.read_bytes()


def opens(partition: Path, passphrase: bytes) -> bool:
    """Whether the passphrase opens a keyslot (`cryptsetup open --test-passphrase`: no device-mapper needed)."""
    with _header_copy(partition) as (copy, _):
        pass_file = _write_secret(copy.parent / "passphrase", passphrase)
        result = tools.run(["cryptsetup", "open", "--test-passphrase", "--key-file", pass_file, copy],
                           what=f"passphrase test on {partition}", ok_codes=(0, 1, 2))  # fmt: skip
        # 2: the passphrase opens no slot; 1 with this message: there is no slot left at all (after luksErase).
        if result.returncode == 1 and b"No usable keyslot" not in result.stderr:
            raise ImageError(f"passphrase test on {partition} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.returncode == 0


class SectorCipher:
    """AES-XTS over whole sectors as dm-crypt's aes-xts-plain64: the tweak of sector n is the 64-bit
    little-endian `iv_offset + n * sector_size / 512` (iv_offset in 512-byte units, as LUKS2's iv_tweak)."""

    def __init__(self, volume_key: bytes, sector_size: int, iv_offset: int = 0) -> None:
        if len(volume_key) not in (32, 64):
            raise ImageBadInput(f"an AES-XTS key is 32 or 64 bytes, not {len(volume_key)}")
        half = len(volume_key) // 2
        if volume_key[:half] == volume_key[half:]:
            raise ImageBadInput("the two halves of the AES-XTS key are equal")
        if sector_size not in (512, 1024, 2048, 4096) or iv_offset < 0:
            raise ImageBadInput(f"sector size {sector_size} / IV offset {iv_offset}: not a dm-crypt sector")
        self._aes = algorithms.AES(volume_key)
        self.sector_size = sector_size
        self.iv_offset = iv_offset
        self._step = sector_size // IV_UNIT

    def encrypt(self, data: bytes, first_sector: int) -> bytes:
        return self._crypt(data, first_sector, encrypt=True)

    def decrypt(self, data: bytes, first_sector: int) -> bytes:
        return self._crypt(data, first_sector, encrypt=False)

    def _crypt(self, data: bytes, first_sector: int, *, encrypt: bool) -> bytes:
        size = self.sector_size
        if len(data) % size or first_sector < 0:
            raise ValueError(f"{len(data)} bytes from sector {first_sector}: not whole {size}-byte sectors")
        view = memoryview(data)
        out = bytearray(len(data))
        for i, pos in enumerate(range(0, len(data), size)):
            iv = (self.iv_offset + (first_sector + i) * self._step) % (1 << 64)  # plain64: 64 bits, zero-padded
            cipher = Cipher(self._aes, modes.XTS(iv.to_bytes(16, "little")))
            # one update per sector: OpenSSL treats each XTS update as a whole data unit under this tweak
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            out[pos : pos + size] = ctx.update(view[pos : pos + size])
            ctx.finalize()
        return bytes(out)


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each data range of a file (SEEK_DATA/SEEK_HOLE; without hole support: the whole file)."""
    ranges: list[tuple[int, int]] = []
    with path.open("rb") as fh:
        fd, pos = fh.fileno(), 0
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                    break
                raise
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, pos - start))
    return ranges


def _sector_spans(ranges: list[tuple[int, int]], sector: int, limit: int) -> list[tuple[int, int]]:
    """(start, end) spans rounded out to whole sectors, clipped to [0, limit), sorted and merged."""
    spans: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        start, end = max(0, offset // sector * sector), min(limit, -(-(offset + length) // sector) * sector)
        if end <= start:
            continue
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ImageCheckFailed(f"short read: {len(data)} of {length} bytes at {offset}")
    return data


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def encrypt_into(
    plain: Path,
    partition: Path,
    *,
    volume_key: bytes,
    params: LuksParams = LuksParams(),
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Encrypt the data ranges of the plaintext filesystem file into the formatted partition's segment.

    Only whole sectors around plain's data are written (at data_offset + offset), so its holes stay holes.
    on_bytes is called with each chunk's byte count. Returns the bytes encrypted.
    """
    _check_key(volume_key, params)
    cipher = SectorCipher(volume_key, params.sector_size)  # iv_offset 0: the iv_tweak luksFormat writes
    plain_size, part_size = plain.stat().st_size, partition.stat().st_size
    room = part_size - params.data_offset
    if plain_size % params.sector_size:
        raise ImageBadInput(f"{plain} is {plain_size} bytes, not a multiple of the {params.sector_size}-byte sector")
    if plain_size > room:
        raise ImageBadInput(
            f"{plain} is {plain_size} bytes but {partition} ({part_size} bytes) holds only {room} "
            f"after its {params.data_offset}-byte header"
        )
    written = [r for r in data_ranges(partition) if r[0] + r[1] > params.data_offset]
    if written:  # stale bytes would survive in plain's holes
        raise ImageBadInput(f"the data area of {partition} is not empty (data at {written[0]}): format a fresh file")
    total = 0
    with plain.open("rb") as src, partition.open("r+b") as dst:
        for start, end in _sector_spans(data_ranges(plain), params.sector_size, plain_size):
            for pos in range(start, end, CHUNK):
                data = _pread_all(src.fileno(), min(CHUNK, end - pos), pos)
                _pwrite_all(dst.fileno(), cipher.encrypt(data, pos // params.sector_size), params.data_offset + pos)
                total += len(data)
                if on_bytes is not None:
                    on_bytes(len(data))
        os.fsync(dst.fileno())
    return total


def plaintext_chunks(
    partition: Path,
    *,
    volume_key: bytes,
    length: int,
    mapped: list[tuple[int, int]] | None = None,
    params: LuksParams = LuksParams(),
    chunk: int = 4 * MIB,
    base: int = 0,
) -> Iterator[bytes]:
    """The decrypted segment's first `length` bytes in order; unmapped ranges read as zeros, never decrypted.

    `mapped`: (offset, length) within the partition that hold data (a block map); None = the file's SEEK_DATA
    ranges. `base`: where the partition starts in the file (a whole disk image); 0 for a partition file.
    Sizes are checked here, before the first chunk is asked for.
    """
    _check_key(volume_key, params)
    size = params.sector_size
    cipher = SectorCipher(volume_key, size)
    file_size = partition.stat().st_size
    if length < 0 or base < 0 or base + params.data_offset + -(-length // size) * size > file_size:
        raise ImageCheckFailed(
            f"{partition} is {file_size} bytes: no room for {length} bytes of data at {base} + {params.data_offset}"
        )
    if mapped is None:
        mapped = [(offset - base, count) for offset, count in data_ranges(partition)]
    segment = [(offset - params.data_offset, count) for offset, count in mapped]
    spans = _sector_spans(segment, size, -(-length // size) * size)
    return _decrypt_spans(partition, cipher, spans, length, base + params.data_offset, max(size, chunk // size * size))


def _decrypt_spans(
    partition: Path, cipher: SectorCipher, spans: list[tuple[int, int]], length: int, start: int, step: int
) -> Iterator[bytes]:
    size = cipher.sector_size
    with partition.open("rb") as fh:
        first = 0
        for pos in range(0, length, step):
            end = min(pos + step, length)
            window_end = -(-end // size) * size
            out = bytearray(window_end - pos)
            while first < len(spans) and spans[first][1] <= pos:
                first += 1
            index = first
            while index < len(spans) and spans[index][0] < window_end:
                lo, hi = max(spans[index][0], pos), min(spans[index][1], window_end)
                data = _pread_all(fh.fileno(), hi - lo, start + lo)
                out[lo - pos : hi - pos] = cipher.decrypt(data, lo // size)
                index += 1
            yield bytes(out[: end - pos])
