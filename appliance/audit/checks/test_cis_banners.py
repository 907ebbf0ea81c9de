"""CIS 1.6: login banners say what the site's policy says, and nothing about the system behind them.

Getty expands \\m \\r \\s \\v (machine, release, system, version) in /etc/issue; the banners must not use them nor
name the operating system (os-release's ID).
"""

from __future__ import annotations

import re
from typing import Any

from appliance.audit.checks._system import check_access, q, run

ESCAPES = re.compile(r"\\[mrsv]")


def _os_id(host: Any) -> str:
    line: str = run(host, "grep -E '^ID=' /etc/os-release").stdout
    return line.strip().partition("=")[2].strip("'\" ")


def _no_system_details(host: Any, path: str, *, required: bool) -> None:
    result = run(host, f"cat -- {q(path)}")
    if result.rc != 0:
        assert not required, f"{path} is missing"
        return
    text = result.stdout
    assert not required or text.strip(), f"{path} is empty: no warning banner"
    escape = ESCAPES.search(text)
    assert escape is None, f"{path} expands {escape.group(0) if escape else ''} (system details) for whoever reads it"
    os_id = _os_id(host)
    assert not (os_id and os_id.lower() in text.lower()), f"{path} names the operating system ({os_id})"


def test_motd_no_system_details(host: Any) -> None:
    _no_system_details(host, "/etc/motd", required=False)


def test_issue_banner(host: Any) -> None:
    _no_system_details(host, "/etc/issue", required=True)


def test_issue_net_banner(host: Any) -> None:
    _no_system_details(host, "/etc/issue.net", required=True)


def test_motd_permissions(host: Any) -> None:
    check_access(host, "/etc/motd", 0o644, required=False)


def test_issue_permissions(host: Any) -> None:
    check_access(host, "/etc/issue", 0o644)


def test_issue_net_permissions(host: Any) -> None:
    check_access(host, "/etc/issue.net", 0o644)
