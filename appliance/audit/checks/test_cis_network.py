"""CIS 3.3: network kernel parameters, configured in sysctl.d and, on a running system, in effect now.

net.* parameters belong to the network namespace, so a container's own values are checked live too.
"""

from __future__ import annotations

from typing import Any

from appliance.audit.checks._system import check_sysctl

OFF, ON = ("0",), ("1",)


def test_ip_forwarding_disabled(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(host, target, evidence, {"net.ipv4.ip_forward": OFF, "net.ipv6.conf.all.forwarding": OFF})


def test_send_redirects_disabled(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(
        host, target, evidence, {"net.ipv4.conf.all.send_redirects": OFF, "net.ipv4.conf.default.send_redirects": OFF}
    )


def test_bogus_icmp_responses_ignored(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(host, target, evidence, {"net.ipv4.icmp_ignore_bogus_error_responses": ON})


def test_broadcast_icmp_ignored(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(host, target, evidence, {"net.ipv4.icmp_echo_ignore_broadcasts": ON})


def test_icmp_redirects_not_accepted(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(
        host,
        target,
        evidence,
        {
            "net.ipv4.conf.all.accept_redirects": OFF,
            "net.ipv4.conf.default.accept_redirects": OFF,
            "net.ipv6.conf.all.accept_redirects": OFF,
            "net.ipv6.conf.default.accept_redirects": OFF,
        },
    )


def test_secure_icmp_redirects_not_accepted(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(
        host,
        target,
        evidence,
        {"net.ipv4.conf.all.secure_redirects": OFF, "net.ipv4.conf.default.secure_redirects": OFF},
    )


def test_reverse_path_filtering(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(host, target, evidence, {"net.ipv4.conf.all.rp_filter": ON, "net.ipv4.conf.default.rp_filter": ON})


def test_source_routed_packets_not_accepted(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(
        host,
        target,
        evidence,
        {
            "net.ipv4.conf.all.accept_source_route": OFF,
            "net.ipv4.conf.default.accept_source_route": OFF,
            "net.ipv6.conf.all.accept_source_route": OFF,
            "net.ipv6.conf.default.accept_source_route": OFF,
        },
    )


def test_martian_packets_logged(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(
        host, target, evidence, {"net.ipv4.conf.all.log_martians": ON, "net.ipv4.conf.default.log_martians": ON}
    )


def test_tcp_syn_cookies(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(host, target, evidence, {"net.ipv4.tcp_syncookies": ON})


def test_ipv6_router_advertisements_not_accepted(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(host, target, evidence, {"net.ipv6.conf.all.accept_ra": OFF, "net.ipv6.conf.default.accept_ra": OFF})
