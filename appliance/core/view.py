"""What `core plan|apply` show while the play runs, built from the runner's events.

On a terminal: a rich Live table, one row per host with its current task (role : task), its counts so far
and the run's elapsed time. Elsewhere (CI logs, a pipe): one plain line per task result, nothing redrawn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from appliance.core.runner import HOST_EVENTS, RunResult

COUNTS = ("ok", "changed", "failed", "skipped", "unreachable")
_STYLE = {"ok": "green", "changed": "yellow", "failed": "red", "skipped": "dim", "unreachable": "red"}


@dataclass
class HostProgress:
    task: str = "waiting"
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*COUNTS, "ignored"), 0))


def outcome(event: dict[str, Any]) -> str | None:
    """ok / changed / failed / ignored / skipped / unreachable for a host's task result; None otherwise."""
    kind = event.get("event")
    if kind not in HOST_EVENTS:
        return None
    data = event.get("event_data") or {}
    if kind == "runner_on_ok":
        return "changed" if (data.get("res") or {}).get("changed") else "ok"
    if kind == "runner_on_failed":
        return "ignored" if data.get("ignore_errors") else "failed"
    return "skipped" if kind == "runner_on_skipped" else "unreachable"


def task_label(data: dict[str, Any]) -> str:
    role = data.get("role")
    task = str(data.get("task") or "")
    return f"{role} : {task}" if role else task


class RunView:
    """Feed it every runner event (`view(event)`); use it as a context manager around the run."""

    def __init__(self, hosts: Iterable[str], console: Console, title: str, *, live: bool | None = None) -> None:
        self.console = console
        self.title = title
        self.hosts = {host: HostProgress() for host in hosts}
        self.started = time.monotonic()
        self.live_mode = console.is_terminal if live is None else live
        self._lock = threading.Lock()  # the Live refresh thread renders while events arrive
        self._live: Live | None = None

    def __enter__(self) -> RunView:
        self.started = time.monotonic()
        if self.live_mode:
            self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        else:
            self.console.print(f"{self.title}: {len(self.hosts)} host(s)")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, event: dict[str, Any]) -> None:
        data = event.get("event_data") or {}
        host = data.get("host")
        if not host:
            return
        with self._lock:
            progress = self.hosts.setdefault(str(host), HostProgress())
            if event.get("event") == "runner_on_start":
                progress.task = task_label(data)
                return
            result = outcome(event)
            if result is None:
                return
            progress.counts[result] += 1
            if result == "changed":
                progress.counts["ok"] += 1  # as ansible counts: a changed task is also ok
        if not self.live_mode:
            self._line(str(host), result, data)

    def _line(self, host: str, result: str, data: dict[str, Any]) -> None:
        text = f"{self.elapsed:7.1f}s {host} {result:<11} {task_label(data)}"
        if result in ("failed", "unreachable"):
            message = str((data.get("res") or {}).get("msg", "")).strip().splitlines()
            if message:
                text += f": {message[0][:200]}"
        self.console.print(escape(text), soft_wrap=True, highlight=False)

    def __rich__(self) -> RenderableType:
        table = Table(title=self.title, caption=f"elapsed {self.elapsed:.0f} s", expand=False)
        table.add_column("host", no_wrap=True, min_width=max((len(h) for h in self.hosts), default=4))
        table.add_column("current task", overflow="ellipsis", max_width=60, no_wrap=True)
        for name in COUNTS:
            table.add_column(name, justify="right", style=_STYLE[name])
        with self._lock:
            for host, progress in sorted(self.hosts.items()):
                table.add_row(escape(host), escape(progress.task), *(str(progress.counts[n]) for n in COUNTS))
        return table


def recap_table(result: RunResult, title: str) -> Table:
    """The per-host recap of a finished run, as ansible's PLAY RECAP."""
    table = Table(title=title)
    # Host names are never cut; the counts' headers give way first on a narrow terminal.
    table.add_column("host", no_wrap=True, min_width=max((len(h) for h in result.recap), default=4))
    for name in ("ok", "changed", "failed", "unreachable", "skipped", "rescued", "ignored"):
        table.add_column(name, justify="right")
    table.add_column("result")
    for host, r in sorted(result.recap.items()):
        verdict = "[red]FAILED[/]" if r.broken else "[green]ok[/]"
        table.add_row(
            escape(host),
            str(r.ok),
            str(r.changed),
            str(r.failed),
            str(r.unreachable),
            str(r.skipped),
            str(r.rescued),
            str(r.ignored),
            verdict,
        )
    return table


def print_problems(result: RunResult, console: Console) -> None:
    """Failed tasks, ansible's own errors and the roles' recorded decisions, one line each."""
    for f in result.failures:
        kind = "unreachable" if f.unreachable else "failed"
        where = f"{f.role} : {f.task}" if f.role != "-" else f.task
        console.print(f"[red]{kind}[/] {escape(f.host)} {escape(where)}: {escape(f.message)}", soft_wrap=True)
    for error in result.errors:
        console.print(f"[red]ansible:[/] {escape(error)}", soft_wrap=True)
    for note in result.notes:
        console.print(f"[dim]note[/] {escape(note.host)} {escape(note.role)}: {escape(note.text)}", soft_wrap=True)
