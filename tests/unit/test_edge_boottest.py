"""The boot tier's pieces that need no qemu: the selftest's parsers and report, the harness's command line and
result (edge_image/device/selftest.py, edge_image/boottest.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_image import boottest
from edge_image.boottest import BootMachine, BootResult
from edge_image.device import selftest
from edge_image.errors import ImageBadInput

pytestmark = pytest.mark.unit

PCRREAD = """\
  sha256:
    0 : 0x3D458CFE55CC03EA1F443F1562BEEC8DF51C75E14A9FCF9A7234A13F198E7969
    1 : 0x0000000000000000000000000000000000000000000000000000000000000000
    7 : 0xB5710BF57D25623E4019027DA116821FA99F5C81E9E38B87671CC574F9281439
"""

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/mapper/root rw,discard,errors=remount-ro
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=4096k
40 22 252:1 / /efi rw,relatime shared:20 - vfat /dev/vda1 rw,fmask=0077,dmask=0077
41 22 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw
"""


def test_pcrread_output_is_parsed_per_bank() -> None:
    banks = selftest.parse_pcrread(PCRREAD)
    assert set(banks) == {"sha256"}
    assert banks["sha256"]["0"] == "0x3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"
    assert set(banks["sha256"]) == {"0", "1", "7"}
    assert selftest.parse_pcrread("") == {}


def test_mountinfo_gives_source_and_type_per_mount_point() -> None:
    found = selftest.mounts(MOUNTINFO)
    assert found["/"] == {"source": "/dev/mapper/root", "fstype": "ext4", "options": "rw,relatime"}
    assert found["/efi"]["fstype"] == "vfat"
    assert "/mnt/with space" in found  # octal escapes decoded


def test_luks_summary_names_pbkdfs_tokens_and_a_pending_reencryption() -> None:
    metadata: dict[str, Any] = {
        "keyslots": {
            "0": {"type": "luks2", "kdf": {"type": "argon2id", "memory": 65536}},
            "1": {"type": "luks2", "kdf": {"type": "pbkdf2", "iterations": 1000}},
            "2": {"type": "reencrypt", "kdf": {"type": "none"}},
        },
        "tokens": {"0": {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-pcrs": [7], "tpm2-blob": "x"}},
        "segments": {
            "0": {"type": "crypt", "encryption": "aes-xts-plain64", "sector_size": 4096, "offset": "16777216"}
        },
        "config": {"requirements": {"mandatory": ["online-reencrypt-v2"]}},
    }
    summary = selftest.luks_summary(metadata)
    assert summary["keyslots"]["0"] == {"type": "luks2", "pbkdf": "argon2id"}
    assert summary["keyslots"]["1"]["pbkdf"] == "pbkdf2"
    assert summary["tokens"]["0"] == {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-pcrs": [7]}
    assert summary["reencrypting"] is True
    assert summary["segments"]["0"]["encryption"] == "aes-xts-plain64"


def test_efi_strings_are_utf16_after_the_attributes(tmp_path: Path) -> None:
    name = f"LoaderEntrySelected-{selftest.LOADER_GUID}"
    (tmp_path / name).write_bytes(b"\x06\x00\x00\x00" + "firstboot-membria.conf\0".encode("utf-16-le"))
    assert selftest.efi_string("LoaderEntrySelected", tmp_path) == "firstboot-membria.conf"
    assert selftest.efi_string("LoaderInfo", tmp_path) is None


def test_the_boot_counter_survives_and_counts(tmp_path: Path) -> None:
    assert selftest.next_boot_number(tmp_path / "selftest") == 1
    assert selftest.next_boot_number(tmp_path / "selftest") == 2
    assert (tmp_path / "selftest" / "boots").read_text() == "2\n"


def test_only_the_ports_udev_rule_starts_the_unit() -> None:
    unit = selftest.UNITS[selftest.UNIT]
    assert "[Install]" not in unit and selftest.ENABLED == ()  # never enabled: a laptop never has the port
    assert "Type=exec" in unit  # a oneshot's start job would hold `is-system-running --wait` until the report
    assert selftest.UDEV_RULE_PATH.startswith("/etc/udev/rules.d/") and selftest.UDEV_RULE_PATH.endswith(".rules")
    rule = selftest.UDEV_RULE.splitlines()[-1]
    assert rule == (
        'SUBSYSTEM=="virtio-ports", ATTR{name}=="org.membria.selftest", TAG+="systemd", '
        'ENV{SYSTEMD_WANTS}+="membria-edge-selftest.service"'
    )


def test_without_the_port_the_selftest_does_nothing(tmp_path: Path) -> None:
    # Never poke I/O port 0xf4 on a machine that is not the boot test's qemu.
    assert selftest.main(["--port", str(tmp_path / "absent"), "--timeout", "1"]) == 0


def test_the_agent_endpoint_comes_from_its_settings() -> None:
    assert selftest._agent_endpoint({}) == ("tcp", "127.0.0.1", 8450)
    assert selftest._agent_endpoint({"port": 9000}) == ("tcp", "127.0.0.1", 9000)
    assert selftest._agent_endpoint({"unix_socket": "/run/a.sock", "port": 1}) == ("unix", "/run/a.sock", 0)


def test_the_report_lists_problems_and_only_then_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selftest, "failed_units", lambda: ["auditd.service"])
    waits = {"system": "degraded", "firstboot": {"busy": []}, "agent": {"configured": False}}
    report = selftest.build_report(3, selftest.Deadline(10), waits)
    assert report["boot"] == 3 and report["format"] == selftest.REPORT_FORMAT
    assert not report["ok"]
    assert any("auditd.service" in p for p in report["problems"])
    json.dumps(report, default=str)  # what goes down the port


def test_the_harness_reads_the_last_json_line(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text('{"ok": false}\nnot json\n{"ok": true, "boot": 2}\n\n')
    assert boottest._read_report(report) == {"ok": True, "boot": 2}
    report.write_text("")
    assert boottest._read_report(report) is None
    assert boottest._read_report(tmp_path / "none") is None


def test_pass_is_verdict_zero_and_a_good_report(tmp_path: Path) -> None:
    def result(code: int, report: dict[str, Any] | None) -> BootResult:
        log = tmp_path / "console.log"
        return BootResult(1, code, report, log, log, log, 1.0, "tcg")

    assert result(1, {"ok": True}).passed
    assert not result(1, None).passed  # qemu's own errors exit 1 too
    assert not result(1, {"ok": False}).passed
    assert not result(3, {"ok": True}).passed
    assert result(3, {"ok": False}).verdict == 1
    assert result(0, None).verdict is None  # powered off, no verdict


def test_the_qemu_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boottest, "_require", lambda tool: tool)  # no qemu needed to build the argv
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")
    machine = BootMachine(tmp_path / "m", disk, accel="tcg")
    argv = machine.qemu_argv(
        number=1,
        tpm_socket=Path("/tmp/s/ctrl.sock"),
        console_log=tmp_path / "console.log",
        report_file=tmp_path / "report.json",
        gateway_port=8443,
        relay=tmp_path / "relay.py",
    )
    joined = " ".join(argv)
    assert argv[argv.index("-accel") + 1].startswith("tcg") and argv[argv.index("-cpu") + 1] == "max"
    assert "-no-reboot" in argv and "isa-debug-exit,iobase=0xf4,iosize=0x04" in argv
    assert f"name={boottest.SELFTEST_PORT}" in joined
    assert "tpm-crb,tpmdev=tpm0" in argv and "readonly=on" in joined
    netdev = argv[argv.index("-netdev") + 1]
    assert "restrict=on" in netdev and "guestfwd=tcp:10.0.2.100:8443-cmd:" in netdev and netdev.endswith(" 8443")
    no_gateway = machine.qemu_argv(
        number=1,
        tpm_socket=Path("/tmp/s/ctrl.sock"),
        console_log=tmp_path / "c",
        report_file=tmp_path / "r",
        gateway_port=None,
        relay=None,
    )
    assert "guestfwd" not in " ".join(no_gateway)
    with pytest.raises(ImageBadInput, match="','"):
        BootMachine(tmp_path / "a,b", disk)


def test_the_relay_carries_one_guest_connection_both_ways(tmp_path: Path) -> None:
    """What qemu's `guestfwd=...-cmd:` runs per guest connection: stdin/stdout (one socket) <-> the host port."""
    relay = tmp_path / "relay.py"
    relay.write_text(boottest.RELAY)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        guest, relay_end = socket.socketpair()
        with guest, relay_end:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(relay), "127.0.0.1", str(port)],
                stdin=relay_end.fileno(),
                stdout=relay_end.fileno(),
            )
            relay_end.close()
            conn, _ = server.accept()
            with conn:
                guest.sendall(b"GET / HTTP/1.1\r\n\r\n")
                guest.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := conn.recv(4096):
                    received += chunk
                assert received == b"GET / HTTP/1.1\r\n\r\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nhello")
            answer = b""
            while chunk := guest.recv(4096):
                answer += chunk
            assert answer == b"HTTP/1.1 200 OK\r\n\r\nhello"
            assert proc.wait(timeout=10) == 0
