"""`core plan`: what a check + diff run would change, per host and role.

    core-1  base: 7 to change (/etc/ssh/sshd_config.d/50-membria.conf, /etc/nftables.conf, ...)
    core-1  total: 9 to change, 41 ok, 0 failed, 0 unreachable

A task whose result is hidden by `no_log` still counts in ansible's recap but says nothing about what it
touches: the host's total names how many such changes there are.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.markup import escape

from appliance.core.runner import Change, RunResult

SHOWN_TARGETS = 4


def _by_host_and_role(changes: list[Change]) -> dict[str, dict[str, list[Change]]]:
    grouped: dict[str, dict[str, list[Change]]] = defaultdict(lambda: defaultdict(list))
    for change in changes:
        grouped[change.host][change.role].append(change)
    return grouped


def _targets(changes: list[Change]) -> list[str]:
    """Distinct targets in order of appearance (a file changed by two tasks is named once)."""
    seen: dict[str, None] = {}
    for change in changes:
        seen.setdefault(change.target or change.task, None)
    return list(seen)


def plan_summary(result: RunResult, *, site: str) -> dict[str, Any]:
    """The plan as JSON: per host its recap, its changes per role, and how many were hidden by no_log."""
    grouped = _by_host_and_role(result.changes)
    hosts: dict[str, Any] = {}
    for host in sorted(set(result.recap) | set(grouped)):
        roles = grouped.get(host, {})
        listed = sum(len(c) for c in roles.values())
        recap = result.recap.get(host)
        hosts[host] = {
            "to_change": max(listed, recap.changed if recap else 0),
            "hidden_changes": max(0, (recap.changed if recap else 0) - listed),
            "recap": asdict(recap) if recap else None,
            "roles": {
                role: {
                    "to_change": len(changes),
                    "changes": [{"task": c.task, "target": c.target, "detail": c.detail} for c in changes],
                }
                for role, changes in sorted(roles.items())
            },
        }
    return {
        "site": site,
        "completed": bool(result.recap),  # the play reached its end (ansible's stats came)
        "broken_hosts": result.broken_hosts,
        "rc": result.rc,
        "status": result.status,
        "hosts": hosts,
        "failures": [asdict(f) for f in result.failures],
        "errors": result.errors,
        "events_path": str(result.events_path),
        "elapsed_s": round(result.elapsed_s, 2),
    }


def render_plan(result: RunResult, console: Console) -> None:
    grouped = _by_host_and_role(result.changes)
    width = max((len(h) for h in (*result.recap, *grouped)), default=0)
    for host in sorted(set(result.recap) | set(grouped)):
        roles = grouped.get(host, {})
        for role, changes in sorted(roles.items()):
            targets = _targets(changes)
            shown = ", ".join(targets[:SHOWN_TARGETS]) + (", ..." if len(targets) > SHOWN_TARGETS else "")
            console.print(
                f"{escape(host):<{width}}  [bold]{escape(role)}[/]: [yellow]{len(changes)} to change[/]"
                f" ({escape(shown)})",
                soft_wrap=True,
            )
        recap = result.recap.get(host)
        listed = sum(len(c) for c in roles.values())
        if recap is None:
            console.print(f"{escape(host):<{width}}  total: {listed} to change (no recap: the run did not finish)")
            continue
        hidden = max(0, recap.changed - listed)
        total = max(listed, recap.changed)
        hidden_text = f" ({hidden} hidden by no_log)" if hidden else ""
        colour = "yellow" if total else "green"
        broken = f"{recap.failed} failed, {recap.unreachable} unreachable"
        if recap.broken:
            broken = f"[red]{broken}[/]"
        console.print(
            f"{escape(host):<{width}}  total: [{colour}]{total} to change[/]{hidden_text}, {recap.ok} ok, {broken}",
            soft_wrap=True,
        )
