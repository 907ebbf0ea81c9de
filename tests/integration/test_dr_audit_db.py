"""The audit_db DR store on real chDB and a real moto S3 server: ClickHouse's own BACKUP/RESTORE to S3
(full and incremental), the copy to a replica on another endpoint, Parquet shipments by seq, and sums.

chDB admits one process per path, and one path at a time per process: every step runs in a worker
process (`isolated`), never in pytest's. Each test has one worker, which runs its steps on the source and
the target paths in turn (a path is released once its clients are closed). boto3 clients do not cross
processes, so each step rebuilds the bucket from a `Spec`.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pyarrow.parquet as pq
import pytest
from botocore.config import Config

from appliance.backends import S3Target
from appliance.dr.crypto import DataKey
from appliance.dr.objects import DrBucket
from appliance.dr.stores.audit_db import AuditDbStore
from appliance.dr.stores.base import Place, ShipBatch, StoreBackup, TableSum
from appliance.errors import CheckFailed, ServiceError
from appliance.lab.bootstrap import ensure_locked_bucket
from appliance.site import Dr
from tests.integration.dr_support import S3Endpoint, endpoint_pair

pytestmark = pytest.mark.integration

T = TypeVar("T")
KEY = b"integration-test-audit-key-32by!"
ACCESS = "AKIDAUDITDBTEST"
SECRET = "audit-db-secret-" + uuid.uuid4().hex  # moto takes any; unique so a leak can be searched for


_worker: list[ProcessPoolExecutor] = []


@pytest.fixture(autouse=True)
def worker() -> Iterator[None]:
    """One worker process per test (spawned: no engine inherited from pytest)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        _worker.append(pool)
        try:
            yield
        finally:
            _worker.remove(pool)


def isolated(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` in this test's worker process and return its result or raise its error."""
    return _worker[-1].submit(fn, *args).result(timeout=300)


@dataclass(frozen=True)
class Spec:
    """A DR bucket that each process can open: endpoints, bucket name, data key."""

    primary: str
    replica: str | None
    name: str
    key: bytes

    def target(self, url: str, name: str) -> S3Target:
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS,
            aws_secret_access_key=SECRET,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}),
        )
        return S3Target(client=client, bucket=name, endpoint=url)

    def replica_target(self) -> S3Target:
        assert self.replica is not None
        return self.target(self.replica, self.name + "-r")

    def open(self) -> DrBucket:
        replica = self.replica_target() if self.replica else None
        return DrBucket(self.target(self.primary, self.name), replica, DataKey(self.key), Dr(), site_name="test")


class ChdbPlace(Place):
    """An audit DB in a chDB directory; the other stores' parts are not used here."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def audit_db(self) -> Any:
        from runtime.common.audit import client_factory

        return client_factory(f"chdb://{self.path}")()

    def vectors(self) -> Any:
        raise NotImplementedError

    def sqlite_files(self) -> dict[str, Path]:
        raise NotImplementedError

    def vault(self) -> Any:
        raise NotImplementedError


# --- steps, each run in its own process ------------------------------------------------------------------------


def _write(path: Path, start: int, count: int) -> None:
    """Real hash-chained audit rows, through the gateway's writer."""
    from runtime.gateway.audit_writer import AuditWriter

    writer = AuditWriter.for_dsn(f"chdb://{path}", pseudonym_key=KEY).start()
    for i in range(start, start + count):
        writer.submit(
            {
                "request_id": f"req-{i}",
                "subject": f"user-{i % 3}@acme.example",
                "departments": ["engineering"],
                "route": "/v1/chat/completions",
                "method": "POST",
                "model": "gemma-3-270m",
                "decision": ("allow", "deny", "rate_limited", "error")[i % 4],
                "prompt_tokens": i,
                "latency_ms": 1.5 + i / 7,
                "status": (200, 403, 429, 502)[i % 4],
            }
        )
    writer.close()


def _sql(path: Path, statements: list[str], query: str | None) -> list[tuple[Any, ...]]:
    client = ChdbPlace(path).audit_db()
    try:
        for statement in statements:
            client.command(statement, settings={"mutations_sync": 2})
        return [tuple(r) for r in client.query(query).result_rows] if query else []
    finally:
        client.close()


def _backup(spec: Spec, path: Path, prefix: str, previous: dict[str, Any] | None) -> dict[str, Any]:
    prev = StoreBackup.from_wire(previous) if previous else None
    return AuditDbStore().backup(spec.open(), ChdbPlace(path), prefix, prev, lambda _: None).to_wire()


def _restore(spec: Spec, backup: dict[str, Any], path: Path) -> None:
    AuditDbStore().restore(spec.open(), StoreBackup.from_wire(backup), ChdbPlace(path), path.parent, lambda _: None)


def _sums(path: Path) -> dict[str, TableSum]:
    return AuditDbStore().sums(ChdbPlace(path))


def _changes(path: Path, watermark: dict[str, Any] | None, workdir: Path, batch_rows: int) -> ShipBatch | None:
    return AuditDbStore(batch_rows=batch_rows).changes(ChdbPlace(path), watermark, workdir)


def _apply(shipment: Path, path: Path) -> int:
    return AuditDbStore().apply(shipment, ChdbPlace(path))


def write(path: Path, start: int, count: int) -> None:
    isolated(_write, path, start, count)


def sql(path: Path, *statements: str, query: str | None = None) -> list[tuple[Any, ...]]:
    return isolated(_sql, path, list(statements), query)


def backup(spec: Spec, path: Path, prefix: str, previous: StoreBackup | None = None) -> StoreBackup:
    return StoreBackup.from_wire(isolated(_backup, spec, path, prefix, previous.to_wire() if previous else None))


def restore(spec: Spec, b: StoreBackup, path: Path) -> None:
    isolated(_restore, spec, b.to_wire(), path)


def sums(path: Path) -> dict[str, TableSum]:
    return isolated(_sums, path)


def changes(path: Path, watermark: dict[str, Any] | None, workdir: Path, batch_rows: int = 200_000) -> ShipBatch | None:
    return isolated(_changes, path, watermark, workdir, batch_rows)


def apply(shipment: Path, path: Path) -> int:
    return isolated(_apply, shipment, path)


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Endpoint, S3Endpoint]]:
    with endpoint_pair(tmp_path_factory.mktemp("moto")) as pair:
        yield pair


@pytest.fixture
def spec(endpoints: tuple[S3Endpoint, S3Endpoint]) -> Spec:
    primary, replica = endpoints
    made = Spec(primary.url, replica.url, f"dr-{uuid.uuid4().hex[:10]}", DataKey.generate().key)
    ensure_locked_bucket(made.target(made.primary, made.name))
    ensure_locked_bucket(made.replica_target())
    return made


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """40 chained rows in audit_log, plus another MergeTree table and a Memory table (not backed up)."""
    path = tmp_path / "source"
    write(path, 1, 40)
    sql(
        path,
        "CREATE TABLE checkpoints (at DateTime, head String) ENGINE = MergeTree ORDER BY at",
        "INSERT INTO checkpoints VALUES (1700000000, '40:abc'), (1700000100, '40:abc')",
        "CREATE TABLE scratch (x UInt8) ENGINE = Memory",
        "INSERT INTO scratch VALUES (1)",
    )
    return path


def object_bytes(target: S3Target, full_key: str) -> bytes:
    return bytes(target.client.get_object(Bucket=target.bucket, Key=full_key)["Body"].read())


def native_keys(b: StoreBackup) -> dict[str, dict[str, Any]]:
    return dict(b.extra["native_objects"])


# --- tests --------------------------------------------------------------------------------------------------------


def test_full_backup_restores_into_an_empty_target_with_equal_sums(spec: Spec, source: Path, tmp_path: Path) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    assert full.store == "audit_db" and full.objects == {}
    assert full.extra["tables"] == ["audit_log", "checkpoints"]  # every MergeTree table, not the Memory one
    assert full.extra["native_url_key"] == "backups/b1/audit_db/native" and full.extra["base"] is None
    assert full.watermark == {"seq": 40}
    live = sums(source)
    assert full.sums == live and live["audit_log"].rows == 40 and live["checkpoints"].rows == 2
    assert set(live) == {"audit_log", "checkpoints"}

    target = tmp_path / "target"
    restore(spec, full, target)
    assert sums(target) == live
    assert sql(target, query="SELECT max(seq) FROM audit_log") == [(40,)]


def test_native_objects_are_copied_to_the_replica_and_verified(spec: Spec, source: Path) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    bucket = spec.open()
    objects = native_keys(full)
    assert any(k.endswith("/.backup") for k in objects) and any(k.endswith("data.bin") for k in objects)
    assert sorted(objects) == bucket.list("backups/b1/audit_db/native/")
    replica = spec.replica_target()
    for key, info in objects.items():
        on_primary = object_bytes(bucket.primary, bucket.full_key(key))
        on_replica = object_bytes(replica, bucket.full_key(key))
        assert on_replica == on_primary and len(on_primary) == info["size"]
        assert hashlib.sha256(on_replica).hexdigest() == info["sha256"]
        head = replica.client.head_object(Bucket=replica.bucket, Key=bucket.full_key(key))
        assert head["ObjectLockMode"] == "GOVERNANCE"  # the copy is locked like our own objects


def test_incremental_backup_is_smaller_and_restores_to_equal_sums(spec: Spec, source: Path, tmp_path: Path) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    write(source, 41, 10)
    incr = backup(spec, source, "backups/b2/audit_db/", full)
    assert incr.extra["base"] == "backups/b1/audit_db/native" and incr.watermark == {"seq": 50}
    full_objects, incr_objects = native_keys(full), native_keys(incr)
    assert len(incr_objects) < len(full_objects)
    assert sum(i["size"] for i in incr_objects.values()) < sum(i["size"] for i in full_objects.values())
    assert set(incr.extra["base_objects"]) == set(full_objects)

    target = tmp_path / "target"
    restore(spec, incr, target)
    assert sums(target) == sums(source) == incr.sums
    assert incr.sums["audit_log"].rows == 50


def test_shipments_carry_exactly_the_new_rows_and_apply_idempotently(spec: Spec, source: Path, tmp_path: Path) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    assert changes(source, full.watermark, tmp_path / "ship") is None
    write(source, 41, 15)
    batch = changes(source, full.watermark, tmp_path / "ship")
    assert batch is not None and batch.items == 15 and batch.watermark == {"seq": 55}
    assert pq.read_table(batch.path)["seq"].to_pylist() == list(range(41, 56))
    assert changes(source, batch.watermark, tmp_path / "ship") is None
    everything = changes(source, None, tmp_path / "all")
    assert everything is not None and everything.items == 55

    target = tmp_path / "target"
    restore(spec, full, target)
    assert sums(target)["audit_log"] != sums(source)["audit_log"]
    assert apply(batch.path, target) == 15
    assert sums(target) == sums(source)
    assert apply(batch.path, target) == 0  # applying twice changes nothing
    assert sums(target) == sums(source)


def test_batches_are_capped_and_the_next_one_continues(source: Path, tmp_path: Path) -> None:
    first = changes(source, {"seq": 5}, tmp_path / "ship", 10)
    assert first is not None and first.items == 10 and first.watermark == {"seq": 15}
    second = changes(source, first.watermark, tmp_path / "ship", 30)
    assert second is not None and second.watermark == {"seq": 40}
    assert pq.read_table(second.path)["seq"].to_pylist() == list(range(16, 41))


def test_a_shipment_after_a_missing_one_is_refused(spec: Spec, source: Path, tmp_path: Path) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    write(source, 41, 5)
    one = changes(source, full.watermark, tmp_path / "ship")
    assert one is not None
    write(source, 46, 5)
    two = changes(source, one.watermark, tmp_path / "ship")
    assert two is not None and two.items == 5

    target = tmp_path / "target"
    restore(spec, full, target)
    with pytest.raises(CheckFailed, match=r"continues from seq 45 but the target ends at seq 40"):
        apply(two.path, target)
    assert apply(one.path, target) == 5
    assert apply(two.path, target) == 5
    assert sums(target) == sums(source)


def test_sums_differ_when_one_row_of_the_copy_is_altered(spec: Spec, source: Path, tmp_path: Path) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    target = tmp_path / "target"
    restore(spec, full, target)
    sql(target, "ALTER TABLE audit_log UPDATE reason = 'nothing to see' WHERE seq = 7")
    altered = sums(target)
    assert altered["audit_log"].rows == 40 and altered["audit_log"].digest != full.sums["audit_log"].digest
    assert altered["checkpoints"] == full.sums["checkpoints"]
    sql(target, "ALTER TABLE checkpoints DELETE WHERE at = 1700000100")
    assert sums(target)["checkpoints"].rows == 1


def test_restore_refuses_a_target_with_rows_and_replaces_an_empty_table(
    spec: Spec, source: Path, tmp_path: Path
) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    busy = tmp_path / "busy"
    write(busy, 1, 3)
    with pytest.raises(CheckFailed, match=r"already has table default\.audit_log with 3 rows"):
        restore(spec, full, busy)
    assert sums(busy)["audit_log"].rows == 3  # untouched

    empty = tmp_path / "empty"
    from runtime.common.audit import ddl

    sql(empty, ddl())
    restore(spec, full, empty)
    assert sums(empty) == full.sums


def test_a_missing_native_object_fails_the_restore_naming_it(spec: Spec, source: Path, tmp_path: Path) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    bucket = spec.open()
    victim = next(k for k in native_keys(full) if k.endswith("data.bin") and "/audit_log/" in k)
    bucket.primary.client.delete_object(Bucket=bucket.primary.bucket, Key=bucket.full_key(victim))
    target = tmp_path / "target"
    with pytest.raises(CheckFailed, match=r"backup backups/b1/audit_db/native is incomplete: .*data\.bin is missing"):
        restore(spec, full, target)
    assert sums(target) == {}


def test_a_missing_object_of_the_base_fails_an_incremental_restore(spec: Spec, source: Path, tmp_path: Path) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    write(source, 41, 5)
    incr = backup(spec, source, "backups/b2/audit_db/", full)
    bucket = spec.open()
    victim = next(k for k in native_keys(full) if k.endswith("columns.txt"))
    bucket.primary.client.delete_object(Bucket=bucket.primary.bucket, Key=bucket.full_key(victim))
    with pytest.raises(CheckFailed, match=r"backups/b2/audit_db/native is incomplete: .*b1/audit_db/native/.*missing"):
        restore(spec, incr, tmp_path / "target")


def test_a_corrupt_native_object_fails_the_restore_and_leaves_the_target_empty(
    spec: Spec, source: Path, tmp_path: Path
) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    bucket = spec.open()
    victim = next(k for k in native_keys(full) if k.endswith("data.bin") and "/audit_log/" in k)
    full_key = bucket.full_key(victim)
    data = bytearray(object_bytes(bucket.primary, full_key))
    data[len(data) // 2] ^= 0xFF  # same size: only ClickHouse's part checksums can tell
    bucket.primary.client.put_object(
        Bucket=bucket.primary.bucket, Key=full_key, Body=bytes(data), ChecksumAlgorithm="SHA256"
    )
    target = tmp_path / "target"
    with pytest.raises(
        CheckFailed, match=r"table audit_log restored from backup backups/b1/audit_db/native is corrupt"
    ):
        restore(spec, full, target)
    assert sums(target) == {}

    bucket.primary.client.put_object(
        Bucket=bucket.primary.bucket, Key=full_key, Body=bytes(data[:-1]), ChecksumAlgorithm="SHA256"
    )
    with pytest.raises(CheckFailed, match=r"is corrupt: .*data\.bin has \d+ bytes, the backup wrote \d+"):
        restore(spec, full, target)


def test_clickhouse_errors_never_carry_the_s3_secret(spec: Spec, source: Path, tmp_path: Path) -> None:
    full = backup(spec, source, "backups/b1/audit_db/")
    bogus = StoreBackup.from_wire({**full.to_wire(), "extra": {**full.extra, "native_url_key": "backups/none/native"}})
    with pytest.raises(ServiceError, match=r"BACKUP of default to backups/b2/audit_db/native failed") as failed:
        backup(spec, source, "backups/b2/audit_db/", bogus)
    assert SECRET not in str(failed.value) and "[HIDDEN]" in str(failed.value)
    for file in source.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_an_audit_db_without_tables_backs_up_and_restores_nothing(spec: Spec, tmp_path: Path) -> None:
    source = tmp_path / "source"
    sql(source, "SELECT 1")
    empty = backup(spec, source, "backups/b1/audit_db/")
    assert empty.extra["tables"] == [] and empty.extra["native_url_key"] is None
    assert empty.watermark == {"seq": 0} and empty.sums == {}
    assert spec.open().list("backups/") == []
    assert changes(source, None, tmp_path / "ship") is None
    restore(spec, empty, tmp_path / "target")
    assert sums(tmp_path / "target") == {}


def test_apply_refuses_a_foreign_file_and_a_target_without_the_table(source: Path, tmp_path: Path) -> None:
    batch = changes(source, {"seq": 30}, tmp_path / "ship")
    assert batch is not None
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pq.read_table(batch.path).replace_schema_metadata(None), foreign)
    with pytest.raises(CheckFailed, match=r"foreign\.parquet is not an audit_db shipment"):
        apply(foreign, source)
    with pytest.raises(CheckFailed, match=r"the target has no table audit_log: restore a backup first"):
        apply(batch.path, tmp_path / "empty")


class NoAuditDb(ChdbPlace):
    def audit_db(self) -> Any:
        raise AssertionError("the audit DB must not be opened")


def test_temporary_s3_credentials_are_refused_before_clickhouse_runs(spec: Spec, tmp_path: Path) -> None:
    bucket = spec.open()
    bucket.primary = S3Target(
        client=boto3.client(
            "s3",
            endpoint_url=spec.primary,
            region_name="us-east-1",
            aws_access_key_id=ACCESS,
            aws_secret_access_key=SECRET,
            aws_session_token="session-token",
        ),
        bucket=spec.name,
        endpoint=spec.primary,
    )
    with pytest.raises(ServiceError, match=r"needs a static access key") as refused:
        AuditDbStore().backup(bucket, NoAuditDb(tmp_path), "backups/b1/audit_db/", None, lambda _: None)
    assert SECRET not in str(refused.value)


def test_messages_mask_the_secret_as_clickhouse_does(spec: Spec) -> None:
    from appliance.dr.stores.audit_db import _S3Arg

    arg = _S3Arg(spec.open().primary)
    assert SECRET in arg.sql("http://x/y")  # ClickHouse needs it in the statement...
    assert arg.mask(f"S3('http://x/y', '{ACCESS}', '{SECRET}') failed") == (
        f"S3('http://x/y', '{ACCESS}', '[HIDDEN]') failed"  # ...and no message of ours shows it
    )
