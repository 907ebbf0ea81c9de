"""CIS 7.2: local accounts and groups (/etc/passwd, /etc/shadow, /etc/group, home directories).

/etc/shadow is read without its hash column: a check sees only whether a password field is empty.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from appliance.audit.checks._system import run, stat


def _rows(host: Any, path: str, fields: int) -> list[list[str]]:
    result = run(host, f"cat {path}")
    assert result.rc == 0, f"{path} cannot be read: {result.stderr.strip()}"
    return [line.split(":") for line in result.stdout.splitlines() if line.count(":") == fields - 1]


def _login_shells(host: Any) -> set[str]:
    result = run(host, "grep -E '^/' /etc/shells")
    return {shell for shell in result.stdout.split() if not shell.endswith("nologin")}


def _duplicates(values: list[str]) -> list[str]:
    return sorted(value for value, count in Counter(values).items() if count > 1)


def test_passwords_shadowed(host: Any) -> None:
    """7.2.1: every password field of /etc/passwd is `x` (the hash lives in /etc/shadow)."""
    result = run(host, "awk -F: '($2 != \"x\") {print $1}' /etc/passwd")
    assert result.rc == 0, "/etc/passwd cannot be read"
    unshadowed = result.stdout.split()
    assert not unshadowed, f"accounts whose password is not in /etc/shadow: {', '.join(unshadowed)}"


def test_no_empty_password_fields(host: Any) -> None:
    """7.2.2"""
    result = run(host, "awk -F: '($2 == \"\") {print $1}' /etc/shadow")
    assert result.rc == 0, f"/etc/shadow cannot be read: {result.stderr.strip()}"
    empty = result.stdout.split()
    assert not empty, f"accounts with an empty password field: {', '.join(empty)}"


def test_primary_groups_exist(host: Any) -> None:
    """7.2.3"""
    gids = {row[2] for row in _rows(host, "/etc/group", 4)}
    orphans = [f"{row[0]} (GID {row[3]})" for row in _rows(host, "/etc/passwd", 7) if row[3] not in gids]
    assert not orphans, f"accounts whose primary group does not exist: {', '.join(orphans)}"


def test_shadow_group_empty(host: Any) -> None:
    """7.2.4: nobody is in the shadow group, as a member or by primary group."""
    shadow = [row for row in _rows(host, "/etc/group", 4) if row[0] == "shadow"]
    if not shadow:
        return
    members = [m for m in shadow[0][3].split(",") if m]
    primary = [row[0] for row in _rows(host, "/etc/passwd", 7) if row[3] == shadow[0][2]]
    assert not members and not primary, f"the shadow group has members: {', '.join(members + primary)}"


def test_no_duplicate_uids(host: Any) -> None:
    """7.2.5"""
    rows = _rows(host, "/etc/passwd", 7)
    twice = _duplicates([row[2] for row in rows])
    names = [f"UID {uid}: {', '.join(row[0] for row in rows if row[2] == uid)}" for uid in twice]
    assert not twice, f"UIDs shared by several accounts: {'; '.join(names)}"


def test_no_duplicate_gids(host: Any) -> None:
    """7.2.6"""
    rows = _rows(host, "/etc/group", 4)
    twice = _duplicates([row[2] for row in rows])
    names = [f"GID {gid}: {', '.join(row[0] for row in rows if row[2] == gid)}" for gid in twice]
    assert not twice, f"GIDs shared by several groups: {'; '.join(names)}"


def test_no_duplicate_user_names(host: Any) -> None:
    """7.2.7"""
    twice = _duplicates([row[0] for row in _rows(host, "/etc/passwd", 7)])
    assert not twice, f"account names defined more than once: {', '.join(twice)}"


def test_no_duplicate_group_names(host: Any) -> None:
    """7.2.8"""
    twice = _duplicates([row[0] for row in _rows(host, "/etc/group", 4)])
    assert not twice, f"group names defined more than once: {', '.join(twice)}"


def test_interactive_home_directories(host: Any) -> None:
    """7.2.9: every account with a login shell has a home directory of its own, 0750 or stricter."""
    shells = _login_shells(host)
    problems = []
    for row in _rows(host, "/etc/passwd", 7):
        name, home, shell = row[0], row[5], row[6]
        if shell not in shells:
            continue
        found = stat(host, home)
        if found is None or found.kind != "directory":
            problems.append(f"{name}: {home} is missing")
        elif found.user != name:
            problems.append(f"{name}: {home} is owned by {found.user}")
        elif found.mode & 0o027:
            problems.append(f"{name}: {home} is {found.mode:04o}")
    assert not problems, f"interactive accounts' homes not private: {'; '.join(problems)}"
