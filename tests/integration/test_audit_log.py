"""The audit log on real chDB: the writer batches, flushes and resumes; verify catches tampering; the CLI.

chDB admits one engine path per process and one process per path (see runtime/common/audit.py), so every
chDB user here runs in a fresh subprocess (`isolated`): the pytest process never opens the engine, and the
CLI subprocesses can open the paths the test wrote.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runtime.common.audit import (
    COLUMN_NAMES,
    COLUMN_TYPES,
    Finding,
    Head,
    VerifyResult,
    quote_table,
    read_head,
    verify_chain,
)
from tests.conftest import REPO, lab_site_data, write_site

pytestmark = pytest.mark.integration

KEY = b"integration-test-audit-key-32by!"
T = TypeVar("T")


# --- running chDB users in their own process -----------------------------------------------------------------


def _pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` in a fresh process (its own chDB engine) and return its result."""
    with _pool() as pool:
        return pool.submit(fn, *args, **kwargs).result(timeout=300)


def _client(path: Path) -> Any:
    import clickhouse_connect

    return clickhouse_connect.get_client(dsn=f"chdb://{path}")


def event(i: int, subject: str = "alice@acme.example") -> dict[str, Any]:
    return {
        "request_id": f"req-{i}",
        "subject": subject,
        "device": "laptop-7",
        "departments": ["engineering"],
        "route": "/v1/chat/completions",
        "method": "POST",
        "model": "gemma-3-270m",
        "decision": ("allow", "deny", "rate_limited", "error")[i % 4],
        "reason": "" if i % 4 == 0 else "policy",
        "prompt_tokens": i,
        "completion_tokens": 2 * i,
        "latency_ms": round(1.5 + i / 7, 3),
        "status": (200, 403, 429, 502)[i % 4],
    }


def _write(path: Path, start: int, count: int, table: str = "audit_log", **options: Any) -> dict[str, Any]:
    from runtime.gateway.audit_writer import AuditWriter

    writer = AuditWriter.for_dsn(f"chdb://{path}", pseudonym_key=KEY, table=table, **options).start()
    resumed_from = writer.status().head
    for i in range(start, start + count):
        writer.submit(event(i))
    writer.close()
    return {"resumed_from": resumed_from, "head": writer.status().head}


def write(path: Path, start: int, count: int, **options: Any) -> dict[str, Any]:
    return isolated(_write, path, start, count, **options)


def _verify(path: Path, table: str, expected_head: Head | None, page_size: int) -> VerifyResult:
    client = _client(path)
    try:
        return verify_chain(client, table, expected_head=expected_head, page_size=page_size)
    finally:
        client.close()


def verify(
    path: Path, *, table: str = "audit_log", expected_head: Head | None = None, page_size: int = 7
) -> VerifyResult:
    return isolated(_verify, path, table, expected_head, page_size)


def _sql(path: Path, statements: list[str], query: str | None) -> list[tuple[Any, ...]]:
    client = _client(path)
    try:
        for statement in statements:
            client.command(statement, settings={"mutations_sync": 2})
        return [tuple(r) for r in client.query(query).result_rows] if query else []
    finally:
        client.close()


def sql(path: Path, *statements: str, query: str | None = None) -> list[tuple[Any, ...]]:
    return isolated(_sql, path, list(statements), query)


def _swap_seq(path: Path, a: int, b: int) -> None:
    """Swap the seq values of two rows (seq is the sort key: ClickHouse cannot UPDATE it, so re-insert)."""
    client = _client(path)
    try:
        rows = client.query(f"SELECT * FROM audit_log WHERE seq IN ({a}, {b}) ORDER BY seq").result_rows
        client.command(f"ALTER TABLE audit_log DELETE WHERE seq IN ({a}, {b})", settings={"mutations_sync": 2})
        swapped = [[b if r[0] == a else a, *r[1:]] for r in rows]
        client.insert("audit_log", swapped, column_names=list(COLUMN_NAMES), column_type_names=list(COLUMN_TYPES))
    finally:
        client.close()


def _rehash_row(path: Path, seq: int) -> None:
    """Edit a row *and* recompute its row_hash, as an attacker with write access would."""
    from runtime.common.audit import iter_rows, row_hash

    client = _client(path)
    try:
        client.command(
            f"ALTER TABLE audit_log UPDATE reason = 'nothing to see' WHERE seq = {seq}", settings={"mutations_sync": 2}
        )
        row = next(r for r in iter_rows(client) if r.seq == seq)
        digest = row_hash(row, row.prev_hash)
        client.command(
            f"ALTER TABLE audit_log UPDATE row_hash = '{digest}' WHERE seq = {seq}", settings={"mutations_sync": 2}
        )
    finally:
        client.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "chdb"


def kinds(result: VerifyResult) -> list[tuple[int, str]]:
    return [(f.seq, f.kind) for f in result.findings]


# --- the writer -------------------------------------------------------------------------------------------------


def _batching(path: Path) -> dict[str, Any]:
    from runtime.gateway.audit_writer import AuditWriter

    def count() -> int:
        return int(reader.command("SELECT count() FROM audit_log"))

    def wait_for(n: int, within: float) -> float:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if count() >= n:
                return time.monotonic()
            time.sleep(0.02)
        raise AssertionError(f"{count()} rows after {within} s, expected {n}")

    out: dict[str, Any] = {}
    by_size = AuditWriter.for_dsn(f"chdb://{path}", pseudonym_key=KEY, batch_size=10, flush_interval_s=60).start()
    reader = _client(path)  # same process, same path: shares the engine with the writer
    try:
        for i in range(25):
            by_size.submit(event(i))
        wait_for(20, 10)  # two full batches, long before the 60 s interval
        time.sleep(0.5)
        out["after_two_batches"] = count()  # the 5 left wait for the interval or close
        by_size.close()
        out["after_close"] = count()
        by_size.close()  # idempotent

        by_time = AuditWriter.for_dsn(
            f"chdb://{path}", pseudonym_key=KEY, batch_size=1000, flush_interval_s=0.2
        ).start()
        submitted = time.monotonic()
        for i in range(25, 28):
            by_time.submit(event(i))
        out["interval_flush_s"] = wait_for(28, 10) - submitted
        out["pending_before_close"] = by_time.status().pending
        by_time.close()
        out["final"] = count()
        out["verify"] = verify_chain(reader)
    finally:
        reader.close()
    return out


def test_writer_batches_by_size_and_by_time_and_flushes_on_close(db: Path) -> None:
    out = isolated(_batching, db)
    assert out["after_two_batches"] == 20
    assert out["after_close"] == 25
    assert out["interval_flush_s"] < 5  # by time: 3 rows of a 1000-row batch went in after ~0.2 s
    assert out["pending_before_close"] == 0
    assert out["final"] == 28
    assert out["verify"].ok and out["verify"].rows_checked == 28


def test_writer_resumes_the_chain_across_restarts(db: Path) -> None:
    first = write(db, 0, 7, batch_size=3)
    assert first["resumed_from"] is None and first["head"].seq == 7
    second = write(db, 7, 5, batch_size=3)
    assert second["resumed_from"] == first["head"]
    assert second["head"].seq == 12
    links = sql(db, query="SELECT seq, prev_hash, row_hash FROM audit_log WHERE seq IN (7, 8) ORDER BY seq")
    assert links[1][1] == links[0][2]
    result = verify(db)
    assert result.ok, result.findings
    assert result.rows_checked == 12 and result.head == second["head"]


def _retry_after_the_db_comes_back(path: Path) -> dict[str, Any]:
    """The DB is held by another process for a while: rows wait and are retried, none lost, none doubled."""
    import subprocess as sp

    from runtime.gateway.audit_writer import AuditWriter

    writer = AuditWriter.for_dsn(
        f"chdb://{path}", pseudonym_key=KEY, batch_size=5, flush_interval_s=0.05, retry_max_s=0.2
    ).start()
    holder = sp.Popen(
        [
            sys.executable,
            "-c",
            f"import clickhouse_connect, time; c = clickhouse_connect.get_client(dsn='chdb://{path}');"
            " print('held', flush=True); time.sleep(2)",
        ],
        stdout=sp.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    for i in range(12):
        writer.submit(event(i))
    time.sleep(0.8)
    during = writer.status()
    holder.wait(30)
    writer.close()
    client = _client(path)
    try:
        return {
            "during": during,
            "count": int(client.command("SELECT count() FROM audit_log")),
            "verify": verify_chain(client),
        }
    finally:
        client.close()


def test_writer_keeps_and_retries_rows_while_the_db_is_unavailable(db: Path) -> None:
    out = isolated(_retry_after_the_db_comes_back, db)
    assert out["during"].pending == 12 and "held by process" in out["during"].last_error
    assert out["count"] == 12
    assert out["verify"].ok


def _shutdown_without_db(path: Path) -> dict[str, Any]:
    """close() cannot reach the DB before its timeout: the rows are logged, chained, and the error says so."""
    import json
    import logging
    import subprocess as sp

    from runtime.gateway.audit_writer import AuditFlushError, AuditWriter

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("membria.audit").addHandler(Keep(logging.ERROR))
    writer = AuditWriter.for_dsn(f"chdb://{path}", pseudonym_key=KEY, flush_interval_s=0.05).start()
    holder = sp.Popen(
        [
            sys.executable,
            "-c",
            f"import clickhouse_connect, time; c = clickhouse_connect.get_client(dsn='chdb://{path}');"
            " print('held', flush=True); time.sleep(60)",
        ],
        stdout=sp.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for i in range(3):
            writer.submit(event(i, subject="carol@acme.example"))
        try:
            writer.close(timeout=0.5)
            error = ""
        except AuditFlushError as exc:
            error = str(exc)
        writer.close()  # idempotent, even after a failed flush
    finally:
        holder.kill()
        holder.wait()
    rows = [json.loads(r.split(": ", 1)[1]) for r in records if r.startswith("audit row not written")]
    return {"error": error, "rows": rows, "records": records}


def test_shutdown_without_the_db_logs_every_unwritten_row_and_fails_loudly(db: Path) -> None:
    out = isolated(_shutdown_without_db, db)
    assert "3 audit row(s) (seq 1..3) could not be written" in out["error"]
    assert [r["seq"] for r in out["rows"]] == [1, 2, 3]
    assert out["rows"][0]["prev_hash"] == "0" * 64
    assert out["rows"][1]["prev_hash"] == out["rows"][0]["row_hash"]
    assert all("carol" not in line for line in out["records"])


def _bounded(path: Path) -> dict[str, Any]:
    from runtime.gateway.audit_writer import AuditError, AuditQueueFull, AuditWriter

    writer = AuditWriter.for_dsn(f"chdb://{path}", pseudonym_key=KEY, batch_size=2, max_pending=4, flush_interval_s=60)
    for i in range(4):  # not started yet: events queue
        writer.submit(event(i))
    out: dict[str, Any] = {"has_capacity": writer.has_capacity()}
    started = time.monotonic()
    try:
        writer.submit(event(4))
    except AuditQueueFull as exc:
        out["full"] = str(exc)
    out["submit_s"] = time.monotonic() - started
    writer.close()  # starts the writer to write what was accepted
    try:
        writer.submit(event(5))
    except AuditError as exc:
        out["closed"] = str(exc)
    client = _client(path)
    try:
        out["count"] = int(client.command("SELECT count() FROM audit_log"))
    finally:
        client.close()
    return out


def test_a_full_queue_refuses_at_once_and_accepted_rows_are_still_written(db: Path) -> None:
    out = isolated(_bounded, db)
    assert out["has_capacity"] is False
    assert "4 audit rows are waiting" in out["full"]
    assert out["submit_s"] < 0.1
    assert out["count"] == 4
    assert "closed" in out["closed"]


# --- verify ------------------------------------------------------------------------------------------------------


def test_verify_passes_an_intact_log_read_in_pages_and_checks_a_checkpoint(db: Path) -> None:
    head = write(db, 0, 30, batch_size=8)["head"]
    result = verify(db, page_size=7)  # 30 rows in 5 pages
    assert result.ok and result.findings == [] and result.rows_checked == 30
    assert result.head == head
    assert verify(db, expected_head=head).ok
    mid = sql(db, query="SELECT seq, row_hash FROM audit_log WHERE seq = 11")[0]
    assert verify(db, expected_head=Head(11, mid[1])).ok


def test_verify_detects_an_edited_row(db: Path) -> None:
    write(db, 0, 12)
    sql(db, "ALTER TABLE audit_log UPDATE decision = 'allow', status = 200 WHERE seq = 6")
    result = verify(db)
    assert not result.ok
    assert kinds(result) == [(6, "edited")]
    assert result.rows_checked == 12


def test_verify_detects_an_edited_row_whose_hash_was_recomputed(db: Path) -> None:
    write(db, 0, 12)
    isolated(_rehash_row, db, 4)
    assert kinds(verify(db)) == [(4, "edited")]


def test_verify_detects_a_deleted_row(db: Path) -> None:
    write(db, 0, 12)
    sql(db, "ALTER TABLE audit_log DELETE WHERE seq = 5")
    result = verify(db)
    assert result.findings == [
        Finding(5, "deleted", "seq 5 missing: row 6 chains to a row that is not in the log"),
    ]
    assert result.rows_checked == 11


def test_verify_detects_deleted_rows_at_the_head_and_a_bad_genesis(db: Path) -> None:
    write(db, 0, 6)
    sql(db, "ALTER TABLE audit_log DELETE WHERE seq IN (1, 2)")
    assert kinds(verify(db)) == [(1, "deleted")]
    other = db.parent / "other"
    write(other, 0, 4)
    sql(other, f"ALTER TABLE audit_log UPDATE prev_hash = '{'ab' * 32}' WHERE seq = 1")
    assert kinds(verify(other)) == [(1, "edited"), (1, "bad_genesis")]


def test_verify_detects_reordered_rows(db: Path) -> None:
    write(db, 0, 12)
    isolated(_swap_seq, db, 5, 6)
    result = verify(db)
    assert kinds(result) == [(5, "reordered"), (6, "reordered")], result.findings
    assert "follows seq 6" in result.findings[0].detail


def test_only_a_checkpoint_catches_a_deleted_tail(db: Path) -> None:
    head = write(db, 0, 10)["head"]
    sql(db, "ALTER TABLE audit_log DELETE WHERE seq >= 9")
    assert verify(db).ok  # a plain chain cannot see it
    result = verify(db, expected_head=head)
    assert kinds(result) == [(10, "deleted")]
    assert "the log ends at seq 8" in result.findings[0].detail


# --- the CLI -----------------------------------------------------------------------------------------------------


def appliance(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "appliance", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.fixture
def lab(tmp_path: Path) -> tuple[Path, Path]:
    """A lab site file and the path of its embedded audit DB (<state_dir>/data/chdb)."""
    state = tmp_path / "state"
    site = write_site(tmp_path / "site.yaml", lab_site_data(state))
    return site, state / "data" / "chdb"


def test_cli_verify_exits_0_on_an_intact_log_and_1_listing_each_finding(lab: tuple[Path, Path]) -> None:
    site, db = lab
    missing = appliance("audit-log", "verify", "--site", str(site))
    assert missing.returncode == 1 and "no embedded audit DB" in missing.stderr
    head = write(db, 0, 15)["head"]

    ok = appliance("audit-log", "verify", "--site", str(site))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "15 rows checked, chain intact" in ok.stdout
    assert f"head: {head}" in ok.stdout
    assert appliance("audit-log", "verify", "--site", str(site), "--expect-head", str(head)).returncode == 0

    bad_head = appliance("audit-log", "verify", "--site", str(site), "--expect-head", "15:nothex")
    assert bad_head.returncode == 2 and "SEQ:HASH" in bad_head.stderr
    bad_table = appliance("audit-log", "verify", "--site", str(site), "--table", "x;drop")
    assert bad_table.returncode == 2
    no_table = appliance("audit-log", "verify", "--site", str(site), "--table", "nope")
    assert no_table.returncode == 1 and "no table nope" in no_table.stderr

    sql(db, "ALTER TABLE audit_log UPDATE reason = 'x' WHERE seq = 3", "ALTER TABLE audit_log DELETE WHERE seq = 9")
    isolated(_swap_seq, db, 12, 13)
    failed = appliance("audit-log", "verify", "--site", str(site))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    out = failed.stdout
    for seq, kind in ((3, "edited"), (9, "deleted"), (12, "reordered"), (13, "reordered")):
        assert any([c.strip() for c in line.split("│")][1:3] == [str(seq), kind] for line in out.splitlines()), out
    assert "4 finding(s)" in failed.stderr
    for result in (missing, ok, bad_head, bad_table, no_table, failed):
        assert "Traceback" not in result.stdout + result.stderr


def _gateway_like(path: Path, seconds: float) -> dict[str, Any]:
    """A process writing audit rows continuously, as the lab's gateway does."""
    from runtime.gateway.audit_writer import AuditWriter

    writer = AuditWriter.for_dsn(f"chdb://{path}", pseudonym_key=KEY, batch_size=20, flush_interval_s=0.1).start()
    submitted = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        writer.submit(event(submitted))
        submitted += 1
        time.sleep(0.005)
    writer.close()
    return {"submitted": submitted, "head": writer.status().head}


def test_cli_verify_runs_while_the_lab_gateway_writes(lab: tuple[Path, Path]) -> None:
    """chDB admits one process at a time: the writer releases it between batches and verify waits its turn."""
    site, db = lab
    write(db, 0, 1)  # the DB exists before the gateway-like process starts
    with _pool() as pool:
        gateway: Future[dict[str, Any]] = pool.submit(_gateway_like, db, 8.0)
        time.sleep(2)
        runs = [appliance("audit-log", "verify", "--site", str(site), "--wait", "30") for _ in range(3)]
        written = gateway.result(timeout=120)
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "chain intact" in run.stdout and "Traceback" not in run.stderr
    final = appliance("audit-log", "verify", "--site", str(site), "--expect-head", str(written["head"]))
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"{written['submitted'] + 1} rows checked" in final.stdout


def test_cli_verify_gives_up_clearly_when_another_process_keeps_the_db(lab: tuple[Path, Path]) -> None:
    site, db = lab
    write(db, 0, 3)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import clickhouse_connect, time; c = clickhouse_connect.get_client(dsn='chdb://{db}');"
            " print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = appliance("audit-log", "verify", "--site", str(site), "--wait", "1")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert f"held by process {holder.pid}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_read_head_and_table_names_on_a_database_qualified_table(db: Path) -> None:
    sql(db, "CREATE DATABASE IF NOT EXISTS membria_audit")
    head = write(db, 0, 4, table="membria_audit.requests")["head"]
    assert isolated(_head, db, "membria_audit.requests") == head
    assert verify(db, table="membria_audit.requests").ok


def _head(path: Path, table: str) -> Head | None:
    client = _client(path)
    try:
        quote_table(table)
        return read_head(client, table)
    finally:
        client.close()
