"""CIS 5.1: the SSH server. Settings are read as sshd applies them (`sshd -T`: the first value wins across the
main file and its drop-ins), not by reading the files, so a drop-in that sorts first cannot hide.

`sshd -T` needs /run/sshd, which only a booted system has: on an image those checks are not applicable.
PermitRootLogin (5.1.20) is not checked: the appliance is provisioned as root with a key (prohibit-password).
"""

from __future__ import annotations

from typing import Any

import pytest

CONFIG = "/etc/ssh/sshd_config"
DROP_INS = "/etc/ssh/sshd_config.d"

WEAK_CIPHERS = {
    "3des-cbc",
    "aes128-cbc",
    "aes192-cbc",
    "aes256-cbc",
    "blowfish-cbc",
    "cast128-cbc",
    "rijndael-cbc@lysator.liu.se",
    "arcfour",
    "arcfour128",
    "arcfour256",
}
WEAK_KEX = {"diffie-hellman-group1-sha1", "diffie-hellman-group14-sha1", "diffie-hellman-group-exchange-sha1"}
WEAK_MACS = {
    "hmac-md5",
    "hmac-md5-96",
    "hmac-ripemd160",
    "hmac-sha1-96",
    "umac-64@openssh.com",
    "hmac-md5-etm@openssh.com",
    "hmac-md5-96-etm@openssh.com",
    "hmac-ripemd160-etm@openssh.com",
    "hmac-sha1-96-etm@openssh.com",
    "umac-64-etm@openssh.com",
    "umac-128-etm@openssh.com",
}
# chacha20-poly1305 is weak only where the Terrapin fix (CVE-2023-48795, strict key exchange) is missing:
# Debian 12 has it from openssh 1:9.2p1-2+deb12u2.
TERRAPIN_FIXED = "1:9.2p1-2+deb12u2"


def _sshd(host: Any, target: Any) -> dict[str, list[str]]:
    """`sshd -T`: setting (lower case) -> its values, in order (HostKey and the like appear more than once)."""
    result = host.run("sshd -T")
    output = (result.stdout + result.stderr).strip()
    if result.rc != 0 and not target.running and "privilege separation directory" in output:
        pytest.skip("sshd -T needs /run/sshd, which only a booted system has")
    assert result.rc == 0, f"sshd -T fails, so sshd would not start with this configuration: {output[-300:]}"
    settings: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key.lower(), []).append(value.strip())
    return settings


def _one(host: Any, target: Any, key: str) -> str:
    values = _sshd(host, target).get(key)
    assert values, f"sshd -T does not report {key}"
    return values[0]


def _number(host: Any, target: Any, key: str) -> int:
    value = _one(host, target, key)
    assert value.lstrip("-").isdigit(), f"sshd {key} is {value!r}, not a number"
    return int(value)


def _modes(host: Any, pattern: str) -> list[tuple[str, int, str, str]]:
    """(path, mode, owner, group) of the files matching a shell pattern."""
    result = host.run("stat -c '%n %a %U %G' " + pattern)
    rows = []
    for line in result.stdout.splitlines():
        path, mode, owner, group = line.rsplit(" ", 3)
        rows.append((path, int(mode, 8), owner, group))
    return rows


def test_sshd_config_permissions(host: Any) -> None:
    """5.1.1: sshd's configuration is root's alone (0600 root:root), the main file and every drop-in."""
    rows = _modes(host, f"{CONFIG} {DROP_INS}/*.conf")
    assert any(path == CONFIG for path, *_ in rows), f"{CONFIG} is missing"
    bad = [f"{p} {m:04o} {o}:{g}" for p, m, o, g in rows if m & 0o177 or (o, g) != ("root", "root")]
    assert not bad, f"sshd configuration readable or writable beyond root (want 0600 root:root): {', '.join(bad)}"


def test_ssh_private_host_keys_permissions(host: Any) -> None:
    """5.1.2: private host keys 0600 root:root (0640 only for the group ssh_keys)."""
    rows = _modes(host, "/etc/ssh/ssh_host_*_key")
    assert rows, "no SSH host private keys in /etc/ssh"
    bad = [
        f"{p} {m:04o} {o}:{g}"
        for p, m, o, g in rows
        if o != "root" or m & 0o137 or (m & 0o040 and g != "ssh_keys") or g not in ("root", "ssh_keys")
    ]
    assert not bad, f"SSH host private keys open beyond root: {', '.join(bad)}"


def test_ssh_public_host_keys_permissions(host: Any) -> None:
    """5.1.3: public host keys 0644 or stricter, root:root."""
    rows = _modes(host, "/etc/ssh/ssh_host_*_key.pub")
    assert rows, "no SSH host public keys in /etc/ssh"
    bad = [f"{p} {m:04o} {o}:{g}" for p, m, o, g in rows if m & 0o133 or (o, g) != ("root", "root")]
    assert not bad, f"SSH host public keys writable beyond root: {', '.join(bad)}"


def test_sshd_banner(host: Any, target: Any) -> None:
    """5.1.5: a pre-login banner file is shown (its wording is checked with the banners, CIS 1.6)."""
    banner = _one(host, target, "banner")
    assert banner != "none", "sshd shows no banner before login (Banner none)"
    assert host.file(banner).is_file, f"the sshd banner file {banner} is missing"


def test_sshd_ciphers(host: Any, target: Any) -> None:
    """5.1.6: no weak cipher is offered."""
    ciphers = _one(host, target, "ciphers").split(",")
    weak = [c for c in ciphers if c in WEAK_CIPHERS]
    if "chacha20-poly1305@openssh.com" in ciphers:
        version = host.run("dpkg-query -W -f='${Version}' openssh-server").stdout.strip()
        fixed = host.run("dpkg --compare-versions %s ge %s", version or "0", TERRAPIN_FIXED)
        if fixed.rc != 0:
            weak.append(f"chacha20-poly1305@openssh.com (openssh-server {version} lacks the CVE-2023-48795 fix)")
    assert not weak, f"sshd offers weak ciphers: {', '.join(weak)}"


def test_sshd_client_alive(host: Any, target: Any) -> None:
    """5.1.7: idle sessions are probed and dropped (ClientAliveInterval and ClientAliveCountMax above 0)."""
    interval = _number(host, target, "clientaliveinterval")
    count = _number(host, target, "clientalivecountmax")
    assert interval > 0 and count > 0, (
        f"idle SSH sessions are never dropped: ClientAliveInterval {interval}, CountMax {count}"
    )


def test_sshd_hostbased_authentication_disabled(host: Any, target: Any) -> None:
    """5.1.10"""
    value = _one(host, target, "hostbasedauthentication")
    assert value == "no", f"sshd HostbasedAuthentication is {value}, not no"


def test_sshd_ignore_rhosts(host: Any, target: Any) -> None:
    """5.1.11"""
    value = _one(host, target, "ignorerhosts")
    assert value == "yes", f"sshd IgnoreRhosts is {value}: .rhosts and .shosts files are honoured"


def test_sshd_kex_algorithms(host: Any, target: Any) -> None:
    """5.1.12: no weak key exchange is offered."""
    weak = [k for k in _one(host, target, "kexalgorithms").split(",") if k in WEAK_KEX]
    assert not weak, f"sshd offers weak key exchange algorithms: {', '.join(weak)}"


def test_sshd_login_grace_time(host: Any, target: Any) -> None:
    """5.1.13: 1 to 60 seconds to authenticate."""
    grace = _number(host, target, "logingracetime")
    assert 1 <= grace <= 60, f"sshd LoginGraceTime is {grace} s, not 1 to 60"


def test_sshd_log_level(host: Any, target: Any) -> None:
    """5.1.14: INFO or VERBOSE."""
    level = _one(host, target, "loglevel").upper()
    assert level in ("INFO", "VERBOSE"), f"sshd LogLevel is {level}, not INFO or VERBOSE"


def test_sshd_macs(host: Any, target: Any) -> None:
    """5.1.15: no weak MAC is offered."""
    weak = [m for m in _one(host, target, "macs").split(",") if m in WEAK_MACS]
    assert not weak, f"sshd offers weak MACs: {', '.join(weak)}"


def test_sshd_max_auth_tries(host: Any, target: Any) -> None:
    """5.1.16: 4 or fewer."""
    tries = _number(host, target, "maxauthtries")
    assert 1 <= tries <= 4, f"sshd MaxAuthTries is {tries}, more than 4"


def test_sshd_max_sessions(host: Any, target: Any) -> None:
    """5.1.17: 10 or fewer."""
    sessions = _number(host, target, "maxsessions")
    assert 1 <= sessions <= 10, f"sshd MaxSessions is {sessions}, not 1 to 10"


def test_sshd_max_startups(host: Any, target: Any) -> None:
    """5.1.18: 10:30:60 or stricter."""
    value = _one(host, target, "maxstartups")
    parts = value.split(":")
    assert len(parts) == 3 and all(p.isdigit() for p in parts), f"sshd MaxStartups is {value}, not start:rate:full"
    start, rate, full = (int(p) for p in parts)
    assert start <= 10 and rate <= 30 and full <= 60, f"sshd MaxStartups is {value}, looser than 10:30:60"


def test_sshd_permit_empty_passwords_disabled(host: Any, target: Any) -> None:
    """5.1.19"""
    value = _one(host, target, "permitemptypasswords")
    assert value == "no", f"sshd PermitEmptyPasswords is {value}: accounts without a password may log in"


def test_sshd_permit_user_environment_disabled(host: Any, target: Any) -> None:
    """5.1.21"""
    value = _one(host, target, "permituserenvironment")
    assert value == "no", f"sshd PermitUserEnvironment is {value}: users can set LD_PRELOAD and the like"


def test_sshd_use_pam(host: Any, target: Any) -> None:
    """5.1.22"""
    value = _one(host, target, "usepam")
    assert value == "yes", f"sshd UsePAM is {value}: PAM account and session checks are bypassed"
