"""Remote wipe, the parts without services: the wipe list as the gateway reads it, the list edits `edge wipe`
makes, the guard's settings and unit, and how the wipe finds the LUKS device behind `root` (a fake sysfs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.edge import wipe as operator
from appliance.errors import BadInput
from edge_image.device import guard
from edge_image.device import wipe as device_wipe
from runtime.common.identity import Identity
from runtime.gateway.device_commands import WipeList, device_name, parse_wipe_list
from tests.conftest import REPO

pytestmark = pytest.mark.unit

AT = "2026-11-20T10:00:00Z"


def listed(**devices: Any) -> bytes:
    return json.dumps({"devices": devices}).encode()


def test_the_gateway_parses_the_rendered_list() -> None:
    entries = parse_wipe_list(
        listed(
            **{
                "lt-1": {"id": "wipe-1", "reason": "stolen", "requested_at": AT, "requested_by": "ops", "new": 1},
                "Bad_Name": {"id": "wipe-2"},  # not a device name: dropped
            }
        )
    )
    assert list(entries) == ["lt-1"]
    assert entries["lt-1"].id == "wipe-1" and entries["lt-1"].reason == "stolen"
    assert parse_wipe_list(b"{}") == {}
    for bad in (b"not json", b'{"devices": {"lt-1": {"reason": "no id"}}}', b'{"devices": {"lt-1": {"id": "a b"}}}'):
        with pytest.raises(ValueError):
            parse_wipe_list(bad)


def test_an_entry_covers_certificates_issued_before_it_only() -> None:
    entry = parse_wipe_list(listed(**{"lt-1": {"id": "w", "requested_at": AT}}))["lt-1"]
    at = datetime(2026, 11, 20, 10, tzinfo=UTC)
    assert entry.covers(at - timedelta(days=3)) and entry.covers(at)
    assert not entry.covers(at + timedelta(seconds=1))  # a laptop enrolled again after the wipe order
    undated = parse_wipe_list(listed(**{"lt-1": {"id": "w"}}))["lt-1"]
    assert undated.covers(at + timedelta(days=365))


def test_the_wipe_list_file_is_reread_on_change_and_a_broken_render_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "wipe-list.json"
    wipe_list = WipeList(path)
    assert wipe_list.entry("lt-1") is None  # no file: nobody listed
    path.write_bytes(listed(**{"lt-1": {"id": "w1"}}))
    entry = wipe_list.entry("lt-1")
    assert entry is not None and entry.id == "w1"
    path.write_text("{ half a file")
    os.utime(path, ns=(1, 1))
    entry = wipe_list.entry("lt-1")
    assert entry is not None and entry.id == "w1"
    path.write_bytes(listed(**{"lt-2": {"id": "w2"}}))
    os.utime(path, ns=(2, 2))
    assert wipe_list.entry("lt-1") is None and wipe_list.entry("lt-2") is not None
    path.unlink()
    assert wipe_list.entry("lt-2") is None
    assert WipeList(None).entry("lt-1") is None


def test_device_names_come_from_the_certificate_cn_in_the_site_domain() -> None:
    def ident(cn: str) -> Identity:
        return Identity(subject=cn, kind="device", departments=(), auth="mtls")

    assert device_name(ident("lt-0042.lab.membria"), "lab.membria") == "lt-0042"
    assert device_name(ident("lt-0042"), "lab.membria") is None
    assert device_name(ident("lt-0042.other.example"), "lab.membria") is None
    assert device_name(ident("x.y.lab.membria"), "lab.membria") is None


def test_list_edits_keep_the_first_entry_and_other_devices() -> None:
    data = {"devices": {"lt-a": {"id": "wa"}}}
    added = operator.with_entry(data, "lt-b", {"id": "wb"})
    assert added == {"devices": {"lt-a": {"id": "wa"}, "lt-b": {"id": "wb"}}}
    assert operator.with_entry(added, "lt-b", {"id": "other"}) is None  # idempotent: the first id stays
    assert operator.without_entry(added, "lt-a") == {"devices": {"lt-b": {"id": "wb"}}}
    assert operator.without_entry(data, "lt-z") is None
    assert data == {"devices": {"lt-a": {"id": "wa"}}}  # never edited in place


def test_reasons_are_one_printable_line() -> None:
    assert operator.check_reason("  stolen at the airport ") == "stolen at the airport"
    for bad in ("", "   ", "two\nlines", "x" * 501):
        with pytest.raises(BadInput):
            operator.check_reason(bad)


def test_render_writes_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "wipe-list.json"
    assert operator.render(path, {"devices": {"lt-1": {"id": "w"}}})
    assert not operator.render(path, {"devices": {"lt-1": {"id": "w"}}})
    assert parse_wipe_list(path.read_bytes())["lt-1"].id == "w"
    assert operator.render(path, {})
    assert json.loads(path.read_text()) == {"devices": {}}


# --- the laptop's side ---------------------------------------------------------------------------------------


def test_guard_reads_the_agent_settings_file(tmp_path: Path) -> None:
    path = tmp_path / "edge.json"
    path.write_text(
        json.dumps(
            {
                "device": "lt-1",
                "gateways": ["https://gateway.lab.membria:8443"],
                "tls": {"cert": "/etc/membria/tls/device.pem", "key": "/k", "ca": "/ca"},
                "model": {"path": "/m"},
            }
        )
    )
    conf = guard.load_config(path)
    assert conf.gateways == ["https://gateway.lab.membria:8443"] and conf.tls.ca == Path("/ca")
    path.write_text(json.dumps({"gateways": [], "tls": {"cert": "/c", "key": "/k", "ca": "/ca"}}))
    with pytest.raises(guard.ConfigError, match="gateways"):
        guard.load_config(path)
    with pytest.raises(guard.ConfigError, match="cannot read"):
        guard.load_config(tmp_path / "missing.json")


def test_guard_unit_runs_as_root_after_the_network_and_only_once_enrolled() -> None:
    assert guard.ENABLED == ("membria-edge-guard.service",)
    unit = guard.UNITS["membria-edge-guard.service"]
    for line in (
        "After=network-online.target membria-enroll.service",
        "ConditionPathExists=/etc/membria/edge.json",
        "Restart=always",
        "ExecStart=/opt/membria/runtime/bin/python -m edge_image.device.guard --config /etc/membria/edge.json "
        "--interval 60",
    ):
        assert line in unit.splitlines()
    settings = {line.split("=", 1)[0] for line in unit.splitlines() if "=" in line and not line.startswith("#")}
    # root, the partition's device node and a writable /proc/sysrq-trigger: what a wipe needs
    assert not settings & {"User", "DynamicUser", "PrivateDevices", "ProtectKernelTunables", "DevicePolicy"}


def test_guard_and_wipe_commands_refuse_bad_input_with_exit_2(tmp_path: Path) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)

    done = run("edge_image.device.guard", "--config", str(tmp_path / "none.json"), "--once")
    assert done.returncode == 2 and "cannot read" in done.stderr and "Traceback" not in done.stderr
    done = run("edge_image.device.wipe", "--device", str(tmp_path / "x"))
    assert done.returncode == 2 and "--yes-destroy-all-data" in done.stderr and "Traceback" not in done.stderr


def test_device_imports_stay_within_the_laptop_wheelhouse() -> None:
    allowed = {"httpx", "pydantic", "cryptography", "edge_image"}
    for module in (guard, device_wipe):
        source = Path(str(module.__file__)).read_text()
        for line in source.splitlines():
            if line.startswith(("import ", "from ")) and not line.startswith("from __future__"):
                top = line.split()[1].split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, line


def fake_sysfs(root: Path, name: str, dm_name: str, slaves: list[str], uuid: str = "CRYPT-LUKS2-abc-root") -> None:
    dm = root / "block" / name
    (dm / "dm").mkdir(parents=True)
    (dm / "dm" / "name").write_text(dm_name + "\n")
    (dm / "dm" / "uuid").write_text(uuid + "\n")
    (dm / "slaves").mkdir()
    for slave in slaves:
        (dm / "slaves" / slave).touch()


def test_the_wipe_finds_the_partition_behind_root(tmp_path: Path) -> None:
    fake_sysfs(tmp_path, "dm-0", "swap", ["nvme0n1p3"], uuid="CRYPT-PLAIN-swap")
    fake_sysfs(tmp_path, "dm-1", "root", ["nvme0n1p2"])
    assert device_wipe.find_root_device(sys_root=tmp_path) == Path("/dev/nvme0n1p2")
    with pytest.raises(device_wipe.WipeError) as missing:
        device_wipe.find_root_device("home", sys_root=tmp_path)
    assert missing.value.exit_code == 3
    other = tmp_path / "other"
    fake_sysfs(other, "dm-0", "root", ["sda2"], uuid="LVM-xyz")
    with pytest.raises(device_wipe.WipeError, match="not a LUKS volume"):
        device_wipe.find_root_device(sys_root=other)
    two = tmp_path / "two"
    fake_sysfs(two, "dm-0", "root", ["sda2", "sdb2"])
    with pytest.raises(device_wipe.WipeError, match="2 backing devices"):
        device_wipe.find_root_device(sys_root=two)
