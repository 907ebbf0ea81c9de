"""Edge image disk layout arithmetic and the ESP's boot loader text (no tools run)."""

from __future__ import annotations

import uuid

import pytest

from edge_image.disk import ESP_NAME, ESP_TYPE, MIB, ROOT_NAME, ROOT_TYPE, Layout, Partition, plan
from edge_image.errors import ImageBadInput, ImageCheckFailed
from edge_image.esp import BOOTSTRAP_KEY_PATH, boot_entry, kernel_options, loader_conf

pytestmark = pytest.mark.unit

LUKS = "0b6c7f38-52d2-4c51-a7a5-5a4d1f3c9e10"


def test_plan_aligns_partitions_and_leaves_room_for_the_backup_gpt() -> None:
    layout = plan(512 * MIB, 4096 * MIB)
    esp, root = layout.partitions
    assert (esp.number, esp.name, esp.type_guid) == (1, ESP_NAME, ESP_TYPE)
    assert (root.number, root.name, root.type_guid) == (2, ROOT_NAME, ROOT_TYPE)
    assert (esp.start, esp.size) == (MIB, 512 * MIB)
    assert (root.start, root.size) == (513 * MIB, 4096 * MIB)
    assert layout.disk_size == (1 + 512 + 4096 + 1) * MIB
    assert all(p.start % MIB == 0 and p.size % MIB == 0 for p in layout.partitions)


def test_plan_makes_fresh_upper_case_guids_unless_given() -> None:
    first, second = plan(64 * MIB, 64 * MIB), plan(64 * MIB, 64 * MIB)
    guids = [first.disk_guid, *(p.uuid for p in first.partitions)]
    assert len(set(guids)) == 3
    assert all(g == g.upper() and uuid.UUID(g).version == 4 for g in guids)
    assert first.disk_guid != second.disk_guid

    given = plan(
        64 * MIB,
        64 * MIB,
        disk_guid="11111111-2222-3333-4444-555555555555",
        esp_uuid="aaaaaaaa-2222-3333-4444-555555555555",
        root_uuid="BBBBBBBB-2222-3333-4444-555555555555",
    )
    assert given.disk_guid == "11111111-2222-3333-4444-555555555555"
    assert given.partition(ESP_NAME).uuid == "AAAAAAAA-2222-3333-4444-555555555555"  # sfdisk's spelling
    assert given.partition(ROOT_NAME).uuid == "BBBBBBBB-2222-3333-4444-555555555555"


@pytest.mark.parametrize(("esp", "root"), [(MIB + 1, 64 * MIB), (64 * MIB, 4096), (0, 64 * MIB), (64 * MIB, -MIB)])
def test_plan_refuses_sizes_that_are_not_whole_mib(esp: int, root: int) -> None:
    with pytest.raises(ImageBadInput, match="multiple of 1 MiB"):
        plan(esp, root)


def test_plan_refuses_a_guid_that_is_not_one() -> None:
    with pytest.raises(ImageBadInput, match="GUID"):
        plan(64 * MIB, 64 * MIB, disk_guid="not-a-guid")


def test_layout_partition_lookup() -> None:
    layout = plan(64 * MIB, 128 * MIB)
    assert layout.partition(ROOT_NAME).size == 128 * MIB
    with pytest.raises(ImageCheckFailed, match=r"no partition named 'membria-home'.*membria-esp, membria-root"):
        layout.partition("membria-home")


def test_layout_models_are_frozen_and_strict() -> None:
    layout = plan(64 * MIB, 64 * MIB)
    with pytest.raises(ValueError, match="frozen"):
        layout.partitions[0].start = 0  # type: ignore[misc]
    with pytest.raises(ValueError, match="extra"):
        Partition.model_validate({**layout.partitions[0].model_dump(), "flags": 1})
    assert Layout.model_validate_json(layout.model_dump_json()) == layout


def test_loader_conf() -> None:
    text = loader_conf("firstboot-membria.conf")
    assert text.splitlines() == ["timeout 0", "editor no", "default firstboot-membria.conf", "console-mode keep"]
    assert text.endswith("\n")
    with pytest.raises(ImageBadInput):
        loader_conf("a\neditor yes")


def test_boot_entry_lists_each_initrd_in_order() -> None:
    text = boot_entry(
        title="Membria edge (first boot)",
        version="6.1.0-18-amd64",
        linux="/membria/6.1.0-18-amd64/linux",
        initrds=["/membria/6.1.0-18-amd64/initrd", "/membria/bootstrap.cpio"],
        options="root=/dev/mapper/root rw",
    )
    assert text == (
        "title Membria edge (first boot)\n"
        "version 6.1.0-18-amd64\n"
        "linux /membria/6.1.0-18-amd64/linux\n"
        "initrd /membria/6.1.0-18-amd64/initrd\n"
        "initrd /membria/bootstrap.cpio\n"
        "options root=/dev/mapper/root rw\n"
    )
    plain = boot_entry(title="t", linux="/l", initrds=[], options="quiet")
    assert plain == "title t\nlinux /l\noptions quiet\n"
    with pytest.raises(ImageBadInput):
        boot_entry(title="t", linux="/l", initrds=["/i\noptions init=/bin/sh"], options="quiet")


def test_kernel_options_normal_and_first_boot() -> None:
    normal = kernel_options(LUKS, first_boot=False)
    assert normal == (
        f"rd.luks.name={LUKS}=root rd.luks.options={LUKS}=tpm2-device=auto,discard root=/dev/mapper/root rw "
        "console=tty0 console=ttyS0,115200 quiet"
    )
    first = kernel_options(LUKS.upper(), first_boot=True)  # written as udev's by-uuid link names it
    assert first.split() == [
        f"rd.luks.name={LUKS}=root",
        f"rd.luks.options={LUKS}=discard",  # no tpm2-device=: systemd 252 would then ignore the key file
        f"rd.luks.key={LUKS}=/{BOOTSTRAP_KEY_PATH}",
        "root=/dev/mapper/root",
        "rw",
        "console=tty0",
        "console=ttyS0,115200",
        "quiet",
    ]
    assert BOOTSTRAP_KEY_PATH == "etc/membria/bootstrap.key"
    with pytest.raises(ImageBadInput, match="LUKS UUID"):
        kernel_options("root", first_boot=False)
