"""`appliance audit SITE | verify-report | keygen | controls`: compliance checks with signed evidence."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.common import StateDirOption, load
from appliance.cli.output import console, print_ok
from appliance.errors import BadInput, CheckFailed

FORMATS = ("json", "junit", "html")
STEM = "audit-report"
STATUSES = ("pass", "fail", "error", "waived", "not_applicable")


class _DefaultRun(typer.core.TyperGroup):
    """`appliance audit SITE ...` means `appliance audit run SITE ...`: the subcommands keep their names."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    help=(
        "Compliance audit of core nodes, laptops and images against the control catalog (CIS Debian 12 Level 1 "
        "and the appliance's own controls), with evidence for every result and signed reports.\n\n"
        "Once: `appliance audit keygen SITE` (the report signing key goes into Vault). Then `appliance audit SITE` "
        "(every core node over SSH), `--host core-1` (some), `--image DIR` (an edge image, read-only), "
        "`--local` (this machine). Hand on the output directory; anyone with the public key checks it with "
        "`appliance audit verify-report DIR`."
    ),
    no_args_is_help=True,
)


@app.command("run")
def run_audit(
    site_file: Path = typer.Argument(..., help="The site file: its core nodes are the SSH targets."),
    hosts: list[str] | None = typer.Option(
        None, "--host", help="Audit this core node (repeatable); default: every node, unless --image/--local is given."
    ),
    images: list[Path] | None = typer.Option(
        None, "--image", help="Audit an edge image directory (decrypted and mounted read-only; repeatable)."
    ),
    local: bool = typer.Option(False, "--local", help="Audit this machine (a laptop or a node, run on it)."),
    local_kind: str | None = typer.Option(
        None, "--local-kind", help="core or edge (default: edge when /etc/membria/edge.json exists)."
    ),
    waivers_file: Path | None = typer.Option(None, "--waivers", help="Accepted failures (YAML; see the README)."),
    formats: str = typer.Option("json,junit,html", "--format", help="Comma-separated: json, junit, html."),
    out_dir: Path | None = typer.Option(
        None, "-o", "--output-dir", help="Where the reports go (default: audit-<site>-<UTC time>/; must not exist)."
    ),
    parallel: int = typer.Option(5, "--parallel", min=1, max=64, help="Targets audited at the same time."),
    state_dir: Path | None = StateDirOption,
) -> None:
    """Run the catalog's checks against the targets and write signed reports.

    Exit 0 when every control passed (or is waived or does not apply), 1 when any failed or a target could not
    be audited, 2 on bad input (an unknown host, a malformed waiver file), 3 when the signing key is missing.
    The audit only reads: nothing on a target changes.
    """
    from appliance.audit import catalog as catalog_mod
    from appliance.audit import facts as facts_mod
    from appliance.audit import keys, runner
    from appliance.audit import waivers as waivers_mod

    site = load(site_file)
    chosen = _formats(formats)
    catalog = catalog_mod.shipped()
    waivers = waivers_mod.load(waivers_file, catalog) if waivers_file else []
    out = out_dir or Path(f"audit-{site.site.name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    if out.exists():
        raise BadInput(f"{out} already exists", hint="pick another --output-dir: reports are never overwritten")
    _known_hosts_only(site, hosts or [])
    if local_kind not in (None, "core", "edge"):
        raise BadInput(f"--local-kind {local_kind}: use core or edge")
    for image in images or []:
        if not image.is_dir():
            raise BadInput(
                f"{image} is not an edge image directory", hint="pass the directory `appliance edge build` made"
            )
    signing_key = keys.signing_key(site, state_dir)  # before any check runs: a missing key fails in a second
    facts = facts_mod.site_facts(site, site_file, state_dir)
    with ExitStack() as stack:
        targets = _targets(site, state_dir, hosts or [], images or [], local, local_kind, facts, stack)
        names = ", ".join(t.name for t in targets)
        with console.status(f"auditing {len(targets)} target(s): {escape(names)}") as status:

            def progress(target: str, done: int, total: int) -> None:
                status.update(f"{escape(target)}: {done}/{total} checks reported")
                console.print(f"  [dim]{escape(target)}: {done}/{total} checks done[/]")

            report = runner.run(site.site.name, catalog, targets, waivers=waivers, parallel=parallel, progress=progress)
    written = _write(report, chosen, out, signing_key)
    _summary(report)
    for path in written:
        print_ok(f"wrote {path}")
    if not report.ok:
        raise CheckFailed(
            f"{len(report.failures)} control result(s) failed; see {out}",
            hint="each failure names its remediation (role or image step); accepted ones go into --waivers",
        )


def _formats(text: str) -> list[str]:
    chosen = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise BadInput(f"unknown report format(s): {', '.join(unknown) or '(none)'}", hint="use json, junit, html")
    return chosen


def _known_hosts_only(site: Any, hosts: Sequence[str]) -> None:
    nodes = [node.name for node in site.core_nodes]
    unknown = [h for h in hosts if h not in nodes]
    if unknown:
        raise BadInput(
            f"no core node named {', '.join(unknown)} in {site.site.name}", hint=f"nodes: {', '.join(nodes)}"
        )


def _targets(
    site: Any,
    state_dir: Path | None,
    hosts: Sequence[str],
    images: Sequence[Path],
    local: bool,
    local_kind: str | None,
    facts: dict[str, Any],
    stack: ExitStack,
) -> list[Any]:
    from appliance.audit import targets
    from appliance.core.inventory import controller_path, core_state_dir

    nodes = {node.name: node for node in site.core_nodes}
    picked = list(hosts) if hosts else ([] if images or local else list(nodes))
    known_hosts = core_state_dir(site, state_dir) / "core" / "known_hosts"
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    specs = []
    lab_node = _lab_node(site, state_dir)
    for name in picked:
        if lab_node is not None and name == lab_node.node.name:
            # The lab's core-1 is a test host with its own key and pinned host key (as `core apply` reaches it).
            machine = lab_node.host
            specs.append(
                targets.ssh_target(
                    name, machine.address, machine.user, machine.key_path, known_hosts=machine.known_hosts, facts=facts
                )
            )
            continue
        node = nodes[name]
        specs.append(
            targets.ssh_target(
                name,
                node.address,
                node.ssh.user,
                controller_path(node.ssh.key),
                port=node.ssh.port,
                known_hosts=known_hosts,
                facts=facts,
            )
        )
    for image in images:
        specs.append(stack.enter_context(_image_target(image, facts, site)))
    if local:
        kind = local_kind or ("edge" if Path("/etc/membria/edge.json").exists() else "core")
        specs.append(targets.local_target(socket.gethostname(), kind, facts))  # type: ignore[arg-type]
    return specs


def _lab_node(site: Any, state_dir: Path | None) -> Any:
    """core-1 of a lab whose core runs on a test host (`lab.core: host`), else None."""
    from appliance.core.inventory import is_lab_site

    if not is_lab_site(site) or site.lab.core != "host":
        return None
    from appliance.cli.common import lab_state
    from appliance.lab.core_node import LabCoreNode

    return LabCoreNode(site, lab_state(site, state_dir))


@contextmanager
def _image_target(image: Path, facts: dict[str, Any], site: Any) -> Iterator[Any]:
    from appliance import signing_keys
    from appliance.audit import targets
    from appliance.audit.image_root import mounted_root

    # The site's image key, when it has one: an unsigned or edited image is refused before it is audited.
    public_key = signing_keys.load_trusted(site.edge.signing.public_key_file) if site.edge is not None else None
    console.print(f"[bold]›[/] decrypting and mounting the root filesystem of {escape(str(image))} (read-only)")
    with mounted_root(image, public_key=public_key) as root:
        yield targets.chroot_target(image.name, root, kind="image", image=image, facts=facts)


def _write(report: Any, formats: list[str], out: Path, key: Any) -> list[Path]:
    from appliance.audit import signing
    from appliance.audit.render import html_page, junit_xml
    from runtime.common import atomic

    out.mkdir(parents=True)
    written: list[Path] = []
    makers: dict[str, tuple[str, Callable[[], bytes]]] = {
        "json": (f"{STEM}.json", lambda: report.model_dump_json(indent=2).encode() + b"\n"),
        "junit": (f"{STEM}.xml", lambda: junit_xml(report)),
        "html": (f"{STEM}.html", lambda: html_page(report)),
    }
    for fmt in FORMATS:
        if fmt in formats:
            name, make = makers[fmt]
            atomic.write_bytes(out / name, make(), mode=0o644)
            written.append(out / name)
    written.append(signing.sign(written, key, out / f"{STEM}.sig.json"))
    return written


def _summary(report: Any) -> None:
    table = Table(title=f"audit of {escape(report.site)}", show_lines=False)
    for column in ("target", "pass", "fail", "error", "waived", "n/a"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for target in report.targets:
        mine = [r for r in report.results if r.target == target.name]
        count = {
            s: sum(1 for r in mine if r.status == s) for s in ("pass", "fail", "error", "waived", "not_applicable")
        }
        name = escape(target.name) + (f" [red](not audited: {escape(target.error)})[/]" if target.error else "")
        table.add_row(
            name,
            str(count["pass"]),
            f"[red]{count['fail']}[/]" if count["fail"] else "0",
            f"[red]{count['error']}[/]" if count["error"] else "0",
            str(count["waived"]),
            str(count["not_applicable"]),
        )
    console.print(table)
    for score in report.scores:
        console.print(f"  {escape(score.title)}: [bold]{score.percent:.1f}%[/] ({score.passed} passed)")
    for result in report.failures[:20]:
        first = result.message.splitlines()[0] if result.message else ""
        console.print(f"  [red]✗[/] {escape(result.control)} on {escape(result.target)}: {escape(first)}")
    if len(report.failures) > 20:
        console.print(f"  … and {len(report.failures) - 20} more in the report")
    for expired in report.expired_waivers:
        console.print(f"  [yellow]![/] waiver for {escape(expired.control)} expired on {expired.expired}")


@app.command("verify-report")
def verify_report(
    report: Path = typer.Argument(..., help="The report directory, its .sig.json, or one report file."),
    site_file: Path | None = typer.Option(None, "--site", help="Trust the site's audit.signing.public_key_file."),
    public_key: Path | None = typer.Option(None, "--public-key", help="Trust this Ed25519 public key (PEM)."),
) -> None:
    """Check a report's signature and that no signed file was edited (exit 1 on any difference)."""
    from appliance.audit import keys, signing

    site = load(site_file) if site_file else None
    key = keys.trusted_key(site, public_key)
    target = report / f"{STEM}.sig.json" if report.is_dir() else report
    verified = signing.verify(target, key)
    for name in verified:
        print_ok(f"{name}: signature and contents verified")


@app.command()
def keygen(
    site_file: Path = typer.Argument(..., help="The site file (its audit: section names the key's places)."),
    state_dir: Path | None = StateDirOption,
    force: bool = typer.Option(False, "--force", help="Replace the key in Vault (old reports stop verifying)."),
) -> None:
    """Create the Ed25519 report signing key in Vault and write its public key to audit.signing.public_key_file.

    The private key never touches the disk. Give the public key to whoever checks the reports.
    """
    from appliance.audit import keys

    site = load(site_file)
    kid = keys.keygen(site, state_dir, force=force)
    conf = keys.settings(site)
    print_ok(f"audit report signing key {kid} stored in Vault at {conf.signing_key_vault_path}")
    print_ok(f"public key written to {conf.public_key_file}")


@app.command()
def controls(
    kind: str | None = typer.Option(None, "--kind", help="Only controls for core, edge or image."),
    not_covered: bool = typer.Option(False, "--not-covered", help="List the CIS recommendations no control checks."),
) -> None:
    """List the control catalog (or what of CIS Debian 12 Level 1 it does not cover yet)."""
    from appliance.audit import catalog as catalog_mod

    catalog = catalog_mod.shipped()
    if not_covered:
        missing = catalog.cis_not_covered()
        console.print(f"{len(missing)} of {len(catalog.cis.recommendations)} automated Level 1 recommendations:")
        for rec in missing:
            console.print(f"  {rec.id:<10} {escape(rec.title)}")
        return
    table = Table()
    for column in ("id", "severity", "applies to", "title", "fixed by"):
        table.add_column(column)
    for control in catalog.for_kind(kind) if kind else catalog.controls:
        fix = control.remediation
        table.add_row(
            control.id,
            control.severity,
            ", ".join(control.applies_to),
            escape(control.title),
            escape(fix.role or fix.image_step or ""),
        )
    console.print(table)
    covered = len(catalog.cis_covered())
    console.print(f"CIS Debian 12 Level 1 (automated): {covered} of {len(catalog.cis.recommendations)} covered")
