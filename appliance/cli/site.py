"""`appliance site ...`: work with the site file."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.output import console, print_ok
from appliance.site import (
    CoreNode,
    EmbeddedS3,
    ExternalAuditDb,
    ExternalLlm,
    ExternalS3,
    ExternalVault,
    ExternalVectors,
    Site,
    load_site,
)

app = typer.Typer(help="Validate and inspect the site file (the single source of truth).", no_args_is_help=True)

SiteFileArgument = typer.Argument(
    ..., metavar="FILE", help="The site file (YAML), e.g. examples/lab.yaml.", show_default=False
)


@app.command()
def validate(site_file: Path = SiteFileArgument) -> None:
    """Check the site file and summarise it. Exit 2 with every problem as FILE:LINE: PATH: message."""
    # An invalid file raises InvalidFile; the CLI's one error handler prints its lines and exits 2.
    site = load_site(site_file)
    _print_summary(site)
    print_ok(f"{site_file} is valid")


@app.command()
def show(
    site_file: Path = SiteFileArgument,
    as_json: bool = typer.Option(False, "--json", help="Print the validated site, defaults filled in, as JSON."),
) -> None:
    """Show the validated site: a summary, or with --json everything, defaults included."""
    site = load_site(site_file)
    if as_json:
        # Plain print, not rich: the output is for jq and other programs.
        typer.echo(json.dumps(site.model_dump(mode="json"), indent=2))
    else:
        _print_summary(site)


# --- the summary ---------------------------------------------------------------------------------------


def _print_summary(site: Site) -> None:
    console.print(f"[bold]{escape(site.site.name)}[/] — {escape(site.site.domain)}")
    if site.site.description:
        console.print(f"[dim]{escape(site.site.description)}[/]")
    for table in (_nodes(site), _services(site), _edge_profiles(site), _dr_targets(site)):
        console.print(table)


def _gpus(node: CoreNode) -> str:
    if not node.hardware.gpus:
        return "none"
    return ", ".join(f"{g.count}x {g.model} ({g.count * g.memory_gb} GB)" for g in node.hardware.gpus)


def _nodes(site: Site) -> Table:
    table = Table(title="Core nodes", title_justify="left")
    for column in ("name", "address", "CPU", "RAM", "GPUs"):
        table.add_column(column, overflow="fold")  # fold, never cut a URL short
    for node in site.core_nodes:
        cpu = node.hardware.cpu
        table.add_row(
            escape(node.name),
            escape(node.address),
            escape(f"{cpu.model} ({cpu.cores} cores)"),
            f"{node.hardware.ram_gb} GB",
            escape(_gpus(node)),
        )
    return table


def _lab_url(site: Site, scheme: str, port: int, suffix: str = "") -> str:
    host = f"[{site.lab.host}]" if ":" in site.lab.host else site.lab.host
    return f"{scheme}://{host}:{port}{suffix}"


def _services(site: Site) -> Table:
    """Where each service is: the external URL, or where the lab runs the embedded stand-in."""
    s, ports, state = site.services, site.lab.ports, site.lab.state_dir
    llm = str(s.llm.url) if isinstance(s.llm, ExternalLlm) else _lab_url(site, "http", ports.llm, "/v1")
    vectors = str(s.vectors.url) if isinstance(s.vectors, ExternalVectors) else f"Milvus Lite in {state}"
    audit_db = str(s.audit_db.dsn) if isinstance(s.audit_db, ExternalAuditDb) else f"chDB in {state}"
    vault = str(s.vault.url) if isinstance(s.vault, ExternalVault) else _lab_url(site, "https", ports.openbao)
    rows = [
        ("llm", s.llm.backend, llm),
        ("vectors", s.vectors.backend, vectors),
        ("audit_db", s.audit_db.backend, audit_db),
        ("vault", s.vault.backend, vault),
    ]
    table = Table(title="Services", title_justify="left")
    for column in ("service", "backend", "URL"):
        table.add_column(column, overflow="fold")  # fold, never cut a URL short
    for name, backend, url in rows:
        table.add_row(name, "[cyan]embedded[/]" if backend == "embedded" else "external", escape(url))
    return table


def _edge_profiles(site: Site) -> Table:
    table = Table(title="Edge profiles", title_justify="left")
    for column in ("profile", "departments", "model", "extra packages"):
        table.add_column(column, overflow="fold")  # fold, never cut a URL short
    for profile in site.edge_profiles:
        table.add_row(
            escape(profile.name),
            escape(", ".join(profile.departments)),
            escape(profile.model.name),
            escape(", ".join(profile.extra_packages) or "-"),
        )
    return table


def _dr_targets(site: Site) -> Table:
    table = Table(title="DR targets (S3)", title_justify="left")
    for column in ("target", "backend", "URL", "bucket", "region"):
        table.add_column(column, overflow="fold")  # fold, never cut a URL short
    targets: list[tuple[str, EmbeddedS3 | ExternalS3 | None]] = [
        ("primary", site.services.s3.primary),
        ("replica", site.services.s3.replica),
    ]
    for role, target in targets:
        if target is None:
            table.add_row(role, "-", "[yellow]none: backups have a single copy[/]", "", "")
        elif isinstance(target, ExternalS3):
            table.add_row(role, "external", escape(str(target.url)), escape(target.bucket), escape(target.region))
        else:
            url = _lab_url(site, "http", site.lab.ports.s3)
            table.add_row(role, "[cyan]embedded[/]", escape(url), escape(target.bucket), "-")
    return table
