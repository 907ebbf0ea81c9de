"""The edge disk image through the real tools: sfdisk's GPT on a sparse file, sparse copies, the FAT32 ESP with mtools
at its offset in the disk, and the first-boot cpio. Nothing is mounted."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest

from edge_image import tools
from edge_image.disk import (
    ESP_NAME,
    MIB,
    ROOT_NAME,
    copy_sparse,
    data_ranges,
    plan,
    read_table,
    verify_table,
    write_table,
)
from edge_image.errors import ImageBadInput, ImageCheckFailed
from edge_image.esp import (
    BOOTSTRAP_KEY_PATH,
    ESP_LABEL,
    bootstrap_cpio,
    cpio_member,
    loader_conf,
    make_fat,
    read_file,
    read_tree,
    write_file,
)

pytestmark = pytest.mark.image

ESP_SIZE = 64 * MIB
ROOT_SIZE = 32 * MIB
KIB = 1024


def _sparse(path: Path, size: int) -> None:
    """A new file of `size` bytes, all hole."""
    with path.open("wb") as handle:
        handle.truncate(size)


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _tree_files(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for a directory)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[path.relative_to(root).as_posix()] = path.read_bytes() if path.is_file() else None
    return found


def _sample_tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "EFI" / "BOOT").mkdir(parents=True)
    (tree / "loader" / "entries").mkdir(parents=True)
    (tree / "membria" / "empty").mkdir(parents=True)
    (tree / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(os.urandom(300 * KIB + 7))
    (tree / "loader" / "loader.conf").write_text(loader_conf("firstboot-membria.conf"))
    (tree / "loader" / "entries" / "firstboot-membria.conf").write_text("title first\nlinux /l\noptions quiet\n")
    (tree / "membria" / "Bootstrap Key.cpio").write_bytes(bytes(range(256)) * 4)
    return tree


# --- GPT ------------------------------------------------------------------------------------------------------------


def test_write_table_on_a_sparse_file_reads_back_the_plan(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    layout = plan(ESP_SIZE, ROOT_SIZE)
    assert write_table(image, layout) == layout
    assert read_table(image) == layout
    assert image.stat().st_size == layout.disk_size == 98 * MIB
    assert verify_table(image) == []
    assert _allocated(image) <= 256 * KIB  # only the MBR and both GPT copies were written
    assert [r for r in data_ranges(image) if r[0] >= MIB and r[0] < layout.disk_size - MIB] == []


def test_write_table_grows_a_smaller_file_and_refuses_a_larger_one(tmp_path: Path) -> None:
    layout = plan(ESP_SIZE, ROOT_SIZE)
    image = tmp_path / "disk.img"
    with image.open("wb") as handle:
        handle.seek(layout.partition(ESP_NAME).start)
        handle.write(b"ESP data stays")
    write_table(image, layout)
    with image.open("rb") as handle:
        handle.seek(MIB)
        assert handle.read(14) == b"ESP data stays"

    larger = tmp_path / "larger.img"
    larger.write_bytes(b"")
    os.truncate(larger, layout.disk_size + MIB)
    with pytest.raises(ImageBadInput, match="not shrunk"):
        write_table(larger, layout)
    assert larger.stat().st_size == layout.disk_size + MIB
    with pytest.raises(ImageCheckFailed):
        read_table(larger)  # nothing was written


def test_damaged_primary_header_falls_back_to_the_backup_and_verify_says_so(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    layout = write_table(image, plan(ESP_SIZE, ROOT_SIZE))
    with image.open("r+b") as handle:
        handle.seek(512 + 56)  # a byte of the disk GUID in the primary header: its CRC no longer matches
        old = handle.read(1)
        handle.seek(512 + 56)
        handle.write(bytes([old[0] ^ 0xFF]))
    # sfdisk silently reads the backup: the table is unchanged, only verify notices.
    assert read_table(image) == layout
    problems = verify_table(image)
    assert any("primary GPT table is corrupt" in p for p in problems), problems

    with image.open("r+b") as handle:
        handle.seek(512)
        handle.write(bytes(512))
    problems = verify_table(image)
    assert any("primary GPT header missing" in p for p in problems), problems


def test_a_grown_image_has_no_backup_header_at_its_end(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    write_table(image, plan(ESP_SIZE, ROOT_SIZE))
    os.truncate(image, image.stat().st_size + MIB)
    problems = verify_table(image)
    assert any("backup GPT header missing" in p for p in problems), problems
    assert any("not on the end of the device" in p for p in problems), problems


def test_read_table_of_a_file_without_gpt(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    _sparse(blank, 4 * MIB)
    with pytest.raises(ImageCheckFailed, match=re.escape(str(blank))):
        read_table(blank)
    assert verify_table(blank)  # at least the missing headers
    with pytest.raises(ImageBadInput):
        read_table(tmp_path / "missing.img")


# --- sparse copies --------------------------------------------------------------------------------------------------


def test_data_ranges_and_copy_sparse_keep_holes(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    chunks = {0: os.urandom(8 * KIB), 3 * MIB: os.urandom(64 * KIB), 9 * MIB - 4 * KIB: os.urandom(4 * KIB)}
    with src.open("wb") as handle:
        for offset, data in chunks.items():
            handle.seek(offset)
            handle.write(data)
    assert data_ranges(src) == [(offset, len(data)) for offset, data in chunks.items()]
    assert data_ranges(src, 4 * KIB, 3 * MIB + 4 * KIB) == [(4 * KIB, 4 * KIB), (3 * MIB, 4 * KIB)]

    dst = tmp_path / "dst.img"
    _sparse(dst, 16 * MIB)
    steps: list[int] = []
    copied = copy_sparse(src, dst, 2 * MIB, on_bytes=steps.append)
    assert copied == sum(steps) == sum(len(d) for d in chunks.values())
    assert dst.stat().st_size == 16 * MIB
    assert _allocated(dst) <= 2 * copied  # holes stayed holes
    with dst.open("rb") as handle:
        handle.seek(2 * MIB)
        assert handle.read(src.stat().st_size) == src.read_bytes()
    assert data_ranges(dst) == [(2 * MIB + offset, len(data)) for offset, data in chunks.items()]

    with pytest.raises(ImageBadInput, match="does not fit"):
        copy_sparse(src, dst, 8 * MIB)


def test_copy_sparse_falls_back_to_read_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device copy")

    monkeypatch.setattr(os, "copy_file_range", refuse)  # as across filesystems on older kernels
    src = tmp_path / "src.bin"
    with src.open("wb") as handle:
        handle.seek(5 * MIB)
        handle.write(os.urandom(5 * MIB + 123))
    dst = tmp_path / "dst.img"
    _sparse(dst, 12 * MIB)
    assert copy_sparse(src, dst, MIB) == 5 * MIB + 123
    assert dst.read_bytes()[MIB : MIB + src.stat().st_size] == src.read_bytes()
    assert data_ranges(dst) == [(6 * MIB, 5 * MIB + 4 * KIB)]  # the last block holds the tail


# --- the FAT32 ESP --------------------------------------------------------------------------------------------------


def test_make_fat_and_read_tree_round_trip(tmp_path: Path) -> None:
    tree = _sample_tree(tmp_path)
    fat = tmp_path / "esp.fat"
    make_fat(tree, fat, ESP_SIZE, volume_id="1234ABCD")
    assert fat.stat().st_size == ESP_SIZE
    boot = fat.read_bytes()[:512]
    assert boot[82:90] == b"FAT32   " and boot[510:512] == b"\x55\xaa"
    assert boot[71:82] == ESP_LABEL.ljust(11).encode()
    assert boot[67:71] == bytes.fromhex("1234ABCD")[::-1]  # little-endian serial

    out = tmp_path / "out"
    read_tree(fat, 0, out)
    assert _tree_files(out) == _tree_files(tree)
    assert read_file(fat, 0, "membria/Bootstrap Key.cpio") == (tree / "membria" / "Bootstrap Key.cpio").read_bytes()


def test_make_fat_refusals_leave_nothing_behind(tmp_path: Path) -> None:
    tree = _sample_tree(tmp_path)
    fat = tmp_path / "esp.fat"
    with pytest.raises(ImageBadInput, match="at least 64 MiB"):
        make_fat(tree, fat, 32 * MIB)
    with pytest.raises(ImageBadInput, match="multiple of 1 MiB"):
        make_fat(tree, fat, ESP_SIZE + 512)
    with pytest.raises(ImageBadInput, match="volume ID"):
        make_fat(tree, fat, ESP_SIZE, volume_id="xyz")
    assert not fat.exists()

    big = tmp_path / "big"
    big.mkdir()
    _sparse(big / "kernel", 70 * MIB)  # sparse here, 70 MiB on FAT
    with pytest.raises(ImageBadInput, match="does not fit"):
        make_fat(big, fat, ESP_SIZE)
    assert not fat.exists()

    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "Linux").write_bytes(b"1")
    (clash / "linux").write_bytes(b"2")
    with pytest.raises(ImageBadInput, match="differ only in case"):
        make_fat(clash, fat, ESP_SIZE)
    (clash / "Linux").unlink()
    (clash / "link").symlink_to("linux")
    with pytest.raises(ImageBadInput, match="neither a file nor a directory"):
        make_fat(clash, fat, ESP_SIZE)
    assert not fat.exists()

    fat.write_bytes(b"")
    with pytest.raises(ImageBadInput, match="already exists"):
        make_fat(tree, fat, ESP_SIZE)


def test_esp_inside_the_disk_image_read_and_written_at_its_offset(tmp_path: Path) -> None:
    tree = _sample_tree(tmp_path)
    image = tmp_path / "disk.img"
    layout = write_table(image, plan(ESP_SIZE, ROOT_SIZE))
    esp = layout.partition(ESP_NAME)
    fat = tmp_path / "esp.fat"
    make_fat(tree, fat, esp.size)
    assert copy_sparse(fat, image, esp.start) <= esp.size
    assert read_table(image) == layout
    assert verify_table(image) == []

    assert read_file(image, esp.start, "loader/loader.conf") == (tree / "loader" / "loader.conf").read_bytes()
    assert read_file(image, esp.start, "/EFI/BOOT/BOOTX64.EFI") == (tree / "EFI" / "BOOT" / "BOOTX64.EFI").read_bytes()

    # A new file in new directories, as flash writes membria/enroll.json.
    enroll = b'{"format": 1, "device": "boot-1"}\n'
    write_file(image, esp.start, "membria/enrollment/enroll.json", enroll)
    assert read_file(image, esp.start, "membria/enrollment/enroll.json") == enroll
    # Replacing an existing file, shorter than before, and into an existing directory spelt in another case.
    write_file(image, esp.start, "loader/loader.conf", b"default membria-*\n")
    assert read_file(image, esp.start, "loader/loader.conf") == b"default membria-*\n"
    write_file(image, esp.start, "efi/boot/grub.cfg", b"# none\n")

    out = tmp_path / "out"
    read_tree(image, esp.start, out)
    expected = _tree_files(tree)
    expected.update(
        {
            "membria/enrollment": None,
            "membria/enrollment/enroll.json": enroll,
            "loader/loader.conf": b"default membria-*\n",
            "EFI/BOOT/grub.cfg": b"# none\n",
        }
    )
    assert _tree_files(out) == dict(sorted(expected.items()))

    with pytest.raises(ImageCheckFailed, match=r"no file loader/missing\.conf"):
        read_file(image, esp.start, "loader/missing.conf")
    with pytest.raises(ImageBadInput, match="is a file"):
        write_file(image, esp.start, "loader/loader.conf/x", b"")
    with pytest.raises(ImageBadInput, match="is a directory"):
        write_file(image, esp.start, "loader/entries", b"")
    root = layout.partition(ROOT_NAME)
    with pytest.raises(ImageCheckFailed, match="no FAT filesystem"):
        read_file(image, root.start, "loader/loader.conf")
    with pytest.raises(ImageCheckFailed, match="no FAT filesystem"):
        read_tree(image, root.start, tmp_path / "none")
    # The partition table and the root partition were never touched by mtools.
    assert verify_table(image) == []
    assert data_ranges(image, root.start, root.start + root.size) == []


# --- first-boot cpio ------------------------------------------------------------------------------------------------


def _newc_headers(archive: bytes) -> dict[str, dict[str, int]]:
    """name -> mode, uid, gid, mtime of each member of a newc archive (a reader independent of cpio)."""
    members: dict[str, dict[str, int]] = {}
    pos = 0
    while True:
        header = archive[pos : pos + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, mtime, filesize, namesize = fields[1], fields[2], fields[3], fields[5], fields[6], fields[11]
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return members
        members[name] = {"mode": mode, "uid": uid, "gid": gid, "mtime": mtime}
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3


def test_bootstrap_cpio_is_reproducible_and_extracts(tmp_path: Path) -> None:
    key = os.urandom(32)
    archive = bootstrap_cpio(key)
    assert archive == bootstrap_cpio(key)
    assert archive != bootstrap_cpio(os.urandom(32))
    assert len(archive) % 512 == 0  # padded like an initrd cpio
    assert cpio_member(archive, BOOTSTRAP_KEY_PATH) == key
    assert cpio_member(archive, "/" + BOOTSTRAP_KEY_PATH) == key

    members = _newc_headers(archive)
    assert list(members) == ["etc", "etc/membria", BOOTSTRAP_KEY_PATH]
    assert members[BOOTSTRAP_KEY_PATH]["mode"] == 0o100400
    assert members["etc"]["mode"] == 0o040755
    assert all(m["uid"] == 0 and m["gid"] == 0 and m["mtime"] == 0 for m in members.values())

    with pytest.raises(ImageCheckFailed, match=r"no member 'etc/membria/other\.key'"):
        cpio_member(archive, "etc/membria/other.key")
    with pytest.raises(ImageCheckFailed, match="not a readable cpio"):
        cpio_member(b"garbage" * 100, BOOTSTRAP_KEY_PATH)


def test_cpio_member_takes_names_literally(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    for name, data in (("a*b", b"star"), ("axb", b"plain"), ("[x]", b"bracket"), ("x", b"x")):
        (stage / name).write_bytes(data)
    archive = tools.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], what="test cpio", stdin=b"axb\na*b\nx\n[x]\n", cwd=stage
    ).stdout
    assert cpio_member(archive, "a*b") == b"star"
    assert cpio_member(archive, "axb") == b"plain"
    assert cpio_member(archive, "[x]") == b"bracket"
    assert cpio_member(archive, "x") == b"x"
    shutil.rmtree(stage)
