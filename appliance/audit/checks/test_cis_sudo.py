"""CIS 5.2: sudo and su. The sudoers policy is read as sudo parses it (`cvtsudoers -f json`, includes followed);
of a global Defaults setting the last one wins.

The admins' NOPASSWD rule (5.2.4, Level 2) is deliberate: they have no password, only SSH keys.
"""

from __future__ import annotations

import json
import re
from typing import Any

SUDOERS = "/etc/sudoers"
SU_PAM = "/etc/pam.d/su"
MAX_TIMEOUT_MIN = 15


def _defaults(host: Any) -> list[dict[str, Any]]:
    """Every Defaults entry, in sudo's order: {"Options": [...], "Binding": ... (absent for global ones)}."""
    result = host.run("cvtsudoers -f json %s", SUDOERS)
    assert result.rc == 0, f"cvtsudoers cannot parse {SUDOERS}: {result.stderr.strip()[-300:]}"
    entries: list[dict[str, Any]] = json.loads(result.stdout).get("Defaults", [])
    return entries


def _global(host: Any, option: str) -> list[Any]:
    """The values the global Defaults give `option`, in order (True / False for flags, the text otherwise)."""
    values = []
    for entry in _defaults(host):
        if "Binding" in entry:
            continue
        for item in entry.get("Options", []):
            if option in item:
                values.append(item[option])
    return values


def test_sudo_installed(host: Any) -> None:
    """5.2.1"""
    result = host.run("dpkg-query -W -f='${Status}' sudo")
    words = result.stdout.split()
    installed = result.rc == 0 and len(words) == 3 and words[0] in ("install", "hold") and words[2] == "installed"
    assert installed, f"sudo is not installed (dpkg: {result.stdout.strip() or result.stderr.strip()})"


def test_sudo_use_pty(host: Any) -> None:
    """5.2.2: commands run in their own pseudo-terminal, so a background process cannot keep the terminal."""
    values = _global(host, "use_pty")
    assert values and values[-1] is True, "sudoers does not set Defaults use_pty (or turns it off later)"


def test_sudo_logfile(host: Any) -> None:
    """5.2.3"""
    values = _global(host, "logfile")
    assert values and isinstance(values[-1], str) and values[-1], "sudoers sets no Defaults logfile"


def test_sudo_reauthentication_not_disabled(host: Any) -> None:
    """5.2.5: no Defaults !authenticate (the admins' NOPASSWD rule is a per-user tag, not this)."""
    off = [entry for entry in _defaults(host) for item in entry.get("Options", []) if item.get("authenticate") is False]
    assert not off, "sudoers turns authentication off with Defaults !authenticate"


def test_sudo_timestamp_timeout(host: Any) -> None:
    """5.2.6: a cached sudo authentication lasts 15 minutes or less (sudo's built-in default when unset)."""
    values = _global(host, "timestamp_timeout")
    if values:
        timeout = float(values[-1])
    else:
        built_in = host.run("sudo -V")
        match = re.search(r"Authentication timestamp timeout: ([-0-9.]+) minutes", built_in.stdout)
        assert match, "sudoers sets no timestamp_timeout and sudo -V does not say its default"
        timeout = float(match.group(1))
    assert 0 <= timeout <= MAX_TIMEOUT_MIN, f"sudo caches an authentication for {timeout:g} minutes, not 0 to 15"


def test_su_restricted(host: Any) -> None:
    """5.2.7: su needs membership of a group (pam_wheel use_uid group=...), and that group is empty."""
    pam = host.file(SU_PAM)
    assert pam.exists, f"{SU_PAM} is missing"
    group = None
    for line in pam.content_string.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:3] in (["auth", "required", "pam_wheel.so"], ["auth", "requisite", "pam_wheel.so"]):
            options = words[3:]
            named = [o.split("=", 1)[1] for o in options if o.startswith("group=")]
            if "use_uid" in options and named:
                group = named[0]
    assert group, f"{SU_PAM} does not require pam_wheel.so use_uid group=<group>: anyone with a password may su"
    entry = host.run("getent group %s", group)
    assert entry.rc == 0, f"the su group {group} does not exist"
    members = [m for m in entry.stdout.strip().split(":")[3].split(",") if m]
    assert not members, f"the su group {group} is not empty: {', '.join(members)}"
