"""Boot an edge disk in qemu + OVMF + swtpm, as a laptop would boot it (edge_image/DESIGN.md, "Boot test").

`BootMachine(workdir, disk)` is one laptop: its disk (a raw file), its firmware variables (a copy of
OVMF_VARS_4M.fd) and its TPM (swtpm's state directory, manufactured once with EK certificates by `swtpm_setup`) stay
in `workdir` from one boot to the next. Each `boot()` starts swtpm, runs qemu until the guest ends it, stops swtpm and
returns a `BootResult`.

The verdict comes from two channels the guest's selftest (`edge_image.device.selftest`) writes, never from the
console: a JSON report on the virtio-serial port `org.membria.selftest` (a host file), then one byte to the
`isa-debug-exit` device at I/O port 0xf4, which ends qemu with exit code `(byte << 1) | 1`. Pass = exit code 1 and
`report["ok"]`. qemu exits 1 on its own errors too, hence both. The serial console goes to a file for diagnosis.

KVM is used when it really runs a guest: `/dev/kvm` can exist and even create a VM on a host whose CPU cannot run one
(here: KVM_CREATE_VM succeeds and OVMF's first instructions end in "KVM internal error"), so the probe boots OVMF
itself under KVM to its boot manager. Otherwise TCG, with `-cpu max` (AVX2 under TCG since qemu 7.2).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_image.errors import ImageBadInput, ImageCheckFailed, ImageError, ImageMissingTool

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")  # no Secure Boot: laptops boot with it off (DESIGN.md)
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SELFTEST_PORT = "org.membria.selftest"
DEBUG_EXIT_PORT = 0xF4
GUEST_GATEWAY = ("10.0.2.100", 8443)  # what the guest dials (enroll.json's `resolve`); forwarded to the host gateway
PASS_EXIT_CODE = (0 << 1) | 1
# Tool -> the Debian package that has it (the boot tier's apt list in the Makefile).
PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "swtpm": "swtpm",
    "swtpm_setup": "swtpm-tools",
    str(OVMF_CODE): "ovmf",
    str(OVMF_VARS): "ovmf",
}
# A unix socket path must fit sun_path (108 bytes with the NUL).
_SUN_PATH_MAX = 107
_KVM_CREATE_VM = 0xAE01
_KVM_PROBE_SECONDS = 60.0
_kvm_verdict: bool | None = None

# Run by qemu's user networking once per guest connection to the gateway address (`guestfwd=...-cmd:`): stdin and
# stdout are the guest's TCP stream, relayed to the host's gateway. qemu's other form (`guestfwd=...-tcp:HOST:PORT`)
# opens one chardev connection when qemu starts and feeds every guest connection into it, so only the first guest
# connection (one HTTPS request) would ever work; enrollment retries and the guard's polls need one each.
RELAY = '''\
"""A guest connection's relay to the host's gateway (edge_image/boottest.py): stdin/stdout <-> TCP."""
import os, selectors, socket, sys

sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sock.settimeout(None)
sel = selectors.DefaultSelector()
sel.register(0, selectors.EVENT_READ, "guest")
sel.register(sock, selectors.EVENT_READ, "host")
open_ends = 2
while open_ends:
    for key, _ in sel.select():
        if key.data == "guest":
            data = os.read(0, 65536)
            if data:
                sock.sendall(data)
            else:
                sel.unregister(0)
                sock.shutdown(socket.SHUT_WR)
                open_ends -= 1
        else:
            data = sock.recv(65536)
            if data:
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view):]
            else:
                sel.unregister(sock)
                try:  # slirp hands us one socket as stdin and stdout: half-close it, the guest may still send
                    socket.socket(fileno=os.dup(1)).shutdown(socket.SHUT_WR)
                except OSError:
                    os.close(1)
                open_ends -= 1
'''


class BootTimeout(ImageCheckFailed):
    """The guest did not end the boot in time; qemu and swtpm were killed."""


@dataclass(frozen=True)
class BootResult:
    """One boot: qemu's exit code, the selftest's report (None if it wrote none), where the logs are."""

    number: int  # 1 for the machine's first boot
    exit_code: int
    report: dict[str, Any] | None
    console_log: Path
    qemu_log: Path
    report_file: Path
    seconds: float
    accel: str  # "kvm" or "tcg"

    @property
    def verdict(self) -> int | None:
        """The byte the guest wrote to port 0xf4, or None when qemu ended with an even code (power-off, a signal).

        qemu's own start-up errors also exit 1, which reads as verdict 0: `passed` needs the report as well.
        """
        return self.exit_code >> 1 if self.exit_code > 0 and self.exit_code & 1 else None

    @property
    def passed(self) -> bool:
        return self.exit_code == PASS_EXIT_CODE and self.report is not None and self.report.get("ok") is True

    def console_tail(self, lines: int = 40) -> str:
        return _tail(self.console_log, lines)

    def describe(self) -> str:
        """A one-paragraph account for assertion messages: exit code, problems, where to look, console tail."""
        problems = (self.report or {}).get("problems")
        return (
            f"boot {self.number} ({self.accel}, {self.seconds:.0f} s): qemu exit {self.exit_code}, "
            f"report {'missing' if self.report is None else 'ok=' + str(self.report.get('ok'))}, problems {problems}; "
            f"console log {self.console_log}, qemu log {self.qemu_log}\n--- console tail ---\n{self.console_tail()}"
        )


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def _require(tool: str) -> str:
    if tool.startswith("/"):
        if not Path(tool).is_file():
            raise ImageMissingTool(f"{tool} is missing", hint=f"apt-get install {PACKAGES.get(tool, 'ovmf')}")
        return tool
    found = shutil.which(tool) or next((f"{d}/{tool}" for d in ("/usr/sbin", "/sbin") if Path(d, tool).is_file()), None)
    if found is None:
        raise ImageMissingTool(
            f"`{tool}` is not installed", hint=f"apt-get install {PACKAGES.get(tool, tool)} (or run `make test-slow`)"
        )
    return found


def require_tools() -> None:
    """qemu, swtpm, swtpm_setup and OVMF's 4 MiB images, or ImageMissingTool naming the package."""
    for tool in PACKAGES:
        _require(tool)


def _option_safe(path: Path, what: str) -> str:
    # qemu and swtpm split their option strings on ',' (and slirp's cmd: on spaces).
    text = str(path)
    if any(c in text for c in ", \n"):
        raise ImageBadInput(f"{what} {text!r}: a path holding ',' or spaces cannot be given to qemu/swtpm")
    return text


def _kvm_creates_vm() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        vm = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    os.close(vm)
    return True


def kvm_usable(timeout_s: float = _KVM_PROBE_SECONDS) -> bool:
    """Whether qemu can boot OVMF under KVM here (cached for the process).

    KVM_CREATE_VM first (cheap); then OVMF itself, no disk, until its boot manager prints `BdsDxe` on the serial
    console: a host without hardware virtualisation can pass the first step and still fail every guest instruction
    that needs emulation ("KVM internal error", qemu then hangs paused).
    """
    global _kvm_verdict
    if _kvm_verdict is None:
        _kvm_verdict = _kvm_creates_vm() and _ovmf_runs_under_kvm(timeout_s)
    return _kvm_verdict


def _ovmf_runs_under_kvm(timeout_s: float) -> bool:
    qemu = _require("qemu-system-x86_64")
    with tempfile.TemporaryDirectory(prefix="membria-kvm-probe-") as scratch:
        work = Path(scratch)
        shutil.copyfile(_require(str(OVMF_VARS)), work / "vars.fd")
        serial, errors = work / "serial.log", work / "qemu.log"
        argv = [
            qemu, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "256", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_require(str(OVMF_CODE))}",
            "-drive", f"if=pflash,format=raw,unit=1,file={work / 'vars.fd'}",
            "-serial", f"file:{serial}",
        ]  # fmt: skip
        with errors.open("wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and proc.poll() is None:
                if serial.exists() and b"BdsDxe" in serial.read_bytes():
                    return True
                if b"KVM internal error" in errors.read_bytes():
                    return False
                time.sleep(0.5)
            return False
        finally:
            _stop(proc, grace_s=2)


def _stop(proc: subprocess.Popen[bytes], *, grace_s: float, sig: int = signal.SIGTERM) -> None:
    """End a child we started: `sig`, then SIGKILL after grace_s; always reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


class BootMachine:
    """A laptop in qemu: the disk, firmware variables and TPM state persist in `workdir` across boots."""

    def __init__(
        self,
        workdir: Path,
        disk: Path,
        *,
        memory_mb: int = 3072,
        cpus: int = 2,
        accel: str | None = None,
    ) -> None:
        if not disk.is_file():
            raise ImageBadInput(f"{disk}: the machine's disk must be an existing raw image file")
        if accel not in (None, "kvm", "tcg"):
            raise ImageBadInput(f"accel must be kvm or tcg, not {accel!r}")
        self.workdir = workdir.resolve()
        self.disk = disk.resolve()
        self.memory_mb = memory_mb
        self.cpus = cpus
        self._accel = accel
        _option_safe(self.workdir, "the work directory")
        _option_safe(self.disk, "the disk")
        self.workdir.mkdir(parents=True, exist_ok=True)

    # --- what persists --------------------------------------------------------------------------------------------

    @property
    def tpm_dir(self) -> Path:
        return self.workdir / "tpm"

    @property
    def vars_file(self) -> Path:
        return self.workdir / "OVMF_VARS_4M.fd"

    @property
    def boots(self) -> int:
        """How many boots this machine has had (counted from their console logs, so it survives a new harness)."""
        return len(list(self.workdir.glob("console-*.log")))

    @property
    def accel(self) -> str:
        if self._accel is None:
            self._accel = "kvm" if kvm_usable() else "tcg"
        return self._accel

    def _prepare(self) -> None:
        if not self.vars_file.exists():
            shutil.copyfile(_require(str(OVMF_VARS)), self.vars_file)
        if not self.tpm_dir.is_dir() or not any(self.tpm_dir.iterdir()):
            self._manufacture_tpm()

    def _manufacture_tpm(self) -> None:
        """A TPM as a laptop ships it: EK (RSA and ECC) with certificates, platform certificate, sha256 bank."""
        self.tpm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = [
            _require("swtpm_setup"), "--tpm2", "--tpmstate", _option_safe(self.tpm_dir, "the TPM state directory"),
            "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--pcr-banks", "sha256", "--overwrite",
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            tail = " / ".join((result.stdout + result.stderr).strip().splitlines()[-5:])
            raise ImageError(f"manufacturing the TPM in {self.tpm_dir} failed (swtpm_setup exit {result.returncode}): "
                             + tail)  # fmt: skip

    # --- one boot -------------------------------------------------------------------------------------------------

    def qemu_argv(
        self,
        *,
        number: int,
        tpm_socket: Path,
        console_log: Path,
        report_file: Path,
        gateway_port: int | None,
        relay: Path | None,
    ) -> list[str]:
        """qemu's command line for one boot (no shell: every item is one argument)."""
        accel = self.accel
        netdev = "user,id=net0,restrict=on"
        if gateway_port is not None:
            if relay is None or not 0 < gateway_port < 65536:
                raise ImageBadInput(f"bad gateway port {gateway_port!r}")
            address, port = GUEST_GATEWAY
            command = f"{_option_safe(Path(sys.executable), 'Python')} -I {_option_safe(relay, 'the relay')}"
            netdev += f",guestfwd=tcp:{address}:{port}-cmd:{command} 127.0.0.1 {gateway_port}"
        return [
            _require("qemu-system-x86_64"),
            "-name", f"membria-edge-boot-{number}",
            "-machine", "q35",
            "-accel", accel if accel == "kvm" else "tcg,thread=multi",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(self.cpus), "-m", f"{self.memory_mb}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_require(str(OVMF_CODE))}",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.vars_file}",
            # discard=unmap: the guest's TRIM punches holes in the sparse disk file, as an SSD forgets blocks.
            "-drive", f"if=none,id=disk0,format=raw,file={self.disk},discard=unmap",
            "-device", "virtio-blk-pci,drive=disk0,bootindex=0",
            "-chardev", f"socket,id=chrtpm,path={tpm_socket}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-crb,tpmdev=tpm0",
            "-netdev", netdev,
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",
            "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"file,id=selftest,path={report_file}",
            "-device", f"virtserialport,bus=vser0.0,chardev=selftest,name={SELFTEST_PORT}",
            "-chardev", f"file,id=console,path={console_log}",
            "-serial", "chardev:console",
        ]  # fmt: skip

    def boot(self, timeout_s: float, *, gateway_port: int | None = None) -> BootResult:
        """Boot once; returns when the guest ends qemu (selftest verdict, power-off, reboot) or raises BootTimeout."""
        self._prepare()
        number = self.boots + 1
        console_log = self.workdir / f"console-{number}.log"
        qemu_log = self.workdir / f"qemu-{number}.log"
        report_file = self.workdir / f"report-{number}.json"
        for path in (console_log, qemu_log, report_file):
            path.unlink(missing_ok=True)
        console_log.touch()  # counts this boot even if qemu never starts
        relay: Path | None = None
        if gateway_port is not None:
            relay = self.workdir / "relay.py"
            relay.write_text(RELAY)
        # swtpm's socket lives in a short private directory: a pytest workdir can exceed sun_path.
        sockets = Path(tempfile.mkdtemp(prefix="membria-swtpm-"))
        tpm_socket = sockets / "ctrl.sock"
        swtpm = self._start_swtpm(tpm_socket, number)
        started = time.monotonic()
        qemu: subprocess.Popen[bytes] | None = None
        try:
            argv = self.qemu_argv(
                number=number,
                tpm_socket=tpm_socket,
                console_log=console_log,
                report_file=report_file,
                gateway_port=gateway_port,
                relay=relay,
            )
            (self.workdir / f"qemu-{number}.argv").write_text(json.dumps(argv, indent=1) + "\n")
            with qemu_log.open("wb") as log:
                qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            try:
                exit_code = qemu.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _stop(qemu, grace_s=10)
                raise BootTimeout(
                    f"boot {number} ({self.accel}) did not end within {timeout_s:.0f} s; qemu was killed. "
                    f"Console log: {console_log}\n--- console tail ---\n{_tail(console_log, 30)}",
                    hint=f"qemu's own messages: {qemu_log}",
                ) from None
            seconds = time.monotonic() - started
        finally:
            if qemu is not None:
                _stop(qemu, grace_s=10)
            self._stop_swtpm(swtpm)
            shutil.rmtree(sockets, ignore_errors=True)
        return BootResult(
            number=number,
            exit_code=exit_code,
            report=_read_report(report_file),
            console_log=console_log,
            qemu_log=qemu_log,
            report_file=report_file,
            seconds=seconds,
            accel=self.accel,
        )

    def _start_swtpm(self, socket_path: Path, number: int) -> subprocess.Popen[bytes]:
        if len(str(socket_path)) > _SUN_PATH_MAX:
            raise ImageBadInput(f"{socket_path}: too long for a unix socket")
        log = self.workdir / f"swtpm-{number}.log"
        argv = [
            _require("swtpm"), "socket", "--tpm2",
            "--tpmstate", f"dir={self.tpm_dir},mode=0600",
            "--ctrl", f"type=unixio,path={socket_path},mode=0600",
            "--log", f"file={log},level=1",
            # Ends when qemu drops the control connection (qemu's exit); the state is written as it changes.
            "--terminate",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc, grace_s=2)
                stderr = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise ImageError(
                    f"swtpm did not start (exit {proc.returncode}): {stderr or _tail(log, 5)}",
                    hint=f"its log: {log}",
                )
            time.sleep(0.05)
        return proc

    @staticmethod
    def _stop_swtpm(proc: subprocess.Popen[bytes]) -> None:
        """swtpm ends by itself once qemu is gone (--terminate); SIGTERM (a clean shutdown) if it lingers."""
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _stop(proc, grace_s=10)
        if proc.stderr is not None:
            proc.stderr.close()


def _read_report(path: Path) -> dict[str, Any] | None:
    """The last JSON object the selftest wrote to its port (one per line); None when it wrote none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None
