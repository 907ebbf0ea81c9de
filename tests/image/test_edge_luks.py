"""LUKS2 on partition files with the real cryptsetup: format, header checks, and our XTS writer checked against
cryptsetup's own offline decryption and against e2fsck on an image whose holes decrypt to random garbage."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path
from uuid import uuid4

import pytest

from edge_image import luks
from edge_image.errors import ImageBadInput, ImageCheckFailed
from edge_image.luks import MIB, LuksParams, SectorCipher

pytestmark = pytest.mark.image

PARAMS = LuksParams()
HEADER = PARAMS.data_offset
SECTOR = PARAMS.sector_size


def sparse_file(path: Path, size: int, writes: dict[int, bytes] | None = None) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
        for offset, data in (writes or {}).items():
            fh.seek(offset)
            fh.write(data)
    return path


def formatted(tmp_path: Path, data_size: int, uuid: str | None = None) -> tuple[Path, bytes, bytes]:
    """A fresh sparse partition file with a LUKS2 header; its volume key and passphrase."""
    partition = sparse_file(tmp_path / "root.luks", HEADER + data_size)
    key, passphrase = os.urandom(64), os.urandom(32).hex().encode()
    luks.luks_format(partition, volume_key=key, passphrase=passphrase, uuid=uuid)
    return partition, key, passphrase


def data_area_ranges(partition: Path) -> list[tuple[int, int]]:
    """The partition's data ranges within its segment (the header's own range may run on into the segment)."""
    ranges = [(max(offset, HEADER), offset + length) for offset, length in luks.data_ranges(partition)]
    return [(start - HEADER, end - start) for start, end in ranges if end > start]


def cryptsetup_decrypt(partition: Path, passphrase: bytes, work: Path) -> bytes:
    """cryptsetup's own plaintext of the segment: offline `reencrypt --decrypt` of a copy of the partition.

    cryptsetup 2.6.1 decrypts a device with its header attached only by moving the header out to a new file
    (`--header` naming a file that does not exist yet) and the data to the device's start; on a regular file it
    cannot tell whether a mapping is active, hence --force-offline-reencrypt.
    """
    copy = work / "decrypted"
    subprocess.run(["cp", "--sparse=always", partition, copy], check=True)
    key_file = work / "passphrase"
    key_file.write_bytes(passphrase)
    subprocess.run(
        ["cryptsetup", "reencrypt", "--decrypt", "--header", work / "moved-header", "--key-file", key_file,
         "--batch-mode", "--force-offline-reencrypt", copy],
        check=True, capture_output=True,
    )  # fmt: skip
    return copy.read_bytes()


def test_format_writes_the_header_we_asked_for(tmp_path: Path) -> None:
    fixed = str(uuid4())
    partition, key, passphrase = formatted(tmp_path, 48 * MIB, uuid=fixed)
    header = luks.read_header(partition)
    assert (header.uuid, header.label) == (fixed, "membria-root")
    segment = header.segment
    assert (segment.encryption, segment.sector_size, segment.iv_tweak, segment.size) == (
        "aes-xts-plain64", 4096, 0, "dynamic",
    )  # fmt: skip
    assert header.data_offset == 16 * MIB
    assert list(header.keyslots) == ["0"] and header.tokens == {}
    slot = header.keyslots["0"]
    assert (slot.key_size * 8, slot.area.encryption) == (512, "aes-xts-plain64")
    assert (slot.kdf.type, slot.kdf.memory, slot.kdf.time, slot.kdf.cpus) == ("argon2id", 65536, 4, 1)
    assert not header.reencrypting
    assert data_area_ranges(partition) == []  # the data area is still a hole
    assert luks.dump_volume_key(partition, passphrase) == key
    assert luks.opens(partition, passphrase)
    assert not luks.opens(partition, b"not the passphrase")
    with pytest.raises(ImageCheckFailed, match="opens no keyslot"):
        luks.dump_volume_key(partition, b"not the passphrase")


def test_format_refuses_bad_input(tmp_path: Path) -> None:
    partition = sparse_file(tmp_path / "p", 32 * MIB)
    with pytest.raises(ImageBadInput, match="volume key is 32 bytes"):
        luks.luks_format(partition, volume_key=os.urandom(32), passphrase=b"x")
    small = sparse_file(tmp_path / "small", 16 * MIB)
    with pytest.raises(ImageBadInput, match="16777216 bytes"):
        luks.luks_format(small, volume_key=os.urandom(64), passphrase=b"x")
    with pytest.raises(ImageBadInput, match="not a file"):
        luks.luks_format(tmp_path / "missing", volume_key=os.urandom(64), passphrase=b"x")


def test_a_file_without_luks_is_named(tmp_path: Path) -> None:
    plain = sparse_file(tmp_path / "plain.img", 32 * MIB, {0: b"hello"})
    with pytest.raises(ImageCheckFailed, match=r"plain\.img holds no LUKS2 header"):
        luks.read_header(plain)


@pytest.mark.parametrize(("where", "which"), [(5000, "primary"), (16384 + 5000, "secondary"), (300, "primary")])
def test_a_damaged_header_copy_fails_and_is_not_repaired(tmp_path: Path, where: int, which: str) -> None:
    partition, _, passphrase = formatted(tmp_path, 1 * MIB)
    with partition.open("r+b") as fh:
        fh.seek(where)
        fh.write(b"X")
    before = partition.read_bytes()
    with pytest.raises(ImageCheckFailed, match=which):
        luks.read_header(partition)
    with pytest.raises(ImageCheckFailed, match=which):
        luks.opens(partition, passphrase)
    # cryptsetup itself would quietly rewrite the bad copy from the good one: the image must stay as it was
    assert partition.read_bytes() == before


def test_private_dir_is_private_and_removed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), luks.private_dir() as tmp:
        kept = tmp
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o700
        if Path("/dev/shm").is_dir():
            assert tmp.parent == Path("/dev/shm")
        (tmp / "volume.key").write_bytes(b"k")
        raise RuntimeError("boom")
    assert not kept.exists()


def test_data_ranges_of_a_sparse_file(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "s", 8 * MIB, {MIB: b"a" * 4096, 5 * MIB: b"b" * 8192})
    assert luks.data_ranges(path) == [(MIB, 4096), (5 * MIB, 8192)]
    assert luks.data_ranges(sparse_file(tmp_path / "empty", MIB)) == []


@pytest.mark.parametrize("layout", ["full", "holes"])
def test_cryptsetup_decrypts_what_we_encrypted(tmp_path: Path, layout: str) -> None:
    size = 4 * MIB
    if layout == "full":
        plain = sparse_file(tmp_path / "plain", size, {0: os.urandom(size)})
    else:  # unaligned pieces: whole sectors around them are encrypted, the rest stays a hole
        pieces = {0: os.urandom(65536), MIB + 3 * SECTOR + 100: os.urandom(20000), 3 * MIB: os.urandom(SECTOR)}
        plain = sparse_file(tmp_path / "plain", size, {**pieces, size - 10: os.urandom(10)})
    partition, key, passphrase = formatted(tmp_path, 8 * MIB)
    reported: list[int] = []
    total = luks.encrypt_into(plain, partition, volume_key=key, on_bytes=reported.append)

    plain_ranges = luks.data_ranges(plain)
    assert data_area_ranges(partition) == plain_ranges  # holes stayed holes
    assert total == sum(reported) == sum(length for _, length in plain_ranges)
    if layout == "holes":
        assert total < size // 2

    clear = plain.read_bytes()
    theirs = cryptsetup_decrypt(partition, passphrase, tmp_path)
    for offset, length in plain_ranges:  # cryptsetup decrypts holes too (to garbage): compare the data only
        assert theirs[offset : offset + length] == clear[offset : offset + length], f"range at {offset}"

    ours = b"".join(luks.plaintext_chunks(partition, volume_key=key, length=size))
    assert ours == clear  # holes read as zeros, as in the plaintext file


def test_plaintext_chunks_with_a_block_map_inside_a_disk(tmp_path: Path) -> None:
    size = 2 * MIB
    plain = sparse_file(tmp_path / "plain", size, {0: os.urandom(SECTOR), MIB: os.urandom(3 * SECTOR)})
    partition, key, _ = formatted(tmp_path, 4 * MIB)
    luks.encrypt_into(plain, partition, volume_key=key)
    mapped = luks.data_ranges(partition)
    base = MIB  # the partition inside a disk image, as verify reads it
    disk = sparse_file(tmp_path / "disk", base + partition.stat().st_size + MIB)
    with partition.open("rb") as src, disk.open("r+b") as dst:
        for offset, length in mapped:
            dst.seek(base + offset)
            dst.write(os.pread(src.fileno(), length, offset))
    chunks = list(luks.plaintext_chunks(disk, volume_key=key, length=size, mapped=mapped, chunk=MIB + 5, base=base))
    assert [len(c) for c in chunks] == [MIB, MIB]
    assert b"".join(chunks) == plain.read_bytes()
    # a range the block map leaves out reads as zeros, not as decrypted bytes
    partial = b"".join(luks.plaintext_chunks(partition, volume_key=key, length=size, mapped=mapped[:1]))
    assert partial[:MIB] == plain.read_bytes()[:MIB] and partial[MIB:] == bytes(MIB)
    with pytest.raises(ImageCheckFailed, match="no room"):
        luks.plaintext_chunks(partition, volume_key=key, length=5 * MIB)


def test_encrypt_into_refuses_what_does_not_fit(tmp_path: Path) -> None:
    partition, key, _ = formatted(tmp_path, 1 * MIB)
    too_big = sparse_file(tmp_path / "big", 2 * MIB)
    with pytest.raises(ImageBadInput, match=r"2097152 bytes .* holds only 1048576"):
        luks.encrypt_into(too_big, partition, volume_key=key)
    ragged = sparse_file(tmp_path / "ragged", SECTOR + 1)
    with pytest.raises(ImageBadInput, match="not a multiple of the 4096-byte sector"):
        luks.encrypt_into(ragged, partition, volume_key=key)
    sparse_file(partition, partition.stat().st_size, {HEADER + 8192: b"stale"})
    with pytest.raises(ImageBadInput, match="not empty"):
        luks.encrypt_into(sparse_file(tmp_path / "ok", SECTOR), partition, volume_key=key)


def test_garbage_in_holes_is_never_read(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("edge-1\n")
    (tree / "data").mkdir()
    blob = os.urandom(MIB + 123)
    (tree / "data" / "blob.bin").write_bytes(blob)
    for i in range(40):
        (tree / "data" / f"note-{i}.txt").write_text(f"note {i}\n" * (i + 1))
    (tree / "etc" / "link").symlink_to("hostname")
    fs_size = 64 * MIB
    fs = sparse_file(tmp_path / "root.ext4", fs_size)
    subprocess.run(
        ["mke2fs", "-F", "-q", "-t", "ext4", "-b", "4096", "-d", tree,
         "-E", "lazy_itable_init=1,lazy_journal_init=0", fs],
        check=True,
    )  # fmt: skip
    assert sum(length for _, length in luks.data_ranges(fs)) < fs_size // 2  # enough holes to fill with garbage

    partition, key, _ = formatted(tmp_path, fs_size)
    luks.encrypt_into(fs, partition, volume_key=key)

    # Decrypt as a laptop would see it: mapped sectors decrypted, every hole full of random bytes.
    cipher = SectorCipher(key, SECTOR)
    garbage = bytearray(os.urandom(fs_size))
    with partition.open("rb") as fh:
        for offset, length in data_area_ranges(partition):
            garbage[offset : offset + length] = cipher.decrypt(
                os.pread(fh.fileno(), length, HEADER + offset), offset // SECTOR
            )
    laptop = tmp_path / "laptop.ext4"
    laptop.write_bytes(garbage)
    fsck = subprocess.run(["e2fsck", "-fn", laptop], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /data/blob.bin", laptop], capture_output=True, check=True)
    assert cat.stdout == blob

    digest = hashlib.sha256()
    for chunk in luks.plaintext_chunks(partition, volume_key=key, length=fs_size):
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(fs.read_bytes()).hexdigest()


def test_a_tampered_ciphertext_byte_changes_the_plaintext(tmp_path: Path) -> None:
    size = MIB
    plain = sparse_file(tmp_path / "plain", size, {0: os.urandom(size)})
    partition, key, _ = formatted(tmp_path, size)
    luks.encrypt_into(plain, partition, volume_key=key)
    target = 5 * SECTOR + 1000
    with partition.open("r+b") as fh:
        fh.seek(HEADER + target)
        byte = fh.read(1)
        fh.seek(HEADER + target)
        fh.write(bytes([byte[0] ^ 1]))
    clear = plain.read_bytes()
    read = b"".join(luks.plaintext_chunks(partition, volume_key=key, length=size))
    assert hashlib.sha256(read).digest() != hashlib.sha256(clear).digest()
    changed = [i for i in range(size) if read[i] != clear[i]]
    assert changed and changed[0] // 16 == changed[-1] // 16 == target // 16  # XTS garbles that one block only
