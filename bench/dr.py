"""DR figures (appliance/dr), each against a baseline measured in the same run, on real chDB, Milvus Lite
and two moto S3 servers (primary and replica, `tests/integration/dr_support.S3Endpoint`).

- audit DB, `--audit-rows` rows (default 1M) in the real audit table (`runtime.common.audit.ddl`), filled by
  `INSERT ... SELECT FROM numbers()` (realistic values, sha256 hashes; not a valid chain: throughput only):
  - backup rows/s: `AuditDbStore.backup` (ClickHouse's `BACKUP TO S3` on the primary, copy + read-back on the
    replica, sums) vs a plain boto3 `put_object` of objects of the same sizes (no encryption, no replica);
  - restore rows/s: `AuditDbStore.restore` into an empty chDB (object check, `RESTORE`, `CHECK TABLE`) vs a
    plain `INSERT INTO t2 SELECT * FROM audit_log` copy inside chDB;
  - shipping rows/s: `shipper.ship_store` of `--ship-rows` new rows (Parquet, encrypted, primary + replica,
    record + head) vs `query_arrow` of the same rows + `pq.write_table` + one plain `put_object`. The head
    is seeded at the backup's watermark (as if the shipper had kept up), so the shipment continues from it.
- vectors, `--vectors` rows (default 100k) in one department collection created by `DepartmentStore`:
  - backup vectors/s: `VectorsStore.backup` vs a bare `query_iterator` read of the same fields;
  - restore vectors/s: the restore phase of `restore_store` vs a bare insert of the same rows in the same
    256-row batches into a fresh collection (the source's own fill, timed).
  Embeddings are real: `--distinct` texts are embedded with the packaged model and reused with a per-row
  reference number up to the full size, exactly as bench/edge.py does for its 100k case (embedding 100k
  distinct texts on 2 cores would take a quarter of an hour or more). Inserts and full reads are timed on
  `--probe` rows first, the read time's exponent fitted on two sizes (reads are superlinear on Milvus
  Lite 3: each `query_iterator` page scans and sorts the whole collection); when the vector part would
  exceed `--vector-budget-s`, the largest size that fits is used and the output says so. On 2 cores 100k
  vectors take about 30 minutes: pass `--vector-budget-s 2000` for them.
- drill RTO: `restore.restore_store` of both stores (restore, check against the manifest, shipments, sums)
  into empty targets, plus the drill's verification against the live source (sums on both sides), vs the
  site's RTO targets (`appliance.site.Dr` defaults).
- shipping lag: a writer thread adds audit rows at `--lag-rate` rows/s for `--lag-seconds` while a shipper
  loop runs `ship_store` with the real `AuditDbStore` every `--intervals` seconds (30 = the site default),
  in one process on one chDB path (separate clients; clickhouse-connect's chdb backend allows that). Lag of
  a row = the end of the pass that shipped it minus the time its insert returned; vs the interval and
  the RPO targets.

Figures are noisy on a small machine that runs other work: the load average is recorded at start and end.

    .venv/bin/python bench/dr.py [--audit-rows 1000000] [--vectors 100000] [--lag-seconds 90]
        [--intervals 30,5] [--out bench/results/dr.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from appliance.backends import S3Target  # noqa: E402
from appliance.dr import catalog  # noqa: E402
from appliance.dr.crypto import DataKey  # noqa: E402
from appliance.dr.objects import DrBucket  # noqa: E402
from appliance.dr.restore import restore_store  # noqa: E402
from appliance.dr.stores.base import Place, StoreBackup  # noqa: E402
from appliance.lab.bootstrap import ensure_locked_bucket  # noqa: E402
from appliance.site import Dr  # noqa: E402

console = Console()
if not console.is_terminal:  # a log file: wide enough for the tables
    console = Console(width=160)
ACCESS, SECRET = "AKIDDRBENCH", "dr-bench-" + uuid.uuid4().hex  # moto accepts any static key
DEPARTMENT = "engineering"
Stamps = list[tuple[float, str]]


# --- places and buckets (picklable: chDB work runs in a worker process) ------------------------------------


@dataclass(frozen=True)
class Spec:
    """A DR bucket any process can open: endpoints, bucket name, data key, site name (the key root)."""

    primary: str
    replica: str
    name: str
    key: bytes
    site: str

    def target(self, url: str, name: str) -> S3Target:
        config = Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=300)
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS,
            aws_secret_access_key=SECRET,
            config=config,
        )
        return S3Target(client=client, bucket=name, endpoint=url)

    def open(self) -> DrBucket:
        replica = self.target(self.replica, self.name + "-r")
        return DrBucket(self.target(self.primary, self.name), replica, DataKey(self.key), Dr(), site_name=self.site)

    def plain(self) -> S3Target:
        """A bucket on the primary endpoint with no lock and no versioning: the baselines' upload target."""
        return self.target(self.primary, self.name + "-plain")


class BenchPlace(Place):
    """A chDB directory and/or a Milvus Lite file; the other stores are not used here."""

    def __init__(self, chdb: Path | None = None, milvus: Path | None = None) -> None:
        self.chdb, self.milvus = chdb, milvus

    def audit_db(self) -> Any:
        from runtime.common.audit import client_factory

        assert self.chdb is not None
        return client_factory(f"chdb://{self.chdb}")()

    def vectors(self) -> Any:
        from pymilvus import MilvusClient

        assert self.milvus is not None
        return MilvusClient(str(self.milvus))

    def sqlite_files(self) -> dict[str, Path]:
        raise NotImplementedError

    def vault(self) -> Any:
        raise NotImplementedError


def _stamper() -> tuple[Stamps, Callable[[str], None]]:
    """A progress callback that records when each message came: the phases of a store call."""
    stamps: Stamps = []
    return stamps, lambda message: stamps.append((time.monotonic(), message))


def _between(stamps: Stamps, first: str, then: str | None, end: float) -> float:
    """Seconds from the first message containing `first` to the first later one containing `then` (or `end`)."""
    start = next(t for t, m in stamps if first in m)
    if then is None:
        return end - start
    return next((t for t, m in stamps if t >= start and then in m), end) - start


# --- audit DB (run in the worker process) ------------------------------------------------------------------------

# Realistic values for every column of the real table; hashes are sha256 hex (incompressible, as in production).
_AUDIT_SELECT = """
SELECT number + 1, toDateTime64(1700000000 + number / 50, 6, 'UTC'), concat('req-', toString(number)),
  lower(hex(SHA256(toString(number % 500)))), concat('laptop-', toString(number % 200)),
  arrayElement([['engineering'], ['sales'], ['hr', 'engineering'], ['field-ops']], number % 4 + 1),
  '/v1/chat/completions', 'POST', 'gemma-3-270m', arrayElement(['allow', 'deny', 'rate_limited', 'error'],
  number % 4 + 1), if(number % 4 = 1, 'department not granted', ''), toUInt32(number % 4000),
  toUInt32(number % 700), 1.5 + (number % 10000) / 7, arrayElement([200, 403, 429, 502], number % 4 + 1),
  lower(hex(SHA256(toString(number)))), lower(hex(SHA256(toString(number + 1))))
FROM numbers({start:UInt64}, {count:UInt64})
"""


def _run_sql(path: Path, fn: Callable[[Any], Any]) -> Any:
    client = BenchPlace(chdb=path).audit_db()
    try:
        return fn(client)
    finally:
        client.close()  # chDB's engine is released with its last client


def w_fill(path: Path, start: int, count: int) -> dict[str, Any]:
    from runtime.common.audit import ddl

    def fill(client: Any) -> dict[str, Any]:
        client.command(ddl())
        started = time.perf_counter()
        client.command(f"INSERT INTO audit_log {_AUDIT_SELECT}", parameters={"start": start, "count": count})
        seconds = time.perf_counter() - started
        rows, on_disk = client.query(
            "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE table = 'audit_log' AND active "
            "AND database = currentDatabase()"
        ).result_rows[0]
        return {"seconds": seconds, "rows": int(rows), "bytes_on_disk": int(on_disk)}

    return dict(_run_sql(path, fill))


def w_copy_baseline(path: Path) -> float:
    def copy(client: Any) -> float:
        client.command("CREATE TABLE bench_copy AS audit_log")
        started = time.perf_counter()
        client.command("INSERT INTO bench_copy SELECT * FROM audit_log")
        seconds = time.perf_counter() - started
        client.command("DROP TABLE bench_copy SYNC")  # not to be backed up or summed later
        return seconds

    return float(_run_sql(path, copy))


def w_backup(spec: Spec, path: Path, prefix: str) -> dict[str, Any]:
    from appliance.dr.stores.audit_db import AuditDbStore

    stamps, progress = _stamper()
    started = time.monotonic()
    part = AuditDbStore().backup(spec.open(), BenchPlace(chdb=path), prefix, None, progress)
    end = time.monotonic()
    return {
        "part": part.to_wire(),
        "seconds": end - started,
        "native_s": _between(stamps, "ClickHouse backs up", "copying", end),
        "replica_s": _between(stamps, "copying", None, end),
    }


def w_sums(path: Path) -> dict[str, Any]:
    from appliance.dr.stores.audit_db import AuditDbStore

    started = time.perf_counter()
    sums = AuditDbStore().sums(BenchPlace(chdb=path))
    return {"seconds": time.perf_counter() - started, "rows": {k: v.rows for k, v in sums.items()}}


def w_ship(spec: Spec, path: Path, after_seq: int, count: int, workdir: Path) -> dict[str, Any]:
    """Seed the head at `after_seq`, ship the rows after it with ship_store; then the baseline."""
    import pyarrow.parquet as pq

    from appliance.dr.shipper import ship_store
    from appliance.dr.stores.audit_db import AuditDbStore

    bucket = spec.open()
    seed = catalog.ShipRecord("audit_db", 1, {"seq": after_seq}, time.time(), time.time(), 0, "seeded-by-bench")
    bucket.put_json(catalog.head_key("audit_db"), seed.to_wire())
    started = time.perf_counter()
    outcome = ship_store(bucket, BenchPlace(chdb=path), AuditDbStore(batch_rows=count))
    ship_s = time.perf_counter() - started
    head = catalog.read_head(bucket, "audit_db")
    assert head is not None and outcome.items == count, f"shipped {outcome.items} rows, expected {count}"

    plain, local = spec.plain(), workdir / "baseline.parquet"
    started = time.perf_counter()
    table = _run_sql(
        path,
        lambda c: c.query_arrow(
            "SELECT * FROM audit_log WHERE seq > {a:UInt64} ORDER BY seq LIMIT {n:UInt64}",
            parameters={"a": after_seq, "n": count},
        ),
    )
    pq.write_table(table, local)
    with local.open("rb") as body:
        plain.client.put_object(Bucket=plain.bucket, Key="baseline/ship.parquet", Body=body)
    base_s = time.perf_counter() - started
    return {
        "rows": outcome.items,
        "seconds": ship_s,
        "baseline_s": base_s,
        "parquet_bytes": local.stat().st_size,
        "sequence": head.sequence,
    }


def w_restore(spec: Spec, part: dict[str, Any], path: Path, workdir: Path) -> dict[str, Any]:
    from appliance.dr.stores.audit_db import AuditDbStore

    started = time.perf_counter()
    AuditDbStore().restore(spec.open(), StoreBackup.from_wire(part), BenchPlace(chdb=path), workdir, lambda _: None)
    seconds = time.perf_counter() - started
    rows = _run_sql(path, lambda c: int(c.query("SELECT count() FROM audit_log").result_rows[0][0]))
    return {"seconds": seconds, "rows": rows}


def w_restore_store(spec: Spec, manifest: dict[str, Any], source: Path, path: Path, workdir: Path) -> dict[str, Any]:
    """The drill's work for audit_db: restore_store, then sums of the live source and of the copy."""
    from appliance.dr.restore import compare
    from appliance.dr.stores.audit_db import AuditDbStore

    stamps, progress = _stamper()
    started = time.monotonic()
    result = restore_store(spec.open(), catalog.Manifest.from_wire(manifest), "audit_db", BenchPlace(chdb=path),
                           workdir, progress)  # fmt: skip
    restored = time.monotonic()
    mismatches = compare("audit_db", AuditDbStore().sums(BenchPlace(chdb=source)), result.sums)
    verified = time.monotonic()
    return {
        "restore_store_s": restored - started,
        "restore_and_check_s": _between(stamps, "restoring backup", "applying shipment", restored),
        "shipments_s": _between(stamps, "applying shipment", None, restored) if result.shipments else 0.0,
        "verify_s": verified - restored,
        "rto_s": verified - started,
        "shipments": result.shipments,
        "items_applied": result.items_applied,
        "rows": sum(s.rows for s in result.sums.values()),
        "mismatches": [m.describe() for m in mismatches],
    }


# --- shipping lag (worker process) ----------------------------------------------------------------------------


def _event_row(seq: int, now: datetime) -> list[Any]:
    digest = hashlib.sha256(str(seq).encode()).hexdigest()
    return [seq, now, f"req-{seq}", digest, "laptop-1", ["engineering"], "/v1/chat/completions", "POST",
            "gemma-3-270m", "allow", "", 120, 40, 12.5, 200, digest, digest]  # fmt: skip


def w_lag(spec: Spec, path: Path, rate: float, seconds: float, interval: float) -> dict[str, Any]:
    """A steady writer thread and a shipper loop on one chDB path; per-row lag from insert to shipped."""
    from appliance.dr.shipper import ship_store
    from appliance.dr.stores.audit_db import AuditDbStore
    from runtime.common.audit import COLUMN_NAMES, ddl

    _run_sql(path, lambda c: c.command(ddl()))
    written: list[tuple[int, int, float]] = []  # (first seq, last seq, time the insert returned)
    done, errors = threading.Event(), []
    tick = 0.1  # the writer inserts rate * tick rows every tick (a gateway writes small batches too)

    def writer() -> None:
        client = BenchPlace(chdb=path).audit_db()
        seq, due, started = 0, 0.0, time.monotonic()
        try:
            while (elapsed := time.monotonic() - started) < seconds:
                want = int(rate * elapsed) - seq
                if want > 0:
                    now = datetime.now(UTC)
                    rows = [_event_row(seq + 1 + i, now) for i in range(want)]
                    client.insert("audit_log", rows, column_names=list(COLUMN_NAMES))
                    written.append((seq + 1, seq + want, time.time()))
                    seq += want
                due += tick
                time.sleep(max(0.0, started + due - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - reported by the shipper side
            errors.append(f"writer: {type(exc).__name__}: {exc}")
        finally:
            client.close()
            done.set()

    bucket, place, store = spec.open(), BenchPlace(chdb=path), AuditDbStore()
    passes: list[dict[str, Any]] = []
    shipped: list[tuple[int, float]] = []  # (head seq after the pass, time the pass ended)
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    while True:
        started = time.monotonic()
        outcome = ship_store(bucket, place, store)
        ended = time.time()
        head = catalog.read_head(bucket, "audit_db")
        shipped.append((int(head.watermark["seq"]) if head else 0, ended))
        passes.append({"items": outcome.items, "seconds": round(time.monotonic() - started, 3)})
        last = written[-1][1] if written else 0
        if done.is_set() and shipped[-1][0] >= last:
            break
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    thread.join()
    lags: list[float] = []
    for first, last, at in written:
        ended = next(t for head_seq, t in shipped if head_seq >= last)
        lags.extend([ended - at] * (last - first + 1))
    return {"lags": lags, "passes": passes, "errors": errors}


# --- vectors (main process; Milvus Lite serves each file from its own server process) ----------------------------

EQUIPMENT = ["pump", "valve", "compressor", "boiler", "heat exchanger", "conveyor", "turbine", "chiller"]
ACTIONS = ["inspect", "grease", "replace the seal of", "re-align", "calibrate", "clean", "test", "log the vibration of"]


def _texts(n: int, seed: int = 7) -> list[str]:
    """Maintenance-manual sentences with varied ids and figures, all different."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        eq, act = rng.choice(EQUIPMENT), rng.choice(ACTIONS)
        out.append(
            f"{act.capitalize()} {eq} {eq[:1].upper()}-{rng.randint(1, 999)} every {rng.randint(1, 52)} weeks; "
            f"alarm above {rng.randint(40, 120)} °C, torque {rng.randint(10, 400)} Nm, record in log book {i}."
        )
    return out


def _embed(texts: list[str]) -> np.ndarray:
    from runtime.common.embeddings import Embedder

    embedder = Embedder.shared()
    out = np.zeros((len(texts), embedder.dimension), dtype=np.float32)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"embedding {len(texts)} distinct texts", total=len(texts))
        for start in range(0, len(texts), 256):
            part = texts[start : start + 256]
            out[start : start + len(part)] = np.asarray(embedder.embed(part), dtype=np.float32)
            progress.advance(task, len(part))
    return out


def _chunk_rows(start: int, stop: int, pool: list[str], vectors: np.ndarray, base: int) -> list[dict[str, Any]]:
    """Rows as the core stores them: pool text i mod |pool| plus the row's own reference, its real vector;
    updated_at spread at 100 rows a second from `base` (as an ingest over time leaves them)."""
    from runtime.common.ingest import lexical_form

    rows = []
    for i in range(start, stop):
        text = f"{pool[i % len(pool)]} Ref {i}."
        doc = i // 20
        rows.append(
            {
                "chunk_id": f"c{i:08d}",
                "doc_id": f"manual-{doc}",
                "version": 1,
                "doc_hash": hashlib.sha256(f"manual-{doc}".encode()).hexdigest(),
                "title": f"Maintenance manual {doc}",
                "position": i % 20,
                "doc_chunks": 20,
                "source_name": f"manual-{doc}.md",
                "kind": "markdown",
                "updated_at": base + i // 100,
                "text": text,
                "lexical": lexical_form(text),
                "dense": vectors[i % len(pool)].tolist(),
            }
        )
    return rows


def _insert(client: Any, name: str, rows: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    for start in range(0, len(rows), 256):  # the restore's batch size (vectors._WRITE_BATCH)
        client.insert(name, rows[start : start + 256])
    return time.perf_counter() - started


def _bare_read(client: Any, name: str, fields: list[str]) -> tuple[int, float]:
    started = time.perf_counter()
    iterator = client.query_iterator(name, batch_size=1000, output_fields=fields)
    rows = 0
    try:
        while batch := iterator.next():
            rows += len(batch)
    finally:
        iterator.close()
    return rows, time.perf_counter() - started


def bench_vectors(args: argparse.Namespace, work: Path, spec: Spec) -> dict[str, Any]:
    from pymilvus import MilvusClient

    from appliance.dr.stores.vectors import VectorsStore
    from runtime.core.store import DepartmentStore

    pool = _texts(args.distinct)
    started = time.perf_counter()
    vectors = _embed(pool)
    embed_s = time.perf_counter() - started
    console.print(f"embedded {len(pool)} distinct texts in {embed_s:.0f} s")

    source = work / "vectors-source.db"
    client = MilvusClient(str(source))
    name = DepartmentStore(client).ensure_department(DEPARTMENT)
    base = int(time.time()) - args.vectors // 100 - 1
    fields = list(_chunk_rows(0, 1, pool, vectors, base)[0])
    probe = min(args.probe, args.vectors)
    quarter = max(1, probe // 4)
    probe_insert_s = _insert(client, name, _chunk_rows(0, quarter, pool, vectors, base))
    _, quarter_read_s = _bare_read(client, name, fields)
    probe_insert_s += _insert(client, name, _chunk_rows(quarter, probe, pool, vectors, base))
    _, probe_read_s = _bare_read(client, name, fields)
    insert_s = probe_insert_s
    # A full read is superlinear on Milvus Lite 3 (each query_iterator page scans and sorts the whole
    # collection): fit its exponent on the two probe reads. The vector part inserts every row twice (fill,
    # restore) and reads the collection about 7 times (baseline, backup, restore_store's two sums, the
    # drill's two sums, the idle shipping pass).
    exponent = 1.0
    if probe > quarter and quarter_read_s > 0:
        exponent = min(2.5, max(1.0, math.log(probe_read_s / quarter_read_s) / math.log(probe / quarter)))

    def estimate_s(n: int) -> float:
        return float(2 * probe_insert_s * n / probe + 7 * probe_read_s * (n / probe) ** exponent)

    wanted = args.vectors
    candidates = sorted({args.vectors, 50_000, 20_000, probe}, reverse=True)
    size = next((n for n in candidates if n <= args.vectors and estimate_s(n) <= args.vector_budget_s), probe)
    note = "" if size == wanted else (
        f"{wanted} vectors would take about {estimate_s(wanted):.0f} s here (over the {args.vector_budget_s:g} s "
        f"budget): measured at {size}"
    )  # fmt: skip
    console.print(
        f"vectors: probe {probe} rows: insert {probe / probe_insert_s:.0f}/s, read {probe / probe_read_s:.0f}/s "
        f"(read time ~ rows^{exponent:.2f}); using {size} (estimated {estimate_s(size):.0f} s)"
        + (f" [yellow]{note}[/]" if note else "")
    )
    for start in range(probe, size, 10_000):
        insert_s += _insert(client, name, _chunk_rows(start, min(size, start + 10_000), pool, vectors, base))
    read_rows, read_s = _bare_read(client, name, fields)
    assert read_rows == size, f"read {read_rows} rows back, inserted {size}"
    client.close()
    console.print(f"vectors: {size} rows inserted in {insert_s:.0f} s, read back in {read_s:.0f} s")

    bucket, place, store = spec.open(), BenchPlace(milvus=source), VectorsStore()
    started = time.perf_counter()
    part = store.backup(bucket, place, "backups/bench/vectors/", None, lambda _: None)
    backup_s = time.perf_counter() - started
    console.print(f"vectors: backup {backup_s:.0f} s")
    parquet_bytes = sum(
        int(bucket.primary.client.head_object(Bucket=bucket.primary.bucket, Key=bucket.full_key(k))["ContentLength"])
        for k in part.objects
    )

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ship-", dir=work) as tmp:
        batch = store.changes(place, part.watermark, Path(tmp))
    idle_ship_s = time.perf_counter() - started
    console.print(f"vectors: idle shipping pass {idle_ship_s:.0f} s")
    return {
        "wanted": wanted,
        "rows": size,
        "note": note,
        "distinct_embedded": len(pool),
        "embed_s": embed_s,
        "probe": {
            "rows": probe,
            "insert_per_s": round(probe / probe_insert_s),
            "read_per_s": round(probe / probe_read_s),
            "read_exponent": round(exponent, 2),
        },
        "estimate_s": estimate_s(size),
        "fill_insert_s": insert_s,
        "bare_read_s": read_s,
        "backup_s": backup_s,
        "parquet_bytes": parquet_bytes,
        "idle_ship_pass_s": idle_ship_s,
        "idle_ship_items": 0 if batch is None else batch.items,
        "part": part,
        "source": source,
    }


def vectors_drill(spec: Spec, manifest: catalog.Manifest, source: Path, target: Path, work: Path) -> dict[str, Any]:
    from appliance.dr.restore import compare
    from appliance.dr.stores.vectors import VectorsStore

    stamps, progress = _stamper()
    started = time.monotonic()
    result = restore_store(spec.open(), manifest, "vectors", BenchPlace(milvus=target), work, progress)
    restored = time.monotonic()
    mismatches = compare("vectors", VectorsStore().sums(BenchPlace(milvus=source)), result.sums)
    verified = time.monotonic()
    return {
        "restore_store_s": restored - started,
        "restore_s": _between(stamps, "restoring backup", "rows restored", restored),
        "shipments_s": 0.0,
        "verify_s": verified - restored,
        "rto_s": verified - started,
        "rows": sum(s.rows for s in result.sums.values()),
        "mismatches": [m.describe() for m in mismatches],
    }


# --- orchestration --------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _plain_upload(spec: Spec, sizes: list[int]) -> float:
    """Objects of these sizes put once to the primary, unencrypted and unreplicated (data made beforehand)."""
    plain = spec.plain()
    data = os.urandom(max(sizes, default=0))
    started = time.perf_counter()
    for i, size in enumerate(sizes):
        plain.client.put_object(Bucket=plain.bucket, Key=f"baseline/{i}", Body=data[:size])
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audit-rows", type=int, default=1_000_000)
    parser.add_argument("--ship-rows", type=int, default=100_000, help="new audit rows in one shipment")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--distinct", type=int, default=2000, help="distinct texts embedded for real")
    parser.add_argument("--probe", type=int, default=10_000, help="vectors inserted first to extrapolate from")
    parser.add_argument("--vector-budget-s", type=float, default=720, help="time the vector part may take")
    parser.add_argument("--lag-rate", type=float, default=50, help="audit rows/s written during the lag test")
    parser.add_argument("--lag-seconds", type=float, default=90, help="how long the writer writes")
    parser.add_argument("--intervals", default="30,5", help="shipper intervals to try (s)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dr.json")
    args = parser.parse_args()
    try:
        intervals = [float(s) for s in args.intervals.split(",") if s.strip()]
    except ValueError:
        parser.error("--intervals takes comma-separated seconds")
    if min(args.audit_rows, args.ship_rows, args.vectors, args.probe, args.distinct) < 1 or not intervals:
        parser.error("sizes must be positive")

    from milvus_lite.server_manager import server_manager_instance

    from tests.integration.dr_support import S3Endpoint

    run_started, load_start = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="membria-bench-dr-") as tmp:
        work = Path(tmp)
        primary, replica = S3Endpoint.start_new(work), S3Endpoint.start_new(work)
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        milvus_files: list[Path] = []
        try:
            results = _run(args, intervals, work, primary.url, replica.url, pool, milvus_files)
        finally:
            pool.shutdown()
            for path in milvus_files:  # one Milvus Lite server process per file
                server_manager_instance.release_server(str(path))
            primary.stop()
            replica.stop()
    results["run_s"] = round(time.monotonic() - run_started, 1)
    results["cpus"] = os.cpu_count()
    results["load_avg_start"] = [round(x, 2) for x in load_start]
    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written to {args.out}")
    return 0


def _make_spec(primary: str, replica: str, site: str) -> Spec:
    spec = Spec(primary, replica, f"dr-bench-{uuid.uuid4().hex[:8]}", DataKey.generate().key, site)
    ensure_locked_bucket(spec.target(primary, spec.name))
    ensure_locked_bucket(spec.target(replica, spec.name + "-r"))
    spec.plain().client.create_bucket(Bucket=spec.plain().bucket)
    return spec


def _run(
    args: argparse.Namespace,
    intervals: list[float],
    work: Path,
    primary: str,
    replica: str,
    pool: ProcessPoolExecutor,
    milvus_files: list[Path],
) -> dict[str, Any]:
    def isolated(fn: Callable[..., Any], *a: Any) -> Any:
        return pool.submit(fn, *a).result()

    spec = _make_spec(primary, replica, "bench")
    policy = Dr()
    out: dict[str, Any] = {"benchmark": "dr"}

    # -- audit DB: fill, backup, copy baseline, shipping, restore ------------------------------------------------
    source = work / "audit-source"
    n = args.audit_rows
    fill = isolated(w_fill, source, 0, n)
    console.print(f"audit: {n} rows filled in {fill['seconds']:.1f} s ({fill['bytes_on_disk'] / 1e6:.0f} MB on disk)")
    backup = isolated(w_backup, spec, source, "backups/bench/audit_db/")
    objects = backup["part"]["extra"]["native_objects"]
    sizes = [int(o["size"]) for o in objects.values()]
    plain_upload_s = _plain_upload(spec, sizes)
    sums = isolated(w_sums, source)
    copy_s = isolated(w_copy_baseline, source)
    console.print(f"audit: backup {backup['seconds']:.1f} s, plain upload {plain_upload_s:.1f} s")
    isolated(w_fill, source, n, args.ship_rows)  # the new rows the shipper ships
    ship = isolated(w_ship, spec, source, n, args.ship_rows, work)
    restored = isolated(w_restore, spec, backup["part"], work / "audit-restore", work)
    assert restored["rows"] == n, f"restored {restored['rows']} rows, backed up {n}"
    console.print(f"audit: restore {restored['seconds']:.1f} s, copy in chDB {copy_s:.1f} s")
    out["audit_db"] = {
        "rows": n,
        "fill_s": round(fill["seconds"], 2),
        "bytes_on_disk": fill["bytes_on_disk"],
        "backup": {
            "seconds": round(backup["seconds"], 2),
            "rows_per_s": round(n / backup["seconds"]),
            "native_backup_and_sums_s": round(backup["native_s"], 2),
            "replica_copy_s": round(backup["replica_s"], 2),
            "objects": len(sizes),
            "bytes": sum(sizes),
            "baseline_plain_upload_s": round(plain_upload_s, 2),
            "baseline_rows_per_s": round(n / plain_upload_s),
            "ratio": round(backup["seconds"] / plain_upload_s, 2),
        },
        "sums_s": round(sums["seconds"], 2),
        "restore": {
            "seconds": round(restored["seconds"], 2),
            "rows_per_s": round(n / restored["seconds"]),
            "baseline_insert_select_s": round(copy_s, 2),
            "baseline_rows_per_s": round(n / copy_s),
            "ratio": round(restored["seconds"] / copy_s, 2),
        },
        "ship": {
            "rows": ship["rows"],
            "seconds": round(ship["seconds"], 2),
            "rows_per_s": round(ship["rows"] / ship["seconds"]),
            "parquet_bytes": ship["parquet_bytes"],
            "baseline_s": round(ship["baseline_s"], 2),
            "baseline_rows_per_s": round(ship["rows"] / ship["baseline_s"]),
            "ratio": round(ship["seconds"] / ship["baseline_s"], 2),
        },
    }

    # -- vectors: fill (= bare insert baseline), bare read, backup, idle shipping pass --------------------------
    vec = bench_vectors(args, work, spec)
    milvus_files.append(vec["source"])
    vparts = vec.pop("part")
    size = vec["rows"]

    # -- drill: restore_store of both stores into empty targets, then the verification against the source -------
    manifest = catalog.Manifest(
        backup_id=catalog.new_backup_id(),
        site=spec.site,
        started_at=time.time(),
        finished_at=time.time(),
        stores={"audit_db": StoreBackup.from_wire(backup["part"]), "vectors": vparts},
        ship_sequences={"audit_db": 1, "vectors": 0},  # the shipment of the new audit rows comes after the backup
    )
    catalog.write_manifest(spec.open(), manifest)
    audit_drill = isolated(w_restore_store, spec, manifest.to_wire(), source, work / "audit-drill", work)
    target = work / "vectors-drill.db"
    milvus_files.append(target)
    vdrill = vectors_drill(spec, manifest, vec.pop("source"), target, work)
    console.print(f"drill: audit_db RTO {audit_drill['rto_s']:.1f} s, vectors RTO {vdrill['rto_s']:.0f} s")
    out["vectors"] = {
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in vec.items()},
        "backup": {
            "seconds": round(vec["backup_s"], 2),
            "vectors_per_s": round(size / vec["backup_s"]),
            "baseline_bare_read_s": round(vec["bare_read_s"], 2),
            "baseline_vectors_per_s": round(size / vec["bare_read_s"]),
            "ratio": round(vec["backup_s"] / vec["bare_read_s"], 2),
        },
        "restore": {
            "seconds": round(vdrill["restore_s"], 2),
            "vectors_per_s": round(size / vdrill["restore_s"]),
            "baseline_bare_insert_s": round(vec["fill_insert_s"], 2),
            "baseline_vectors_per_s": round(size / vec["fill_insert_s"]),
            "ratio": round(vdrill["restore_s"] / vec["fill_insert_s"], 2),
        },
    }
    out["drill"] = {
        "audit_db": {
            **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in audit_drill.items()},
            "rto_target_s": policy.rto_seconds.audit_db,
        },
        "vectors": {
            **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in vdrill.items()},
            "rto_target_s": policy.rto_seconds.vectors,
        },
    }

    # -- shipping lag under a steady write load ---------------------------------------------------------------
    out["lag"] = []
    for interval in intervals:
        lag_spec = _make_spec(primary, replica, f"lag-{int(interval)}")
        console.print(
            f"lag: writing {args.lag_rate:g} rows/s for {args.lag_seconds:g} s, shipping every {interval:g} s"
        )
        run = isolated(w_lag, lag_spec, work / f"audit-lag-{int(interval)}", args.lag_rate, args.lag_seconds, interval)
        lags = run["lags"]
        out["lag"].append(
            {
                "interval_s": interval,
                "rate_per_s": args.lag_rate,
                "write_s": args.lag_seconds,
                "rows": len(lags),
                "passes": len(run["passes"]),
                "pass_p50_s": round(statistics.median(p["seconds"] for p in run["passes"]), 3),
                "pass_max_s": round(max(p["seconds"] for p in run["passes"]), 3),
                "lag_p50_s": round(statistics.median(lags), 2),
                "lag_p95_s": round(_pct(lags, 0.95), 2),
                "lag_max_s": round(max(lags), 2),
                "max_over_interval": round(max(lags) / interval, 2),
                "max_over_rpo_audit": round(max(lags) / policy.rpo_seconds.audit_db, 3),
                "max_over_rpo_vectors": round(max(lags) / policy.rpo_seconds.vectors, 3),
                "errors": run["errors"],
            }
        )
    out["targets"] = {"rto": policy.rto_seconds.model_dump(), "rpo": policy.rpo_seconds.model_dump()}
    return out


def _print(r: dict[str, Any]) -> None:
    a, v = r["audit_db"], r["vectors"]
    table = Table(title=f"DR throughput (audit {a['rows']:,} rows, vectors {v['rows']:,})")
    for col in ("what", "DR s", "DR rate", "baseline", "baseline s", "baseline rate", "DR / baseline"):
        table.add_column(col)
    rows = [
        ("audit backup (BACKUP TO S3 + replica)", a["backup"], "rows_per_s", "plain put, same sizes",
         "baseline_plain_upload_s"),
        ("audit restore (RESTORE + CHECK)", a["restore"], "rows_per_s", "INSERT SELECT in chDB",
         "baseline_insert_select_s"),
        (f"audit ship {a['ship']['rows']:,} rows (ship_store)", a["ship"], "rows_per_s",
         "query_arrow + parquet + put", "baseline_s"),
        ("vectors backup", v["backup"], "vectors_per_s", "bare query_iterator", "baseline_bare_read_s"),
        ("vectors restore", v["restore"], "vectors_per_s", "bare insert (256/batch)", "baseline_bare_insert_s"),
    ]  # fmt: skip
    for label, fig, rate, base, base_s in rows:
        table.add_row(
            label,
            f"{fig['seconds']:.1f}",
            f"{fig[rate]:,}/s",
            base,
            f"{fig[base_s]:.1f}",
            f"{fig['baseline_' + rate]:,}/s",
            f"{fig['ratio']:.2f}x",
        )
    console.print(table)
    if v["note"]:
        console.print(f"[yellow]vectors: {v['note']}[/]")

    drill = Table(title="drill RTO (restore_store + verification against the source)")
    for col in ("store", "rows", "shipments", "restore_store s", "of which shipments s", "verify s", "RTO s",
                "target s", "of target"):  # fmt: skip
        drill.add_column(col)
    for name in ("audit_db", "vectors"):
        d = r["drill"][name]
        drill.add_row(
            name,
            f"{d['rows']:,}",
            str(d.get("shipments", 0)),
            f"{d['restore_store_s']:.1f}",
            f"{d['shipments_s']:.1f}",
            f"{d['verify_s']:.1f}",
            f"{d['rto_s']:.1f}",
            str(d["rto_target_s"]),
            f"{d['rto_s'] / d['rto_target_s']:.1%}",
        )
    console.print(drill)
    for name in ("audit_db", "vectors"):
        if r["drill"][name]["mismatches"]:
            console.print(f"[red]{name}: the restored copy differs: {r['drill'][name]['mismatches']}[/]")

    lag = Table(title="audit shipping lag under a steady write load (write -> shipped on both targets)")
    for col in ("interval s", "rows", "passes", "pass p50/max s", "lag p50 s", "lag p95 s", "lag max s",
                "max / interval", "max / RPO audit 300 s", "max / RPO vectors 60 s"):  # fmt: skip
        lag.add_column(col)
    for row in r["lag"]:
        lag.add_row(
            f"{row['interval_s']:g}",
            f"{row['rows']:,} @ {row['rate_per_s']:g}/s",
            str(row["passes"]),
            f"{row['pass_p50_s']:.2f} / {row['pass_max_s']:.2f}",
            f"{row['lag_p50_s']:.1f}",
            f"{row['lag_p95_s']:.1f}",
            f"{row['lag_max_s']:.1f}",
            f"{row['max_over_interval']:.2f}",
            f"{row['max_over_rpo_audit']:.1%}",
            f"{row['max_over_rpo_vectors']:.1%}",
        )
        if row["errors"]:
            console.print(f"[red]lag at {row['interval_s']:g} s: {row['errors']}[/]")
    console.print(lag)
    console.print(
        f"vectors: idle shipping pass at {v['rows']:,} vectors took {v['idle_ship_pass_s']:.1f} s "
        f"({v['idle_ship_items'] or 'nothing'} to ship; it reads every primary key and the rows of the watermark's "
        f"second) vs the site's shipping interval of 30 s; audit sums on {a['rows']:,} rows {a['sums_s']:.1f} s"
    )
    console.print(
        f"run {r['run_s']:.0f} s on {r['cpus']} CPUs, load average {r['load_avg_start'][0]} -> "
        f"{r['load_avg_end'][0]} (other work shares the machine: figures are noisy)"
    )


if __name__ == "__main__":
    sys.exit(main())
