"""CIS 2.3: one time synchronisation daemon, systemd-timesyncd, configured with the site's servers and running.

Inside a container systemd-timesyncd is condition-skipped (ConditionVirtualization=!container: the host keeps
the clock), so there it must be enabled and configured, and is not expected to run.
"""

from __future__ import annotations

from typing import Any

import pytest

from appliance.audit.checks._system import in_container, installed, run, unit_states

# Time daemons Debian 12 ships, each with the units that would run it.
DAEMONS: dict[str, list[str]] = {
    "systemd-timesyncd": ["systemd-timesyncd.service"],
    "chrony": ["chrony.service"],
    "ntpsec": ["ntpsec.service", "ntp.service"],
    "openntpd": ["openntpd.service"],
}
TIMESYNCD = "systemd-timesyncd.service"


def _daemons_in_use(host: Any, target: Any) -> list[str]:
    units = [unit for names in DAEMONS.values() for unit in names]
    in_use = {state.unit for state in unit_states(host, units, running=target.running) if state.in_use}
    return [daemon for daemon, names in DAEMONS.items() if in_use.intersection(names)]


def test_single_time_daemon(host: Any, target: Any) -> None:
    daemons = _daemons_in_use(host, target)
    assert daemons, "no time synchronisation daemon is enabled"
    assert len(daemons) == 1, f"more than one time synchronisation daemon is enabled: {', '.join(daemons)}"


def test_timesyncd_servers_configured(host: Any, target: Any) -> None:
    if not installed(host, ["systemd-timesyncd"]):
        pytest.skip("systemd-timesyncd is not installed: another time daemon is in use (2.3.3 covers chrony)")
    config = run(host, "systemd-analyze cat-config systemd/timesyncd.conf")
    assert config.rc == 0, "cannot read the systemd-timesyncd configuration"
    section, servers = "", ""
    for raw in config.stdout.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Time]" and line.startswith("NTP="):
            servers = line.partition("=")[2].strip()  # the last assignment wins; an empty one resets
    assert servers, "systemd-timesyncd has no NTP= servers configured"
    wanted = target.facts.get("ntp_servers")
    if wanted:
        missing = [server for server in wanted if server not in servers.split()]
        assert not missing, f"systemd-timesyncd does not use the site's time server {missing[0]}"


def test_timesyncd_enabled_and_running(host: Any, target: Any, evidence: Any) -> None:
    state = unit_states(host, [TIMESYNCD], running=target.running)
    enabled = state[0].enabled if state else "not-found"
    assert enabled == "enabled", f"{TIMESYNCD} is {enabled}, not enabled"
    if not target.running:
        return
    container = in_container(host)
    if container:
        evidence.add(
            f"{TIMESYNCD} running?",
            f"not expected: inside a container ({container}) the unit is condition-skipped; the host keeps the clock",
            None,
        )
        return
    assert state[0].active == "active", f"{TIMESYNCD} is {state[0].active}, not running"
