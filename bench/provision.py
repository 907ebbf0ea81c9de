"""Core provisioning figures (appliance/core), on fresh Debian 12 systemd-nspawn test hosts
(`appliance/hosts/nspawn.py`), each against a baseline measured in the same run on the same hosts.

For each host count in `--hosts` (default 1 and 3; three hosts run in parallel, one fork each):
- fresh apply: `run_playbook` of `--playbook` (default roles/playbooks/core.yml) limited to `--tags`
  (default `base`: the roles that need no Vault; the other roles need the lab's OpenBao and its
  credentials) on just-booted hosts, through the real inventory (`build_inventory` of a site whose core
  nodes are the test hosts, with the hosts' own connection variables and `base_apt_update_cache: false`:
  a test host has no route to a mirror, its rootfs carries the packages);
- no-op re-apply: the same run again; it must report changed=0 (printed, and recorded);
- tasks/s: task results over all hosts (ok + failed + skipped + unreachable) / wall time of the run.
Baselines, same hosts, same runner, right after:
- ping round: a play of one `ansible.builtin.ping` per host: SSH connection plus one module round trip;
- no-op tasks: a play of as many `ansible.builtin.ping` tasks per host as the re-apply ran `ok` tasks
  (fact gathering included). The re-apply's ratio to it is what checking idempotently costs over bare
  module round trips of the same count.
Boot time (create + boot to SSH) is recorded too. The load average is recorded at start and end: the
figures are noisy on a small shared machine.

Needs root, systemd-container and mmdebstrap (the cached rootfs is built once, about a minute).

    .venv/bin/python bench/provision.py [--hosts 1,3] [--tags base] [--playbook PATH]
        [--out bench/results/provision.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.core.inventory import build_inventory, write_inventory  # noqa: E402
from appliance.core.runner import RunResult, core_playbook, run_playbook  # noqa: E402
from appliance.hosts.nspawn import TestHost, ensure_rootfs, free_network, require_tools  # noqa: E402
from appliance.site import Site  # noqa: E402
from tests.conftest import example_data  # noqa: E402

console = Console()
if not console.is_terminal:  # a log file: wide enough for the tables
    console = Console(width=160)


def bench_site(hosts: list[TestHost], work: Path) -> Site:
    """examples/lab.yaml with the test hosts as its core nodes. Vault is named external (and never reached):
    the roles benchmarked need none, and the inventory then needs no running OpenBao for its CA."""
    data = example_data("lab.yaml")
    node = data["core_nodes"][0]
    data["core_nodes"] = [
        {**node, "name": h.name, "address": h.address, "ssh": {"user": h.user, "key": str(h.key_path)}} for h in hosts
    ]
    data["services"]["vault"] = {
        "backend": "external",
        "url": "https://vault.invalid:8200",
        "auth": {"method": "token", "token_env": "MEMBRIA_BENCH_UNUSED_TOKEN"},
    }
    data["licensing"] = {"license_file": str(work / "license.json")}
    data["rbac"] = {"policy_file": str(REPO / "examples" / "rbac.yaml")}
    data["lab"]["state_dir"] = str(work / "state")
    routing = data["edge_profiles"][0].get("routing")
    if routing:
        routing["taxonomy_file"] = str(REPO / "examples" / "taxonomy.yaml")
    return Site.model_validate(data)


def ping_playbook(path: Path, tasks: int) -> Path:
    plays = [
        {
            "name": f"baseline: {tasks} ping task(s)",
            "hosts": "core_nodes",
            "gather_facts": False,
            "tasks": [{"name": f"ping {i + 1}", "ansible.builtin.ping": {}} for i in range(tasks)],
        }
    ]
    path.write_text(json.dumps(plays))  # JSON is YAML
    return path


def figures(result: RunResult) -> dict[str, Any]:
    recap = {host: asdict(r) for host, r in result.recap.items()}
    return {
        "seconds": round(result.elapsed_s, 2),
        "rc": result.rc,
        "tasks": result.tasks,
        "tasks_per_s": round(result.tasks / result.elapsed_s, 2) if result.elapsed_s else None,
        "changed": sum(r.changed for r in result.recap.values()),
        "failed_hosts": result.broken_hosts,
        "recap": recap,
        "first_failure": (
            f"{result.failures[0].host} {result.failures[0].task}: {result.failures[0].message}"
            if result.failures
            else (result.errors[0] if result.errors else None)
        ),
    }


def bench_hosts(count: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    network = free_network("mbb")
    hosts = [TestHost(f"bench-{i + 1}", network.address(11 + i), network) for i in range(count)]
    out: dict[str, Any] = {"hosts": count}
    try:
        started = time.monotonic()
        for host in hosts:
            host.create(progress=console.print)
        for host in hosts:
            host.start(progress=console.print)
        out["boot_s"] = round(time.monotonic() - started, 1)
        site = bench_site(hosts, work)
        extra = {h.name: {**h.ansible_vars(), "base_apt_update_cache": False} for h in hosts}
        state = work / f"state-{count}"
        inventory = write_inventory(build_inventory(site, extra_hostvars=extra, state_dir=state), state)

        def run(name: str, playbook: Path, tags: list[str] | None) -> dict[str, Any]:
            console.print(f"{count} host(s): {name} ...")
            result = run_playbook(
                site,
                check=False,
                diff=False,
                limit=None,
                tags=tags,
                on_event=None,
                private_data_dir=state / "runner",
                envvars={},
                inventory=inventory,
                playbook=playbook,
                forks=max(5, count),
            )
            fig = figures(result)
            console.print(
                f"  {fig['seconds']:.1f} s, {fig['tasks']} task results, changed {fig['changed']}, rc {fig['rc']}"
                + (f" [red]{fig['first_failure']}[/]" if fig["first_failure"] else "")
            )
            return fig

        out["fresh_apply"] = run("fresh apply", args.playbook, args.tags)
        out["noop_reapply"] = run("no-op re-apply", args.playbook, args.tags)
        out["baseline_ping"] = run("baseline: ping round", ping_playbook(work / "ping.json", 1), None)
        per_host_ok = max((r["ok"] for r in out["noop_reapply"]["recap"].values()), default=1) or 1
        out["baseline_noop"] = run(
            f"baseline: {per_host_ok} ping tasks", ping_playbook(work / "noop.json", per_host_ok), None
        )
        out["baseline_noop"]["tasks_per_host"] = per_host_ok
        reapply, noop = out["noop_reapply"]["seconds"], out["baseline_noop"]["seconds"]
        out["reapply_over_noop_tasks"] = round(reapply / noop, 2) if noop else None
        out["fresh_over_reapply"] = round(out["fresh_apply"]["seconds"] / reapply, 2) if reapply else None
    finally:
        for host in hosts:
            host.destroy()
        network.down()
    return out


def _print(results: dict[str, Any]) -> None:
    table = Table(title=f"core provisioning: {results['playbook']} --tags {','.join(results['tags'] or ['(all)'])}")
    for col in ("hosts", "boot s", "run", "s", "task results", "tasks/s", "changed", "vs baseline"):
        table.add_column(col)
    for r in results["runs"]:
        rows = [
            ("fresh apply", r["fresh_apply"], f"{r['fresh_over_reapply']}x the re-apply"),
            ("no-op re-apply", r["noop_reapply"], f"{r['reapply_over_noop_tasks']}x the no-op tasks"),
            ("baseline: ping round", r["baseline_ping"], ""),
            (f"baseline: {r['baseline_noop']['tasks_per_host']} ping tasks", r["baseline_noop"], ""),
        ]
        for i, (name, fig, ratio) in enumerate(rows):
            table.add_row(
                str(r["hosts"]) if i == 0 else "",
                str(r["boot_s"]) if i == 0 else "",
                name,
                f"{fig['seconds']:.1f}",
                str(fig["tasks"]),
                str(fig["tasks_per_s"]),
                str(fig["changed"]),
                ratio,
            )
    console.print(table)
    for r in results["runs"]:
        if r["noop_reapply"]["changed"]:
            console.print(f"[red]{r['hosts']} host(s): the re-apply changed {r['noop_reapply']['changed']} task(s)[/]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="1,3", help="host counts to run, comma-separated")
    parser.add_argument("--tags", default="base", help="roles to run (comma-separated); 'all' for every role")
    parser.add_argument("--playbook", type=Path, default=None, help="default: roles/playbooks/core.yml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "provision.json")
    args = parser.parse_args()
    try:
        counts = [int(s) for s in args.hosts.split(",") if s.strip()]
    except ValueError:
        parser.error("--hosts takes comma-separated integers")
    if not counts or min(counts) < 1 or max(counts) > 20:
        parser.error("--hosts: between 1 and 20 hosts")
    args.tags = None if args.tags == "all" else [t for t in args.tags.split(",") if t]
    args.playbook = (args.playbook or core_playbook()).absolute()

    require_tools()
    ensure_rootfs(progress=console.print)
    run_started, load_start = time.monotonic(), os.getloadavg()
    results: dict[str, Any] = {"benchmark": "provision", "playbook": str(args.playbook), "tags": args.tags}
    with tempfile.TemporaryDirectory(prefix="membria-bench-provision-") as tmp:
        results["runs"] = [bench_hosts(count, args, Path(tmp)) for count in counts]
    results["run_s"] = round(time.monotonic() - run_started, 1)
    results["cpus"] = os.cpu_count()
    results["load_avg_start"] = [round(x, 2) for x in load_start]
    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
