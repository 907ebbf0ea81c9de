"""`appliance core plan | apply`: provision the site's core nodes with the Ansible roles in `roles/`."""

from __future__ import annotations

import json
import shutil
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from appliance.cli.common import SiteOption
from appliance.cli.output import console, err_console, print_ok
from appliance.core.apply import Prepared, check_tags, prepare
from appliance.errors import CheckFailed

if TYPE_CHECKING:
    from appliance.core.runner import EventHandler, RunResult

app = typer.Typer(
    help=(
        "Provision the site's core nodes over SSH: the site file becomes an Ansible inventory "
        "(<state>/core/inventory/hosts.json, regenerated on every run) and roles/playbooks/core.yml runs "
        "through ansible-runner. Each role is tagged with its own name.\n\n"
        "First `plan` (a check + diff run: what would change, per host and role; nothing is touched), "
        "then `apply`. Both compute the LLM serving plan from the site's GPUs first and refuse, with the "
        "arithmetic, a model that cannot fit, before anything runs.\n\n"
        "Examples:\n\n"
        "  appliance core plan --site examples/rack.yaml\n\n"
        "  appliance core plan --site examples/rack.yaml --tags base,gateway --json\n\n"
        "  appliance core apply --site examples/rack.yaml --limit core-1 --events core-1-events.jsonl"
    ),
    no_args_is_help=True,
)

StateDirOption = typer.Option(
    None,
    "--state-dir",
    envvar="MEMBRIA_STATE_DIR",
    help=(
        "Where the inventory, known host keys and run logs go (default: the lab's state directory for a site "
        "with embedded services, else .membria/<site name>). Env: MEMBRIA_STATE_DIR."
    ),
)
LimitOption = typer.Option(
    None,
    "--limit",
    "-l",
    help="Only these core nodes: names separated by commas (core-1,core-2), or any Ansible host pattern.",
)
VarsOption = typer.Option(
    None,
    "--vars",
    help=(
        "A YAML file of role variables: `all:` for every node and/or a node's name for one, e.g. "
        "{all: {base_ntp_servers: [ntp.plant.example]}, core-2: {base_ssh_allowed_cidrs: [10.20.0.0/16]}}. "
        "No secrets here: those come from Vault."
    ),
)
BundleOption = typer.Option(
    None,
    "--bundle",
    help=(
        "Air-gapped install: an offline bundle directory (`appliance bundle build`). It is verified first "
        "(signature with the site's bundle.public_key_file, every checksum, completeness); the nodes then "
        "install only from it, pushed to them over SSH, never from a mirror or PyPI."
    ),
)
TagsOption = typer.Option(
    None,
    "--tags",
    "-t",
    help="Only these roles (repeatable, or separated by commas): --tags base,monitoring.",
)


def _status(text: str) -> AbstractContextManager[Any]:
    return console.status(text, spinner="dots")


def _prepare(
    site_file: Path,
    state_dir: Path | None,
    limit: str | None,
    *,
    mint_secrets: bool,
    vars_file: Path | None = None,
    bundle: Path | None = None,
) -> Prepared:
    """`prepare` with the console's spinners and the bundle's verdict."""
    return prepare(
        site_file,
        state_dir,
        limit,
        mint_secrets=mint_secrets,
        vars_file=vars_file,
        bundle=bundle,
        status=_status,
        on_bundle_verified=print_ok,
    )


def _show_plans(prepared: Prepared) -> None:
    for node in prepared.nodes:
        lines = prepared.plans[node].get("arithmetic") or []
        console.print(f"[bold]serving plan[/] {escape(node)}:")
        for line in lines:
            console.print(f"  {escape(str(line))}", soft_wrap=True)


def _verdict(result: RunResult, what: str) -> None:
    broken = result.broken_hosts
    if broken:
        raise CheckFailed(
            f"{what}: {', '.join(broken)} failed or unreachable", hint=f"every event is in {result.events_path}"
        )
    if result.rc != 0:
        first = result.errors[0].splitlines()[0] if result.errors else f"status {result.status}"
        raise CheckFailed(
            f"{what}: ansible-playbook exited with {result.rc}: {first}", hint=f"see {result.events_path}"
        )


@app.command()
def plan(
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
    limit: str | None = LimitOption,
    tags: list[str] | None = TagsOption,
    vars_file: Path | None = VarsOption,
    bundle: Path | None = BundleOption,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (no live view)."),
) -> None:
    """What `apply` would change, per host and role (a check + diff run).

    Nothing is touched, on the nodes or in Vault. Exit 0 when the check completed, pending changes or
    not; 1 when a host failed or was unreachable.

    Example: appliance core plan --site examples/rack.yaml --tags base

        core-1  base: 7 to change (/etc/ssh/sshd_config.d/50-membria.conf, /etc/nftables.conf, ...)
        core-1  total: 7 to change, 41 ok, 0 failed, 0 unreachable
    """
    from appliance.core.summary import plan_summary, render_plan
    from appliance.core.view import RunView, print_problems

    roles = check_tags(tags)
    prepared = _prepare(site_file, state_dir, limit, mint_secrets=False, vars_file=vars_file, bundle=bundle)

    def run(on_event: EventHandler | None) -> RunResult:
        return prepared.run(check=True, limit=limit, tags=roles, on_event=on_event)

    if as_json:
        result = run(None)
        summary = plan_summary(result, site=prepared.site.site.name)
        summary["serving_plans"] = {node: prepared.plans[node] for node in prepared.nodes}
        typer.echo(json.dumps(summary, indent=2))
    else:
        _show_plans(prepared)
        with RunView(prepared.nodes, console, f"core plan — site {prepared.site.site.name}") as view:
            result = run(view)
        render_plan(result, console)
        print_problems(result, console)
        console.print(f"event log: {result.events_path}")
    _verdict(result, "plan")
    if not as_json:
        pending = len(result.changes) or sum(r.changed for r in result.recap.values())
        print_ok(f"plan complete: {pending} change(s) pending" if pending else "plan complete: nothing to change")


@app.command()
def apply(
    site_file: Path = SiteOption,
    state_dir: Path | None = StateDirOption,
    limit: str | None = LimitOption,
    tags: list[str] | None = TagsOption,
    vars_file: Path | None = VarsOption,
    bundle: Path | None = BundleOption,
    events: Path | None = typer.Option(
        None, "--events", help="Also copy the run's JSON event log (one event a line) to this file."
    ),
) -> None:
    """Provision the core nodes: every role, with a live view per host, then the recap.

    Each node's Vault identity is made sure of first: an AppRole and a fresh, short-lived secret id, which
    reaches the play only through its environment. While the play runs, the current task and counts per
    host are shown; then the recap per host and the path of the JSON event log. Exit 1 when any host
    failed or was unreachable.

    Examples:

        appliance core apply --site examples/rack.yaml

        appliance core apply --site examples/rack.yaml --limit core-2 --tags monitoring

        appliance core apply --site examples/rack.yaml --bundle /media/usb/membria-acme   (air-gapped)
    """
    from appliance.core.view import RunView, print_problems, recap_table

    roles = check_tags(tags)
    prepared = _prepare(site_file, state_dir, limit, mint_secrets=True, vars_file=vars_file, bundle=bundle)
    _show_plans(prepared)
    with RunView(prepared.nodes, console, f"core apply — site {prepared.site.site.name}") as view:
        result = prepared.run(check=False, limit=limit, tags=roles, on_event=view)
    console.print(recap_table(result, f"recap ({result.elapsed_s:.0f} s)"))
    print_problems(result, console)
    if events is not None:
        events.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.events_path, events)
        err_console.print(f"event log copied to {events}")
    console.print(f"event log: {result.events_path}")
    _verdict(result, "apply")
    print_ok(f"applied to {', '.join(sorted(result.recap))}")
