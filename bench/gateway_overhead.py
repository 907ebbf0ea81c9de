"""Gateway overhead: latency added by the gateway (mTLS, identity, RBAC, rate limiting, audit to chDB)
over calling the same upstream directly, measured in the same run at concurrency 1, 8 and 32.

The upstream is bench/fast_upstream.py (answers at once), so the difference is the gateway's own cost.
The PKI, license and keys come from a real lab (OpenBao etc.) brought up in a temporary directory.

    .venv/bin/python bench/gateway_overhead.py [--requests 300] [--out bench/results/gateway_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.backends import Backends  # noqa: E402
from appliance.lab import bootstrap, lifecycle, process  # noqa: E402
from appliance.lab.runtime_services import AUDIT_KEY_ENV, admin_tls  # noqa: E402
from appliance.lab.state import LabState  # noqa: E402
from appliance.site import Site  # noqa: E402
from runtime.common.tls import TlsFiles, client_context  # noqa: E402
from tests.conftest import free_port, lab_site_data  # noqa: E402

CONCURRENCY = (1, 8, 32)


async def _measure(url: str, tls: TlsFiles, requests: int, concurrency: int) -> list[float]:
    """Latencies (ms) of `requests` POSTs issued by `concurrency` workers over kept-alive connections."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(verify=client_context(tls), limits=limits, timeout=30) as client:
        # Warm-up: open the connections (TLS handshakes are not what this measures).
        await asyncio.gather(*(client.post(url, json={"query": "warm-up"}) for _ in range(concurrency)))
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                response = await client.post(url, json={"query": "valve VX-55", "top_k": 3})
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status_code} {response.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _wait_ready(url: str, tls: TlsFiles, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with httpx.Client(verify=client_context(tls), timeout=2) as client:
                if client.get(url).status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="requests per (path, concurrency)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gateway_overhead.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="membria-bench-") as tmp:
        root = Path(tmp)
        site = Site.model_validate(lab_site_data(root / "state"))
        state = LabState.at(site.lab.state_dir)
        print("bringing up a lab for its PKI, license and keys ...", flush=True)
        lifecycle.up(site, state)
        try:
            results = _run(site, state, root, args.requests)
        finally:
            process.stop(state, "bench-gateway")
            process.stop(state, "bench-upstream")
            lifecycle.down(site, state)

    print(f"\nGateway overhead, {args.requests} requests per cell (ms)")
    header = f"{'conc':>4} | {'direct p50':>10} {'direct p99':>10} | {'gateway p50':>11} {'gateway p99':>11} | "
    print(header + f"{'added p50':>9} {'added p99':>9} | {'ratio p50':>9}")
    for row in results["rows"]:
        print(
            f"{row['concurrency']:>4} | {row['direct_p50_ms']:>10.2f} {row['direct_p99_ms']:>10.2f} | "
            f"{row['gateway_p50_ms']:>11.2f} {row['gateway_p99_ms']:>11.2f} | "
            f"{row['added_p50_ms']:>9.2f} {row['added_p99_ms']:>9.2f} | {row['ratio_p50']:>9.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


def _run(site: Site, state: LabState, root: Path, requests: int) -> dict[str, object]:
    core_cert, core_key = bootstrap.cert_paths(state, "core")
    ca = bootstrap.ca_chain_path(state)
    upstream_port, gateway_port = free_port(), free_port()
    process.spawn(
        state,
        "bench-upstream",
        [
            sys.executable,
            str(REPO / "bench" / "fast_upstream.py"),
            "--port",
            str(upstream_port),
            "--cert",
            str(core_cert),
            "--key",
            str(core_key),
            "--ca",
            str(ca),
        ],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
    )
    # The lab gateway's own configuration, pointed at the fast upstream, with limits out of the way.
    config = json.loads((state.root / "config" / "gateway.json").read_text())
    config.update(
        port=gateway_port,
        core_url=f"https://127.0.0.1:{upstream_port}",
        state_dir=str(root / "bench-gateway"),
        rate_limit={"rate_per_second": 1_000_000, "burst": 1_000_000},
    )
    config["audit"]["dsn"] = f"chdb://{root / 'bench-audit'}"
    config_file = root / "bench-gateway.json"
    config_file.write_text(json.dumps(config))
    key_hex = Backends(site, state).read_secret(bootstrap.AUDIT_HMAC_PATH)["key_hex"]
    process.spawn(
        state,
        "bench-gateway",
        [sys.executable, "-m", "runtime.gateway", "--config", str(config_file)],
        env={AUDIT_KEY_ENV: key_hex, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    tls = admin_tls(state)
    _wait_ready(f"https://127.0.0.1:{upstream_port}/readyz", tls)
    _wait_ready(f"https://127.0.0.1:{gateway_port}/readyz", tls)

    rows = []
    for concurrency in CONCURRENCY:
        direct = asyncio.run(_measure(f"https://127.0.0.1:{upstream_port}/internal/search", tls, requests, concurrency))
        via = asyncio.run(_measure(f"https://127.0.0.1:{gateway_port}/v1/knowledge/search", tls, requests, concurrency))
        row = {
            "concurrency": concurrency,
            "requests": requests,
            "direct_p50_ms": statistics.median(direct),
            "direct_p99_ms": _pct(direct, 99),
            "gateway_p50_ms": statistics.median(via),
            "gateway_p99_ms": _pct(via, 99),
        }
        row["added_p50_ms"] = row["gateway_p50_ms"] - row["direct_p50_ms"]
        row["added_p99_ms"] = row["gateway_p99_ms"] - row["direct_p99_ms"]
        row["ratio_p50"] = row["gateway_p50_ms"] / row["direct_p50_ms"]
        rows.append(row)
        print(f"  concurrency {concurrency}: done", flush=True)
    return {"benchmark": "gateway_overhead", "cpus": os.cpu_count(), "rows": rows}


if __name__ == "__main__":
    main()
