"""Helpers of the CIS section 1-3 and 7 checks (`test_cis_*.py`): file modes, packages, systemd units, the
effective sysctl configuration, the local filesystems to search.

Everything a helper learns comes from a command run through testinfra's `host.run`, which the audit plugin
records as evidence; nothing here writes to the target. Commands are built with `shlex.quote` and passed
without testinfra's `%` arguments, so the recorded command is exactly what ran.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Where systemd-sysctl and `sysctl --system` read *.conf files, highest priority first: a file name in an earlier
# directory hides the same name in a later one; the files then apply in the order of their names, the last
# assignment of a key winning. /etc/sysctl.conf is read last by `sysctl --system`.
SYSCTL_DIRS = ("/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d", "/lib/sysctl.d")
SYSCTL_CONF = "/etc/sysctl.conf"

# Filesystems searched for world-writable and unowned files (local, with Unix permissions).
LOCAL_FSTYPES = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "tmpfs", "overlay"}
)

# `systemctl is-enabled` answers that mean the unit starts by itself (at boot, or when its socket/path fires).
STARTS_BY_ITSELF = frozenset({"enabled", "enabled-runtime", "indirect", "generated", "linked", "linked-runtime"})


def q(word: str) -> str:
    return shlex.quote(word)


def run(host: Any, command: str) -> Any:
    """`host.run` without testinfra's `%` formatting: the command is recorded as it ran."""
    return host.run(command)


# ---- files ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    path: str
    mode: int
    user: str
    group: str
    kind: str  # stat's %F: "regular file", "directory", ...


def stat(host: Any, path: str) -> Stat | None:
    """The file's mode, owner, group and type (following a symlink); None when it does not exist."""
    result = run(host, f"stat -L -c '%a %U %G %F' -- {q(path)}")
    if result.rc != 0:
        return None
    mode, user, group, kind = result.stdout.strip().split(" ", 3)
    return Stat(path, int(mode, 8), user, group, kind)


def check_access(
    host: Any,
    path: str,
    max_mode: int,
    *,
    owners: Iterable[str] = ("root",),
    groups: Iterable[str] = ("root",),
    required: bool = True,
) -> Stat | None:
    """Assert `path` is owned by one of `owners`/`groups` and has no permission bit beyond `max_mode`.

    A missing file fails when `required`, and passes otherwise (returns None)."""
    found = stat(host, path)
    if found is None:
        assert not required, f"{path} is missing"
        return None
    owners, groups = tuple(owners), tuple(groups)
    assert found.user in owners, f"{path} is owned by user {found.user}, not {' or '.join(owners)}"
    assert found.group in groups, f"{path} is owned by group {found.group}, not {' or '.join(groups)}"
    extra = found.mode & ~max_mode
    assert not extra, f"{path} has mode {found.mode:04o}, more than {max_mode:04o}"
    return found


# ---- packages and units -----------------------------------------------------------------------------------


def installed(host: Any, packages: Iterable[str]) -> list[str]:
    """Which of `packages` dpkg has installed (unpacked or configured; not removed, not config-files only)."""
    names = list(packages)
    result = run(host, "dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' " + " ".join(q(n) for n in names))
    present = []
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in names and len(parts[1]) >= 2 and parts[1][1] not in "nc":
            present.append(parts[0])
    return present


@dataclass(frozen=True)
class UnitState:
    unit: str
    enabled: str  # systemctl is-enabled: enabled, disabled, masked, static, not-found, ...
    active: str | None  # systemctl is-active; None where nothing runs (an image)

    @property
    def in_use(self) -> bool:
        return self.enabled in STARTS_BY_ITSELF or self.active in ("active", "activating", "reloading")

    def describe(self) -> str:
        return f"{self.unit} is {self.enabled}" + (f" and {self.active}" if self.active else "")


def unit_states(host: Any, units: Iterable[str], *, running: bool) -> list[UnitState]:
    """`systemctl is-enabled` (works on an image too) and, on a running system, `systemctl is-active`."""
    names = list(units)
    active = '"$(systemctl is-active "$u" 2>/dev/null)"' if running else "-"
    script = (
        f"for u in {' '.join(q(n) for n in names)}; do "
        f'e="$(systemctl is-enabled "$u" 2>/dev/null)"; echo "$u ${{e:-not-found}} {active}"; done'
    )
    states = []
    for line in run(host, script).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in names:
            state = parts[2] if running and len(parts) > 2 else None
            states.append(UnitState(parts[0], parts[1], state))
    return states


def in_container(host: Any) -> str | None:
    """The container technology the target runs in (systemd-detect-virt), or None on a VM or bare metal."""
    result = run(host, "systemd-detect-virt --container")
    name = result.stdout.strip()
    return name if result.rc == 0 and name and name != "none" else None


# ---- sysctl -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    value: str
    source: str  # the file that set it last


def sysctl_files(host: Any) -> list[str]:
    """The sysctl configuration files in the order they are applied."""
    patterns = " ".join(f"{d}/*.conf" for d in SYSCTL_DIRS)
    listed = run(host, f"ls -1d {patterns} {SYSCTL_CONF} 2>/dev/null").stdout.split()
    chosen: dict[str, str] = {}
    for directory in SYSCTL_DIRS:
        for path in listed:
            name = path.rsplit("/", 1)[-1]
            if path.rsplit("/", 1)[0] == directory and name not in chosen:
                chosen[name] = path
    ordered = [chosen[name] for name in sorted(chosen)]
    if SYSCTL_CONF in listed:
        ordered.append(SYSCTL_CONF)
    return ordered


def _normal_key(key: str) -> str:
    return key.strip().lstrip("-").strip().replace("/", ".")


def sysctl_configured(host: Any, keys: Iterable[str]) -> dict[str, Setting]:
    """The value each key ends up with from the sysctl configuration files (absent: no file sets it)."""
    wanted = list(keys)
    files = sysctl_files(host)
    if not files:
        return {}
    alternatives = "|".join(key.replace(".", "[./]") for key in wanted)
    command = f"grep -HE '^[[:space:]]*-?({alternatives})[[:space:]]*=' " + " ".join(q(f) for f in files)
    found: dict[str, Setting] = {}
    for line in run(host, command).stdout.splitlines():
        source, _, assignment = line.partition(":")
        key, _, value = assignment.partition("=")
        key = _normal_key(key)
        if key in wanted:
            found[key] = Setting(value.strip(), source)
    return found


def sysctl_live(host: Any, key: str) -> str | None:
    """The running kernel's value, or None where the key does not exist (IPv6 turned off, say)."""
    result = run(host, f"sysctl -n {q(key)}")
    return result.stdout.strip() if result.rc == 0 else None


def check_sysctl(host: Any, target: Any, evidence: Any, wanted: dict[str, tuple[str, ...]]) -> None:
    """Each key must be configured (sysctl.d) to one of its allowed values and, where the running kernel's value
    is this system's own, have it now.

    net.* keys belong to the target's network namespace, so their live value is checked on every running
    target; kernel.* and fs.* keys inside a container belong to the host's kernel and are checked in the
    configuration only (the evidence says which container)."""
    configured = sysctl_configured(host, wanted)
    for key, allowed in wanted.items():
        setting = configured.get(key)
        assert setting is not None, f"{key} is not set in any sysctl configuration file (want {' or '.join(allowed)})"
        assert setting.value in allowed, (
            f"{key} is configured as {setting.value} in {setting.source}, not {' or '.join(allowed)}"
        )
    if not target.running:
        evidence.add("live kernel values", "not checked: an image has no running kernel", None)
        return
    container = None
    if any(not key.startswith("net.") for key in wanted):
        container = in_container(host)
    for key, allowed in wanted.items():
        if container and not key.startswith("net."):
            evidence.add(
                f"live value of {key}",
                f"not checked: inside a container ({container}) {key} belongs to the host's kernel; "
                "the configuration above is what this system applies when it boots on its own kernel",
                None,
            )
            continue
        live = sysctl_live(host, key)
        if live is None and key.startswith("net.ipv6."):
            continue  # IPv6 is off: nothing to accept or forward
        assert live in allowed, f"{key} is {live} in the running kernel, not {' or '.join(allowed)}"


# ---- filesystems ------------------------------------------------------------------------------------------


def _mounts(host: Any) -> list[tuple[str, str, list[str]]]:
    """(target, fstype, options) of every mount on a running system."""
    out = []
    for line in run(host, "findmnt -rn -o TARGET,FSTYPE,OPTIONS").stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2].split(",")))
    return out


def local_mounts(host: Any, target: Any) -> list[str]:
    """The local filesystems to search: every writable mount of a local type on a running system; the root on an
    image. Read-only mounts are left out (and pruned from the others' search: a bind mount shares its device, so
    `-xdev` does not stop at it), as the base role leaves them out: nothing on them can be written, and nothing
    there can be remediated (a test host's read-only bind of the checkout, which may hold another machine's tree
    with that machine's owners)."""
    if not target.running:
        return ["/"]
    mounts = [
        mount
        for mount, fstype, options in _mounts(host)
        if fstype in LOCAL_FSTYPES and "ro" not in options and not mount.startswith("/run/user/")
    ]
    return mounts or ["/"]


def read_only_mounts(host: Any, target: Any) -> list[str]:
    """The mount points a search of the local filesystems skips (see `local_mounts`)."""
    if not target.running:
        return []
    return [mount for mount, _fstype, options in _mounts(host) if "ro" in options and mount != "/"]


def find_on_local(host: Any, target: Any, expression: str, limit: int = 50) -> list[str]:
    """Paths on the local filesystems matching a `find` expression (at most `limit`, the rest counted)."""
    mounts = " ".join(q(m) for m in local_mounts(host, target))
    prune = " -o ".join(f"-path {q(m)}" for m in read_only_mounts(host, target)) or "-false"
    search = f"find {mounts} -xdev \\( {prune} \\) -prune -o {expression} -print"
    result = run(host, f"{search} 2>/dev/null | head -n {limit}")
    return [line for line in result.stdout.splitlines() if line]
