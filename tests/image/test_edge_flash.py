"""bmaptool's block map and flash, for real: a sparse 64 MiB image, flashed to new and old files and to loop
devices (one of them mounted), read back, corrupted, and mismatched with its bmap. Needs root, bmap-tools, util-linux,
e2fsprogs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_image import bmap, disk, esp, flash
from edge_image.errors import ImageBadInput, ImageCheckFailed

pytestmark = pytest.mark.image

MiB = 1 << 20
SIZE = 64 * MiB
# (offset, length) of the image's data; the rest is holes. 1 MiB + 123 makes a range that starts mid-block.
DATA = [(0, 64 * 1024), (MiB + 123, 37), (20 * MiB, MiB), (SIZE - 4096, 4096)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bmap.BlockMap]:
    work = tmp_path_factory.mktemp("flash")
    img = work / "edge.img"
    with img.open("wb") as f:
        f.truncate(SIZE)
        for offset, length in DATA:
            f.seek(offset)
            f.write(os.urandom(length))
    bm = bmap.create(img, work / "edge.img.bmap")
    return img, work / "edge.img.bmap", bm


@contextmanager
def loop(backing: Path) -> Iterator[Path]:
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True)
    path = Path(dev.stdout.strip())
    try:
        yield path
    finally:
        subprocess.run(["losetup", "-d", str(path)], check=True)


def data_segments(path: Path) -> list[tuple[int, int]]:
    """Where a file holds data (SEEK_DATA/SEEK_HOLE), as (start, end)."""
    out, pos = [], 0
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            pos = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def inside_mapped(bm: bmap.BlockMap, segments: list[tuple[int, int]]) -> bool:
    return all(any(o <= s and e <= o + n for o, n, _ in bm.byte_ranges()) for s, e in segments)


def read(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def same_over_mapped(bm: bmap.BlockMap, a: Path, b: Path) -> bool:
    return all(read(a, o, n) == read(b, o, n) for o, n, _ in bm.byte_ranges())


def test_create_maps_the_data_and_bmaptool_agrees_on_the_file_checksum(
    image: tuple[Path, Path, bmap.BlockMap], tmp_path: Path
) -> None:
    img, bmap_path, bm = image
    assert (bm.version, bm.image_size, bm.block_size, bm.blocks_count) == ("2.0", SIZE, 4096, SIZE // 4096)
    assert [(r.first, r.last) for r in bm.ranges] == [(0, 15), (256, 256), (5120, 5375), (16383, 16383)]
    assert all(hashlib.sha256(read(img, o, n)).hexdigest() == sha for o, n, sha in bm.byte_ranges())
    assert bm.mapped_bytes == (16 + 1 + 256 + 1) * 4096

    # The BmapFileChecksum rule, checked against bmaptool: a changed comment fails both; re-sealed, both accept.
    changed = bmap_path.read_text().replace("Image size in bytes", "Image size in octets")
    tampered = tmp_path / "tampered.bmap"
    tampered.write_text(changed)
    with pytest.raises(ImageBadInput, match="BmapFileChecksum mismatch"):
        bmap.parse(tampered)
    argv = ["bmaptool", "copy", "--bmap", str(tampered), "--no-sig-verify", str(img), str(tmp_path / "out")]
    run = subprocess.run(argv, capture_output=True, text=True)
    assert run.returncode == 1 and "checksum mismatch for bmap file" in run.stderr
    stated = bm_checksum(changed)
    tampered.write_text(changed.replace(stated, hashlib.sha256(changed.replace(stated, "0" * 64).encode()).hexdigest()))
    assert bmap.parse(tampered) == bm
    assert subprocess.run(argv, capture_output=True).returncode == 0


def bm_checksum(text: str) -> str:
    return text.split("<BmapFileChecksum>", 1)[1].split("</BmapFileChecksum>", 1)[0].strip()


def test_flash_to_a_new_file_copies_the_data_and_keeps_the_holes(
    image: tuple[Path, Path, bmap.BlockMap], tmp_path: Path
) -> None:
    img, bmap_path, bm = image
    target = tmp_path / "laptop.img"
    seen: list[tuple[int, int]] = []
    report = flash.flash(img, bmap_path, target, on_progress=lambda done, total: seen.append((done, total)))
    assert target.stat().st_size == SIZE
    assert same_over_mapped(bm, img, target)
    assert target.stat().st_blocks * 512 <= bm.mapped_bytes + 64 * 1024
    assert inside_mapped(bm, data_segments(target))
    assert report.target.kind == "file" and report.target.path == target
    assert (report.mapped_bytes, report.image_size) == (bm.mapped_bytes, SIZE)
    assert 0 < report.copy_seconds < 30 and 0 <= report.readback_seconds < 30 and report.mb_per_s > 0
    assert seen[-1] == (bm.mapped_bytes, bm.mapped_bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize("discard", [True, False])
def test_flash_over_an_old_file_leaves_no_old_data(
    image: tuple[Path, Path, bmap.BlockMap], tmp_path: Path, discard: bool
) -> None:
    img, bmap_path, bm = image
    target = tmp_path / "old.img"
    target.write_bytes(b"\xaa" * (SIZE + 8 * MiB))  # old data everywhere, and past the image's end
    flash.flash(img, bmap_path, target, discard=discard)
    # bmaptool opens a file target "wb+" (truncating it) whatever we do, so discard=False changes nothing for files
    assert target.stat().st_size == SIZE
    assert same_over_mapped(bm, img, target)
    assert inside_mapped(bm, data_segments(target))
    assert read(target, 2 * MiB, MiB) == bytes(MiB)


def test_flash_to_a_loop_device(image: tuple[Path, Path, bmap.BlockMap], tmp_path: Path) -> None:
    img, bmap_path, bm = image
    backing = tmp_path / "disk.raw"
    backing.write_bytes(b"\x55" * SIZE)
    with loop(backing) as dev:
        report = flash.flash(img, bmap_path, dev)
        assert (report.target.kind, report.target.disk, report.target.transport) == ("block", dev.name, "loop")
        assert report.target.size == SIZE
        assert flash.read_back(dev, bm) >= 0
        assert same_over_mapped(bm, img, dev)
        assert read(dev, 2 * MiB, MiB) == bytes(MiB)  # blkdiscard punched the old data out of the loop's file
        with pytest.raises(ImageBadInput, match="backs /dev/loop"):
            flash.flash(img, bmap_path, backing)
    too_small = tmp_path / "small.raw"
    too_small.write_bytes(bytes(SIZE // 2))
    with loop(too_small) as dev, pytest.raises(ImageBadInput, match=f"holds {SIZE // 2} bytes; the image needs {SIZE}"):
        flash.flash(img, bmap_path, dev)


def test_a_mounted_loop_device_is_refused_and_left_untouched(
    image: tuple[Path, Path, bmap.BlockMap], tmp_path: Path
) -> None:
    img, bmap_path, bm = image
    backing = tmp_path / "fs.raw"
    backing.write_bytes(bytes(SIZE))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop(backing) as dev:
        subprocess.run(["mkfs.ext4", "-q", str(dev)], check=True)
        subprocess.run(["mount", str(dev), str(mnt)], check=True)
        try:
            (mnt / "keep.txt").write_text("still here\n")
            subprocess.run(["sync"], check=True)
            before = hashlib.sha256(backing.read_bytes()).hexdigest()
            with pytest.raises(ImageBadInput, match=f"is mounted on {mnt}") as err:
                flash.flash(img, bmap_path, dev)
            assert err.value.exit_code == 2
            # the kernel's own refusal, which guards the time between our checks and bmaptool's exclusive open
            with pytest.raises(ImageBadInput, match="in use"):
                flash.read_back(dev, bm)
            assert (mnt / "keep.txt").read_text() == "still here\n"
            assert hashlib.sha256(backing.read_bytes()).hexdigest() == before
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def test_read_back_names_a_corrupted_range(image: tuple[Path, Path, bmap.BlockMap], tmp_path: Path) -> None:
    img, bmap_path, bm = image
    target = tmp_path / "laptop.img"
    flash.flash(img, bmap_path, target)
    with target.open("r+b") as f:
        f.seek(20 * MiB + 5000)
        byte = f.read(1)
        f.seek(20 * MiB + 5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ImageCheckFailed, match=rf"blocks 5120-5375 \(bytes {20 * MiB}-{21 * MiB - 1}\)") as err:
        flash.read_back(target, bm)
    assert err.value.exit_code == 1


def test_an_image_that_does_not_match_its_bmap_fails_in_bmaptool(
    image: tuple[Path, Path, bmap.BlockMap], tmp_path: Path
) -> None:
    img, bmap_path, _ = image
    changed = tmp_path / "changed.img"
    subprocess.run(["cp", "--sparse=always", str(img), str(changed)], check=True)
    with changed.open("r+b") as f:
        f.seek(MiB + 130)
        f.write(b"!")
    with pytest.raises(ImageCheckFailed, match="checksum mismatch for blocks range 256-256"):
        flash.flash(changed, bmap_path, tmp_path / "laptop.img")


def test_an_image_of_another_size_is_refused(image: tuple[Path, Path, bmap.BlockMap], tmp_path: Path) -> None:
    img, bmap_path, _ = image
    longer = tmp_path / "longer.img"
    subprocess.run(["cp", "--sparse=always", str(img), str(longer)], check=True)
    os.truncate(longer, SIZE + 4096)
    with pytest.raises(ImageBadInput, match=f"is {SIZE + 4096} bytes but .* describes an image of {SIZE}"):
        flash.flash(longer, bmap_path, tmp_path / "laptop.img")
    assert not (tmp_path / "laptop.img").exists()


# --- the enrollment file on the ESP (DESIGN.md, "Block map and flash", step 5) ------------------------------------


@pytest.fixture(scope="module")
def gpt_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A small disk image as a build lays it out: GPT, a 64 MiB FAT32 ESP with a loader.conf, a 1 MiB root."""
    work = tmp_path_factory.mktemp("flash-gpt")
    img = work / "edge.img"
    part = disk.write_table(img, disk.plan(64 * MiB, MiB)).partition(disk.ESP_NAME)
    tree = work / "esp"
    (tree / "loader").mkdir(parents=True)
    (tree / "loader" / "loader.conf").write_text(esp.loader_conf("membria-*"))
    esp.make_fat(tree, work / "esp.fat", part.size)
    disk.copy_sparse(work / "esp.fat", img, part.start)
    bmap.create(img, work / "edge.img.bmap")
    return img, work / "edge.img.bmap", part.start


def enrollment_file(path: Path, **changes: Any) -> Path:
    """A token file as `appliance edge enroll-token` writes it (the token is random; nothing can use it)."""
    expires = datetime.now(UTC) + timedelta(hours=72)
    doc = {
        "format": 1,
        "site": "lab",
        "device": "lt-0042",
        "token": "s.test-" + secrets.token_urlsafe(18),
        "expires_at": expires.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "gateways": ["https://gateway.lab.membria:8443"],
        "resolve": {"gateway.lab.membria": "10.0.2.2"},
    }
    doc.update(changes)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.chmod(0o600)
    return path


def mtools_read(target: Path, offset: int, name: str) -> bytes:
    """One file of the FAT at `offset`, read with mtools directly (not through edge_image.esp)."""
    run = subprocess.run(
        ["mcopy", "-n", "-i", f"{target}@@{offset}", f"::/{name}", "-"],
        capture_output=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_enrollment_lands_in_the_esp_of_a_file_target(gpt_image: tuple[Path, Path, int], tmp_path: Path) -> None:
    img, bmap_path, offset = gpt_image
    source = enrollment_file(tmp_path / "enroll.json")
    enrollment = flash.load_enrollment(source, site="lab")
    target = tmp_path / "laptop.img"
    target.write_bytes(b"\xaa" * MiB)
    report = flash.flash(img, bmap_path, target, enrollment=enrollment)
    assert report.enrollment == "membria/enroll.json"
    assert mtools_read(target, offset, "membria/enroll.json") == source.read_bytes()
    assert mtools_read(target, offset, "loader/loader.conf") == esp.loader_conf("membria-*").encode()
    assert disk.read_table(target) == disk.read_table(img)
    # flashed again with a re-minted file: the old one is replaced, not kept beside it
    again = enrollment_file(tmp_path / "again.json", device="lt-0043", resolve=None)
    flash.flash(img, bmap_path, target, enrollment=flash.load_enrollment(again))
    assert mtools_read(target, offset, "membria/enroll.json") == again.read_bytes()


def test_enrollment_lands_in_the_esp_of_a_loop_target(gpt_image: tuple[Path, Path, int], tmp_path: Path) -> None:
    img, bmap_path, offset = gpt_image
    source = enrollment_file(tmp_path / "enroll.json")
    backing = tmp_path / "disk.raw"
    backing.write_bytes(b"\x55" * img.stat().st_size)
    with loop(backing) as dev:
        report = flash.flash(img, bmap_path, dev, enrollment=flash.load_enrollment(source, site="lab"))
        assert report.target.kind == "block" and report.enrollment == "membria/enroll.json"
        assert mtools_read(dev, offset, "membria/enroll.json") == source.read_bytes()
    # on the disk itself, not only in the loop device's page cache
    assert mtools_read(backing, offset, "membria/enroll.json") == source.read_bytes()


def test_an_enrollment_refused_at_flash_time_leaves_the_target_untouched(
    gpt_image: tuple[Path, Path, int], image: tuple[Path, Path, bmap.BlockMap], tmp_path: Path
) -> None:
    img, bmap_path, _ = gpt_image
    target = tmp_path / "laptop.img"
    target.write_bytes(b"old data " * 100_000)
    before = target.read_bytes()
    # still valid when checked (now = an hour ago), lapsed by the time flash starts: the user sat on the prompt
    past = datetime.now(UTC) - timedelta(seconds=1)
    lapsed = enrollment_file(tmp_path / "lapsed.json", expires_at=past.isoformat().replace("+00:00", "Z"))
    enrollment = flash.check_enrollment(lapsed.read_bytes(), source=lapsed, now=past - timedelta(hours=1))
    with pytest.raises(ImageBadInput, match="expired at") as err:
        flash.flash(img, bmap_path, target, enrollment=enrollment)
    assert err.value.exit_code == 2 and target.read_bytes() == before
    # an image with no partition table, so no ESP to put the file in: refused before the copy
    plain_img, plain_bmap, _ = image
    good = flash.load_enrollment(enrollment_file(tmp_path / "good.json"))
    with pytest.raises(ImageBadInput, match="enrollment file goes onto the image's ESP"):
        flash.flash(plain_img, plain_bmap, target, enrollment=good)
    assert target.read_bytes() == before
