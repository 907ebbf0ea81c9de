"""CIS 2.4: job schedulers. Core nodes schedule their own work with systemd timers; cron and at may be present
(a Debian install pulls cron in), and then they run, read only root's files and serve only listed users.

The crontab and cron directories are checked whenever they exist, and cron.allow / at.allow must exist whether or
not cron or at is installed now, so that installing either later opens nothing.
"""

from __future__ import annotations

from typing import Any

from appliance.audit.checks._system import check_access, installed, unit_states

CRON_PACKAGES = ["cron", "cronie", "systemd-cron"]


def _cron_dir(host: Any, path: str) -> None:
    check_access(host, path, 0o700, required=False)


def test_cron_enabled_and_running(host: Any, target: Any, evidence: Any) -> None:
    present = installed(host, CRON_PACKAGES)
    if not present:
        evidence.add("cron daemon", "no cron daemon is installed: scheduled jobs are systemd timers", None)
        return
    states = unit_states(host, ["cron.service"], running=target.running)
    state = states[0] if states else None
    assert state is not None and state.enabled == "enabled", (
        f"{present[0]} is installed but cron.service is not enabled"
    )
    if target.running:
        assert state.active == "active", f"{present[0]} is installed but cron.service is {state.active}, not running"


def test_crontab_permissions(host: Any) -> None:
    check_access(host, "/etc/crontab", 0o600, required=False)


def test_cron_hourly_permissions(host: Any) -> None:
    _cron_dir(host, "/etc/cron.hourly")


def test_cron_daily_permissions(host: Any) -> None:
    _cron_dir(host, "/etc/cron.daily")


def test_cron_weekly_permissions(host: Any) -> None:
    _cron_dir(host, "/etc/cron.weekly")


def test_cron_monthly_permissions(host: Any) -> None:
    _cron_dir(host, "/etc/cron.monthly")


def test_cron_d_permissions(host: Any) -> None:
    _cron_dir(host, "/etc/cron.d")


def test_cron_restricted_to_allowed_users(host: Any) -> None:
    check_access(host, "/etc/cron.allow", 0o640, groups=("root", "crontab"))
    check_access(host, "/etc/cron.deny", 0o640, groups=("root", "crontab"), required=False)


def test_at_restricted_to_allowed_users(host: Any) -> None:
    check_access(host, "/etc/at.allow", 0o640, groups=("root", "daemon"))
    check_access(host, "/etc/at.deny", 0o640, groups=("root", "daemon"), required=False)
