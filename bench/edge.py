"""Edge agent figures, each against a baseline measured in the same run.

- retrieval p50/p95 of the knowledge core's hybrid search (FTS5 + sqlite-vec, RRF) at 1k / 10k / 100k chunks,
  vs an exact brute-force cosine scan in numpy over the same vectors (query embedding included in both);
- routing decision time (taxonomy, sensitivity, confidence) vs the retrieval it follows;
- local time-to-first-token and tokens/s with cache-augmented generation (pinned knowledge restored from
  llama.cpp state) vs the same prompt evaluated from an empty context;
- sync throughput: 10k chunk changes exported as a patch and applied on another replica (changes/s), vs
  inserting the same rows into a plain SQLite table with executemany;
- patch vs snapshot size for those 10k changes.

Chunk texts are generated (plant maintenance, sales and HR sentences with varied ids and figures); `--distinct`
of them are embedded for real with the packaged model and reused with a per-chunk reference number up to the
largest size (embedding 100k texts on 2 cores would take hours); smaller sizes use the first N.

    .venv/bin/python bench/edge.py [--sizes 1000,10000,100000] [--queries 50] [--out bench/results/edge.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.lab.model import ensure_gemma  # noqa: E402
from runtime.common.embeddings import Embedder  # noqa: E402
from runtime.common.replica import LocalWrite, ReplicaStore  # noqa: E402
from runtime.common.vclock import VectorClock  # noqa: E402
from runtime.edge.knowledge import ChunkRecord, KnowledgeCore  # noqa: E402
from runtime.edge.local_model import LocalModel, LocalModelConfig, pinned_text, prompt_for  # noqa: E402
from runtime.edge.router import RouterConfig, route  # noqa: E402
from runtime.edge.taxonomy import load_taxonomy  # noqa: E402

console = Console()
EQUIPMENT = ["pump", "valve", "compressor", "boiler", "heat exchanger", "conveyor", "turbine", "chiller"]
ACTIONS = ["inspect", "grease", "replace the seal of", "re-align", "calibrate", "clean", "test", "log the vibration of"]
SALES = ["discount", "quote approval", "commission", "price list", "rebate", "payment terms"]
HR = ["vacation", "onboarding", "remote work", "parental leave", "training budget", "expense claim"]


def _texts(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """(department, text) pairs: realistic enough for FTS and embeddings, all different."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            eq, act = rng.choice(EQUIPMENT), rng.choice(ACTIONS)
            tag = f"{eq[:1].upper()}-{rng.randint(1, 999)}"
            out.append(
                (
                    "engineering",
                    f"{act.capitalize()} {eq} {tag} every {rng.randint(1, 52)} weeks; alarm above "
                    f"{rng.randint(40, 120)} °C, torque {rng.randint(10, 400)} Nm, record in log book {i}.",
                )
            )
        elif kind == 1:
            topic = rng.choice(SALES)
            out.append(
                (
                    "sales",
                    f"The {topic} for region {rng.randint(1, 40)} is {rng.randint(1, 30)}% up to "
                    f"{rng.randint(5, 500)}k EUR; above that the {rng.choice(['director', 'CFO', 'board'])} approves "
                    f"(policy {i}).",
                )
            )
        else:
            topic = rng.choice(HR)
            out.append(
                (
                    "hr",
                    f"{topic.capitalize()}: employees in site {rng.randint(1, 20)} get {rng.randint(1, 30)} days; "
                    f"requests go to HR {rng.randint(2, 8)} weeks ahead (rule {i}).",
                )
            )
    return out


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return p50, p95


def _time_each(fn: Callable[[str], Any], queries: list[str]) -> list[float]:
    fn(queries[0])  # warm-up
    out = []
    for q in queries:
        started = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - started) * 1000)
    return out


def bench_retrieval(
    sizes: list[int], n_queries: int, distinct: int, work: Path, embedder: Embedder
) -> list[dict[str, Any]]:
    biggest = max(sizes)
    pool = _texts(min(distinct, biggest))
    pool_vectors = np.zeros((len(pool), embedder.dimension), dtype=np.float32)
    batch = 256
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"embedding {len(pool)} distinct chunk texts", total=len(pool))
        for start in range(0, len(pool), batch):
            part = [t for _, t in pool[start : start + batch]]
            pool_vectors[start : start + len(part)] = np.asarray(embedder.embed(part), dtype=np.float32)
            progress.advance(task, len(part))
    # Chunk i is pool text i mod |pool| plus its own reference number, with the pool text's real vector: the
    # model embeds about 15-100 chunks/s on 2 cores, so 100k distinct embeddings would take hours.
    texts = [(pool[i % len(pool)][0], f"{pool[i % len(pool)][1]} Ref {i}.") for i in range(biggest)]
    vectors = pool_vectors[np.arange(biggest) % len(pool)]
    rng = random.Random(11)
    queries = [
        f"how often to {rng.choice(ACTIONS)} the {rng.choice(EQUIPMENT)} and what is the alarm temperature?"
        for _ in range(n_queries)
    ]
    rows = []
    for size in sizes:
        core = KnowledgeCore(work / f"k{size}.sqlite", embedder)
        records = [
            ChunkRecord(
                chunk_id=f"c{i}", doc_id=f"d{i // 20}", department=dep, title=f"doc {i // 20}", text=text, version=1
            )
            for i, (dep, text) in enumerate(texts[:size])
        ]
        started = time.perf_counter()
        for start in range(0, size, 5000):
            end = min(start + 5000, size)
            core.upsert_chunks(records[start:end], vectors=vectors[start:end].tolist())
        load_s = time.perf_counter() - started
        hybrid = _time_each(lambda q, c=core: c.search(q, ["engineering"], k=5), queries)  # type: ignore[misc]
        matrix = vectors[:size]
        eng = np.array([dep == "engineering" for dep, _ in texts[:size]])

        def brute(q: str, m: np.ndarray = matrix, mask: np.ndarray = eng) -> Any:
            scores = m @ np.asarray(embedder.embed_one(q), dtype=np.float32)
            scores[~mask] = -2.0
            return np.argpartition(-scores, 5)[:5]

        base = _time_each(brute, queries)
        core.close()
        h50, h95 = _percentiles(hybrid)
        b50, b95 = _percentiles(base)
        rows.append(
            {
                "chunks": size,
                "load_s": round(load_s, 2),
                "hybrid_p50_ms": round(h50, 2),
                "hybrid_p95_ms": round(h95, 2),
                "bruteforce_p50_ms": round(b50, 2),
                "bruteforce_p95_ms": round(b95, 2),
                "ratio_p50": round(h50 / b50, 2),
            }
        )
        console.print(f"retrieval at {size}: hybrid p50 {h50:.1f} ms, brute force p50 {b50:.1f} ms")
    return rows


def bench_routing(n: int, retrieval_p50_ms: float) -> dict[str, Any]:
    taxonomy = load_taxonomy(REPO / "examples" / "taxonomy.yaml")
    config = RouterConfig(theta=0.45)
    questions = [q for _, q in _texts(n, seed=3)]

    class _Draft:
        text = "Grease the bearings every month."
        mean_logprob = -0.6

    def decide(q: str) -> Any:
        return route(
            q,
            device_departments=["engineering"],
            draft=_Draft(),
            coverage=0.6,
            config=config,
            taxonomy=taxonomy,
            chunk_labels=[(), ("local-only",)],
        )

    samples = _time_each(decide, questions)
    p50, p95 = _percentiles(samples)
    return {
        "decisions": n,
        "p50_us": round(p50 * 1000, 1),
        "p95_us": round(p95 * 1000, 1),
        "share_of_retrieval_p50": round(p50 / retrieval_p50_ms, 4),
    }


def bench_local_model(n: int, work: Path) -> dict[str, Any]:
    # No stop sequence: every draft generates max_tokens, so tokens/s is measured over the same length each time.
    model = LocalModel(LocalModelConfig(model_path=ensure_gemma(), n_ctx=2048, max_tokens=48, temperature=0.0, stop=()))
    model.ensure_loaded()
    knowledge = [t for dep, t in _texts(60) if dep == "engineering"][:16]
    prefix = model.pin(pinned_text(knowledge), "bench")
    questions = [f"How often is {eq} serviced and what is its alarm temperature?" for eq in EQUIPMENT][:n]
    with_cag, without, tps = [], [], []
    for q in questions:
        prompt = prompt_for(q, (), (), prefix=prefix)
        a = model.draft(prompt, prefix=prefix, cag=True)
        b = model.draft(prompt, prefix=prefix, cag=False)
        with_cag.append(a.ttft_seconds * 1000)
        without.append(b.ttft_seconds * 1000)
        tps.append(a.tokens_per_second)
    model.close()
    c50, _ = _percentiles(with_cag)
    w50, _ = _percentiles(without)
    return {
        "pinned_tokens": prefix.tokens,
        "pinned_state_bytes": prefix.state_bytes,
        "ttft_cag_p50_ms": round(c50, 1),
        "ttft_no_cag_p50_ms": round(w50, 1),
        "ttft_ratio": round(c50 / w50, 3),
        "tokens_per_s_p50": round(statistics.median(tps), 1),
    }


def bench_sync(changes: int, work: Path) -> dict[str, Any]:
    texts = _texts(changes, seed=5)
    device = ReplicaStore(work / "device.sqlite", "laptop-1")
    hub = ReplicaStore(work / "hub.sqlite", "core")
    writes = [
        LocalWrite("chunk", f"c{i}", department=dep, payload={"doc_id": f"d{i // 20}", "title": "t", "text": text})
        for i, (dep, text) in enumerate(texts)
    ]
    device.local_write_many(writes)
    departments = ["engineering", "sales", "hr"]
    started = time.perf_counter()
    payload = device.export(VectorClock(), departments=departments)
    result = hub.import_payload(payload)
    sync_s = time.perf_counter() - started
    assert len(result.accepted) == changes, "every change must arrive"
    snapshot = device.export(VectorClock(), departments=departments, max_patch_bytes=1)

    plain = sqlite3.connect(work / "plain.sqlite")
    plain.execute("PRAGMA journal_mode = WAL")
    plain.execute("CREATE TABLE t (id TEXT PRIMARY KEY, department TEXT, payload TEXT)")
    rows = [(f"c{i}", dep, json.dumps({"text": text})) for i, (dep, text) in enumerate(texts)]
    started = time.perf_counter()
    with plain:
        plain.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    plain_s = time.perf_counter() - started
    plain.close()
    device.close()
    hub.close()
    return {
        "changes": changes,
        "sync_s": round(sync_s, 3),
        "changes_per_s": round(changes / sync_s),
        "plain_insert_changes_per_s": round(changes / plain_s),
        "ratio_vs_plain_insert": round(sync_s / plain_s, 1),
        "mode_at_20mb": payload.mode,
        "patch_bytes": payload.bytes,
        "snapshot_bytes": snapshot.bytes,
        "snapshot_over_patch": round(snapshot.bytes / payload.bytes, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="chunk counts for retrieval")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--distinct", type=int, default=3000, help="distinct chunk texts embedded for real")
    parser.add_argument("--sync-changes", type=int, default=10_000)
    parser.add_argument("--questions", type=int, default=5, help="local model drafts per mode")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "edge.json")
    args = parser.parse_args()
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error("--sizes takes comma-separated integers")
    if not sizes or min(sizes) < 10:
        parser.error("--sizes needs chunk counts of at least 10")

    embedder = Embedder.shared()
    with tempfile.TemporaryDirectory(prefix="membria-bench-edge-") as tmp:
        work = Path(tmp)
        retrieval = bench_retrieval(sizes, args.queries, args.distinct, work, embedder)
        routing = bench_routing(1000, retrieval[0]["hybrid_p50_ms"])
        local = bench_local_model(args.questions, work)
        sync = bench_sync(args.sync_changes, work)
    results = {"retrieval": retrieval, "routing": routing, "local_model": local, "sync": sync}

    table = Table(title="retrieval (engineering scope, k=5)")
    for col in ("chunks", "load s", "hybrid p50/p95 ms", "brute force p50/p95 ms", "ratio p50"):
        table.add_column(col)
    for r in retrieval:
        table.add_row(
            str(r["chunks"]),
            str(r["load_s"]),
            f"{r['hybrid_p50_ms']} / {r['hybrid_p95_ms']}",
            f"{r['bruteforce_p50_ms']} / {r['bruteforce_p95_ms']}",
            str(r["ratio_p50"]),
        )
    console.print(table)
    console.print(
        f"routing: p50 {routing['p50_us']} µs, p95 {routing['p95_us']} µs "
        f"({routing['share_of_retrieval_p50']:.2%} of a retrieval at {retrieval[0]['chunks']} chunks)"
    )
    console.print(
        f"local model: TTFT p50 {local['ttft_cag_p50_ms']} ms with CAG vs {local['ttft_no_cag_p50_ms']} ms without "
        f"(ratio {local['ttft_ratio']}, {local['pinned_tokens']} pinned tokens), {local['tokens_per_s_p50']} tokens/s"
    )
    console.print(
        f"sync: {sync['changes']} changes in {sync['sync_s']} s = {sync['changes_per_s']}/s "
        f"(plain executemany {sync['plain_insert_changes_per_s']}/s, x{sync['ratio_vs_plain_insert']}); "
        f"patch {sync['patch_bytes']} B vs snapshot {sync['snapshot_bytes']} B"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
