"""The audit DB's DR (ClickHouse in production, chDB in the lab): see appliance/dr/DESIGN.md, row `audit_db`.

Full backups are ClickHouse's own `BACKUP ... TO S3(...)` (incremental on the previous one through
`base_backup`): ClickHouse writes the objects itself, so they carry SSE and object lock but not our
client-side layer (its only encrypted format, a zip, is refused for S3). We then copy each object to the
replica and check the copy. Shipments are the audit table's rows with `seq` above the watermark, as
Parquet. Sums are `count()` and `sum(cityHash64(<all columns>))`, computed by ClickHouse on either side.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from appliance.dr.objects import DrBucket, s3_errors
from appliance.dr.stores.base import Place, Progress, ShipBatch, Store, StoreBackup, TableSum
from appliance.errors import ApplianceError, CheckFailed, ServiceError
from runtime.common.audit import DEFAULT_TABLE

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from appliance.backends import S3Target

BATCH_ROWS = 200_000  # rows per shipment at most; the next pass continues from its watermark
_AFTER_META = b"membria.audit_db.after_seq"  # in each shipment: the seq it continues from


def _ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class _S3Arg:
    """ClickHouse's `S3(url, key, secret)` for one target. It knows the secret only to put it in SQL and to
    mask it in any message (ClickHouse masks it too, as [HIDDEN])."""

    def __init__(self, target: S3Target) -> None:
        # botocore keeps a client's credentials on its signer; ClickHouse needs them as plain arguments.
        creds = getattr(target.client._request_signer, "_credentials", None)
        frozen = creds.get_frozen_credentials() if creds is not None else None
        if frozen is None or not frozen.access_key or frozen.token:  # S3() takes no session token
            raise ServiceError(
                f"ClickHouse's BACKUP to {target.endpoint} needs a static access key and secret key "
                "(no temporary credentials)"
            )
        self.access_key, self._secret = str(frozen.access_key), str(frozen.secret_key)

    def sql(self, url: str) -> str:
        return f"S3({_literal(url)}, {_literal(self.access_key)}, {_literal(self._secret)})"

    def mask(self, text: str) -> str:
        for form in {self._secret, _literal(self._secret)[1:-1]}:
            if form:
                text = text.replace(form, "[HIDDEN]")
        return text

    def run(self, client: Client, sql: str, fail: Callable[[str], ApplianceError]) -> None:
        try:
            client.command(sql)
        except Exception as exc:  # noqa: BLE001 - the drivers raise several types; all become `fail`
            raise fail(self.mask(str(exc))) from None  # `from None`: no chained text that could hold the SQL


@contextlib.contextmanager
def _opened(place: Place) -> Iterator[Client]:
    client = place.audit_db()
    try:
        yield client
    finally:
        client.close()  # chDB's engine is released with its last client


def _database(client: Client) -> str:
    return str(client.command("SELECT currentDatabase()")).strip()


def _tables(client: Client) -> list[str]:
    sql = (
        "SELECT name FROM system.tables WHERE database = currentDatabase() AND engine LIKE '%MergeTree' "
        "AND NOT is_temporary ORDER BY name"
    )
    return [str(row[0]) for row in client.query(sql).result_rows]


def _has_table(client: Client, table: str) -> bool:
    return table in _tables(client)


def _max_seq(client: Client) -> int:
    if not _has_table(client, DEFAULT_TABLE):
        return 0
    return int(client.query(f"SELECT max(seq) FROM {_ident(DEFAULT_TABLE)}").result_rows[0][0])  # noqa: S608


def _table_sum(client: Client, table: str) -> TableSum:
    columns = client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String} "
        "AND default_kind != 'EPHEMERAL' ORDER BY position",
        parameters={"t": table},
    ).result_rows
    hashed = ", ".join(_ident(str(row[0])) for row in columns)
    try:
        rows, total = client.query(f"SELECT count(), sum(cityHash64({hashed})) FROM {_ident(table)}").result_rows[0]  # noqa: S608
    except Exception as exc:  # noqa: BLE001 - a table whose parts cannot be read has no sum
        raise CheckFailed(f"audit_db: table {table} cannot be read: {exc}") from None
    return TableSum(int(rows), f"{int(total):016x}")  # sum() of UInt64 wraps: a digest, order-independent


def _listing(bucket: DrBucket, prefix: str) -> dict[str, int]:
    """Object key (relative to the bucket root) -> size, for the primary's objects under `prefix`."""
    full, out = bucket.full_key(prefix), {}
    with s3_errors(bucket.primary, f"listing {full}"):
        for page in bucket.primary.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket.primary.bucket, Prefix=full
        ):
            for item in page.get("Contents", []):
                out[item["Key"][len(bucket.root) :]] = int(item["Size"])
    return out


def _copy_to_replica(bucket: DrBucket, key: str) -> str:
    """Copy one object ClickHouse wrote to the replica (another endpoint: get, then put), read the copy back
    and compare (CorruptObject if it differs). Returns the object's sha256."""
    full, digest = bucket.full_key(key), hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="membria-dr-") as tmp:
        spool = Path(tmp) / "object"
        with s3_errors(bucket.primary, f"reading {full} for the replica"), spool.open("wb") as out:
            body = bucket.primary.client.get_object(Bucket=bucket.primary.bucket, Key=full)["Body"]
            for block in iter(lambda: body.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        bucket.put_raw(key, spool, sha256=digest.hexdigest(), only="replica")
    return digest.hexdigest()


class AuditDbStore(Store):
    name = "audit_db"

    def __init__(self, *, batch_rows: int = BATCH_ROWS) -> None:
        self.batch_rows = batch_rows

    def backup(
        self, bucket: DrBucket, place: Place, prefix: str, previous: StoreBackup | None, progress: Progress
    ) -> StoreBackup:
        native = prefix + "native"
        base = previous.extra.get("native_url_key") if previous is not None else None
        s3 = _S3Arg(bucket.primary)
        with _opened(place) as client:
            database, tables = _database(client), _tables(client)
            started = time.time()
            # Read before BACKUP: rows are only added, so the backup holds every row up to it (a shipment that
            # overlaps is applied idempotently).
            watermark = {"seq": _max_seq(client)}
            if tables:
                items = ", ".join(f"TABLE {_ident(database)}.{_ident(t)}" for t in tables)
                sql = f"BACKUP {items} TO {s3.sql(bucket.s3_url(native))}"
                if base:
                    sql += f" SETTINGS base_backup = {s3.sql(bucket.s3_url(base))}"
                progress(
                    f"audit_db: ClickHouse backs up {len(tables)} table(s) to {native}"
                    + (f" on {base}" if base else "")
                )
                s3.run(client, sql, lambda m: ServiceError(f"audit_db: BACKUP of {database} to {native} failed: {m}"))
            sums = {t: _table_sum(client, t) for t in tables}
        listed = _listing(bucket, native + "/") if tables else {}
        shas = dict.fromkeys(listed, "")
        if bucket.replica is not None and listed:
            progress(f"audit_db: copying {len(listed)} object(s) to the replica")
            shas = {key: _copy_to_replica(bucket, key) for key in listed}
        base_objects: dict[str, Any] = {}
        chain: list[str] = []
        if base and previous is not None:  # a restore reads the whole chain of bases: record it to check it
            base_objects = {**previous.extra.get("base_objects", {}), **previous.extra.get("native_objects", {})}
            chain = [*previous.extra.get("base_chain", []), base]
        return StoreBackup(
            store=self.name,
            objects={},  # ClickHouse's own objects are listed in extra, not ours to decrypt
            sums=sums,
            watermark=watermark,
            source_time=started,
            extra={
                "native_url_key": native if tables else None,
                "base": base if tables else None,
                "database": database,
                "tables": tables,
                "native_objects": {k: {"size": listed[k], "sha256": shas[k]} for k in listed},
                "base_objects": base_objects if tables else {},
                "base_chain": chain if tables else [],
            },
        )

    def changes(self, place: Place, watermark: dict[str, Any] | None, workdir: Path) -> ShipBatch | None:
        after = int((watermark or {}).get("seq", 0))
        with _opened(place) as client:
            if not _has_table(client, DEFAULT_TABLE):
                return None
            now = time.time()
            sql = f"SELECT * FROM {_ident(DEFAULT_TABLE)} WHERE seq > {{a:UInt64}} ORDER BY seq LIMIT {{n:UInt64}}"  # noqa: S608
            table = client.query_arrow(sql, parameters={"a": after, "n": self.batch_rows})
        if table.num_rows == 0:
            return None
        first, last = int(table["seq"][0].as_py()), int(table["seq"][-1].as_py())
        table = table.replace_schema_metadata({_AFTER_META: str(after).encode()})
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / f"audit_db-{first:012d}-{last:012d}.parquet"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=workdir)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ShipBatch(path, {"seq": last}, table.num_rows, source_time=now)

    def restore(self, bucket: DrBucket, backup: StoreBackup, target: Place, workdir: Path, progress: Progress) -> None:
        tables, native = list(backup.extra.get("tables", [])), backup.extra.get("native_url_key")
        if not tables or not native:
            return  # the source had no tables yet: nothing to restore
        self._check_objects(bucket, backup, native)
        s3 = _S3Arg(bucket.primary)
        source_db = str(backup.extra["database"])
        with _opened(target) as client:
            database = _database(client)
            present = set(_tables(client))
            for table in tables:
                if table in present:
                    rows = int(client.query(f"SELECT count() FROM {_ident(table)}").result_rows[0][0])  # noqa: S608
                    if rows:
                        raise CheckFailed(
                            f"audit_db: the restore target already has table {database}.{table} with {rows} rows",
                            hint="restore into an empty audit DB",
                        )
                    client.command(f"DROP TABLE {_ident(table)} SYNC")  # empty: RESTORE creates it anew
            items = ", ".join(
                f"TABLE {_ident(source_db)}.{_ident(t)} AS {_ident(database)}.{_ident(t)}" for t in tables
            )
            progress(f"audit_db: ClickHouse restores {len(tables)} table(s) from {native}")
            try:
                s3.run(
                    client,
                    f"RESTORE {items} FROM {s3.sql(bucket.s3_url(native))}",
                    lambda m: CheckFailed(f"audit_db: restoring backup {native} failed: {m}"),
                )
                for table in tables:  # RESTORE does not check part checksums; CHECK TABLE does
                    ok = client.command(f"CHECK TABLE {_ident(table)} SETTINGS check_query_single_value_result = 1")
                    if str(ok).strip() != "1":
                        raise CheckFailed(f"audit_db: table {table} restored from backup {native} is corrupt")
            except CheckFailed:
                for table in tables:  # leave the target empty, not half restored
                    client.command(f"DROP TABLE IF EXISTS {_ident(table)} SYNC")
                raise

    def _check_objects(self, bucket: DrBucket, backup: StoreBackup, native: str) -> None:
        """Every object of the backup and of its bases is there with its size, before ClickHouse starts
        (its own error for a missing object names none)."""
        wanted = {**backup.extra.get("base_objects", {}), **backup.extra.get("native_objects", {})}
        present: dict[str, int] = {}
        for prefix in [*backup.extra.get("base_chain", []), native]:
            present.update(_listing(bucket, prefix + "/"))
        for key, info in sorted(wanted.items()):
            if key not in present:
                raise CheckFailed(f"audit_db: backup {native} is incomplete: {bucket.full_key(key)} is missing")
            if present[key] != int(info["size"]):
                raise CheckFailed(
                    f"audit_db: backup {native} is corrupt: {bucket.full_key(key)} has {present[key]} bytes, "
                    f"the backup wrote {info['size']}"
                )

    def apply(self, shipment: Path, target: Place) -> int:
        table = pq.read_table(shipment)
        after = (table.schema.metadata or {}).get(_AFTER_META)
        if after is None or "seq" not in table.column_names:
            raise CheckFailed(f"audit_db: {shipment} is not an audit_db shipment")
        if table.num_rows == 0:
            return 0
        with _opened(target) as client:
            if not _has_table(client, DEFAULT_TABLE):
                raise CheckFailed(f"audit_db: the target has no table {DEFAULT_TABLE}: restore a backup first")
            have = _max_seq(client)
            if have < int(after):
                raise CheckFailed(
                    f"audit_db: shipment {shipment.name} continues from seq {int(after)} but the target ends at "
                    f"seq {have}: an earlier shipment is missing"
                )
            low, high = pc.min(table["seq"]).as_py(), pc.max(table["seq"]).as_py()
            sql = f"SELECT DISTINCT seq FROM {_ident(DEFAULT_TABLE)} WHERE seq BETWEEN {{lo:UInt64}} AND {{hi:UInt64}}"  # noqa: S608
            existing = [row[0] for row in client.query(sql, parameters={"lo": low, "hi": high}).result_rows]
            fresh = table.filter(pc.invert(pc.is_in(table["seq"], value_set=pa.array(existing, pa.uint64()))))
            if fresh.num_rows:
                client.insert_arrow(DEFAULT_TABLE, fresh.replace_schema_metadata(None))
            return int(fresh.num_rows)

    def sums(self, place: Place) -> dict[str, TableSum]:
        with _opened(place) as client:
            return {table: _table_sum(client, table) for table in _tables(client)}
