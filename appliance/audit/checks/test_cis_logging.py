"""CIS 6.1: systemd-journald, the node's one log store. Its settings are read as journald merges them
(`systemd-analyze cat-config`: journald.conf, then the drop-ins in order, the last assignment winning).

auditd (CIS 6.2) is Level 2 in this benchmark and is not part of this Level 1 catalog.
"""

from __future__ import annotations

from typing import Any

import pytest

UNIT = "systemd-journald.service"


def _journald(host: Any) -> dict[str, str]:
    result = host.run("systemd-analyze cat-config systemd/journald.conf")
    assert result.rc == 0, f"systemd-analyze cannot read journald's configuration: {result.stderr.strip()[-300:]}"
    settings: dict[str, str] = {}
    section = ""
    for line in result.stdout.splitlines():
        text = line.strip()
        if not text or text.startswith(("#", ";")):
            continue
        if text.startswith("[") and text.endswith("]"):
            section = text[1:-1]
        elif section == "Journal" and "=" in text:
            key, _, value = text.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_journald_enabled_and_active(host: Any, target: Any) -> None:
    """6.1.1.1: journald starts with the system (a static unit: never masked) and runs."""
    enabled = host.run("systemctl is-enabled %s", UNIT).stdout.strip() or "unknown"
    assert enabled in ("static", "enabled"), f"{UNIT} is {enabled}: the journal does not start with the system"
    if not target.running:
        pytest.skip(f"{UNIT} starts with the system ({enabled}); whether it runs needs a running system")
    active = host.run("systemctl is-active %s", UNIT).stdout.strip() or "unknown"
    assert active == "active", f"{UNIT} is {active}, not running: nothing is being logged"


def test_journald_forward_to_syslog_disabled(host: Any) -> None:
    """6.1.2.2: the journal is the one log store (no copy to a syslog daemon)."""
    value = _journald(host).get("ForwardToSyslog")
    assert value is not None and value.lower() in ("no", "false", "0", "off"), (
        f"journald ForwardToSyslog is {value or 'not set'}, not no"
    )


def test_journald_compress(host: Any) -> None:
    """6.1.2.3"""
    value = _journald(host).get("Compress")
    assert value is not None and value.lower() in ("yes", "true", "1", "on"), (
        f"journald Compress is {value or 'not set'}, not yes"
    )


def test_journald_storage_persistent(host: Any) -> None:
    """6.1.2.4: the journal survives a reboot."""
    value = _journald(host).get("Storage")
    assert value == "persistent", f"journald Storage is {value or 'not set (auto)'}, not persistent"
