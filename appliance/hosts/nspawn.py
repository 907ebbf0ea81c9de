"""Debian 12 test hosts: systemd-nspawn machines booted with systemd, reached over SSH on a private bridge.

Used by the `hosts` test tier and by the lab (a rack node in small). Usage::

    network = HostNetwork("mbt7", "10.207.0.1/24")     # a bridge; no NAT, so no route anywhere
    network.up()
    host = TestHost("core-1", network.address(11), network, binds=[Bind(repo, repo)])
    host.create()                                      # fresh copy of the cached rootfs, own keys
    host.start()                                       # boots systemd, waits for sshd
    host.ssh("systemctl is-system-running")
    host.ansible_vars()                                # connection variables for an inventory
    host.testinfra_host()                              # a pytest-testinfra host over SSH
    host.destroy()                                     # stops it, removes its tree
    network.down()

The rootfs is built once by mmdebstrap and cached as a tarball keyed by its package list
(`/var/cache/membria/hosts/`). It carries the Debian packages the roles install, because a test host
has no route to a mirror (a rack node gets them from its mirror, or from the air-gapped bundle).
Each machine gets its own SSH host keys, recorded in a known_hosts file next to it, so SSH checks the
host key strictly instead of trusting whatever answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import MissingEnvironment, ServiceError
from runtime.common.file_lock import exclusive

Progress = Callable[[str], None]

SUITE = "bookworm"
CACHE_DIR = Path(os.environ.get("MEMBRIA_HOSTS_CACHE", "/var/cache/membria/hosts"))
MACHINES_DIR = Path(os.environ.get("MEMBRIA_HOSTS_DIR", "/var/lib/membria/hosts"))

# What the roles install, present in the image (see the module docstring), plus what a booted,
# SSH-reachable Debian needs. libgomp1: llama.cpp's shared library links it.
ROOTFS_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "python3-venv",
    "iproute2",
    "iputils-ping",
    "procps",
    "nftables",
    "auditd",
    "unattended-upgrades",
    "sudo",
    "ca-certificates",
    "openssl",
    "systemd-timesyncd",
    "prometheus-node-exporter",
    "keepalived",
    "pciutils",
    "libgomp1",
)

STOP_TIMEOUT_S = 30.0


def _quiet(_: str) -> None:
    pass


def require_tools() -> None:
    """Exit 3 (missing environment) with the fix, before anything is made."""
    if os.geteuid() != 0:
        raise MissingEnvironment("test hosts need root (systemd-nspawn, bridges)", hint="run as root")
    missing = [tool for tool in ("systemd-nspawn", "mmdebstrap", "ip", "ssh", "ssh-keygen") if not shutil.which(tool)]
    if missing:
        raise MissingEnvironment(
            f"missing tools for test hosts: {', '.join(missing)}",
            hint="apt-get install systemd-container mmdebstrap iproute2 openssh-client",
        )


def rootfs_path(packages: Sequence[str] = ROOTFS_PACKAGES) -> Path:
    digest = hashlib.sha256(" ".join([SUITE, *sorted(packages)]).encode()).hexdigest()[:12]
    return CACHE_DIR / f"{SUITE}-{digest}.tar"


def ensure_rootfs(packages: Sequence[str] = ROOTFS_PACKAGES, progress: Progress = _quiet) -> Path:
    """The cached rootfs tarball, built by mmdebstrap if absent (about a minute). Safe across processes."""
    require_tools()
    target = rootfs_path(packages)
    with exclusive(CACHE_DIR / ".lock"):
        if target.exists():
            return target
        progress(f"building the Debian {SUITE} rootfs with mmdebstrap (once; cached in {CACHE_DIR})")
        partial = target.with_suffix(".partial.tar")
        argv = ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(partial)]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ServiceError(f"mmdebstrap failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        partial.rename(target)  # only a complete tarball ever carries the final name
    return target


def _run(argv: Sequence[str], what: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ServiceError(f"{what} failed: {' '.join(argv)}: {result.stderr.strip()}")


@dataclass
class HostNetwork:
    """A Linux bridge holding the admin side's address of a private /24; nothing routes off it."""

    bridge: str
    cidr: str  # the admin side's address with its prefix, e.g. 10.77.0.1/24

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.cidr)

    @property
    def gateway(self) -> str:
        """The admin machine's address on the bridge (what a test host reaches the admin side at)."""
        return str(self.interface.ip)

    def address(self, host_number: int) -> str:
        return str(self.interface.network.network_address + host_number)

    def exists(self) -> bool:
        return Path("/sys/class/net", self.bridge).exists()

    def up(self) -> None:
        if len(self.bridge) > 15:
            raise ValueError(f"bridge name {self.bridge!r} is longer than 15 characters")
        if not self.exists():
            _run(["ip", "link", "add", self.bridge, "type", "bridge"], "creating the bridge")
        current = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "dev", self.bridge], capture_output=True, text=True, check=False
        ).stdout
        if self.cidr not in current:
            _run(["ip", "addr", "add", self.cidr, "dev", self.bridge], "addressing the bridge")
        _run(["ip", "link", "set", self.bridge, "up"], "raising the bridge")

    def down(self) -> None:
        if self.exists():
            _run(["ip", "link", "del", self.bridge], "removing the bridge")


@dataclass(frozen=True)
class Bind:
    """A host directory visible inside the machine (read-only unless said otherwise)."""

    source: Path
    target: Path
    readonly: bool = True

    def argument(self) -> str:
        flag = "--bind-ro" if self.readonly else "--bind"
        return f"{flag}={self.source}:{self.target}"


class TestHost:
    """One Debian 12 machine. `create` and `destroy` are idempotent; `start` boots and waits for SSH."""

    __test__ = False  # not a pytest test class, despite the name
    user = "root"

    def __init__(
        self,
        name: str,
        address: str,
        network: HostNetwork,
        *,
        binds: Sequence[Bind] = (),
        machines_dir: Path = MACHINES_DIR,
        packages: Sequence[str] = ROOTFS_PACKAGES,
    ) -> None:
        if not name.replace("-", "").isalnum() or len(name) > 12:
            raise ValueError(f"machine name {name!r}: letters, digits and '-', at most 12 characters")
        self.name = name
        self.address = address
        self.network = network
        self.binds = list(binds)
        self.packages = tuple(packages)
        self.home = machines_dir / name
        self.root = self.home / "rootfs"
        self.key_path = self.home / "id_ed25519"
        self.known_hosts = self.home / "known_hosts"
        self.console_log = self.home / "console.log"
        self.pid_file = self.home / "nspawn.pid"
        self._process: subprocess.Popen[bytes] | None = None  # when this object started it

    # ---- lifecycle -------------------------------------------------------------------------------------

    def create(self, progress: Progress = _quiet) -> None:
        """A fresh machine tree from the cached rootfs, with its own identity, address and keys."""
        tarball = ensure_rootfs(self.packages, progress)
        if self.running():
            raise ServiceError(f"test host {self.name} is running; destroy it first")
        if self.home.exists():
            shutil.rmtree(self.home)
        self.root.mkdir(parents=True)
        progress(f"unpacking {self.name}")
        _run(["tar", "-xf", str(tarball), "-C", str(self.root)], "unpacking the rootfs")
        self._write_identity()
        self._write_network()
        self._write_keys()

    def _write_identity(self) -> None:
        (self.root / "etc/hostname").write_text(self.name + "\n")
        hosts = self.root / "etc/hosts"
        hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {self.name}\n::1 localhost ip6-localhost\n")
        (self.root / "etc/machine-id").write_text("")  # systemd makes a new one on first boot

    def _write_network(self) -> None:
        prefix = self.network.interface.network.prefixlen
        network_dir = self.root / "etc/systemd/network"
        network_dir.mkdir(parents=True, exist_ok=True)
        # Sorts before systemd's own 80-container-host0.network (DHCP), so the static address wins.
        (network_dir / "10-host0.network").write_text(
            f"[Match]\nName=host0\n\n[Network]\nAddress={self.address}/{prefix}\nLinkLocalAddressing=no\n"
        )
        wants = self.root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / "systemd-networkd.service"
        if not link.is_symlink():
            link.symlink_to("/lib/systemd/system/systemd-networkd.service")

    def _write_keys(self) -> None:
        for old in (self.root / "etc/ssh").glob("ssh_host_*"):
            old.unlink()
        _run(["ssh-keygen", "-q", "-A", "-f", str(self.root)], "generating SSH host keys")
        host_key = (self.root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts.write_text(f"{self.address} {host_key[0]} {host_key[1]}\n")
        _run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"membria-test@{self.name}",
                "-f",
                str(self.key_path),
            ],
            "generating the test key",
        )
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        authorized.write_text(self.public_key() + "\n")
        authorized.chmod(0o600)

    def public_key(self) -> str:
        return self.key_path.with_suffix(".pub").read_text().strip()

    def start(self, timeout: float = 120.0, progress: Progress = _quiet) -> None:
        if not self.root.exists():
            raise ServiceError(f"test host {self.name} has no tree; create() it first")
        if self.running():
            return
        self.network.up()
        argv = [
            "systemd-nspawn",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--register=no",  # no machined on the admin machine: nothing to register with
            "--keep-unit",  # no D-Bus to ask systemd for a scope
            f"--network-bridge={self.network.bridge}",
            "--console=pipe",
            *(bind.argument() for bind in self.binds),
        ]
        progress(f"booting {self.name} ({self.address})")
        with self.console_log.open("ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self._process = process
        self.pid_file.write_text(str(process.pid))
        self.wait_ssh(timeout)

    def wait_ssh(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running():
                raise ServiceError(f"test host {self.name} exited while booting", hint=f"see {self.console_log}")
            result = self.ssh("true", check=False, timeout=10)
            if result.returncode == 0:
                return
            last = result.stderr.strip()
            time.sleep(1)
        raise ServiceError(
            f"test host {self.name} did not answer SSH on {self.address} within {timeout:.0f}s: {last}",
            hint=f"see {self.console_log}",
        )

    def pid(self) -> int | None:
        if self._process is not None:
            return self._process.pid if self._process.poll() is None else None
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited (no zombie "running")
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None
        if state == "Z":
            return None
        # The pid may have been reused by another program since. (comm, not cmdline: nspawn's cmdline reads
        # empty for a moment after it starts.)
        return pid if comm == "systemd-nspawn" else None

    def running(self) -> bool:
        return self.pid() is not None

    def stop(self) -> None:
        """Power off (nspawn turns SIGTERM into a clean shutdown of the machine's systemd), then kill."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and self.running():
            time.sleep(0.3)
        if self.running():
            os.killpg(pid, signal.SIGKILL)
            while self.running():
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        self._process = None

    def destroy(self) -> None:
        self.stop()
        if self.home.exists():
            shutil.rmtree(self.home)

    # ---- access ----------------------------------------------------------------------------------------

    def ssh_options(self) -> list[str]:
        return [
            "-i",
            str(self.key_path),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
        ]

    def ssh(self, command: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", *self.ssh_options(), f"{self.user}@{self.address}", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ServiceError(f"on {self.name}: `{command}` exited {result.returncode}: {result.stderr.strip()}")
        return result

    def ansible_vars(self) -> dict[str, Any]:
        return {
            "ansible_host": self.address,
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": str(self.key_path),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes",
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def testinfra_host(self) -> Any:
        import testinfra  # the dev extra; only tests and audits use it

        return testinfra.get_host(
            f"ssh://{self.user}@{self.address}",
            ssh_identity_file=str(self.key_path),
            ssh_extra_args=f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes",
        )


def free_network(prefix: str = "mbt") -> HostNetwork:
    """A new bridge on a 10.2xx.y.0/24 that no interface here uses (runs side by side), already up."""
    with exclusive(CACHE_DIR / ".network.lock"):  # pick and raise in one step, so two runs never share one
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout
        for number in range(1, 2000):
            second, third = 200 + number // 250, number % 250
            bridge = f"{prefix}{number}"
            if f"10.{second}.{third}." not in used and not Path("/sys/class/net", bridge).exists():
                network = HostNetwork(bridge, f"10.{second}.{third}.1/24")
                network.up()
                return network
    raise ServiceError("no free private subnet for a test network")


def unique_name(prefix: str = "t") -> str:
    """A machine name no other run uses right now (at most 12 characters)."""
    return f"{prefix[:5]}-{os.urandom(3).hex()}"


def stop_strays(machines_dir: Path = MACHINES_DIR) -> list[str]:
    """Stop machines a crashed run left behind (their pid files); returns their names."""
    stopped = []
    for pid_file in machines_dir.glob("*/nspawn.pid"):
        name = pid_file.parent.name
        host = TestHost(name, "0.0.0.0", HostNetwork("unused", "10.0.0.1/24"), machines_dir=machines_dir)  # noqa: S104
        if host.running():
            host.stop()
            stopped.append(name)
    return stopped
