"""Core provisioning figures (appliance/core), on fresh Debian 12 systemd-nspawn test hosts
(`appliance/hosts/nspawn.py`), each against a baseline measured in the same run on the same hosts.

For each host count in `--hosts` (default 1 and 3; three hosts run in parallel, one fork each):
- fresh apply: `run_playbook` of `--playbook` (default roles/playbooks/core.yml, every role unless
  `--tags`) on just-booted hosts, as `core apply` runs it: the real inventory (`build_inventory` of a lab
  site whose core nodes are the test hosts, with the hosts' own connection variables and
  `base_apt_update_cache: false`: a test host has no route to a mirror, its rootfs carries the packages),
  the lab's OpenBao and S3 server bootstrapped as `lab up` does and relayed onto the hosts' bridge, an
  AppRole and a fresh secret id per node; the runtime comes from this checkout, bound read-only;
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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.core.inventory import build_inventory, secret_id_env, write_inventory  # noqa: E402
from appliance.core.runner import RunResult, core_playbook, run_playbook  # noqa: E402
from appliance.core.vault_access import node_credentials  # noqa: E402
from appliance.hosts.nspawn import Bind, TestHost, ensure_rootfs, free_network, require_tools  # noqa: E402
from appliance.hosts.relay import TcpRelay  # noqa: E402
from appliance.lab.services import OpenBao  # noqa: E402
from tests.integration.vault_support import bootstrapped_vault  # noqa: E402

console = Console()
if not console.is_terminal:  # a log file: wide enough for the tables
    console = Console(width=160)


def with_hosts(hosts: list[TestHost]) -> Callable[[dict[str, Any]], None]:
    """Edit a lab site's data so that its core nodes are the test hosts."""

    def edit(data: dict[str, Any]) -> None:
        node = data["core_nodes"][0]
        data["core_nodes"] = [
            {**node, "name": h.name, "address": h.address, "ssh": {"user": h.user, "key": str(h.key_path)}}
            for h in hosts
        ]
        data["lab"]["dr_shipper"] = False

    return edit


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
    hosts = [
        TestHost(f"bench-{i + 1}", network.address(11 + i), network, binds=[Bind(REPO, REPO)]) for i in range(count)
    ]
    out: dict[str, Any] = {"hosts": count}
    try:
        with bootstrapped_vault(work / f"lab-{count}", with_hosts(hosts)) as backends:
            assert backends.state is not None
            site = backends.site
            bao = OpenBao(site, backends.state)
            with TcpRelay((site.lab.host, bao.port), listen_host=network.gateway) as relay:
                started = time.monotonic()
                for host in hosts:
                    host.create(progress=console.print)
                for host in hosts:
                    host.start(progress=console.print)
                out["boot_s"] = round(time.monotonic() - started, 1)
                extra: dict[str, dict[str, Any]] = {}
                envvars: dict[str, str] = {}
                for h in hosts:
                    role_id, envvars[secret_id_env(h.name)] = node_credentials(site, h.name, backends)
                    extra[h.name] = {
                        **h.ansible_vars(),
                        "base_apt_update_cache": False,
                        "membria_vault_role_id": role_id,
                        "membria_vault_addr": f"https://{network.gateway}:{relay.port}",
                        "vault_agent_tls_server_name": "localhost",
                        "membria_runtime_python": str(REPO / ".venv" / "bin" / "python"),
                        "membria_runtime_root": str(REPO),
                    }
                state = Path(site.lab.state_dir)
                site_file = work / f"lab-{count}" / "site.yaml"
                inventory = write_inventory(
                    build_inventory(site, extra_hostvars=extra, state_dir=state, site_file=site_file), state
                )

                def run(name: str, playbook: Path, tags: list[str] | None) -> dict[str, Any]:
                    console.print(f"{count} host(s): {name} ...")
                    result = run_playbook(
                        site,
                        check=False,
                        diff=False,
                        limit=None,
                        tags=tags,
                        on_event=None,
                        private_data_dir=state / "core" / "runner",
                        envvars=envvars,
                        inventory=inventory,
                        playbook=playbook,
                        forks=max(5, count),
                    )
                    fig = figures(result)
                    console.print(
                        f"  {fig['seconds']:.1f} s, {fig['tasks']} task results, changed {fig['changed']}, "
                        f"rc {fig['rc']}" + (f" [red]{fig['first_failure']}[/]" if fig["first_failure"] else "")
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
    parser.add_argument("--tags", default="all", help="roles to run (comma-separated); 'all' for every role")
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
