"""`appliance audit-log verify`: is the gateway's hash-chained audit log intact?"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from appliance import audit_log
from appliance.backends import Backends
from appliance.cli.common import SiteOption, StateDirOption, lab_state, load
from appliance.cli.output import console, print_ok
from appliance.errors import BadInput, CheckFailed
from runtime.common.audit import DEFAULT_TABLE, Head, quote_table

app = typer.Typer(
    help=(
        "The audit log the gateway writes: one pseudonymized, hash-chained row per request in ClickHouse "
        "(chDB in the lab)."
    ),
    no_args_is_help=True,
)


@app.command()
def verify(
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
    table: str = typer.Option(DEFAULT_TABLE, "--table", help="The audit table (or database.table)."),
    expect_head: str | None = typer.Option(
        None,
        "--expect-head",
        metavar="SEQ:HASH",
        help="A head recorded earlier (printed by a previous verify): that row must still be there, unchanged. "
        "Catches a deleted tail or a chain rewritten to the end.",
    ),
    wait: float = typer.Option(
        30.0, "--wait", min=0, help="Lab only: seconds to wait for the gateway to release the embedded DB."
    ),
) -> None:
    """Walk the chain row by row. Exit 0 if intact, 1 listing every edited, deleted or reordered row."""
    site = load(site_file)
    try:
        expected = Head.parse(expect_head) if expect_head is not None else None
        quote_table(table)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    state = lab_state(site, state_dir) if site.services.audit_db.backend == "embedded" else None
    backends = Backends(site, state)
    with console.status(f"verifying {table}", spinner="dots") as spinner:
        result = audit_log.verify(
            backends,
            table=table,
            expected_head=expected,
            wait_s=wait,
            progress=lambda n: spinner.update(f"verifying {table}: {n} rows"),
        )
    head = str(result.head) if result.head else "none (empty log)"
    if result.ok:
        print_ok(f"{table}: {result.rows_checked} rows checked, chain intact")
        console.print(f"head: {head}", soft_wrap=True)
        return
    findings = Table(title=f"{table}: {len(result.findings)} finding(s)")
    findings.add_column("seq", justify="right")
    findings.add_column("kind")
    findings.add_column("detail")
    for f in result.findings:
        findings.add_row(str(f.seq), f"[red]{f.kind}[/]", escape(f.detail))
    console.print(findings)
    console.print(f"rows checked: {result.rows_checked}; head: {head}", soft_wrap=True)
    more = " (more findings not listed)" if result.truncated else ""
    raise CheckFailed(f"the audit log {table} is not intact: {len(result.findings)} finding(s){more}")
