"""Boot 1 of the lab image in qemu + OVMF + swtpm: what the boot chain itself guarantees.

The image's first-boot entry (systemd-boot, no Secure Boot) loads the kernel, the generic dracut initrd and the
bootstrap cpio; systemd-cryptsetup opens the LUKS2 root with the bootstrap key; the system reaches multi-user; the
selftest, started by its virtio port, reports and ends qemu. This laptop is flashed without an enrollment token, so
first boot must stop loudly at enrollment; the enrolled laptop's two boots are test_edge_enrolled_boot.py.
"""

from __future__ import annotations

import pytest

from edge_image.boottest import BootResult
from edge_image.build import FIRST_BOOT_ENTRY
from tests.boot.conftest import Laptop

# The session's image build (5 min warm, 25 cold) and a TCG boot come first, inside the first test's time.
pytestmark = [pytest.mark.boot, pytest.mark.timeout(2 * 3600)]


def test_the_selftest_reports_and_ends_the_machine(first_boot: BootResult) -> None:
    # An odd exit code is the selftest's verdict byte on port 0xf4 ((v << 1) | 1); a report means it got that far.
    assert first_boot.report is not None, first_boot.describe()
    assert first_boot.verdict is not None, first_boot.describe()
    assert first_boot.report["format"] == "membria-selftest/1"
    assert first_boot.report["boot"] == 1


def test_systemd_boot_started_the_first_boot_entry(first_boot: BootResult, laptop: Laptop) -> None:
    report = first_boot.report
    assert report is not None, first_boot.describe()
    luks_uuid = laptop.manifest.luks.uuid
    cmdline = report["cmdline"].split()
    assert f"rd.luks.name={luks_uuid}=root" in cmdline
    assert f"rd.luks.key={luks_uuid}=/etc/membria/bootstrap.key" in cmdline
    assert "console=ttyS0,115200" in cmdline
    assert report["boot_loader"]["entry"] == FIRST_BOOT_ENTRY  # systemd-boot's LoaderEntrySelected


def test_the_root_is_the_luks_volume_and_the_esp_is_mounted(first_boot: BootResult, laptop: Laptop) -> None:
    report = first_boot.report
    assert report is not None, first_boot.describe()
    assert report["mounts"]["/"]["source"] == "/dev/mapper/root"
    assert report["mounts"]["/"]["fstype"] == "ext4"
    assert report["mounts"]["/efi"] is not None and report["mounts"]["/efi"]["fstype"] == "vfat"
    assert report["root"]["dm_name"] == "root"
    assert report["luks"]["uuid"] == laptop.manifest.luks.uuid
    assert report["luks"]["segments"]["0"]["encryption"] == "aes-xts-plain64"


def test_the_tpm_is_there_with_the_firmware_event_log(first_boot: BootResult) -> None:
    report = first_boot.report
    assert report is not None, first_boot.describe()
    tpm = report["tpm"]
    assert tpm["device"] and tpm["rm_device"] and tpm["version_major"] == "2"
    assert tpm["event_log"] and tpm["event_log_bytes"] > 0
    assert set(tpm["pcrs"]) == {str(n) for n in range(24)}, tpm
    zero = "0x" + "0" * 64
    assert tpm["pcrs"]["0"] != zero and tpm["pcrs"]["7"] != zero  # OVMF measured itself and the Secure Boot state


def test_the_system_reached_multi_user(first_boot: BootResult) -> None:
    report = first_boot.report
    assert report is not None, first_boot.describe()
    assert report["targets"]["multi-user.target"] == "active"
    assert report["system"] in ("running", "degraded")


def test_without_an_enrollment_file_first_boot_stops_loudly_after_re_encrypting(first_boot: BootResult) -> None:
    """Flashed without `--enrollment`: the disk still gets its own key and grows, then enrollment fails (the unit,
    not silently), the bootstrap slot stays, and the selftest's verdict is a failure naming that unit."""
    report = first_boot.report
    assert report is not None, first_boot.describe()
    assert report["failed_units"] == ["membria-enroll.service"], first_boot.describe()
    assert report["firstboot"]["markers"] == ["reencrypted"]
    assert first_boot.verdict == 1 and not first_boot.passed
