"""The edge image's deploy: pyinfra operations over `@chroot/<tree>`, run by `edge_image.deploy_runner`.

Data (`--data`): `spec_file`, an `ImageSpec` as JSON on the build machine, and `wheelhouse`, the wheelhouse's path
inside the tree (a read-only bind mount). Idempotent: a second run on the same tree changes nothing. No apt here
(mmdebstrap installed every package) and no service is started: the tree has no running systemd, so units are
enabled from their unit files (`systemctl enable` works offline) and sysctl values are only written, never applied
(the chroot shares the build machine's kernel). Files are written whole: `files.put` from the spec's values.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from io import StringIO
from pathlib import Path
from typing import Any

from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.exceptions import OperationError
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import File, FileContents, FindFiles, Sha256File
from pyinfra.operations import files, server

from edge_image.device import firstboot, guard, selftest
from edge_image.spec import ImageSpec

VENV = "/opt/membria/runtime"
STAMP = f"{VENV}/.membria-requirements.sha256"  # the installed requirements' sha256, as the core's runtime role
STATE_DIR = "/var/lib/membria/edge"
AGENT_UNIT = "membria-edge-agent.service"
HOSTNAME = "membria-edge"  # a placeholder: enrollment sets the device's name
LOCKED = "!"  # shadow's "no password, locked" marker (useradd's own default on Debian)

spec = ImageSpec.model_validate_json(Path(host.data.get("spec_file")).read_text())
wheelhouse: str = host.data.get("wheelhouse")
ssh_open = any(user.ssh_public_keys for user in spec.users)


class UnitFileState(FactBase[str]):
    """`systemctl is-enabled UNIT`: reads unit files only, so it answers in a tree where systemd is not running.

    (pyinfra's `systemd.service` asks the running manager through `systemctl show`, which fails in a chroot.)
    """

    def command(self, unit: str) -> StringCommand:
        return StringCommand("systemctl", "is-enabled", QuoteString(unit), "2>/dev/null", "||", "true")

    def process(self, output: list[str]) -> str:
        return output[0].strip() if output else "not-found"


@operation()
def unit_enabled(unit: str, enabled: bool = True) -> Generator[Any, None, None]:
    """Enable or disable a unit offline (symlinks from its [Install] section, aliases and Also= included)."""
    is_enabled = host.get_fact(UnitFileState, unit=unit) == "enabled"
    if is_enabled == enabled:
        host.noop(f"{unit} is {'enabled' if enabled else 'disabled'}")
        return
    yield StringCommand("systemctl", "enable" if enabled else "disable", QuoteString(unit))


@operation()
def venv_from_wheelhouse(venv: str, wheelhouse: str, requirements: str, stamp: str) -> Generator[Any, None, None]:
    """The venv with the wheelhouse's pinned wheels; pip runs only when the requirements' sha256 is not the stamp's."""
    if not host.get_fact(File, path=f"{venv}/pyvenv.cfg"):
        yield StringCommand("python3", "-m", "venv", QuoteString(venv))
    digest = host.get_fact(Sha256File, path=f"{wheelhouse}/{requirements}")
    if digest is None:
        raise OperationError(f"the wheelhouse has no {requirements}")
    if host.get_fact(FileContents, path=stamp) == [digest]:
        host.noop(f"{venv} has the wheelhouse's requirements")
        return
    pip = [f"{venv}/bin/python", "-m", "pip", "install", "--no-index", "--find-links", wheelhouse]
    # --no-deps: the requirements are the complete closure pip resolved at build time, and the appliance wheel's own
    # declared dependencies (the control plane's) are deliberately not on the laptop.
    pip += ["--no-deps", "--require-hashes", "-r", f"{wheelhouse}/{requirements}"]
    # No cache: pip's cache would be build-machine leftovers in every image.
    pip += ["--no-cache-dir", "--disable-pip-version-check", "--no-input"]
    yield StringCommand(*(QuoteString(a) for a in pip))
    # Stamped only after pip succeeded (a failed op stops here): a failed install is retried next run.
    yield from files.put._inner(src=StringIO(digest + "\n"), dest=stamp, user="root", group="root", mode="0644")


@operation()
def no_ssh_host_keys() -> Generator[Any, None, None]:
    """Host keys made by the package's postinst are the build's: every laptop would share them."""
    for path in host.get_fact(FindFiles, path="/etc/ssh", fname="ssh_host_*", maxdepth=1):
        yield StringCommand("rm", "-f", QuoteString(path))


def put(dest: str, content: str, mode: str = "0644", owner: str = "root") -> None:
    files.put(name=f"File {dest}", src=StringIO(content), dest=dest, user=owner, group=owner, mode=mode)


def directory(path: str, mode: str = "0755", owner: str = "root") -> None:
    files.directory(name=f"Directory {path}", path=path, user=owner, group=owner, mode=mode)


def lines(*items: str) -> str:
    return "".join(f"{item}\n" for item in items)


# --- users: the agent's system user, the profile's people (SSH keys only), root locked -------------------------

server.group(name="Group membria", group="membria", system=True)
server.user(  # noqa: S604 (shell= is the login shell, not a subprocess's)
    name="User membria (runs the agent)",
    user="membria",
    group="membria",
    system=True,
    home="/var/lib/membria",
    shell="/usr/sbin/nologin",
    comment="Membria edge agent",
    ensure_home=False,  # /var/lib/membria stays root's: models and first-boot state live there too
)
directory("/var/lib/membria")
directory(STATE_DIR, mode="0750", owner="membria")
for person in spec.users:
    server.user(  # noqa: S604 (the login shell)
        name=f"User {person.name}",
        user=person.name,
        home=f"/home/{person.name}",
        shell="/bin/bash",
        create_home=True,
        password=LOCKED,  # keys only; sudo needs no password (there is none to type)
        public_keys=person.ssh_public_keys or None,
        delete_keys=True,
    )
sudoers = [f"{p.name} ALL=(ALL:ALL) NOPASSWD: ALL" for p in spec.users if p.sudo]
if sudoers:
    put("/etc/sudoers.d/membria-users", lines("# membria edge image: the profile's users with sudo", *sudoers), "0440")
else:
    files.file(name="No sudoers drop-in", path="/etc/sudoers.d/membria-users", present=False)
server.user(name="Root's password locked", user="root", password=LOCKED, ensure_home=False)

# --- the agent: venv from the wheelhouse, build-time settings, the site's CA, the unit -------------------------

directory("/opt/membria")
venv_from_wheelhouse(
    name=f"Venv {VENV} from the wheelhouse",
    venv=VENV,
    wheelhouse=wheelhouse,
    requirements=spec.wheel_requirements,
    stamp=STAMP,
)
directory("/etc/membria")
directory("/etc/membria/tls")
put("/etc/membria/edge-profile.json", json.dumps(spec.agent, indent=2, sort_keys=True) + "\n")
put("/etc/membria/taxonomy.yaml", spec.taxonomy_yaml)
put("/etc/membria/tls/ca.pem", spec.ca_pem)
# What first boot needs (enrollment, TPM binding); nothing secret.
image = spec.model_dump(include={"site", "profile", "version", "domain", "gateways", "tpm2_pcrs", "tpm2_pin"})
put("/etc/membria/image.json", json.dumps(image, indent=2, sort_keys=True) + "\n")
put(
    f"/etc/systemd/system/{AGENT_UNIT}",
    lines(
        "# membria edge image: the edge agent (python -m runtime.edge)",
        "[Unit]",
        "Description=Membria edge agent",
        "After=network-online.target membria-enroll.service",
        "Wants=network-online.target",
        "# Written by enrollment at first boot: nothing to run before.",
        "ConditionPathExists=/etc/membria/edge.json",
        "",
        "[Service]",
        "User=membria",
        "Group=membria",
        f"ExecStart={VENV}/bin/python -m runtime.edge --config /etc/membria/edge.json",
        "Restart=on-failure",
        "RestartSec=5",
        "# 2: bad configuration, 3: a missing file; restarting cannot fix either.",
        "RestartPreventExitStatus=2 3",
        "StateDirectory=membria/edge",
        "StateDirectoryMode=0750",
        f"ReadWritePaths={STATE_DIR}",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ),
)

# --- the laptop's own programs: first boot (re-encrypt, enroll), and their units ---------------------------------

DEVICE_MODULES = (firstboot, guard, selftest)  # selftest: wanted only by the boot test's virtio port
# The commands a local admin types (the units call the modules directly).
for command, module_name in (("membria-edge-wipe", "wipe"), ("membria-firstboot", "firstboot")):
    put(
        f"/usr/local/sbin/{command}",
        lines("#!/bin/sh", f'exec {VENV}/bin/python -m edge_image.device.{module_name} "$@"'),
        mode="0755",
    )
for module in DEVICE_MODULES:
    for unit_name, content in module.UNITS.items():
        put(f"/etc/systemd/system/{unit_name}", content)
put(selftest.UDEV_RULE_PATH, selftest.UDEV_RULE)  # the boot test's virtio port starts the selftest (SYSTEMD_WANTS)
# Enabled below, with the others, once every unit file is in place.
DEVICE_UNITS = tuple(unit for module in DEVICE_MODULES for unit in module.ENABLED)
directory("/var/lib/membria/firstboot", mode="0700")

# --- hardening: sysctl (the core's base role list), no core dumps, firewall, audit, updates, SSH --------------

sysctl = {**spec.sysctl, "kernel.core_pattern": "|/bin/false", "fs.suid_dumpable": "0"}
put(
    "/etc/sysctl.d/60-membria.conf",
    lines(
        "# membria edge image: the core's base role list, and no core dumps",
        *(f"{k} = {sysctl[k]}" for k in sorted(sysctl)),
    ),
)
put("/etc/systemd/coredump.conf.d/50-membria.conf", lines("[Coredump]", "Storage=none", "ProcessSizeMax=0"))
put("/etc/systemd/system.conf.d/50-membria-nocore.conf", lines("[Manager]", "DefaultLimitCORE=0"))
put("/etc/security/limits.d/50-membria-nocore.conf", lines("*  hard  core  0", "*  soft  core  0"))
put(
    "/etc/nftables.conf",
    lines(
        "#!/usr/sbin/nft -f",
        "# membria edge image: default-deny inbound; the agent's API listens on loopback only",
        "flush ruleset",
        "",
        "table inet membria {",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        "\t\tct state established,related accept",
        "\t\tct state invalid drop",
        '\t\tiif "lo" accept',
        "\t\t# DHCP replies to this client (v4; v6 from on-link servers)",
        "\t\tudp sport 67 udp dport 68 accept",
        "\t\tip6 saddr fe80::/10 udp sport 547 udp dport 546 accept",
        "\t\t# IPv6 neighbour discovery and router adverts, on-link only (hop limit 255)",
        "\t\ticmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
        "\t\ticmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem } accept",
        "\t\ticmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
        *(["\t\t# SSH: the profile's users have keys", "\t\ttcp dport 22 accept"] if ssh_open else []),
        "\t}",
        "",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy drop;",
        "\t}",
        "}",
    ),
    mode="0755",  # as Debian ships it: a script for nft -f
)
put(
    "/etc/apt/apt.conf.d/20auto-upgrades",
    lines('APT::Periodic::Update-Package-Lists "1";', 'APT::Periodic::Unattended-Upgrade "1";'),
)
# Read after Debian's 50unattended-upgrades (a conffile, left alone): its origins are cleared, security stays.
put(
    "/etc/apt/apt.conf.d/52membria-unattended",
    lines(
        "// membria edge image: security updates only, never an automatic reboot",
        "#clear Unattended-Upgrade::Origins-Pattern;",
        "Unattended-Upgrade::Origins-Pattern {",
        '        "origin=Debian,codename=${distro_codename}-security,label=Debian-Security";',
        "};",
        'Unattended-Upgrade::Automatic-Reboot "false";',
    ),
)
put(
    "/etc/ssh/sshd_config.d/50-membria.conf",
    lines(
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin no", "PermitEmptyPasswords no"
    ),
)
# The laptop makes its own host keys, before Debian's `sshd -t` (which fails without any).
put(
    "/etc/systemd/system/ssh.service.d/50-membria-hostkeys.conf",
    lines("[Service]", "ExecStartPre=", "ExecStartPre=/usr/bin/ssh-keygen -A", "ExecStartPre=/usr/sbin/sshd -t"),
)

# --- per-laptop identity: nothing of the build machine's ------------------------------------------------------

# Empty, not absent: systemd makes a new ID at boot and writes it here, without first-boot preset-all.
put("/etc/machine-id", "", mode="0444")
for path in ("/var/lib/dbus/machine-id", "/var/lib/systemd/random-seed", "/var/lib/systemd/credential.secret"):
    files.file(name=f"No {path}", path=path, present=False, force=True, force_backup=False)
no_ssh_host_keys(name="No SSH host keys")
put("/etc/hostname", lines(HOSTNAME))
put(
    "/etc/hosts",
    lines(
        "127.0.0.1\tlocalhost",
        f"127.0.1.1\t{HOSTNAME}",
        "::1\t\tlocalhost ip6-localhost ip6-loopback",
        "ff02::1\t\tip6-allnodes",
        "ff02::2\t\tip6-allrouters",
    ),
)

# --- boot-time mounts, networking, units -----------------------------------------------------------------------

directory("/efi")
put(
    "/etc/fstab",
    lines(
        "# membria edge image: root is the LUKS2 volume the initrd opens (rd.luks.name=<uuid>=root)",
        "/dev/mapper/root  /     ext4  errors=remount-ro,discard  0  1",
        "PARTLABEL=membria-esp  /efi  vfat  umask=0077,nofail  0  2",
    ),
)
put(
    "/etc/systemd/network/20-membria-wired.network",
    lines("[Match]", "Name=en* eth*", "", "[Network]", "DHCP=yes"),
)
for unit in (
    *DEVICE_UNITS,
    AGENT_UNIT,
    "nftables.service",
    "auditd.service",
    "systemd-networkd.service",
    "systemd-resolved.service",
):
    unit_enabled(name=f"Enable {unit}", unit=unit)
unit_enabled(name=f"SSH {'enabled' if ssh_open else 'disabled'}", unit="ssh.service", enabled=ssh_open)
