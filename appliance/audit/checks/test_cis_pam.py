"""CIS 5.3: the PAM stacks every login and password change goes through (/etc/pam.d/common-*, as pam-auth-update
writes them), pam_faillock's settings and pam_pwhistory's.

pam_pwquality (5.3.1.3, 5.3.2.3, 5.3.3.2.x) is not checked: its package is not part of the base role. Without
it, pam_pwhistory is the first password module and prompts itself, so it carries no use_authtok (5.3.3.3.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PAM_D = "/etc/pam.d"
FAILLOCK_CONF = "/etc/security/faillock.conf"
PWHISTORY_CONF = "/etc/security/pwhistory.conf"
MAX_DENY = 5
MIN_UNLOCK_S = 900
MIN_REMEMBER = 24
LINE = re.compile(r"^\s*(auth|account|password|session)\s+(\[[^\]]*\]|\S+)\s+(\S+)\s*(.*)$")


@dataclass(frozen=True)
class Rule:
    file: str
    type: str
    control: str
    module: str
    args: tuple[str, ...]

    def option(self, name: str) -> str | None:
        for arg in self.args:
            key, _, value = arg.partition("=")
            if key == name:
                return value
        return None


def _stack(host: Any, name: str) -> list[Rule]:
    path = f"{PAM_D}/{name}"
    result = host.run("cat %s", path)
    assert result.rc == 0, f"{path} cannot be read: {result.stderr.strip()}"
    rules = []
    for line in result.stdout.splitlines():
        match = LINE.match(line.split("#", 1)[0])
        if match:
            kind, control, module, args = match.groups()
            rules.append(Rule(path, kind, control, module.rsplit("/", 1)[-1], tuple(args.split())))
    return rules


def _module(rules: list[Rule], module: str, kind: str | None = None) -> list[Rule]:
    return [r for r in rules if r.module == module and (kind is None or r.type == kind)]


def _conf(host: Any, path: str) -> dict[str, str]:
    """key = value settings (and bare flags, as "") of a pam module's configuration file."""
    result = host.run("cat %s", path)
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            key, _, value = text.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def _unix_rules(host: Any) -> list[Rule]:
    rules = []
    for name in ("common-auth", "common-account", "common-password", "common-session"):
        rules += _module(_stack(host, name), "pam_unix.so")
    return rules


def _pwhistory(host: Any) -> Rule:
    found = _module(_stack(host, "common-password"), "pam_pwhistory.so", "password")
    assert found, f"pam_pwhistory.so is not in {PAM_D}/common-password"
    return found[0]


def test_pam_unix_enabled(host: Any) -> None:
    """5.3.2.1: pam_unix in the auth, account, password and session stacks."""
    missing = []
    for name in ("common-auth", "common-account", "common-password", "common-session"):
        if not _module(_stack(host, name), "pam_unix.so"):
            missing.append(name)
    assert not missing, f"pam_unix.so is missing from {', '.join(missing)}"


def test_pam_faillock_enabled(host: Any) -> None:
    """5.3.2.2: pam_faillock preauth and authfail around pam_unix, and in the account stack."""
    auth = _module(_stack(host, "common-auth"), "pam_faillock.so", "auth")
    account = _module(_stack(host, "common-account"), "pam_faillock.so", "account")
    missing = [
        what
        for what, present in (
            ("auth preauth", any("preauth" in r.args for r in auth)),
            ("auth authfail", any("authfail" in r.args for r in auth)),
            ("account", bool(account)),
        )
        if not present
    ]
    assert not missing, f"pam_faillock.so is not enabled ({', '.join(missing)} missing from {PAM_D}/common-*)"


def test_pam_pwhistory_enabled(host: Any) -> None:
    """5.3.2.4"""
    _pwhistory(host)


def test_faillock_deny(host: Any) -> None:
    """5.3.3.1.1: an account locks after 5 or fewer failed password logins."""
    conf = _conf(host, FAILLOCK_CONF).get("deny")
    lines = [r.option("deny") for r in _module(_stack(host, "common-auth"), "pam_faillock.so") if r.option("deny")]
    values = [v for v in [conf, *lines] if v is not None]
    assert values, f"no deny = N in {FAILLOCK_CONF}: pam_faillock's built-in default applies"
    bad = [v for v in values if not v.isdigit() or not 1 <= int(v) <= MAX_DENY]
    assert not bad, f"pam_faillock deny is {', '.join(bad)}, not 1 to {MAX_DENY}"


def test_faillock_unlock_time(host: Any) -> None:
    """5.3.3.1.2: a lock lasts until an admin lifts it (0) or at least 900 seconds."""
    conf = _conf(host, FAILLOCK_CONF).get("unlock_time")
    lines = [
        r.option("unlock_time")
        for r in _module(_stack(host, "common-auth"), "pam_faillock.so")
        if r.option("unlock_time")
    ]
    values = [v for v in [conf, *lines] if v is not None]
    assert values, f"no unlock_time = N in {FAILLOCK_CONF}"
    bad = [v for v in values if not v.isdigit() or (int(v) != 0 and int(v) < MIN_UNLOCK_S)]
    assert not bad, f"pam_faillock unlock_time is {', '.join(bad)} s, neither 0 nor {MIN_UNLOCK_S} and more"


def test_pwhistory_remember(host: Any) -> None:
    """5.3.3.3.1: the last 24 or more passwords cannot be reused."""
    rule = _pwhistory(host)
    value = rule.option("remember") or _conf(host, PWHISTORY_CONF).get("remember")
    assert value and value.isdigit(), "pam_pwhistory sets no remember=N (its default is 10)"
    assert int(value) >= MIN_REMEMBER, f"pam_pwhistory remembers {value} passwords, fewer than {MIN_REMEMBER}"


def test_pwhistory_enforce_for_root(host: Any) -> None:
    """5.3.3.3.2"""
    rule = _pwhistory(host)
    enforced = "enforce_for_root" in rule.args or "enforce_for_root" in _conf(host, PWHISTORY_CONF)
    assert enforced, "pam_pwhistory does not apply to root (no enforce_for_root)"


def test_pam_unix_no_nullok(host: Any) -> None:
    """5.3.3.4.1: an empty password never authenticates."""
    bad = sorted({r.file for r in _unix_rules(host) if "nullok" in r.args})
    assert not bad, f"pam_unix.so accepts empty passwords (nullok) in {', '.join(bad)}"


def test_pam_unix_no_remember(host: Any) -> None:
    """5.3.3.4.2: password history belongs to pam_pwhistory, not pam_unix's remember=."""
    bad = sorted({r.file for r in _unix_rules(host) if r.option("remember") is not None})
    assert not bad, f"pam_unix.so keeps its own password history (remember=) in {', '.join(bad)}"


def test_pam_unix_strong_hashing(host: Any) -> None:
    """5.3.3.4.3: new passwords are hashed with yescrypt or sha512."""
    rules = _module(_stack(host, "common-password"), "pam_unix.so", "password")
    assert rules, f"pam_unix.so is not in {PAM_D}/common-password"
    weak = [r for r in rules if not {"yescrypt", "sha512"} & set(r.args)]
    assert not weak, f"pam_unix.so hashes new passwords without yescrypt or sha512: {' '.join(weak[0].args)}"


def test_pam_unix_use_authtok(host: Any) -> None:
    """5.3.3.4.4: pam_unix sets the password the modules before it checked, not one it asks for again."""
    rules = _module(_stack(host, "common-password"), "pam_unix.so", "password")
    assert rules, f"pam_unix.so is not in {PAM_D}/common-password"
    assert all("use_authtok" in r.args for r in rules), "pam_unix.so in common-password lacks use_authtok"
