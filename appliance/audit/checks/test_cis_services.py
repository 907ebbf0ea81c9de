"""CIS 2.1, 2.2 and 3.1.3: server services a core node does not run, and network clients it does not carry.

A server service is "not in use" when its packages are not installed or, where another package needs them
installed, none of its units starts by itself (enabled, or pulled in by a socket) or runs now. A client is
simply not installed. On an image only the packages and the units' enablement exist.
"""

from __future__ import annotations

from typing import Any

import pytest

from appliance.audit.checks._system import installed, run, unit_states


def _service_not_in_use(host: Any, target: Any, what: str, packages: list[str], units: list[str]) -> None:
    present = installed(host, packages)
    if not present:
        return
    in_use = [state for state in unit_states(host, units, running=target.running) if state.in_use]
    assert not in_use, f"{what}: {', '.join(present)} installed and {in_use[0].describe()}"


def _client_not_installed(host: Any, what: str, packages: list[str]) -> None:
    present = installed(host, packages)
    assert not present, f"{what}: {', '.join(present)} is installed"


# ---- 2.1 server services ----------------------------------------------------------------------------------


def test_autofs_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "automounter", ["autofs"], ["autofs.service"])


def test_avahi_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(
        host, target, "Avahi", ["avahi-daemon", "avahi-autoipd"], ["avahi-daemon.service", "avahi-daemon.socket"]
    )


def test_dhcp_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(
        host,
        target,
        "DHCP server",
        ["isc-dhcp-server", "kea-dhcp4-server", "kea-dhcp6-server"],
        ["isc-dhcp-server.service", "isc-dhcp-server6.service", "kea-dhcp4-server.service", "kea-dhcp6-server.service"],
    )


def test_dns_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "DNS server", ["bind9"], ["named.service", "bind9.service"])


def test_dnsmasq_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "dnsmasq", ["dnsmasq"], ["dnsmasq.service"])


def test_ftp_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(
        host,
        target,
        "FTP server",
        ["vsftpd", "proftpd-core", "pure-ftpd"],
        ["vsftpd.service", "proftpd.service", "pure-ftpd.service"],
    )


def test_ldap_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "LDAP server", ["slapd"], ["slapd.service"])


def test_imap_pop3_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(
        host, target, "IMAP/POP3 server", ["dovecot-imapd", "dovecot-pop3d"], ["dovecot.service", "dovecot.socket"]
    )


def test_nfs_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "NFS server", ["nfs-kernel-server"], ["nfs-server.service"])


def test_nis_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "NIS server", ["ypserv"], ["ypserv.service"])


def test_print_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "print server", ["cups", "cups-daemon"], ["cups.service", "cups.socket"])


def test_rpcbind_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "rpcbind", ["rpcbind"], ["rpcbind.service", "rpcbind.socket"])


def test_rsync_daemon_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "rsync daemon", ["rsync"], ["rsync.service"])


def test_samba_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "Samba", ["samba"], ["smbd.service", "nmbd.service", "samba-ad-dc.service"])


def test_snmp_agent_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "SNMP agent", ["snmpd"], ["snmpd.service"])


def test_tftp_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "TFTP server", ["tftpd-hpa", "atftpd"], ["tftpd-hpa.service", "atftpd.service"])


def test_web_proxy_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "web proxy", ["squid"], ["squid.service"])


def test_web_server_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(
        host,
        target,
        "web server",
        ["apache2", "nginx", "nginx-core", "lighttpd"],
        ["apache2.service", "nginx.service", "lighttpd.service"],
    )


def test_xinetd_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "xinetd", ["xinetd"], ["xinetd.service"])


def test_mta_local_only(host: Any, target: Any) -> None:
    """Nothing listens for mail (SMTP 25, submissions 465, submission 587) on an address other than loopback."""
    if not target.running:
        pytest.skip("needs a running system: which addresses a mail server listens on is live state")
    listeners = run(host, "ss -Hlnt '( sport = :25 or sport = :465 or sport = :587 )'").stdout.splitlines()
    exposed = []
    for line in listeners:
        parts = line.split()
        if len(parts) < 4:
            continue
        address = parts[3].rsplit(":", 1)[0].strip("[]")
        if not (address.startswith("127.") or address == "::1"):
            exposed.append(parts[3])
    assert not exposed, f"a mail server listens on {exposed[0]}, not on loopback only"


# ---- 2.2 clients ------------------------------------------------------------------------------------------


def test_nis_client_not_installed(host: Any) -> None:
    _client_not_installed(host, "NIS client", ["nis"])


def test_rsh_client_not_installed(host: Any) -> None:
    _client_not_installed(host, "rsh client", ["rsh-client", "rsh-redone-client"])


def test_talk_client_not_installed(host: Any) -> None:
    _client_not_installed(host, "talk client", ["talk", "inetutils-talk"])


def test_telnet_client_not_installed(host: Any) -> None:
    _client_not_installed(host, "telnet client", ["telnet", "inetutils-telnet"])


def test_ldap_client_not_installed(host: Any) -> None:
    _client_not_installed(host, "LDAP client tools", ["ldap-utils"])


def test_ftp_client_not_installed(host: Any) -> None:
    _client_not_installed(host, "FTP client", ["ftp", "tnftp", "inetutils-ftp"])


# ---- 3.1.3 Bluetooth --------------------------------------------------------------------------------------


def test_bluetooth_not_in_use(host: Any, target: Any) -> None:
    _service_not_in_use(host, target, "Bluetooth", ["bluez"], ["bluetooth.service"])
