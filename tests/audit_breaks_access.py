"""Known-bad states for the CIS section 4-6 controls (appliance/audit/controls/controls-cis-access.yaml).

`BREAKS` maps each control to a shell command, run as root over SSH on a provisioned test host, that makes that
control fail. None of them cuts root's key login or restarts sshd: sshd reads its configuration again for every
connection, so the sshd settings go into a drop-in that sorts first (`00-audit-break.conf`, first value wins) and
still parses, with a modern cipher, key exchange and MAC left for the client. The commands work in any order
and each one alone (a later one finding its object gone does nothing, and its control fails anyway).
"""

from __future__ import annotations

_SSHD = "/etc/ssh/sshd_config.d/00-audit-break.conf"
# MaxStartups is the exception: sshd keeps the last value it reads, so its break goes into a drop-in sorting last.
_SSHD_LAST = "/etc/ssh/sshd_config.d/zz-audit-break.conf"
_SUDO = "/etc/sudoers.d/zz-audit-break"
_JOURNALD = "/etc/systemd/journald.conf.d/zz-audit-break.conf"


def _sshd(line: str, drop_in: str = _SSHD) -> str:
    return f"[ -e {drop_in} ] || install -m 0600 /dev/null {drop_in}; echo '{line}' >> {drop_in}; sshd -t"


def _sudo(line: str) -> str:
    return f"[ -e {_SUDO} ] || install -m 0440 /dev/null {_SUDO}; echo '{line}' >> {_SUDO}; visudo -c >/dev/null"


def _journald(line: str) -> str:
    directory = _JOURNALD.rsplit("/", 1)[0]
    header = f"grep -qs '^\\[Journal\\]' {_JOURNALD} || echo '[Journal]' >> {_JOURNALD}"
    return f"mkdir -p {directory}; {header}; echo '{line}' >> {_JOURNALD}"


def _fake_package(name: str) -> str:
    """An empty package of that name, installed with dpkg (the test host has no mirror)."""
    control = "\\n".join(
        [
            f"Package: {name}",
            "Version: 0.0-audit-break",
            "Architecture: all",
            "Maintainer: audit <root@localhost>",
            "Description: stand-in for an audit test",
            "",
        ]
    )
    return (
        f"d=$(mktemp -d) && mkdir -p $d/DEBIAN && printf '{control}' > $d/DEBIAN/control"
        f" && dpkg-deb -b $d $d.deb >/dev/null && dpkg -i $d.deb >/dev/null && rm -rf $d $d.deb"
    )


def _nft(command: str) -> str:
    """An nft change to the appliance's table; nothing to do once the ruleset is flushed (CIS-4.3.4's break)."""
    return f"if nft list table inet membria >/dev/null 2>&1; then {command}; fi"


BREAKS: dict[str, str] = {
    # --- 4 firewall ---
    "CIS-4.1.1": _fake_package("iptables-persistent"),
    # Marked for removal in dpkg: actually removing it would stop the service and flush the ruleset.
    "CIS-4.3.1": "echo 'nftables deinstall' | dpkg --set-selections",
    "CIS-4.3.2": _fake_package("ufw"),
    "CIS-4.3.5": _nft("nft delete chain inet membria forward"),
    "CIS-4.3.6": _nft(
        "nft delete rule inet membria input handle"
        " $(nft -a list chain inet membria input | awk '/ip saddr 127.0.0.0\\/8/ {print $NF}')"
    ),
    "CIS-4.3.8": _nft("nft 'chain inet membria output { policy accept; }'"),
    "CIS-4.3.9": "systemctl disable --quiet nftables",
    "CIS-4.3.10": "printf '#!/usr/sbin/nft -f\\nflush ruleset\\n' > /etc/nftables.conf",
    "CIS-4.3.4": "nft flush ruleset",
    # --- 5.1 sshd ---
    "CIS-5.1.1": "chmod 0644 /etc/ssh/sshd_config",
    # The RSA key: the client knows the node by its ed25519 key, which sshd keeps loading.
    "CIS-5.1.2": "chmod 0644 /etc/ssh/ssh_host_rsa_key",
    "CIS-5.1.3": "chmod 0666 /etc/ssh/ssh_host_rsa_key.pub",
    "CIS-5.1.5": _sshd("Banner none"),
    "CIS-5.1.6": _sshd("Ciphers chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-cbc"),
    "CIS-5.1.7": _sshd("ClientAliveInterval 0"),
    "CIS-5.1.10": _sshd("HostbasedAuthentication yes"),
    "CIS-5.1.11": _sshd("IgnoreRhosts no"),
    "CIS-5.1.12": _sshd(
        "KexAlgorithms sntrup761x25519-sha512@openssh.com,curve25519-sha256,diffie-hellman-group14-sha1"
    ),
    "CIS-5.1.13": _sshd("LoginGraceTime 120"),
    "CIS-5.1.14": _sshd("LogLevel QUIET"),
    "CIS-5.1.15": _sshd("MACs hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com,hmac-md5"),
    "CIS-5.1.16": _sshd("MaxAuthTries 6"),
    "CIS-5.1.17": _sshd("MaxSessions 64"),
    "CIS-5.1.18": _sshd("MaxStartups 100:30:200", _SSHD_LAST),
    "CIS-5.1.19": _sshd("PermitEmptyPasswords yes"),
    "CIS-5.1.21": _sshd("PermitUserEnvironment yes"),
    # Without PAM, sshd itself refuses accounts whose password starts with "!"; root's is Debian's "*".
    "CIS-5.1.22": _sshd("UsePAM no"),
    # --- 5.2 sudo and su ---
    # Marked for removal in dpkg: removing it would take cvtsudoers, which the other sudo checks read with.
    "CIS-5.2.1": "echo 'sudo deinstall' | dpkg --set-selections",
    "CIS-5.2.2": _sudo("Defaults !use_pty"),
    "CIS-5.2.3": _sudo("Defaults !logfile"),
    "CIS-5.2.5": _sudo("Defaults !authenticate"),
    "CIS-5.2.6": _sudo("Defaults timestamp_timeout=60"),
    "CIS-5.2.7": "sed -i 's/^auth[[:space:]]\\+required[[:space:]]\\+pam_wheel\\.so/# &/' /etc/pam.d/su",
    # --- 5.3 PAM (the auth stack is untouched: key logins do not run it, and password logins stay as they were) ---
    "CIS-5.3.2.1": "sed -i '/pam_unix\\.so/d' /etc/pam.d/common-session",
    "CIS-5.3.2.2": "sed -i '/pam_faillock\\.so/d' /etc/pam.d/common-account",
    "CIS-5.3.2.4": "sed -i '/pam_pwhistory\\.so/d' /etc/pam.d/common-password",
    "CIS-5.3.3.1.1": "sed -i 's/^deny = .*/deny = 10/' /etc/security/faillock.conf",
    "CIS-5.3.3.1.2": "sed -i 's/^unlock_time = .*/unlock_time = 60/' /etc/security/faillock.conf",
    "CIS-5.3.3.3.1": "sed -i '/pam_pwhistory\\.so/s/remember=[0-9]*/remember=3/' /etc/pam.d/common-password",
    "CIS-5.3.3.3.2": "sed -i '/pam_pwhistory\\.so/s/ enforce_for_root//' /etc/pam.d/common-password",
    "CIS-5.3.3.4.1": "sed -i 's/pam_unix\\.so\\b/pam_unix.so nullok/' /etc/pam.d/common-auth",
    "CIS-5.3.3.4.2": "sed -i '/pam_unix\\.so/s/$/ remember=5/' /etc/pam.d/common-password",
    "CIS-5.3.3.4.3": "sed -i '/pam_unix\\.so/s/\\b\\(yescrypt\\|sha512\\)\\b/md5/' /etc/pam.d/common-password",
    "CIS-5.3.3.4.4": "sed -i '/pam_unix\\.so/s/ use_authtok//' /etc/pam.d/common-password",
    # --- 5.4 accounts and login shells ---
    "CIS-5.4.1.1": "sed -i 's/^PASS_MAX_DAYS.*/PASS_MAX_DAYS\\t99999/' /etc/login.defs",
    "CIS-5.4.1.2": "sed -i 's/^PASS_MIN_DAYS.*/PASS_MIN_DAYS\\t0/' /etc/login.defs",
    "CIS-5.4.1.3": "sed -i 's/^PASS_WARN_AGE.*/PASS_WARN_AGE\\t3/' /etc/login.defs",
    "CIS-5.4.1.4": "sed -i 's/^ENCRYPT_METHOD.*/ENCRYPT_METHOD\\tMD5/' /etc/login.defs",
    "CIS-5.4.1.5": "sed -i 's/^INACTIVE=.*/INACTIVE=-1/' /etc/default/useradd",
    # An account with a (never matching) password hash, last changed in 2099.
    "CIS-5.4.1.6": (
        "id auditfuture >/dev/null 2>&1 || useradd -M -s /bin/bash -p '$6$auditbreak$x' auditfuture;"
        " chage -d 2099-01-01 auditfuture"
    ),
    "CIS-5.4.2.1": (
        "id auditroot0 >/dev/null 2>&1 || useradd -o -u 0 -g nogroup -M -d /nonexistent -s /usr/sbin/nologin auditroot0"
    ),
    "CIS-5.4.2.2": "id auditgid0 >/dev/null 2>&1 || useradd -g 0 -M -d /nonexistent -s /usr/sbin/nologin auditgid0",
    "CIS-5.4.2.3": "getent group auditgrp0 >/dev/null || groupadd -o -g 0 auditgrp0",
    "CIS-5.4.2.4": "passwd -d root >/dev/null",
    "CIS-5.4.2.5": "echo 'PATH=\"$PATH:/tmp\"' >> /root/.profile",
    "CIS-5.4.2.6": "echo 'umask 022' >> /root/.bashrc",
    "CIS-5.4.2.7": "usermod -s /bin/bash games",
    "CIS-5.4.2.8": "passwd -d lp >/dev/null",
    "CIS-5.4.3.2": "sed -i 's/^TMOUT=.*/TMOUT=3600/' /etc/profile.d/60-membria-cis.sh",
    "CIS-5.4.3.3": "echo 'umask 022' > /etc/profile.d/zz-audit-break-umask.sh",
    # --- 6.1 journald ---
    # Masking stops nothing that runs; it keeps journald from starting at the next boot.
    "CIS-6.1.1.1": "systemctl mask --quiet systemd-journald.service",
    "CIS-6.1.2.2": _journald("ForwardToSyslog=yes"),
    "CIS-6.1.2.3": _journald("Compress=no"),
    "CIS-6.1.2.4": _journald("Storage=volatile"),
}
