"""`appliance dr init | backup | ship | status | restore | drill | list`: the core node's data on S3."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from appliance.backends import Backends
from appliance.cli.common import SiteOption, StateDirOption, lab_state, load
from appliance.cli.output import console, print_ok
from appliance.errors import BadInput, CheckFailed

if TYPE_CHECKING:
    from appliance.dr.objects import DrBucket

app = typer.Typer(
    help=(
        "Disaster recovery of the core node's data to S3: the audit DB (ClickHouse/chDB), the vectors "
        "(Milvus/Milvus Lite), the gateway's and sync hub's SQLite state and the Vault/OpenBao snapshot.\n\n"
        "Every object is encrypted client-side with a data key held in Vault, locked (object lock), and "
        "copied to the replica target, where the copy is read back and checked.\n\n"
        "First `init` (once), then `backup` (full; schedule it), `ship` (continuous, every <= 30 s), "
        "`status` (lag per store against its RPO), `drill` (restore into an empty target, verify, measure "
        "RTO/RPO, write a report) and, on the day, `restore`."
    ),
    no_args_is_help=True,
)

StoreOption = typer.Option(
    None, "--store", help="Only this store (repeatable): vault, state, audit_db, vectors. Default: all."
)


def _backends(site_file: Path, state_dir: Path | None) -> Backends:
    site = load(site_file)
    embedded = any(site.embedded.values())
    return Backends(site, lab_state(site, state_dir) if embedded else None)


def _stores(stores: list[str] | None) -> list[str] | None:
    from appliance.dr.stores import STORE_NAMES

    for name in stores or []:
        if name not in STORE_NAMES:
            raise BadInput(f"unknown store {name!r}; the stores are {', '.join(STORE_NAMES)}")
    return stores or None


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    return table


def _bucket(backends: Backends) -> DrBucket:
    from appliance.dr.objects import DrBucket

    return DrBucket.open(backends)


@app.command()
def init(
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would change."),
) -> None:
    """Create the client-side data key in Vault and set up both buckets: object lock with the site's default
    retention, versioning, default encryption where the endpoint offers it, and a lifecycle rule for old
    versions. Idempotent: a second run changes nothing."""
    from appliance.dr.setup import DrSetup

    setup = DrSetup(_backends(site_file, state_dir))
    if dry_run:
        for step in setup.plan():
            mark = "[yellow]would change[/]" if step.needed else "[green]already set[/]"
            console.print(f"{mark} {step.target}: {escape(step.what)}")
        return
    done = setup.apply()
    for step in done:
        print_ok(f"{step.target}: {step.what}")
    if not done:
        print_ok("already set up; nothing changed")


@app.command()
def backup(
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
    store: list[str] | None = StoreOption,
) -> None:
    """A full backup of every store (the audit DB incrementally on the previous backup). The manifest is
    written last; a backup that was interrupted is ignored by restores."""
    from appliance.dr.backup import run_backup
    from appliance.dr.places import SitePlace

    backends = _backends(site_file, state_dir)
    stores = _stores(store)
    started = time.monotonic()
    with console.status("backing up", spinner="dots") as spinner:
        bucket = _bucket(backends)
        manifest = run_backup(
            bucket,
            SitePlace(backends),
            site_name=backends.site.site.name,
            stores=stores,
            progress=lambda msg: spinner.update(escape(msg)),
        )
    table = _table(
        f"backup {manifest.backup_id} ({time.monotonic() - started:.1f} s)", ("store", "table", "rows", "checksum")
    )
    for name, part in manifest.stores.items():
        for tname, total in sorted(part.sums.items()):
            table.add_row(name, tname, str(total.rows), total.digest[:16])
    console.print(table)
    print_ok(f"backup {manifest.backup_id} complete")


@app.command()
def ship(
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
    once: bool = typer.Option(False, "--once", help="One pass, then exit (1 if a store failed)."),
    interval: float | None = typer.Option(
        None, "--interval", min=0.5, help="Seconds between passes (default: the site's dr.ship_interval_seconds)."
    ),
) -> None:
    """Ship every store's changes since its watermark, every <= 30 s, until stopped (SIGTERM finishes the pass
    in flight). The watermark moves only once the changes are on both targets: an S3 outage loses nothing."""
    from appliance.dr.places import SitePlace
    from appliance.dr.shipper import Heartbeat, ShipOutcome, Shipper, ship_pass
    from appliance.dr.status import heartbeat_path

    backends = _backends(site_file, state_dir)
    heartbeat = Heartbeat(heartbeat_path(backends))
    place = SitePlace(backends)

    def report(outcomes: list[ShipOutcome]) -> None:
        stamp = time.strftime("%H:%M:%S")
        for o in outcomes:
            if o.error:
                console.print(f"{stamp} [red]{o.store}: failed[/] {escape(o.error)}", soft_wrap=True)
            elif o.items:
                console.print(f"{stamp} {o.store}: shipment {o.sequence}, {o.items} item(s), {o.seconds:.2f} s")

    if once:
        outcomes = ship_pass(_bucket(backends), place, heartbeat)
        report(outcomes)
        failed = [o.store for o in outcomes if o.error]
        if failed:
            raise CheckFailed(f"shipping failed for {', '.join(failed)}")
        print_ok("shipped: " + ", ".join(f"{o.store} {o.items}" for o in outcomes))
        return
    logging.basicConfig(level=logging.WARNING)
    every = interval or float(backends.site.dr.ship_interval_seconds)
    console.print(f"shipping every {every:g} s; Ctrl-C or SIGTERM stops after the pass in flight")
    Shipper(lambda: _bucket(backends), place, heartbeat, every, report).run()
    print_ok("shipper stopped")


@app.command()
def status(
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The lag of each store's protected copy behind the source. Exit 1 if any store's lag exceeds its RPO."""
    from appliance.dr.status import lags

    backends = _backends(site_file, state_dir)
    rows = lags(backends, _bucket(backends))
    if as_json:
        console.print_json(json.dumps([r.to_wire() for r in rows]))
    else:
        table = _table(
            f"DR status — site {backends.site.site.name}",
            ("store", "lag", "RPO", "last shipment", "last backup", "state"),
        )
        for r in rows:
            lag = "never" if r.lag_seconds is None else f"{r.lag_seconds:.0f} s"
            state = "[red]OVER RPO[/]" if r.over_rpo else "[green]ok[/]"
            if r.error:
                state += f" [red]{escape(r.error)}[/]"
            table.add_row(r.store, lag, f"{r.rpo_seconds} s", str(r.last_shipment or "-"), r.last_backup or "-", state)
        console.print(table)
    over = [r.store for r in rows if r.over_rpo]
    if over:
        raise CheckFailed(f"lag above the RPO: {', '.join(over)}", hint="is `appliance dr ship` running?")


@app.command("list")
def list_backups(site_file: Path = SiteOption, state_dir: Path | None = StateDirOption) -> None:
    """The complete backups in the bucket, oldest first."""
    from appliance.dr import catalog

    backends = _backends(site_file, state_dir)
    bucket = _bucket(backends)
    table = _table("backups", ("backup", "stores", "started", "seconds"))
    for backup_id in catalog.backup_ids(bucket):
        m = catalog.read_manifest(bucket, backup_id)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.started_at))
        table.add_row(backup_id, ", ".join(m.stores), started, f"{m.finished_at - m.started_at:.1f}")
    console.print(table)


@app.command()
def restore(
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
    backup_id: str | None = typer.Option(
        None, "--backup", help="The backup to restore (default: each store's newest)."
    ),
    into: Path | None = typer.Option(
        None, "--into", help="An empty directory to restore into (chDB, Milvus Lite, SQLite files, OpenBao)."
    ),
    in_place: bool = typer.Option(
        False, "--in-place", help="Restore into the site's own services, which must be empty (a rebuilt node)."
    ),
    store: list[str] | None = StoreOption,
    yes: bool = typer.Option(False, "--yes", help="With --in-place: go ahead (without it, only the plan is shown)."),
) -> None:
    """Restore each store from its newest backup (or all from the named one) plus every later shipment,
    checking each object's checksum, each store against its backup's manifest, and printing per-table counts
    and checksums."""
    from appliance.dr.places import ScratchPlace, SitePlace
    from appliance.dr.restore import backups_used, choose_manifests, restore_store
    from appliance.dr.stores import STORE_NAMES

    if (into is None) == (not in_place):
        raise BadInput("say where to restore: --into DIR (an empty directory) or --in-place")
    if into is not None and into.exists() and any(into.iterdir()):
        raise BadInput(f"{into} is not empty; restore into a new or empty directory")
    backends = _backends(site_file, state_dir)
    names = _stores(store) or list(STORE_NAMES)
    bucket = _bucket(backends)
    manifests = choose_manifests(bucket, backup_id, names)
    used = backups_used({name: m.backup_id for name, m in manifests.items()})
    if in_place and not yes:
        console.print("would restore these backups and their later shipments into the site's own stores:")
        for name in names:
            console.print(f"  - {name}: backup {manifests[name].backup_id}")
        console.print("the targets must be empty; run again with --yes to do it")
        return
    target = SitePlace(backends) if in_place else ScratchPlace(into or Path(), backends)
    table = _table(f"restored backup {used}", ("store", "table", "rows", "checksum", "shipments", "seconds"))
    try:
        with tempfile.TemporaryDirectory(prefix="membria-restore-") as tmp, console.status("restoring") as spinner:
            for name in names:
                result = restore_store(
                    bucket, manifests[name], name, target, Path(tmp), lambda m: spinner.update(escape(m))
                )
                for tname, total in sorted(result.sums.items()):
                    table.add_row(
                        name, tname, str(total.rows), total.digest[:16], str(result.shipments), f"{result.seconds:.1f}"
                    )
    finally:
        if isinstance(target, ScratchPlace):
            target.close()
    console.print(table)
    print_ok(f"restore of {used} verified against its manifest")


@app.command()
def drill(
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
    out: Path = typer.Option(Path("dr-drills"), "--out", help="Where the JSON and Markdown reports go."),
    backup_id: str | None = typer.Option(None, "--backup", help="The backup to drill (default: each store's newest)."),
    store: list[str] | None = StoreOption,
) -> None:
    """Simulate a disaster now: restore into an empty scratch target, verify it against the live source,
    measure RTO and RPO per store against the site's targets, and write a report (also kept in the bucket).
    Exit 1 if any store fails verification or misses its RPO/RTO."""
    from appliance.dr.drill import run_drill, write_report
    from appliance.dr.restore import backups_used

    backends = _backends(site_file, state_dir)
    names = _stores(store)
    bucket = _bucket(backends)
    with (
        tempfile.TemporaryDirectory(prefix="membria-drill-") as tmp,
        console.status("drill", spinner="dots") as spinner,
    ):
        report = run_drill(
            backends,
            bucket,
            workdir=Path(tmp),
            stores=names,
            backup_id=backup_id,
            progress=lambda m: spinner.update(escape(m)),
        )
        json_path, md_path = write_report(report, out, bucket)
    table = _table(
        f"drill {report.drill_id} — backup {backups_used(report.backups)}",
        ("store", "verified", "RPO", "RTO", "unshipped", "result"),
    )
    for s in report.stores:
        rpo = "-" if s.rpo_seconds is None else f"{s.rpo_seconds:.1f} / {s.rpo_target} s"
        rto = "-" if s.rto_seconds is None else f"{s.rto_seconds:.1f} / {s.rto_target} s"
        result = "[green]ok[/]" if s.ok else f"[red]FAILED[/] {escape(s.error)}"
        table.add_row(s.store, "yes" if s.verified else "[red]no[/]", rpo, rto, str(s.unshipped_changes), result)
    console.print(table)
    console.print(f"report: {json_path} and {md_path}")
    if not report.ok:
        problems = [s.store for s in report.stores if not s.ok]
        raise CheckFailed(f"the drill failed for {', '.join(problems)}; see {md_path}")
    print_ok("drill passed")
