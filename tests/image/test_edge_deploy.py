"""The pyinfra edge deploy over a real Debian rootfs (the cached mmdebstrap tarball), run twice through the CLI.

The wheelhouse is a tiny real one (six from PyPI, pinned by hash), not the appliance's: installing that is the full
build's job. Checks read the tree from outside (owners mapped through the tree's own passwd and group files) or run
the tree's own tools in it (chroot): its venv's Python, nft, visudo, systemd-analyze.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_image import chroot, rootfs
from edge_image.deploy_runner import DeployResult, run_deploy
from edge_image.errors import ImageError
from edge_image.spec import ImageSpec, ImageUser

pytestmark = pytest.mark.image

SIX = "six-1.17.0-py2.py3-none-any.whl"
AGENT_UNIT = "etc/systemd/system/membria-edge-agent.service"


def _ssh_key() -> str:
    public = Ed25519PrivateKey.generate().public_key()
    return (
        public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " tech@lab"
    )


SPEC = ImageSpec(
    site="lab",
    profile="engineering-laptop",
    version="0.0.0-test",
    domain="lab.membria.test",
    users=[ImageUser(name="tech", ssh_public_keys=[_ssh_key()], sudo=True), ImageUser(name="viewer")],
    sysctl={"kernel.kptr_restrict": "2", "net.ipv4.tcp_syncookies": "1", "fs.suid_dumpable": "0"},
    agent={"profile": "engineering-laptop", "departments": ["engineering"], "core_model": "core"},
    taxonomy_yaml="labels:\n  - name: engineering\n",
    ca_pem="-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n",
    gateways=["https://gateway.lab.membria.test:8443"],
)


def _wheelhouse(path: Path, requirement: str | None = None) -> Path:
    """six, downloaded from PyPI once per module, with requirements.txt pinning its sha256 (or another line)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / SIX).exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "six==1.17.0", "--no-deps", "-d", str(path)],
            check=True,
            capture_output=True,
        )
    digest = hashlib.sha256((path / SIX).read_bytes()).hexdigest()
    (path / "requirements.txt").write_text((requirement or f"six==1.17.0 --hash=sha256:{digest}") + "\n")
    return path


class Deployed:
    def __init__(self, tree: Path, wheelhouse: Path, first: DeployResult, second: DeployResult, log: list[str]):
        self.tree, self.wheelhouse, self.first, self.second, self.log = tree, wheelhouse, first, second, log

    def path(self, inside: str) -> Path:
        return self.tree / inside.lstrip("/")

    def owner(self, inside: str) -> tuple[str, str, int]:
        """(user, group, permission bits) of a path in the tree, names from the tree's own passwd and group."""
        st = self.path(inside).lstat()
        users = {int(f[2]): f[0] for f in _fields(self.path("/etc/passwd"))}
        groups = {int(f[2]): f[0] for f in _fields(self.path("/etc/group"))}
        return users[st.st_uid], groups[st.st_gid], st.st_mode & 0o7777

    def chroot(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        return subprocess.run(
            ["chroot", str(self.tree), *argv], capture_output=True, text=True, env=env, input=stdin, check=False
        )


def _fields(path: Path) -> list[list[str]]:
    return [line.split(":") for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    base = tmp_path_factory.mktemp("edge-deploy")
    tree = base / "root"
    rootfs.unpack(rootfs.rootfs_tar(SPEC.all_packages), tree)
    wheelhouse = _wheelhouse(base / "wheelhouse")
    log: list[str] = []
    first = run_deploy(tree, SPEC, wheelhouse, on_line=log.append)
    second = run_deploy(tree, SPEC, wheelhouse)
    return Deployed(tree, wheelhouse, first, second, log)


def test_a_second_run_changes_nothing(deployed: Deployed) -> None:
    first, second = deployed.first, deployed.second
    assert first.changed > 0 and first.operations == second.operations > 30
    assert second.changed == 0, "the deploy is not idempotent"
    assert any(line.startswith("--> Starting operation: Venv /opt/membria/runtime") for line in deployed.log)
    assert chroot.mounts_under(deployed.tree) == []
    assert not deployed.path(chroot.POLICY_RC).exists()


def test_the_agent_venv_has_the_wheelhouse(deployed: Deployed) -> None:
    result = deployed.chroot("/opt/membria/runtime/bin/python", "-c", "import six; print(six.__version__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1.17.0"
    stamp = deployed.path("/opt/membria/runtime/.membria-requirements.sha256").read_text().strip()
    assert stamp == hashlib.sha256((deployed.wheelhouse / "requirements.txt").read_bytes()).hexdigest()
    assert not deployed.path("/root/.cache/pip").exists()  # no pip cache baked into the image
    assert not deployed.path("/run/membria-wheelhouse").exists()  # a bind mount on the build's /run tmpfs


@pytest.mark.parametrize(
    ("inside", "owner", "group", "mode"),
    [
        ("/etc/membria/edge-profile.json", "root", "root", 0o644),
        ("/etc/membria/taxonomy.yaml", "root", "root", 0o644),
        ("/etc/membria/tls/ca.pem", "root", "root", 0o644),
        ("/etc/membria/image.json", "root", "root", 0o644),
        ("/var/lib/membria", "root", "root", 0o755),
        ("/var/lib/membria/edge", "membria", "membria", 0o750),
        ("/home/tech/.ssh", "tech", "tech", 0o700),
        ("/home/tech/.ssh/authorized_keys", "tech", "tech", 0o600),
        ("/etc/sudoers.d/membria-users", "root", "root", 0o440),
        ("/etc/machine-id", "root", "root", 0o444),
        ("/" + AGENT_UNIT, "root", "root", 0o644),
        ("/etc/sysctl.d/60-membria.conf", "root", "root", 0o644),
        ("/etc/nftables.conf", "root", "root", 0o755),
    ],
)
def test_files_owners_and_modes(deployed: Deployed, inside: str, owner: str, group: str, mode: int) -> None:
    assert deployed.owner(inside) == (owner, group, mode)


def test_settings_files_hold_the_spec(deployed: Deployed) -> None:
    assert json.loads(deployed.path("/etc/membria/edge-profile.json").read_text()) == SPEC.agent
    assert deployed.path("/etc/membria/taxonomy.yaml").read_text() == SPEC.taxonomy_yaml
    assert deployed.path("/etc/membria/tls/ca.pem").read_text() == SPEC.ca_pem
    image = json.loads(deployed.path("/etc/membria/image.json").read_text())
    assert image == {
        "site": "lab", "profile": "engineering-laptop", "version": "0.0.0-test", "domain": "lab.membria.test",
        "gateways": SPEC.gateways, "tpm2_pcrs": [7], "tpm2_pin": False,
    }  # fmt: skip
    sysctl = deployed.path("/etc/sysctl.d/60-membria.conf").read_text().splitlines()
    assert {"kernel.kptr_restrict = 2", "kernel.core_pattern = |/bin/false", "fs.suid_dumpable = 0"} <= set(sysctl)
    assert "Storage=none" in deployed.path("/etc/systemd/coredump.conf.d/50-membria.conf").read_text()
    fstab = deployed.path("/etc/fstab").read_text()
    assert "/dev/mapper/root  /     ext4  errors=remount-ro,discard  0  1" in fstab
    assert "PARTLABEL=membria-esp  /efi  vfat  umask=0077,nofail  0  2" in fstab
    assert deployed.path("/efi").is_dir()
    unattended = deployed.path("/etc/apt/apt.conf.d/52membria-unattended").read_text()
    assert "#clear Unattended-Upgrade::Origins-Pattern;" in unattended and "label=Debian-Security" in unattended


def test_users_are_locked_and_keyed(deployed: Deployed) -> None:
    passwd = {f[0]: f for f in _fields(deployed.path("/etc/passwd"))}
    shadow = {f[0]: f for f in _fields(deployed.path("/etc/shadow"))}
    assert passwd["membria"][5:] == ["/var/lib/membria", "/usr/sbin/nologin"]
    assert int(passwd["membria"][2]) < 1000  # a system user
    assert passwd["tech"][5:] == ["/home/tech", "/bin/bash"] and "viewer" in passwd
    assert {shadow[name][1] for name in ("root", "tech", "viewer", "membria")} == {"!"}
    keys = deployed.path("/home/tech/.ssh/authorized_keys").read_text().splitlines()
    assert keys == SPEC.users[0].ssh_public_keys
    sudoers = deployed.path("/etc/sudoers.d/membria-users").read_text()
    assert "tech ALL=(ALL:ALL) NOPASSWD: ALL" in sudoers and "viewer" not in sudoers
    check = deployed.chroot("visudo", "-cf", "/etc/sudoers.d/membria-users")
    assert check.returncode == 0, check.stdout + check.stderr
    sshd = deployed.path("/etc/ssh/sshd_config.d/50-membria.conf").read_text().splitlines()
    assert {"PasswordAuthentication no", "PermitRootLogin no", "KbdInteractiveAuthentication no"} <= set(sshd)


def test_no_build_identity(deployed: Deployed) -> None:
    machine_id = deployed.path("/etc/machine-id")
    assert machine_id.is_file() and not machine_id.is_symlink() and machine_id.stat().st_size == 0
    assert not deployed.path("/var/lib/dbus/machine-id").exists()
    assert not list(deployed.path("/etc/ssh").glob("ssh_host_*"))
    drop_in = deployed.path("/etc/systemd/system/ssh.service.d/50-membria-hostkeys.conf").read_text()
    assert drop_in.index("ExecStartPre=/usr/bin/ssh-keygen -A") < drop_in.index("ExecStartPre=/usr/sbin/sshd -t")
    assert deployed.path("/etc/hostname").read_text() == "membria-edge\n"
    assert "127.0.1.1\tmembria-edge" in deployed.path("/etc/hosts").read_text()


def test_units_enabled(deployed: Deployed) -> None:
    wants = deployed.path("/etc/systemd/system/multi-user.target.wants")
    for unit in ("membria-edge-agent.service", "auditd.service", "systemd-networkd.service", "ssh.service"):
        assert (wants / unit).is_symlink(), unit
    assert (wants / "membria-edge-agent.service").readlink() == Path("/" + AGENT_UNIT)
    sysinit = deployed.path("/etc/systemd/system/sysinit.target.wants")
    assert (sysinit / "nftables.service").is_symlink() and (sysinit / "systemd-resolved.service").is_symlink()
    unit = deployed.path("/" + AGENT_UNIT).read_text().splitlines()
    assert {
        "User=membria",
        "ExecStart=/opt/membria/runtime/bin/python -m runtime.edge --config /etc/membria/edge.json",
        "ConditionPathExists=/etc/membria/edge.json",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "WantedBy=multi-user.target",
    } <= set(unit)
    verify = deployed.chroot("systemd-analyze", "verify", "/" + AGENT_UNIT)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    network = deployed.path("/etc/systemd/network/20-membria-wired.network").read_text()
    assert "Name=en* eth*" in network and "DHCP=yes" in network


def test_nftables_config_is_valid(deployed: Deployed) -> None:
    # nft -c runs the ruleset through the kernel's netlink checks without committing it (root, no mounts needed).
    check = deployed.chroot("nft", "-c", "-f", "/etc/nftables.conf")
    assert check.returncode == 0, check.stderr
    broken = deployed.chroot("nft", "-c", "-f", "/dev/stdin", stdin="table inet t { chain c { bogus } }\n")
    assert broken.returncode != 0  # the check can fail
    rules = deployed.path("/etc/nftables.conf").read_text()
    assert "policy drop;" in rules and "tcp dport 22 accept" in rules  # tech has a key: SSH is open


def test_a_failed_operation_is_named(deployed: Deployed, tmp_path: Path) -> None:
    # Runs last. A pin the wheelhouse cannot satisfy makes pip fail (a wrong hash for the installed six would not:
    # pip checks hashes only of what it installs), so the stamp stays and the tree keeps its venv.
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / SIX).write_bytes((deployed.wheelhouse / SIX).read_bytes())
    _wheelhouse(wheelhouse, requirement="six==1.16.0 --hash=sha256:" + "0" * 64)
    with pytest.raises(ImageError) as failure:
        run_deploy(deployed.tree, SPEC, wheelhouse)
    assert "'Venv /opt/membria/runtime from the wheelhouse'" in failure.value.message
    assert "No matching distribution found for six==1.16.0" in failure.value.message  # pip's words, from the log
    assert chroot.mounts_under(deployed.tree) == []
