"""The block map parser (geometry, ranges, clamping at the image end, its own checksum) and flash's target checks,
fed with sample /proc and /sys trees built under tmp_path (mountinfo, swaps, holders, partitions, sizes)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edge_image import bmap, flash
from edge_image.errors import ImageBadInput, ImageCheckFailed

pytestmark = pytest.mark.unit

SHA_A = "a" * 64
SHA_B = "b" * 64
USB = "devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block"
SATA = "devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0/block"
NVME = "devices/pci0000:00/0000:00:1d.0/0000:02:00.0/nvme/nvme0"
GiB = 1 << 30


def bmap_xml(
    ranges: list[tuple[str, str]],
    *,
    image_size: int = 16 * 4096,
    mapped: int | None = None,
    version: str = "2.0",
    checksum_type: str = "sha256",
) -> str:
    """A bmap file as bmaptool 3.6 lays it out, its BmapFileChecksum computed by bmaptool's rule."""
    if mapped is None:
        mapped = sum(int(t.split("-")[-1]) - int(t.split("-")[0]) + 1 for t, _ in ranges)
    body = "\n".join(f'        <Range chksum="{sha}"> {text} </Range>' for text, sha in ranges)
    xml = f"""<?xml version="1.0" ?>
<!-- block map -->
<bmap version="{version}">
    <ImageSize> {image_size} </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> {-(-image_size // 4096)} </BlocksCount>
    <MappedBlocksCount> {mapped}     </MappedBlocksCount>
    <ChecksumType> {checksum_type} </ChecksumType>
    <BmapFileChecksum> {"0" * 64} </BmapFileChecksum>
    <BlockMap>
{body}
    </BlockMap>
</bmap>
"""
    return xml.replace("0" * 64, hashlib.sha256(xml.encode()).hexdigest())


def write(tmp_path: Path, text: str, name: str = "image.bmap") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- bmap ---------------------------------------------------------------------------------------------------


def test_parse_reads_geometry_and_ranges(tmp_path: Path) -> None:
    bm = bmap.parse(write(tmp_path, bmap_xml([("0-3", SHA_A), ("7", SHA_B)])))
    assert (bm.version, bm.image_size, bm.block_size, bm.blocks_count, bm.mapped_blocks) == ("2.0", 65536, 4096, 16, 5)
    assert [(r.first, r.last, r.sha256) for r in bm.ranges] == [(0, 3, SHA_A), (7, 7, SHA_B)]
    assert bm.byte_ranges() == [(0, 16384, SHA_A), (28672, 4096, SHA_B)]
    assert bm.mapped_bytes == 5 * 4096


def test_last_range_is_clamped_at_the_image_end(tmp_path: Path) -> None:
    # 8 blocks and 100 bytes: bmaptool hashes and copies only the 100 bytes of the ninth block
    bm = bmap.parse(write(tmp_path, bmap_xml([("0", SHA_A), ("7-8", SHA_B)], image_size=8 * 4096 + 100)))
    assert bm.blocks_count == 9
    assert bm.byte_ranges()[-1] == (7 * 4096, 4096 + 100, SHA_B)
    assert bm.mapped_bytes == 4096 + 4096 + 100


def test_a_changed_bmap_fails_its_own_checksum(tmp_path: Path) -> None:
    text = bmap_xml([("0-3", SHA_A), ("7", SHA_B)]).replace(SHA_B, "c" * 64)
    path = write(tmp_path, text)
    with pytest.raises(ImageBadInput, match="BmapFileChecksum mismatch") as err:
        bmap.parse(path)
    assert str(path) in err.value.message
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("this is not xml <", "not XML"),
        ("<other/>", "not <bmap>"),
        (bmap_xml([("0", SHA_A)], version="1.3"), "version 1.3 is not supported"),
        (bmap_xml([("0", SHA_A)], checksum_type="sha1"), "sha1 is not supported"),
        (bmap_xml([("0", SHA_A)], mapped=2), "MappedBlocksCount says 2"),
        (bmap_xml([("3-1", SHA_A)], mapped=1), "first > last"),
        (bmap_xml([("0-3", SHA_A), ("2", SHA_B)]), "overlaps"),
        (bmap_xml([("16", SHA_A)]), "past block 15"),
        (bmap_xml([("0", "xyz")]), "no sha256 chksum"),
        (
            bmap_xml([("0", SHA_A)])
            .replace("<BmapFileChecksum>", "<Other>")
            .replace("</BmapFileChecksum>", "</Other>"),
            "BmapFileChecksum> is missing",
        ),
        ('<?xml version="1.0"?><!DOCTYPE bmap [<!ENTITY a "b">]><bmap version="2.0"/>', "DTD"),
    ],
)
def test_bad_bmap_files_are_refused_naming_the_file(tmp_path: Path, text: str, why: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ImageBadInput, match=why) as err:
        bmap.parse(path)
    assert str(path) in err.value.message


def test_missing_bmap_file(tmp_path: Path) -> None:
    with pytest.raises(ImageBadInput, match="cannot read bmap file"):
        bmap.parse(tmp_path / "nope.bmap")


def test_ranges_within_clips_to_a_window(tmp_path: Path) -> None:
    bm = bmap.parse(write(tmp_path, bmap_xml([("0-3", SHA_A), ("7", SHA_B), ("9-12", SHA_A)])))
    # a "partition" from block 2 to block 10 (exclusive): the tail of 0-3, all of 7, the head of 9-12
    assert bmap.ranges_within(bm, 2 * 4096, 10 * 4096) == [(0, 2 * 4096), (5 * 4096, 4096), (7 * 4096, 4096)]
    assert bmap.ranges_within(bm, 4 * 4096, 7 * 4096) == []
    assert bmap.ranges_within(bm, 100, 200) == [(0, 100)]


# --- read-back on a plain file ------------------------------------------------------------------------------


def test_read_back_of_a_file_names_the_differing_range(tmp_path: Path) -> None:
    data = os.urandom(8 * 4096 + 100)
    ranges = [("0-1", hashlib.sha256(data[:8192]).hexdigest()), ("7-8", hashlib.sha256(data[28672:]).hexdigest())]
    bm = bmap.parse(write(tmp_path, bmap_xml(ranges, image_size=len(data))))
    target = tmp_path / "disk"
    target.write_bytes(data)
    seen: list[tuple[int, int]] = []
    assert flash.read_back(target, bm, on_progress=lambda done, total: seen.append((done, total))) >= 0
    assert seen[-1] == (bm.mapped_bytes, bm.mapped_bytes)
    with target.open("r+b") as f:
        f.seek(8 * 4096 + 50)
        f.write(bytes([data[8 * 4096 + 50] ^ 1]))
    with pytest.raises(ImageCheckFailed, match=r"blocks 7-8 \(bytes 28672-32867\)"):
        flash.read_back(target, bm)
    os.truncate(target, 30000)
    with pytest.raises(ImageCheckFailed, match="ended at byte 30000, inside blocks 7-8"):
        flash.read_back(target, bm)


# --- sample /proc and /sys ----------------------------------------------------------------------------------


class Machine:
    """A sample /sys and /proc: disks with partitions, mounts, swaps; what _check_block reads."""

    def __init__(self, root: Path) -> None:
        self.sys = root / "sys"
        self.proc = root / "proc"
        (self.proc / "self").mkdir(parents=True)
        self.mountinfo: list[str] = []
        self.swaps: list[str] = []
        self.save()

    def save(self) -> None:
        (self.proc / "self" / "mountinfo").write_text("".join(line + "\n" for line in self.mountinfo))
        header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        (self.proc / "swaps").write_text(header + "".join(line + "\n" for line in self.swaps))

    def device(self, where: Path, dev: str, size: int) -> Path:
        where.mkdir(parents=True)
        (where / "dev").write_text(dev + "\n")
        (where / "size").write_text(f"{size // 512}\n")
        (where / "ro").write_text("0\n")
        (where / "holders").mkdir()
        (where / "slaves").mkdir()
        for link in (self.sys / "dev" / "block" / dev, self.sys / "class" / "block" / where.name):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(where)
        return where

    def disk(self, name: str, major: int, size: int, parts: int = 2, bus: str = USB, model: str | None = None) -> Path:
        node = self.device(
            self.sys / bus / name, f"{major}:0" if "nvme" in name else f"{major}:{self.minor(name)}", size
        )
        if model:
            (node / "device").mkdir()
            (node / "device" / "model").write_text(model + "     \n")
        base = self.minor(name) if "nvme" not in name else 0
        for i in range(1, parts + 1):
            part = self.device(node / (f"{name}p{i}" if "nvme" in name else f"{name}{i}"), f"{major}:{base + i}", GiB)
            (part / "partition").write_text(f"{i}\n")
        return node

    @staticmethod
    def minor(name: str) -> int:
        return (ord(name[-1]) - ord("a")) * 16 if name.startswith("sd") else 0

    def mount(self, dev: str, point: str, source: str, fstype: str = "ext4") -> None:
        n = len(self.mountinfo) + 20
        self.mountinfo.append(f"{n} 1 {dev} / {point} rw,relatime shared:{n} - {fstype} {source} rw")
        self.save()

    def check(self, major: int, minor: int, image_size: int = GiB, path: str = "/dev/sdb") -> flash.TargetInfo:
        return flash._check_block(Path(path), major, minor, image_size, image=None, proc=self.proc, sys=self.sys)


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    """sda (SATA, holds / and /boot/efi) and sdb (a 16 GiB USB stick with two partitions, unused)."""
    m = Machine(tmp_path)
    m.disk("sda", 8, 256 * GiB, bus=SATA, model="Samsung SSD 870")
    m.disk("sdb", 8, 16 * GiB, model="Cruzer Blade")
    m.mount("8:2", "/", "/dev/sda2")
    m.mount("8:1", "/boot/efi", "/dev/sda1", "vfat")
    m.mount("0:26", "/run", "tmpfs", "tmpfs")
    return m


def test_an_unused_usb_disk_is_accepted_with_its_details(machine: Machine) -> None:
    info = machine.check(8, 16)
    assert info == flash.TargetInfo(
        path=Path("/dev/sdb"), kind="block", size=16 * GiB, disk="sdb", model="Cruzer Blade", transport="usb"
    )


def test_nvme_transport_and_model(machine: Machine) -> None:
    node = machine.disk("nvme0n1", 259, 512 * GiB, bus=NVME)
    (node / "device").mkdir()
    (node / "device" / "model").write_text("WD PC SN740\n")
    info = machine.check(259, 0, path="/dev/nvme0n1")
    assert (info.disk, info.model, info.transport) == ("nvme0n1", "WD PC SN740", "nvme")


def test_a_partition_is_refused_naming_its_disk(machine: Machine) -> None:
    with pytest.raises(ImageBadInput, match="is a partition of /dev/sdb; flash writes whole disks") as err:
        machine.check(8, 17, path="/dev/sdb1")
    assert err.value.hint == "give /dev/sdb"


def test_a_mounted_partition_is_refused(machine: Machine) -> None:
    machine.mount("8:18", "/media/my\\040stick", "/dev/sdb2", "vfat")
    with pytest.raises(ImageBadInput, match=r"/dev/sdb2 \(8:18\) on /dev/sdb is mounted on /media/my stick"):
        machine.check(8, 16)


def test_a_mount_is_found_by_its_source_when_the_number_is_anonymous(machine: Machine) -> None:
    # btrfs shows an anonymous 0:N device number; its source still names the partition
    machine.mount("0:45", "/srv", "/dev/sdb1", "btrfs")
    with pytest.raises(ImageBadInput, match="is mounted on /srv"):
        machine.check(8, 16)


def test_a_swap_partition_is_refused(machine: Machine) -> None:
    machine.swaps.append("/dev/sdb2                               partition\t8388604\t\t0\t\t-2")
    machine.save()
    with pytest.raises(ImageBadInput, match="/dev/sdb2 on /dev/sdb is in use as swap"):
        machine.check(8, 16)


def test_a_partition_with_holders_is_refused(machine: Machine) -> None:
    (machine.sys / USB / "sdb" / "sdb2" / "holders" / "dm-3").mkdir()
    with pytest.raises(ImageBadInput, match=r"/dev/sdb2 is held by dm-3 \(device-mapper, md or LVM\)"):
        machine.check(8, 16)


def test_the_disk_of_root_is_refused(machine: Machine) -> None:
    with pytest.raises(ImageBadInput, match=r"/dev/sda \(/dev/sda\) holds / of the running system"):
        machine.check(8, 0, path="/dev/sda")


def test_root_on_dm_crypt_still_names_its_disk(machine: Machine) -> None:
    # / on dm-0 (LUKS) over sdb2: found by walking dm-0's slaves down to sdb, before the holders check
    dm = machine.device(machine.sys / "devices" / "virtual" / "block" / "dm-0", "254:0", GiB)
    (dm / "slaves" / "sdb2").symlink_to(machine.sys / USB / "sdb" / "sdb2")
    (machine.sys / USB / "sdb" / "sdb2" / "holders" / "dm-0").symlink_to(dm)
    machine.mountinfo[0] = machine.mountinfo[0].replace("8:2 / / ", "254:0 / / ").replace("/dev/sda2", "/dev/dm-0")
    machine.save()
    with pytest.raises(ImageBadInput, match=r"/dev/sdb \(/dev/sdb\) holds / of the running system"):
        machine.check(8, 16)
    with pytest.raises(ImageBadInput, match="holds /boot/efi of the running system"):
        machine.check(8, 0, path="/dev/sda")


def test_a_disk_too_small_is_refused_with_both_sizes(machine: Machine) -> None:
    with pytest.raises(ImageBadInput, match=f"holds {16 * GiB} bytes; the image needs {32 * GiB}"):
        machine.check(8, 16, image_size=32 * GiB)


def test_a_read_only_disk_and_an_unknown_number_are_refused(machine: Machine) -> None:
    with pytest.raises(ImageBadInput, match=r"no .*/dev/block/8:99"):
        machine.check(8, 99)
    (machine.sys / USB / "sdb" / "ro").write_text("1\n")
    with pytest.raises(ImageBadInput, match="is read-only"):
        machine.check(8, 16)


# --- file targets -------------------------------------------------------------------------------------------


def test_file_targets(tmp_path: Path) -> None:
    image = tmp_path / "edge.img"
    image.write_bytes(b"x" * 4096)
    sys = tmp_path / "sys"
    sys.mkdir()
    new = flash.check_target(tmp_path / "out.img", image, 1 << 20, sys=sys)
    assert (new.kind, new.size, new.disk) == ("file", 1 << 20, None)
    with pytest.raises(ImageBadInput, match="is the image itself"):
        flash.check_target(image, image, 4096, sys=sys)
    os.link(image, tmp_path / "hardlink.img")
    with pytest.raises(ImageBadInput, match="is the image itself"):
        flash.check_target(tmp_path / "hardlink.img", image, 4096, sys=sys)
    with pytest.raises(ImageBadInput, match="is not a directory"):
        flash.check_target(tmp_path / "missing" / "out.img", image, 4096, sys=sys)
    with pytest.raises(ImageBadInput, match="neither a regular file nor a block device"):
        flash.check_target(tmp_path, image, 4096, sys=sys)
    with pytest.raises(ImageBadInput, match="neither a regular file nor a block device"):
        flash.check_target(Path("/dev/null"), image, 4096, sys=sys)


def test_a_file_backing_a_loop_device_is_refused(tmp_path: Path) -> None:
    backing = tmp_path / "disk.raw"
    backing.write_bytes(b"\0" * 4096)
    (tmp_path / "sys" / "block" / "loop3" / "loop").mkdir(parents=True)
    (tmp_path / "sys" / "block" / "loop3" / "loop" / "backing_file").write_text(f"{backing}\n")
    with pytest.raises(ImageBadInput, match="backs /dev/loop3") as err:
        flash.check_target(backing, tmp_path / "edge.img", 4096, sys=tmp_path / "sys")
    assert err.value.hint == "losetup -d /dev/loop3 first"
