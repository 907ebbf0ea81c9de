"""`membria-edge-selftest`: the boot test's witness inside the laptop (edge_image/DESIGN.md, "Boot test").

It runs only under the boot test's qemu: a udev rule (`UDEV_RULE`, installed by the deploy) adds it to the
SYSTEMD_WANTS of the virtio-serial port `org.membria.selftest`, and a laptop never has that port. Not `WantedBy=` the
port's device unit: the generic initrd loads virtio_console, so the device is already up when the real root's systemd
takes over, and only SYSTEMD_WANTS is honoured for a device that was up before (systemd's switch-root special case;
a `.wants/` link was never started in the boot test).

It waits (up to 20 min by default: first boot under TCG is slow) for the boot to settle: `systemctl
is-system-running --wait`, first boot (`/var/lib/membria/firstboot/done`) while its units are still at work, and the
edge agent (`membria-edge-agent.service` active and `GET /api/status` answering) when the laptop is
enrolled (`/etc/membria/edge.json`; absent: the agent is reported `not-configured`, nothing is waited for). Then it
writes one JSON report (one line) to the port and its verdict byte to the `isa-debug-exit` device at I/O port 0xf4
(`/dev/port`), which ends qemu with exit code `(byte << 1) | 1`: 0 pass, 1 fail.

The host decides what the boot proved from the report (LUKS keyslots and tokens, PCRs, TPM event log, mounts, agent,
boot loader entry, filesystem size); `ok` here means only that the report is complete and no unit failed.

Stdlib only: it runs from the image's venv (`/opt/membria/runtime/bin/python -m edge_image.device.selftest`) and must
not depend on what it checks. Nothing secret is read: the LUKS header's metadata is what anyone holding the disk sees.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PYTHON = "/opt/membria/runtime/bin/python"  # the image's venv (edge_image/DESIGN.md, "Build pipeline")
PORT_NAME = "org.membria.selftest"
PORT = Path("/dev/virtio-ports") / PORT_NAME
DEBUG_EXIT_PORT = 0xF4  # qemu's isa-debug-exit (edge_image/boottest.py)
PASS, FAIL = 0, 1
DEFAULT_TIMEOUT = 1200.0
REPORT_FORMAT = "membria-selftest/1"

STATE = Path("/var/lib/membria/selftest")
FIRSTBOOT_STATE = Path("/var/lib/membria/firstboot")
FIRSTBOOT_UNITS = ("membria-reencrypt.service", "membria-enroll.service")
AGENT_UNIT = "membria-edge-agent.service"
TARGETS = ("multi-user.target", "network-online.target")
EDGE_CONFIG = Path("/etc/membria/edge.json")
MAPPING = "root"  # rd.luks.name=<uuid>=root
ESP = Path("/efi")
EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
# systemd-boot's variables (the Boot Loader Interface): which entry booted, and when.
LOADER_VARS = Path("/sys/firmware/efi/efivars")
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"

UNIT = "membria-edge-selftest.service"
UDEV_RULE_PATH = "/etc/udev/rules.d/90-membria-selftest.rules"
UDEV_RULE = (
    "# membria edge image: the boot test's virtio port (qemu only; never on a laptop) starts the selftest\n"
    f'SUBSYSTEM=="virtio-ports", ATTR{{name}}=="{PORT_NAME}", TAG+="systemd", ENV{{SYSTEMD_WANTS}}+="{UNIT}"\n'
)
UNITS: dict[str, str] = {
    UNIT: f"""\
[Unit]
Description=Membria boot test selftest (only under the boot test's qemu, whose virtio port starts it)
ConditionPathExists={PORT}

[Service]
# exec, not oneshot: a start job that lasted until the report would hold `is-system-running --wait` forever.
Type=exec
ExecStart={PYTHON} -m edge_image.device.selftest --timeout {DEFAULT_TIMEOUT:g}
StandardOutput=journal+console
StandardError=journal+console
""",
}
ENABLED: tuple[str, ...] = ()  # never enabled: only the port's udev rule (UDEV_RULE) starts it


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A command's result; a missing program or a timeout is a result too (exit 127 / 124), never an exception."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=max(timeout, 1), check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]}: timed out after {timeout:.0f} s")


def say(text: str) -> None:
    print(f"membria-selftest: {text}", flush=True)


# --- waiting ------------------------------------------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.at = self.started + seconds

    @property
    def left(self) -> float:
        return max(0.0, self.at - self._clock())

    @property
    def passed(self) -> bool:
        return self.left <= 0

    @property
    def waited(self) -> float:
        return self._clock() - self.started


def unit_state(unit: str) -> dict[str, str]:
    """LoadState, ActiveState, SubState, Result of a unit ({} when systemctl cannot say)."""
    result = run(["systemctl", "show", unit, "-p", "LoadState", "-p", "ActiveState", "-p", "SubState", "-p", "Result"])
    state: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key:
            state[key] = value
    return state


def _busy(state: dict[str, str]) -> bool:
    """Still at work: starting, running (a service that has not finished), or waiting to be restarted."""
    return state.get("ActiveState") in ("activating", "deactivating", "reloading") or state.get("SubState") in (
        "auto-restart",
        "start",
        "start-pre",
        "start-post",
    )


def wait_for_system(deadline: Deadline) -> str:
    """`systemctl is-system-running --wait`: running, degraded, ... or `starting` if the deadline came first."""
    result = run(["systemctl", "is-system-running", "--wait"], timeout=deadline.left)
    state = result.stdout.strip() or "unknown"
    return "starting" if result.returncode == 124 else state


def wait_for_firstboot(deadline: Deadline, interval: float = 5) -> dict[str, Any]:
    """First boot's state; waits while its units are at work and `done` is missing. Not installed: nothing to wait."""
    while True:
        units = {unit: unit_state(unit) for unit in FIRSTBOOT_UNITS}
        installed = any(state.get("LoadState") == "loaded" for state in units.values())
        done = (FIRSTBOOT_STATE / "done").exists()
        busy = [unit for unit, state in units.items() if _busy(state)]
        if done or not installed or not busy or deadline.passed:
            break
        time.sleep(min(interval, max(deadline.left, 0.1)))
    markers = sorted(p.name for p in FIRSTBOOT_STATE.iterdir()) if FIRSTBOOT_STATE.is_dir() else []
    return {
        "installed": installed,
        "done": done,
        "busy": busy,
        "markers": markers,
        "units": {unit: _state_word(state) for unit, state in units.items()},
    }


def _state_word(state: dict[str, str]) -> str:
    if state.get("LoadState") not in (None, "loaded"):
        return state["LoadState"]  # not-found, masked, ...
    return f"{state.get('ActiveState', 'unknown')}/{state.get('SubState', 'unknown')}"


def _agent_endpoint(config: dict[str, Any]) -> tuple[str, str, int]:
    """("unix", path, 0) or ("tcp", host, port) from the agent's settings (runtime/edge/settings.py's names)."""
    if config.get("unix_socket"):
        return "unix", str(config["unix_socket"]), 0
    return "tcp", str(config.get("host") or "127.0.0.1"), int(config.get("port") or 8450)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def agent_status(config: dict[str, Any], timeout: float = 10) -> tuple[int, Any]:
    """GET /api/status on the agent's loopback API: (HTTP status, JSON body or text)."""
    kind, where, port = _agent_endpoint(config)
    conn: http.client.HTTPConnection = (
        _UnixHTTPConnection(where, timeout)
        if kind == "unix"
        else http.client.HTTPConnection(where, port, timeout=timeout)
    )
    try:
        conn.request("GET", "/api/status", headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(256 * 1024).decode(errors="replace")
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body[:2000]


def wait_for_agent(deadline: Deadline, interval: float = 5) -> dict[str, Any]:
    """The agent's state; when the laptop is enrolled, waits until its unit is active and its API answers."""
    if not EDGE_CONFIG.exists():
        return {"state": "not-configured", "configured": False, "unit": _state_word(unit_state(AGENT_UNIT))}
    try:
        config = json.loads(EDGE_CONFIG.read_text())
    except (OSError, ValueError) as exc:
        return {"state": "bad-config", "configured": True, "error": f"{EDGE_CONFIG}: {exc}"}
    last_error = ""
    while True:
        state = unit_state(AGENT_UNIT)
        active = state.get("ActiveState") == "active"
        if active:
            try:
                code, body = agent_status(config)
            except (OSError, http.client.HTTPException) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if code == 200:
                    return {"state": "active", "configured": True, "status": body, "waited_s": round(deadline.waited)}
                last_error = f"/api/status answered {code}"
        elif state.get("ActiveState") == "failed" or state.get("LoadState") not in (None, "loaded"):
            return {"state": _state_word(state), "configured": True, "error": state.get("Result", "")}
        if deadline.passed:
            return {"state": _state_word(state), "configured": True, "error": last_error or "timed out waiting"}
        time.sleep(min(interval, max(deadline.left, 0.1)))


# --- what the report holds ----------------------------------------------------------------------------------------


def next_boot_number(state: Path = STATE) -> int:
    """This boot's number, counted in a file on the root (1 on first boot), written atomically before the report."""
    counter = state / "boots"
    try:
        previous = int(counter.read_text().strip())
    except (OSError, ValueError):
        previous = 0
    number = previous + 1
    state.mkdir(parents=True, exist_ok=True)
    temp = counter.with_suffix(".tmp")
    temp.write_text(f"{number}\n")
    with temp.open("rb") as fh:
        os.fsync(fh.fileno())
    temp.replace(counter)
    return number


def mounts(mountinfo: str) -> dict[str, dict[str, str]]:
    """Mount point -> {source, fstype, options} from /proc/self/mountinfo (the last mount on a point wins)."""
    found: dict[str, dict[str, str]] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        point = fields[4].encode().decode("unicode_escape")
        found[point] = {"source": tail[1], "fstype": tail[0], "options": fields[5]}
    return found


def backing_device(mapping: str = MAPPING, sys_block: Path = Path("/sys/block")) -> dict[str, Any]:
    """The device-mapper node of /dev/mapper/<mapping> and the partition under it, with sizes."""
    node = Path(os.path.realpath(f"/dev/mapper/{mapping}")).name  # dm-0
    slaves = sorted(p.name for p in (sys_block / node / "slaves").iterdir())
    info: dict[str, Any] = {"mapping": f"/dev/mapper/{mapping}", "dm": node, "slaves": slaves}
    with contextlib.suppress(OSError):
        info["dm_name"] = (sys_block / node / "dm" / "name").read_text().strip()
        info["mapping_size"] = int((sys_block / node / "size").read_text()) * 512
    if len(slaves) == 1:
        part = Path("/sys/class/block") / slaves[0]
        info["device"] = f"/dev/{slaves[0]}"
        with contextlib.suppress(OSError, ValueError):
            info["partition_size"] = int((part / "size").read_text()) * 512
            disk = part.resolve().parent
            info["disk"] = f"/dev/{disk.name}"
            info["disk_size"] = int((disk / "size").read_text()) * 512
    return info


def luks_summary(metadata: dict[str, Any]) -> dict[str, Any]:
    """Keyslots (type, PBKDF), tokens (type, keyslots, PCRs), segments and whether a reencryption is pending."""
    keyslots = {
        slot: {"type": value.get("type"), "pbkdf": (value.get("kdf") or {}).get("type")}
        for slot, value in sorted(metadata.get("keyslots", {}).items())
    }
    tokens = {
        token: {
            "type": value.get("type"),
            "keyslots": value.get("keyslots", []),
            **({"tpm2-pcrs": value["tpm2-pcrs"]} if "tpm2-pcrs" in value else {}),
            **({"tpm2-pcr-bank": value["tpm2-pcr-bank"]} if "tpm2-pcr-bank" in value else {}),
            **({"tpm2-pin": value["tpm2-pin"]} if "tpm2-pin" in value else {}),
        }
        for token, value in sorted(metadata.get("tokens", {}).items())
    }
    segments = {
        seg: {k: value.get(k) for k in ("type", "encryption", "sector_size", "offset", "size")}
        for seg, value in sorted(metadata.get("segments", {}).items())
    }
    return {
        "keyslots": keyslots,
        "tokens": tokens,
        "segments": segments,
        "reencrypting": any(v.get("type") == "reencrypt" for v in metadata.get("keyslots", {}).values()),
        "requirements": (metadata.get("config") or {}).get("requirements"),
    }


_PCR = re.compile(r"^\s*(\d+)\s*:\s*(0x[0-9A-Fa-f]+)\s*$")


def parse_pcrread(text: str) -> dict[str, dict[str, str]]:
    """`tpm2_pcrread` output -> {bank: {pcr: hex}}."""
    banks: dict[str, dict[str, str]] = {}
    bank: str | None = None
    for line in text.splitlines():
        header = line.strip()
        if header.endswith(":") and " " not in header:
            bank = header[:-1]
            banks[bank] = {}
            continue
        match = _PCR.match(line)
        if match and bank is not None:
            banks[bank][match.group(1)] = match.group(2).lower()
    return banks


def efi_string(name: str, root: Path = LOADER_VARS) -> str | None:
    """A systemd-boot variable (UTF-16LE after the 4-byte attributes), or None."""
    try:
        data = (root / f"{name}-{LOADER_GUID}").read_bytes()[4:]
    except OSError:
        return None
    return data.decode("utf-16-le", errors="replace").rstrip("\0")


def failed_units() -> list[str]:
    result = run(["systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager", "--all"])
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def collect_tpm() -> dict[str, Any]:
    env = {**os.environ, "TPM2TOOLS_TCTI": "device:/dev/tpmrm0"}
    try:
        pcrread = subprocess.run(
            ["tpm2_pcrread", "sha256"], capture_output=True, text=True, timeout=60, check=False, env=env
        )
        pcr_text, pcr_rc, pcr_err = pcrread.stdout, pcrread.returncode, pcrread.stderr.strip()
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pcr_text, pcr_rc, pcr_err = "", 127, str(exc)
    version = None
    with contextlib.suppress(OSError):
        version = Path("/sys/class/tpm/tpm0/tpm_version_major").read_text().strip()
    return {
        "device": Path("/dev/tpm0").exists(),
        "rm_device": Path("/dev/tpmrm0").exists(),
        "version_major": version,
        "event_log": EVENT_LOG.exists(),
        "event_log_bytes": len(EVENT_LOG.read_bytes()) if EVENT_LOG.exists() else 0,
        "pcrs": parse_pcrread(pcr_text).get("sha256", {}),
        "pcrread_exit": pcr_rc,
        **({"pcrread_error": pcr_err[-500:]} if pcr_rc else {}),
    }


def collect_luks(device: str) -> dict[str, Any]:
    result = run(["cryptsetup", "luksDump", "--dump-json-metadata", device])
    if result.returncode != 0:
        raise RuntimeError(f"cryptsetup luksDump {device}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
    metadata = json.loads(result.stdout)
    uuid = run(["cryptsetup", "luksUUID", device]).stdout.strip()
    return {"device": device, "uuid": uuid, **luks_summary(metadata), "metadata": metadata}


def collect_boot_loader() -> dict[str, Any]:
    entries = ESP / "loader" / "entries"
    loader_conf = ESP / "loader" / "loader.conf"
    return {
        "entry": efi_string("LoaderEntrySelected"),
        "loader": efi_string("LoaderInfo"),
        "esp_entries": sorted(p.name for p in entries.iterdir()) if entries.is_dir() else None,
        "loader_conf": loader_conf.read_text(errors="replace") if loader_conf.is_file() else None,
        "first_boot_files": {name: (ESP / "membria" / name).exists() for name in ("bootstrap.cpio", "enroll.json")},
    }


def collect_filesystem() -> dict[str, Any]:
    stat = os.statvfs("/")
    return {"size": stat.f_blocks * stat.f_frsize, "free": stat.f_bavail * stat.f_frsize}


def build_report(number: int, deadline: Deadline, waits: dict[str, Any]) -> dict[str, Any]:
    """Every section; a section that fails is recorded as a problem and the report is incomplete, never lost."""
    problems: list[str] = []
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "boot": number,
        "time": datetime.now(UTC).replace(microsecond=0).isoformat(),
        **waits,
    }

    def section(name: str, collect: Callable[[], Any]) -> Any:
        try:
            value = collect()
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the rest still collected
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            value = None
        report[name] = value
        return value

    with contextlib.suppress(OSError, ValueError, IndexError):
        report["uptime_s"] = round(float(Path("/proc/uptime").read_text().split()[0]), 1)
    section("cmdline", lambda: Path("/proc/cmdline").read_text().strip())
    found = section("mounts", lambda: mounts(Path("/proc/self/mountinfo").read_text())) or {}
    report["mounts"] = {point: found.get(point) for point in ("/", "/efi")}
    root = section("root", backing_device)
    if root and root.get("device"):
        section("luks", lambda: collect_luks(root["device"]))
    else:
        problems.append("luks: no single device under /dev/mapper/root")
        report["luks"] = None
    section("filesystem", collect_filesystem)
    section("tpm", collect_tpm)
    section("boot_loader", collect_boot_loader)
    section("targets", lambda: {t: run(["systemctl", "is-active", t]).stdout.strip() for t in TARGETS})
    section("failed_units", failed_units)
    section("analyze", lambda: run(["systemd-analyze", "time"]).stdout.strip())
    report["waited_s"] = round(deadline.waited, 1)

    if report.get("failed_units"):
        problems.append(f"failed units: {', '.join(report['failed_units'])}")
    if waits.get("system") not in ("running", "degraded"):
        problems.append(f"the system did not finish starting: {waits.get('system')}")
    firstboot = waits.get("firstboot") or {}
    if firstboot.get("busy"):
        problems.append(f"first boot still at work when the wait ended: {', '.join(firstboot['busy'])}")
    agent = waits.get("agent") or {}
    if agent.get("configured") and agent.get("state") != "active":
        problems.append(f"the agent is configured but not answering: {agent.get('state')} {agent.get('error', '')}")
    report["problems"] = problems
    report["ok"] = not problems
    return report


# --- the verdict --------------------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], port: Path = PORT) -> None:
    data = (json.dumps(report, sort_keys=True, default=str) + "\n").encode()
    with port.open("wb", buffering=0) as fh:
        view = memoryview(data)
        while view:
            view = view[fh.write(view) or 0 :]


def signal_verdict(byte: int) -> None:
    """One byte to I/O port 0xf4: qemu's isa-debug-exit ends the machine (exit code (byte << 1) | 1)."""
    os.sync()  # qemu stops at once, as at a power cut: the boot counter and first boot's state reach the disk first
    fd = os.open("/dev/port", os.O_WRONLY)
    try:
        os.lseek(fd, DEBUG_EXIT_PORT, os.SEEK_SET)
        os.write(fd, bytes([byte]))
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="membria-edge-selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the boot")
    parser.add_argument("--port", type=Path, default=PORT, help="the virtio-serial port to write the report to")
    parser.add_argument("--no-verdict", action="store_true", help="write the report only; leave qemu running")
    args = parser.parse_args(argv)
    if not args.port.exists():
        # Never poke I/O port 0xf4 on a machine that is not the boot test's qemu.
        say(f"{args.port} does not exist: not under the boot test, nothing to do")
        return 0
    deadline = Deadline(args.timeout)
    number = next_boot_number()
    say(f"boot {number}: waiting up to {args.timeout:.0f} s for the system, first boot and the agent")
    waits: dict[str, Any] = {"system": wait_for_system(deadline)}
    say(f"system {waits['system']} after {deadline.waited:.0f} s")
    waits["firstboot"] = wait_for_firstboot(deadline)
    waits["agent"] = wait_for_agent(deadline)
    say(f"first boot {waits['firstboot']}, agent {waits['agent'].get('state')} after {deadline.waited:.0f} s")
    report = build_report(number, deadline, waits)
    for problem in report["problems"]:
        say(f"problem: {problem}")
    verdict = PASS if report["ok"] else FAIL
    write_report(report, args.port)
    say(f"report written to {args.port}; verdict {'pass' if verdict == PASS else 'fail'}")
    if not args.no_verdict:
        signal_verdict(verdict)
    return 0 if verdict == PASS else 1


if __name__ == "__main__":
    sys.exit(main())
