"""`appliance core plan | apply`: provision the site's core nodes with the Ansible roles in `roles/`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from appliance.backends import Backends
from appliance.cli.common import SiteOption, load
from appliance.cli.output import console, err_console, print_ok
from appliance.errors import BadInput, CheckFailed, ServiceError
from appliance.lab.state import LabState
from appliance.site import NAME_PATTERN, Site

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


@dataclass(frozen=True)
class Prepared:
    site: Site
    state: Path
    inventory: Path
    envvars: dict[str, str]
    nodes: list[str]
    plans: dict[str, Any]

    @property
    def private_data_dir(self) -> Path:
        return self.state / "core" / "runner"

    def run(
        self, *, check: bool, limit: str | None, tags: list[str] | None, on_event: EventHandler | None
    ) -> RunResult:
        """The play on this inventory: `check` is `core plan` (check + diff), else `core apply`."""
        from appliance.core.runner import run_playbook

        return run_playbook(
            self.site,
            check=check,
            diff=check,
            limit=limit,
            tags=tags,
            on_event=on_event,
            private_data_dir=self.private_data_dir,
            envvars=self.envvars,
            inventory=self.inventory,
        )


def _tags(tags: list[str] | None) -> list[str] | None:
    from appliance.core.runner import roles_dir

    wanted = [t.strip() for item in tags or [] for t in item.split(",") if t.strip()]
    if not wanted:
        return None
    roles = sorted(p.name for p in roles_dir().iterdir() if p.is_dir() and (p / "tasks").is_dir())
    unknown = [t for t in wanted if t not in roles and t != "always"]
    if unknown:
        raise BadInput(f"unknown role tag(s): {', '.join(unknown)}; the roles are {', '.join(roles)}")
    return wanted


def _limited(site: Site, limit: str | None) -> list[str]:
    """The nodes a limit names, to issue Vault credentials for. A plain list of names is checked against the
    site; any other host pattern is left to Ansible (every node gets credentials)."""
    names = [n.name for n in site.core_nodes]
    if not limit:
        return names
    parts = [p for p in re.split(r"[,:]", limit) if p]
    if not all(re.fullmatch(NAME_PATTERN, p) for p in parts):
        return names
    parts = [p for p in parts if p not in ("all", "core_nodes")] or names
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise BadInput(f"--limit names unknown core node(s): {', '.join(unknown)}; the site has {', '.join(names)}")
    return [n for n in names if n in parts]


def _backends(site: Site, state: Path) -> Backends:
    return Backends(site, LabState.at(state) if site.embedded["vault"] else None)


def _existing_role_ids(backends: Backends, nodes: list[str]) -> dict[str, str | None]:
    """For `plan`: the AppRole role ids Vault already has, changing nothing (no role, no secret id made)."""
    import hvac.exceptions

    from appliance.core.vault_access import APPROLE_MOUNT, approle_name

    client = backends.vault()
    out: dict[str, str | None] = {}
    for node in nodes:
        try:
            answer = client.auth.approle.read_role_id(approle_name(node), mount_point=APPROLE_MOUNT)
            out[node] = str(answer["data"]["role_id"])
        except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):
            out[node] = None  # not made yet: `apply` makes it
        except hvac.exceptions.VaultError as exc:
            raise ServiceError(f"Vault refused to read the AppRole of {node}: {exc}") from exc
    return out


def _read_vars(path: Path | None, site: Site) -> dict[str, dict[str, Any]]:
    """--vars FILE as per-node variables; a bad file exits 2 naming it."""
    if path is None:
        return {}
    from pydantic import RootModel

    from runtime.common.yamldoc import load_model

    # yamldoc names the file, the YAML path and the line of a bad entry (exit 2).
    data = load_model(path, RootModel[dict[str, dict[str, Any]] | None]).root
    names = {n.name for n in site.core_nodes}
    if data is None:
        return {}
    unknown = sorted(set(data) - names - {"all"})
    if unknown:
        raise BadInput(f"{path}: unknown core node(s) {', '.join(unknown)}; the site has {', '.join(sorted(names))}")
    shared = data.get("all", {})
    return {name: {**shared, **data.get(name, {})} for name in names}


def _verified_bundle(site: Site, bundle: Path) -> dict[str, str]:
    """Verify the bundle against the site before anything else; its role variables (`membria_bundle`)."""
    from appliance.bundle import keys
    from appliance.bundle.verify import verify

    key = keys.trusted_key(site, None)
    with console.status(f"verifying the bundle {bundle}", spinner="dots"):
        manifest = verify(bundle, key, site)
    root = bundle.resolve()
    digest = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()[:16]
    print_ok(f"bundle {bundle} verified ({len(manifest.debs)} Debian packages, {len(manifest.wheels)} wheels)")
    return {"id": digest, "apt_repo": str(root / "debs"), "wheelhouse": str(root / "wheels")}


def _prepare(
    site_file: Path,
    state_dir: Path | None,
    limit: str | None,
    *,
    mint_secrets: bool,
    vars_file: Path | None = None,
    bundle: Path | None = None,
) -> Prepared:
    from appliance.core.inventory import build_inventory, core_state_dir, llm_plan, secret_id_env, write_inventory

    site = load(site_file)
    # The serving plan first: a model that cannot fit is refused (with its arithmetic) before anything else.
    plans = {node.name: llm_plan(site, node) for node in site.core_nodes}
    nodes = _limited(site, limit)
    extra = _read_vars(vars_file, site)  # bad input is refused before Vault is asked anything
    bundle_vars = _verified_bundle(site, bundle) if bundle is not None else None
    state = core_state_dir(site, state_dir)
    backends = _backends(site, state)
    envvars: dict[str, str] = {}
    role_ids: dict[str, str | None]
    if mint_secrets:
        from appliance.core.vault_access import node_credentials

        role_ids = {}
        with console.status("Vault: node identities", spinner="dots"):
            for node in nodes:
                role_ids[node], envvars[secret_id_env(node)] = node_credentials(site, node, backends)
    else:
        role_ids = _existing_role_ids(backends, nodes)
    for node, role_id in role_ids.items():
        extra.setdefault(node, {})["membria_vault_role_id"] = role_id
    inventory = build_inventory(site, extra_hostvars=extra, state_dir=state, site_file=site_file, bundle=bundle_vars)
    return Prepared(site, state, write_inventory(inventory, state), envvars, nodes, plans)


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

    roles = _tags(tags)
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

    roles = _tags(tags)
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
