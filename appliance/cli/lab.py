"""`appliance lab up | status | down`: the whole appliance on this machine, on embedded defaults."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from appliance.cli.common import SiteOption, StateDirOption, lab_state, load
from appliance.cli.output import console, print_ok
from appliance.errors import CheckFailed
from appliance.lab import lifecycle
from appliance.lab.services import Health

app = typer.Typer(
    help=(
        "Run a whole site on this machine with embedded services: OpenBao (secrets, PKI) and an S3 endpoint "
        "(moto) here, and the core node (llama.cpp serving Gemma 3 270M, the core server with Milvus Lite, "
        "the gateway with chDB) on core-1, a systemd-nspawn test host that `appliance core apply` provisions "
        "with the roles (`lab.core: host`; `lab.core: processes` runs them here as processes instead). "
        "Then a smoke through the gateway, one edge agent, and DR shipping to the lab's S3.\n\n"
        "`up` is idempotent: run it again and it only repairs what is missing. `down` leaves no process "
        "behind; core-1's tree stays in <state>/hosts/ for the next `up`.\n\n"
        "Example: appliance lab up --site examples/lab.yaml"
    ),
    no_args_is_help=True,
)


def _health_table(rows: list[Health], title: str) -> Table:
    table = Table(title=title)
    table.add_column("service")
    table.add_column("health")
    table.add_column("endpoint")
    table.add_column("detail")
    for h in rows:
        table.add_row(h.name, "[green]ok[/]" if h.ok else "[red]FAIL[/]", h.endpoint, h.detail)
    return table


@app.command()
def up(site_file: Path = SiteOption, state_dir: Path | None = StateDirOption) -> None:
    """Start the embedded services, bootstrap PKI, secrets and S3 buckets, provision core-1, run the smoke,
    and print the endpoints. The first run builds the test hosts' Debian rootfs once (about a minute)."""
    site = load(site_file)
    state = lab_state(site, state_dir)
    with console.status("starting the lab", spinner="dots") as spinner:
        report = lifecycle.up(site, state, progress=lambda msg: spinner.update(msg))
    for name in report.started:
        print_ok(f"started {name}")
    for step in report.bootstrap:
        print_ok(step)
    if report.ingest is not None:
        print_ok(f"corpus: {report.ingest.files} files, {report.ingest.changed} new or changed")
    if report.edge_sync is not None:
        e = report.edge_sync
        print_ok(f"edge agent: first sync pulled {e['pulled']} records ({e['mode']}, {e['bytes']} bytes)")
    for check in report.smoke:
        print_ok(f"smoke: {check.name} — {check.detail}")
    if not report.changed:
        print_ok("already up; nothing changed")
    console.print(_health_table(report.health, f"Lab '{site.site.name}' — state in {state.root}"))


@app.command()
def status(site_file: Path = SiteOption, state_dir: Path | None = StateDirOption) -> None:
    """Check every embedded service with a real request. Exit 1 if any is down or unhealthy."""
    site = load(site_file)
    state = lab_state(site, state_dir)
    rows = lifecycle.status(site, state)
    console.print(_health_table(rows, f"Lab '{site.site.name}'"))
    failing = [h.name for h in rows if not h.ok]
    if failing:
        raise CheckFailed(f"not healthy: {', '.join(failing)}", hint="`appliance lab up` starts what is missing")


@app.command()
def down(site_file: Path = SiteOption, state_dir: Path | None = StateDirOption) -> None:
    """Stop every lab process (and any stray of an interrupted `up`) and core-1. Data stays in the state directory."""
    site = load(site_file)
    state = lab_state(site, state_dir)
    report = lifecycle.down(site, state)
    for name in report.stopped:
        print_ok(f"stopped {name}")
    if report.strays_killed:
        print_ok(f"stopped {report.strays_killed} stray process(es) of an interrupted run")
    if not report.stopped and not report.strays_killed:
        print_ok("nothing was running")
