"""Known-bad states for the CIS section 1-3 and 7 controls (appliance/audit/controls/controls-cis-system.yaml).

`BREAKS` maps each control id to a shell command that, run as root over SSH on a host the roles provisioned,
makes exactly that control fail. None of them touches sshd, PAM, root's key or its login; the hosts tier applies
them all (with the access controls' breaks) and expects every control to fail in the re-audit.

A test host reaches no package mirror, so "someone installed avahi" is played by a stand-in package: an empty
Debian package of that name, built on the host with dpkg-deb, carrying an enabled unit where the real one would
start a daemon. dpkg then reports it installed, exactly as the check reads it.
"""

from __future__ import annotations

import shlex

BREAK_DIR = "/var/tmp/cis-break"


def _fake_package(package: str, unit: str | None = None, *, enable: bool = True) -> str:
    """Install a stand-in package named `package`, with a daemon unit `unit` (enabled unless told otherwise)."""
    root = f"{BREAK_DIR}/{package}"
    control = (
        f"Package: {package}\\nVersion: 99:99-cisbreak\\nArchitecture: all\\n"
        f"Maintainer: audit break <root@localhost>\\nDescription: stand-in for {package} (audit break)\\n"
    )
    steps = [f"rm -rf {root}", f"mkdir -p {root}/DEBIAN", f"printf '{control}' > {root}/DEBIAN/control"]
    if unit:
        service = f"[Unit]\\nDescription=stand-in {unit}\\n[Service]\\nExecStart=/bin/sleep infinity\\n"
        service += "[Install]\\nWantedBy=multi-user.target\\n"
        steps += [
            f"mkdir -p {root}/usr/lib/systemd/system",
            f"printf '{service}' > {root}/usr/lib/systemd/system/{unit}",
        ]
    steps += [
        f"dpkg-deb --build --root-owner-group {root} {root}.deb >/dev/null",
        f"dpkg -i {root}.deb >/dev/null",
        f"rm -rf {root} {root}.deb",
    ]
    if unit:
        steps.append("systemctl daemon-reload")
        if enable:
            steps.append(f"systemctl enable --quiet {unit}")
    return f"mkdir -p {BREAK_DIR} && " + " && ".join(steps)


def _allow_module(module: str) -> str:
    """Drop the module's install and blacklist lines from the role's modprobe.d file."""
    pattern = f"/^(install|blacklist)[[:space:]]+{module}([[:space:]]|$)/d"
    return f"sed -i -E {shlex.quote(pattern)} /etc/modprobe.d/60-membria-cis.conf"


def _sysctl(name: str, **settings: object) -> str:
    """A late sysctl.d file that overrides the role's values (the configuration is what the checks read first)."""
    lines = "".join(f"{key.replace('__', '.')} = {value}\\n" for key, value in settings.items())
    return f"printf '{lines}' > /etc/sysctl.d/99-cis-break-{name}.conf"


def _mode(path: str, mode: str) -> str:
    return f"chmod {mode} {path}"


MTA_LISTENER = (
    "systemd-run --quiet --unit=cis-break-mta python3 -c "
    + shlex.quote(
        "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        "s.bind(('0.0.0.0', 25)); s.listen(); time.sleep(86400)"
    )
    + " && for i in $(seq 50); do ss -Hlnt 'sport = :25' | grep -q . && break; sleep 0.2; done"
)

BREAKS: dict[str, str] = {
    # 1.1.1 kernel modules
    "CIS-1.1.1.1": _allow_module("cramfs"),
    "CIS-1.1.1.2": _allow_module("freevxfs"),
    "CIS-1.1.1.3": _allow_module("hfs"),
    "CIS-1.1.1.4": _allow_module("hfsplus"),
    "CIS-1.1.1.5": _allow_module("jffs2"),
    "CIS-1.1.1.9": _allow_module("usb-storage"),
    # 1.5 process hardening
    "CIS-1.5.1": _sysctl("aslr", kernel__randomize_va_space=0),
    "CIS-1.5.2": _sysctl("ptrace", kernel__yama__ptrace_scope=0),
    "CIS-1.5.3": "echo '* hard core unlimited' > /etc/security/limits.d/99-cis-break.conf",
    # 1.6 banners
    "CIS-1.6.1": "echo 'Welcome to Debian GNU/Linux' >> /etc/motd",
    "CIS-1.6.2": r"printf '%s\n' 'Kernel \r on an \m' > /etc/issue",
    "CIS-1.6.3": r"printf '%s\n' 'Debian GNU/Linux 12' > /etc/issue.net",
    "CIS-1.6.4": _mode("/etc/motd", "0666"),
    "CIS-1.6.5": _mode("/etc/issue", "0666"),
    "CIS-1.6.6": _mode("/etc/issue.net", "0666"),
    # 2.1 server services (stand-in packages with an enabled daemon unit)
    "CIS-2.1.1": _fake_package("autofs", "autofs.service"),
    "CIS-2.1.2": _fake_package("avahi-daemon", "avahi-daemon.service"),
    "CIS-2.1.3": _fake_package("isc-dhcp-server", "isc-dhcp-server.service"),
    "CIS-2.1.4": _fake_package("bind9", "named.service"),
    "CIS-2.1.5": _fake_package("dnsmasq", "dnsmasq.service"),
    "CIS-2.1.6": _fake_package("vsftpd", "vsftpd.service"),
    "CIS-2.1.7": _fake_package("slapd", "slapd.service"),
    "CIS-2.1.8": _fake_package("dovecot-imapd", "dovecot.service"),
    "CIS-2.1.9": _fake_package("nfs-kernel-server", "nfs-server.service"),
    "CIS-2.1.10": _fake_package("ypserv", "ypserv.service"),
    "CIS-2.1.11": _fake_package("cups", "cups.service"),
    "CIS-2.1.12": _fake_package("rpcbind", "rpcbind.service"),
    "CIS-2.1.13": _fake_package("rsync", "rsync.service"),
    "CIS-2.1.14": _fake_package("samba", "smbd.service"),
    "CIS-2.1.15": _fake_package("snmpd", "snmpd.service"),
    "CIS-2.1.16": _fake_package("tftpd-hpa", "tftpd-hpa.service"),
    "CIS-2.1.17": _fake_package("squid", "squid.service"),
    "CIS-2.1.18": _fake_package("nginx", "nginx.service"),
    "CIS-2.1.19": _fake_package("xinetd", "xinetd.service"),
    "CIS-2.1.21": MTA_LISTENER,
    # 2.2 clients (stand-in packages)
    "CIS-2.2.1": _fake_package("nis"),
    "CIS-2.2.2": _fake_package("rsh-client"),
    "CIS-2.2.3": _fake_package("talk"),
    "CIS-2.2.4": _fake_package("telnet"),
    "CIS-2.2.5": _fake_package("ldap-utils"),
    "CIS-2.2.6": _fake_package("ftp"),
    # 2.3 time: two more daemons enabled (still two with timesyncd disabled below), servers emptied, timesyncd off
    "CIS-2.3.1.1": _fake_package("chrony", "chrony.service") + " && " + _fake_package("ntpsec", "ntpsec.service"),
    "CIS-2.3.2.1": r"printf '[Time]\nNTP=\n' > /etc/systemd/timesyncd.conf.d/zz-cis-break.conf",
    "CIS-2.3.2.2": "systemctl disable --quiet systemd-timesyncd.service",
    # 2.4 cron and at
    "CIS-2.4.1.1": _fake_package("cron", "cron.service", enable=False),
    "CIS-2.4.1.2": "touch /etc/crontab && chmod 0644 /etc/crontab",
    "CIS-2.4.1.3": "mkdir -p /etc/cron.hourly && chmod 0755 /etc/cron.hourly",
    "CIS-2.4.1.4": "mkdir -p /etc/cron.daily && chmod 0755 /etc/cron.daily",
    "CIS-2.4.1.5": "mkdir -p /etc/cron.weekly && chmod 0755 /etc/cron.weekly",
    "CIS-2.4.1.6": "mkdir -p /etc/cron.monthly && chmod 0755 /etc/cron.monthly",
    "CIS-2.4.1.7": "mkdir -p /etc/cron.d && chmod 0755 /etc/cron.d",
    "CIS-2.4.1.8": "rm -f /etc/cron.allow",
    "CIS-2.4.2.1": "rm -f /etc/at.allow",
    # 3.1.3 Bluetooth
    "CIS-3.1.3": _fake_package("bluez", "bluetooth.service"),
    # 3.3 network kernel parameters (configuration overridden by a later sysctl.d file)
    "CIS-3.3.1": _sysctl("forward", net__ipv4__ip_forward=1),
    "CIS-3.3.2": _sysctl("send-redirects", net__ipv4__conf__all__send_redirects=1),
    "CIS-3.3.3": _sysctl("bogus-icmp", net__ipv4__icmp_ignore_bogus_error_responses=0),
    "CIS-3.3.4": _sysctl("broadcast-icmp", net__ipv4__icmp_echo_ignore_broadcasts=0),
    "CIS-3.3.5": _sysctl("redirects", net__ipv4__conf__all__accept_redirects=1),
    "CIS-3.3.6": _sysctl("secure-redirects", net__ipv4__conf__default__secure_redirects=1),
    "CIS-3.3.7": _sysctl("rp-filter", net__ipv4__conf__all__rp_filter=0),
    "CIS-3.3.8": _sysctl("source-route", net__ipv6__conf__all__accept_source_route=1),
    "CIS-3.3.9": _sysctl("martians", net__ipv4__conf__default__log_martians=0),
    "CIS-3.3.10": _sysctl("syncookies", net__ipv4__tcp_syncookies=0),
    "CIS-3.3.11": _sysctl("accept-ra", net__ipv6__conf__default__accept_ra=1),
    # 7.2 accounts: the useradd/groupadd steps first, then the hand-made lines those tools would refuse
    "CIS-7.2.2": "useradd -M -s /usr/sbin/nologin cisbreak-empty && usermod -p '' cisbreak-empty",
    "CIS-7.2.4": "gpasswd -a nobody shadow >/dev/null",
    "CIS-7.2.5": "useradd -M -o -u 65534 -g 65534 -s /usr/sbin/nologin cisbreak-dupuid",
    "CIS-7.2.6": "groupadd -o -g 65534 cisbreak-dupgid",
    "CIS-7.2.7": "useradd -M -g 65534 -s /usr/sbin/nologin cisbreak-twice"
    " && echo 'cisbreak-twice:x:4203:65534::/nonexistent:/usr/sbin/nologin' >> /etc/passwd",
    "CIS-7.2.8": "groupadd cisbreak-grp && echo 'cisbreak-grp:x:4204:' >> /etc/group",
    "CIS-7.2.9": _mode("/root", "0755"),
    "CIS-7.2.1": "echo 'cisbreak-noshadow:*:4201:65534::/nonexistent:/usr/sbin/nologin' >> /etc/passwd",
    "CIS-7.2.3": "echo 'cisbreak-nogroup:x:4202:4299::/nonexistent:/usr/sbin/nologin' >> /etc/passwd",
    # 7.1 file permissions (last: the account tools above rewrite these files)
    "CIS-7.1.1": _mode("/etc/passwd", "0666"),
    "CIS-7.1.2": _mode("/etc/passwd-", "0666"),
    "CIS-7.1.3": _mode("/etc/group", "0666"),
    "CIS-7.1.4": _mode("/etc/group-", "0666"),
    "CIS-7.1.5": _mode("/etc/shadow", "0644"),
    "CIS-7.1.6": _mode("/etc/shadow-", "0644"),
    "CIS-7.1.7": _mode("/etc/gshadow", "0644"),
    "CIS-7.1.8": _mode("/etc/gshadow-", "0644"),
    "CIS-7.1.9": _mode("/etc/shells", "0666"),
    "CIS-7.1.10": "touch /etc/security/opasswd && chmod 0644 /etc/security/opasswd",
    "CIS-7.1.11": "touch /var/tmp/cis-break-world-writable && chmod 0666 /var/tmp/cis-break-world-writable",
    "CIS-7.1.12": "touch /var/tmp/cis-break-unowned && chown 4242:4242 /var/tmp/cis-break-unowned",
}
