"""CIS 5.4: password aging, root and the system accounts, and the login shells' defaults.

/etc/shadow is read field by field without the hash column: a check sees only whether an account has a
password hash at all. Login shells are evaluated with bash itself (their effective TMOUT, umask and PATH).
"""

from __future__ import annotations

import re
import time
from typing import Any

LOGIN_DEFS = "/etc/login.defs"
MAX_DAYS = 365
MIN_WARN_DAYS = 7
MAX_INACTIVE_DAYS = 45
MAX_TMOUT_S = 900
HASHED = "hashed"  # what _shadow() reports for an account with a password hash
# root's login shell; the system-wide profile alone for "a user's default" (no dotfiles).
ROOT_LOGIN_SHELL = "env -i HOME=/root TERM=dumb bash -lc %s"
SYSTEM_PROFILE = "env -i HOME=/nonexistent TERM=dumb bash --noprofile --norc -c %s"
EXEMPT_SYSTEM_ACCOUNTS = {"root", "sync", "shutdown", "halt", "nfsnobody"}


def _login_defs(host: Any) -> dict[str, str]:
    result = host.run("grep -E '^[[:space:]]*[A-Z_]+[[:space:]]' %s", LOGIN_DEFS)
    assert result.rc == 0, f"{LOGIN_DEFS} cannot be read"
    settings = {}
    for line in result.stdout.splitlines():
        words = line.split(None, 1)
        settings[words[0]] = words[1].strip() if len(words) > 1 else ""
    return settings


def _shadow(host: Any) -> list[dict[str, str]]:
    """Every account's shadow fields, with the password reduced to hashed / locked / empty."""
    script = (
        'awk -F: \'{s = ($2 ~ /^\\$.+\\$/) ? "hashed" : (($2 == "") ? "empty" : "locked");'
        ' print $1 ":" s ":" $3 ":" $4 ":" $5 ":" $6 ":" $7}\' /etc/shadow'
    )
    result = host.run(script)
    assert result.rc == 0, f"/etc/shadow cannot be read: {result.stderr.strip()}"
    keys = ("name", "hash_kind", "lastchg", "min", "max", "warn", "inactive")
    return [
        dict(zip(keys, line.split(":"), strict=True)) for line in result.stdout.splitlines() if line.count(":") == 6
    ]


def _has_password(account: dict[str, str]) -> bool:
    return account["hash_kind"] == HASHED


def _passwd(host: Any) -> list[list[str]]:
    result = host.run("getent passwd")
    assert result.rc == 0, "getent passwd fails"
    return [line.split(":") for line in result.stdout.splitlines() if line.count(":") == 6]


def _status(host: Any) -> dict[str, str]:
    """passwd -S for every account: name -> L (locked), NP (no password) or P (usable password)."""
    result = host.run("passwd -S -a")
    assert result.rc == 0, f"passwd -S -a fails: {result.stderr.strip()}"
    return {words[0]: words[1] for words in (line.split() for line in result.stdout.splitlines()) if len(words) > 1}


def _int(value: str, default: int) -> int:
    return int(value) if value.lstrip("-").isdigit() else default


def test_password_max_days(host: Any) -> None:
    """5.4.1.1: passwords expire within 365 days (login.defs, and every account that has a password)."""
    value = _login_defs(host).get("PASS_MAX_DAYS", "")
    assert value.isdigit() and 1 <= int(value) <= MAX_DAYS, f"login.defs PASS_MAX_DAYS is {value or 'unset'}, not 1-365"
    bad = [
        f"{a['name']} ({a['max'] or 'never'})"
        for a in _shadow(host)
        if _has_password(a) and not 1 <= _int(a["max"], -1) <= MAX_DAYS
    ]
    assert not bad, f"accounts whose password never expires or lasts over {MAX_DAYS} days: {', '.join(bad)}"


def test_password_min_days(host: Any) -> None:
    """5.4.1.2: a password is kept at least a day (login.defs, and every account that has a password)."""
    value = _login_defs(host).get("PASS_MIN_DAYS", "")
    assert value.isdigit() and int(value) >= 1, f"login.defs PASS_MIN_DAYS is {value or 'unset'}, not 1 or more"
    bad = [a["name"] for a in _shadow(host) if _has_password(a) and _int(a["min"], 0) < 1]
    assert not bad, f"accounts whose password can be changed again at once: {', '.join(bad)}"


def test_password_warn_age(host: Any) -> None:
    """5.4.1.3: 7 or more days of warning before a password expires."""
    value = _login_defs(host).get("PASS_WARN_AGE", "")
    assert value.isdigit() and int(value) >= MIN_WARN_DAYS, f"login.defs PASS_WARN_AGE is {value or 'unset'}, under 7"
    bad = [a["name"] for a in _shadow(host) if _has_password(a) and _int(a["warn"], 0) < MIN_WARN_DAYS]
    assert not bad, f"accounts warned less than {MIN_WARN_DAYS} days before expiry: {', '.join(bad)}"


def test_password_hashing_algorithm(host: Any) -> None:
    """5.4.1.4: login.defs ENCRYPT_METHOD is YESCRYPT or SHA512."""
    method = _login_defs(host).get("ENCRYPT_METHOD", "").upper()
    assert method in ("YESCRYPT", "SHA512"), f"login.defs ENCRYPT_METHOD is {method or 'unset'}, not YESCRYPT or SHA512"


def test_inactive_password_lock(host: Any) -> None:
    """5.4.1.5: an expired password locks the account within 45 days (new accounts, and existing ones)."""
    result = host.run("useradd -D")
    match = re.search(r"^INACTIVE=(-?\d+)$", result.stdout, re.MULTILINE)
    value = int(match.group(1)) if match else -1
    assert 0 <= value <= MAX_INACTIVE_DAYS, f"useradd's default INACTIVE is {value}, not 0 to {MAX_INACTIVE_DAYS}"
    bad = [
        a["name"] for a in _shadow(host) if _has_password(a) and not 0 <= _int(a["inactive"], -1) <= MAX_INACTIVE_DAYS
    ]
    assert not bad, f"accounts with a password that never lock after expiring: {', '.join(bad)}"


def test_last_password_change_in_past(host: Any) -> None:
    """5.4.1.6: no account with a password claims a password change in the future."""
    today = _int(host.run("date -u +%s").stdout.strip(), int(time.time())) // 86400
    bad = [a["name"] for a in _shadow(host) if _has_password(a) and _int(a["lastchg"], 0) > today]
    assert not bad, f"accounts whose last password change lies in the future: {', '.join(bad)}"


def test_root_only_uid_zero(host: Any) -> None:
    """5.4.2.1"""
    others = [entry[0] for entry in _passwd(host) if entry[2] == "0" and entry[0] != "root"]
    assert not others, f"accounts other than root with UID 0: {', '.join(others)}"


def test_root_only_gid_zero_account(host: Any) -> None:
    """5.4.2.2"""
    exempt = {"root", "sync", "shutdown", "halt", "operator"}
    others = [entry[0] for entry in _passwd(host) if entry[3] == "0" and entry[0] not in exempt]
    assert not others, f"accounts other than root with primary group GID 0: {', '.join(others)}"


def test_root_only_gid_zero_group(host: Any) -> None:
    """5.4.2.3"""
    result = host.run("getent group")
    others = [line.split(":")[0] for line in result.stdout.splitlines() if line.split(":")[2:3] == ["0"]]
    others = [name for name in others if name != "root"]
    assert result.rc == 0 and not others, f"groups other than root with GID 0: {', '.join(others)}"


def test_root_account_access_controlled(host: Any) -> None:
    """5.4.2.4: root has a password or is locked; never an empty one."""
    status = _status(host).get("root")
    assert status in ("P", "L"), f"root's password status is {status or 'unknown'}: it has an empty password"


def test_root_path_integrity(host: Any) -> None:
    """5.4.2.5: root's PATH has no empty or relative entries, and only root-owned, root-writable directories."""
    result = host.run(ROOT_LOGIN_SHELL, 'printf "%s\\n" "$PATH"')
    path = result.stdout.strip()
    assert result.rc == 0 and path, "root's login shell reports no PATH"
    problems = []
    entries = path.split(":")
    if "" in entries:
        problems.append("an empty entry (the working directory)")
    problems += [f"relative entry {e!r}" for e in entries if e and not e.startswith("/")]
    for entry in [e for e in entries if e.startswith("/")]:
        directory = host.file(entry)
        if not directory.exists:
            continue  # a missing directory cannot hold a planted binary; CIS asks only about present ones
        if not directory.is_directory:
            problems.append(f"{entry} is not a directory")
        elif directory.user != "root" or directory.mode & 0o022:
            problems.append(f"{entry} is {directory.user}-owned, mode {directory.mode:04o}")
    assert not problems, f"root's PATH is unsafe: {'; '.join(problems)}"


def test_root_umask(host: Any) -> None:
    """5.4.2.6: root's own shell startup files set no umask looser than 027."""
    result = host.run(
        "grep -Hs -E '^[^#]*\\bumask\\b' /root/.bash_profile /root/.bash_login /root/.profile /root/.bashrc"
    )
    loose = []
    for line in result.stdout.splitlines():
        match = re.search(r"\bumask\s+(?:-S\s+)?([0-7]{3,4})\b", line)
        if match and int(match.group(1), 8) & 0o027 != 0o027:
            loose.append(line)
    assert not loose, f"root's startup files set a umask looser than 027: {'; '.join(loose)}"


def test_system_accounts_without_login_shell(host: Any) -> None:
    """5.4.2.7: accounts below UID_MIN (and nobody) cannot log in: their shell is not a valid login shell."""
    uid_min = _int(_login_defs(host).get("UID_MIN", "1000"), 1000)
    shells = {s for s in host.run("grep -E '^/' /etc/shells").stdout.split() if not s.endswith("nologin")}
    bad = [
        f"{name} ({shell})"
        for name, _, uid, _, _, _, shell in _passwd(host)
        if name not in EXEMPT_SYSTEM_ACCOUNTS and (int(uid) < uid_min or name == "nobody") and shell in shells
    ]
    assert not bad, f"system accounts with a login shell: {', '.join(bad)}"


def test_accounts_without_login_shell_locked(host: Any) -> None:
    """5.4.2.8: an account that cannot log in has no usable password either."""
    shells = {s for s in host.run("grep -E '^/' /etc/shells").stdout.split() if not s.endswith("nologin")}
    status = _status(host)
    bad = [
        f"{name} ({status.get(name, '?')})"
        for name, _, _, _, _, _, shell in _passwd(host)
        if name != "root" and shell not in shells and status.get(name) != "L"
    ]
    assert not bad, f"accounts without a login shell that are not locked: {', '.join(bad)}"


def test_shell_timeout(host: Any) -> None:
    """5.4.3.2: login shells end after at most 900 s idle; TMOUT is read-only and exported."""
    result = host.run(SYSTEM_PROFILE, ". /etc/profile >/dev/null 2>&1; declare -p TMOUT 2>&1")
    match = re.search(r"declare -(\S+) TMOUT=\"?(\d+)\"?", result.stdout)
    assert match, "the system-wide profile sets no TMOUT: idle login shells never end"
    flags, value = match.group(1), int(match.group(2))
    assert 1 <= value <= MAX_TMOUT_S, f"TMOUT is {value} s, not 1 to {MAX_TMOUT_S}"
    assert "r" in flags and "x" in flags, f"TMOUT is not read-only and exported (declare -{flags})"


def test_default_umask(host: Any) -> None:
    """5.4.3.3: login shells and new home directories get 027 or stricter (profile and login.defs UMASK)."""
    result = host.run(SYSTEM_PROFILE, ". /etc/profile >/dev/null 2>&1; umask")
    effective = result.stdout.strip()
    assert re.fullmatch(r"0?[0-7]{3}", effective), f"the system-wide profile leaves no readable umask: {effective!r}"
    assert int(effective, 8) & 0o027 == 0o027, f"login shells get umask {effective}, looser than 027"
    configured = _login_defs(host).get("UMASK", "022")
    assert int(configured, 8) & 0o027 == 0o027, f"login.defs UMASK is {configured}, looser than 027"
