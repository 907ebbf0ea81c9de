"""Audit figures: the catalog's core checks against one host, and against five hosts in parallel, measured in the
same run as the baseline of the same five hosts one after another.

Five fresh Debian 12 test hosts (systemd-nspawn, booted, sshd; appliance/hosts/nspawn.py) on a private bridge are
audited over SSH through `appliance.audit.runner.run`, the path `appliance audit SITE` takes (without signing and
rendering, which are measured separately on the five-host report). The hosts are not provisioned: a fresh host
fails most controls, which costs the same commands as passing them. Rounds alternate the orders:
- one host (`parallel=1`, one target);
- five hosts one after another (`parallel=1`): the baseline;
- five hosts in parallel (`parallel=5`).
Prints medians and the ratios (parallel / sequential, parallel / one host) and writes bench/results/audit.json.
Needs root, systemd-container and the hosts rootfs (built on first use, as the hosts tier does).

    .venv/bin/python bench/audit.py [--rounds 3] [--hosts 5] [--out bench/results/audit.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.audit import catalog as catalog_mod  # noqa: E402
from appliance.audit import runner  # noqa: E402
from appliance.audit.render import html_page, junit_xml  # noqa: E402
from appliance.audit.signing import sign  # noqa: E402
from appliance.audit.targets import TargetSpec, ssh_target  # noqa: E402
from appliance.hosts.nspawn import TestHost, ensure_rootfs, free_network, unique_name  # noqa: E402

console = Console()
if not console.is_terminal:
    console = Console(width=160)


def timed(catalog: catalog_mod.Catalog, targets: list[TargetSpec], parallel: int) -> tuple[float, runner.Report]:
    started = time.perf_counter()
    report = runner.run("bench", catalog, targets, parallel=parallel)
    return time.perf_counter() - started, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "audit.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        console.print("needs root (systemd-nspawn test hosts)")
        return 3

    catalog = catalog_mod.shipped()
    checks = len(catalog.for_kind("core"))
    ensure_rootfs()
    network = free_network()
    hosts: list[TestHost] = []
    try:
        started = time.perf_counter()
        for number in range(args.hosts):
            host = TestHost(unique_name("bench"), network.address(11 + number), network)
            hosts.append(host)
            host.create()
            host.start()
        console.print(f"{args.hosts} test hosts up in {time.perf_counter() - started:.0f} s; {checks} core checks each")
        with tempfile.TemporaryDirectory() as tmp:
            targets = [ssh_target(h.name, h.address, h.user, h.key_path, known_hosts=h.known_hosts) for h in hosts]
            samples: dict[str, list[float]] = {"one": [], "sequential": [], "parallel": []}
            last: runner.Report | None = None
            for round_ in range(args.rounds):
                order = ["one", "sequential", "parallel"] if round_ % 2 == 0 else ["parallel", "sequential", "one"]
                for what in order:
                    chosen = targets[:1] if what == "one" else targets
                    seconds, report = timed(catalog, chosen, 1 if what != "parallel" else len(targets))
                    broken = [t.name for t in report.targets if t.error]
                    if broken:
                        console.print(f"[red]targets not audited: {broken}[/]")
                        return 1
                    samples[what].append(seconds)
                    last = report if what == "parallel" else last
                    console.print(f"  round {round_ + 1} {what}: {seconds:.1f} s")
            assert last is not None
            started = time.perf_counter()
            html, xml = html_page(last), junit_xml(last)
            files = []
            for name, data in (("r.json", last.model_dump_json().encode()), ("r.html", html), ("r.xml", xml)):
                path = Path(tmp) / name
                path.write_bytes(data)
                files.append(path)
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            sign(files, Ed25519PrivateKey.generate(), Path(tmp) / "r.sig.json")
            render_s = time.perf_counter() - started
    finally:
        for host in hosts:
            host.destroy()
        network.down()

    medians = {what: statistics.median(values) for what, values in samples.items()}
    results: dict[str, Any] = {
        "hosts": args.hosts,
        "core_checks_per_host": checks,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "seconds": samples,
        "median_s": medians,
        "ratio_parallel_to_sequential": medians["parallel"] / medians["sequential"],
        "ratio_parallel_to_one_host": medians["parallel"] / medians["one"],
        "render_and_sign_s": render_s,
        "results_in_last_report": len(last.results),
    }
    table = Table(title=f"audit: {checks} core checks per host, {args.hosts} hosts, median of {args.rounds}")
    for column in ("run", "median s", "per host s", "vs one host"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for what, label, count in (
        ("one", "one host", 1),
        ("sequential", f"{args.hosts} hosts one after another (baseline)", args.hosts),
        ("parallel", f"{args.hosts} hosts in parallel", args.hosts),
    ):
        table.add_row(
            label, f"{medians[what]:.1f}", f"{medians[what] / count:.1f}", f"{medians[what] / medians['one']:.2f}x"
        )
    console.print(table)
    console.print(
        f"parallel / sequential: {results['ratio_parallel_to_sequential']:.2f}; "
        f"render + sign of the {len(last.results)}-result report: {render_s:.2f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
