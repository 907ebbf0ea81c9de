"""The `vectors` store: Milvus (Lite in the lab), one collection per department, to Parquet and back.

- Backup: per collection its description (`<name>.schema.json`) and every row through `query_iterator`
  (`<name>.parquet`; `dense` as fixed-size float32 lists). The BM25 output `sparse` is not stored: Milvus
  computes it from `lexical` on insert, so a restore rebuilds it.
- Restore: each collection is created by the core's own code (`DepartmentStore.ensure_department`, the
  same schema, indexes and BM25 function), then compared with the backed-up description.
- Shipping: rows with `updated_at` >= the watermark (seconds, so the boundary second is re-read; applying
  is an upsert) and every collection's complete primary keys (deletes), in one tar of Parquet files.
  Because the boundary second is re-read, the watermark also carries a digest of the rows at or after it
  (`edge_digest`): when those and the key list are unchanged, nothing is shipped.
- Sums: per collection, count and sha256 over the rows in primary-key order, every stored field included
  (text, metadata and the float32 bytes of `dense`).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from appliance.dr.objects import DrBucket
from appliance.dr.stores.base import Place, Progress, ShipBatch, Store, StoreBackup, TableSum
from appliance.errors import BadInput, CheckFailed, ServiceError
from runtime.core.store import DEFAULT_PREFIX, DepartmentStore, InvalidDepartment, StoreError, validate_department

UPDATED = "updated_at"
_READ_BATCH = 1000  # rows per query_iterator page
_WRITE_BATCH = 256  # rows per insert / upsert / delete (a chunk's text may be 64 KiB)
_ARROW = {"VARCHAR": pa.string(), "INT64": pa.int64(), "INT32": pa.int32(), "BOOL": pa.bool_(), "DOUBLE": pa.float64()}
_MEMBER = re.compile(r"^(manifest\.json|[A-Za-z0-9_]+\.(rows|ids)\.parquet)$")


@contextlib.contextmanager
def _milvus(what: str) -> Iterator[None]:
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except (MilvusException, StoreError, ConnectionError, TimeoutError) as exc:
        raise ServiceError(f"Milvus: {what} failed: {getattr(exc, 'message', exc)}") from exc


def _plain(value: Any) -> Any:
    """pymilvus's description as JSON values (enums by name, protobuf containers as lists)."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return [_plain(v) for v in value]


def _department(name: str) -> str:
    """The department a collection belongs to (the core's naming: prefix + name with '-' as '_')."""
    try:
        return validate_department(name[len(DEFAULT_PREFIX) :].replace("_", "-"))
    except InvalidDepartment:
        raise CheckFailed(f"Milvus collection {name} is not a department collection the core could recreate") from None


def _collections(client: Any) -> list[str]:
    with _milvus("listing collections"):
        names = sorted(n for n in client.list_collections() if n.startswith(DEFAULT_PREFIX))
    for name in names:
        _department(name)
    return names


def _describe(client: Any, name: str) -> dict[str, Any]:
    """Schema, functions and indexes of a loaded collection, as JSON."""
    with _milvus(f"describing {name}"):
        client.load_collection(name)  # a reopened Milvus starts with collections released
        out: dict[str, Any] = _plain(client.describe_collection(name))
        out["indexes"] = {}
        for index in client.list_indexes(name):
            info = client.describe_index(name, index)
            out["indexes"][index] = {k: _plain(info.get(k)) for k in ("field_name", "index_type", "metric_type")}
    return out


def _shape(schema: dict[str, Any]) -> dict[str, Any]:
    """What must match between a backup and the collection it is restored into."""
    keys = ("type", "params", "is_primary", "is_function_output")
    return {
        **{f"field {f['name']}": {k: f.get(k) or None for k in keys} for f in schema["fields"]},
        **{
            f"function {f['name']}": {k: f.get(k) for k in ("type", "input_field_names", "output_field_names")}
            for f in schema.get("functions", [])
        },
        **{f"index {k}": v for k, v in schema.get("indexes", {}).items()},
    }


def _data_fields(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored fields (BM25 outputs are computed by Milvus, not inserted)."""
    return [f for f in schema["fields"] if not f.get("is_function_output")]


def _pk(schema: dict[str, Any]) -> str:
    return str(next(f["name"] for f in schema["fields"] if f.get("is_primary")))


def _arrow_schema(name: str, schema: dict[str, Any]) -> pa.Schema:
    columns = []
    for f in _data_fields(schema):
        if f["type"] == "FLOAT_VECTOR":
            columns.append(pa.field(f["name"], pa.list_(pa.float32(), int(f["params"]["dim"]))))
        elif f["type"] in _ARROW:
            columns.append(pa.field(f["name"], _ARROW[f["type"]]))
        else:
            raise CheckFailed(f"Milvus collection {name}: field {f['name']} of type {f['type']} cannot be backed up")
    return pa.schema(columns)


def _encode(value: Any) -> bytes:
    """One field value, unambiguously (type tag + length), for the row digests."""
    if isinstance(value, str):
        data = value.encode()
        return b"s" + len(data).to_bytes(8, "little") + data
    if isinstance(value, bool):
        return b"b" + bytes([value])
    if isinstance(value, int):
        return b"i" + value.to_bytes(8, "little", signed=True)
    if isinstance(value, float):
        return b"f" + struct.pack("<d", value)
    vector = np.asarray(value, dtype="<f4")  # a float vector: its float32 little-endian bytes
    return b"v" + len(vector).to_bytes(8, "little") + vector.tobytes()


@dataclass
class _Scan:
    """What one pass over a collection saw: (primary key, updated_at, row digest) per row."""

    name: str
    rows: list[tuple[str, int, bytes]] = field(default_factory=list)

    def total(self) -> TableSum:
        digest = hashlib.sha256()
        for pk, _, row in sorted(self.rows):
            digest.update(_encode(pk) + row)
        return TableSum(len(self.rows), digest.hexdigest())


def _read(client: Any, name: str, fields: list[str], expr: str = "") -> Iterator[list[dict[str, Any]]]:
    with _milvus(f"reading {name}"):
        iterator = client.query_iterator(name, batch_size=_READ_BATCH, filter=expr, output_fields=fields)
    try:
        while batch := _next(iterator, name):
            yield [dict(r) for r in batch]
    finally:
        iterator.close()


def _next(iterator: Any, name: str) -> list[Any]:
    with _milvus(f"reading {name}"):
        return list(iterator.next())


def _scan(
    client: Any, name: str, schema: dict[str, Any], *, since: int | None = None, out: Path | None = None
) -> _Scan:
    """Read the rows (those with updated_at >= `since`), hash them, and write them to Parquet `out`."""
    fields = [f["name"] for f in _data_fields(schema)]
    if UPDATED not in fields:
        raise CheckFailed(f"Milvus collection {name} has no {UPDATED} field to ship changes by")
    pk, scan = _pk(schema), _Scan(name)
    writer = pq.ParquetWriter(out, _arrow_schema(name, schema)) if out is not None else None
    try:
        for batch in _read(client, name, fields, f"{UPDATED} >= {since}" if since is not None else ""):
            if writer is not None:
                writer.write_table(pa.Table.from_pylist(batch, schema=writer.schema))
            for row in batch:
                digest = hashlib.sha256(b"".join(_encode(row[f]) for f in fields)).digest()
                scan.rows.append((str(row[pk]), int(row[UPDATED]), digest))
    finally:
        if writer is not None:
            writer.close()
    return scan


def _ids_digest(ids: dict[str, list[str]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(ids):
        digest.update(_encode(name) + len(ids[name]).to_bytes(8, "little"))
        for pk in sorted(ids[name]):
            digest.update(_encode(pk))
    return digest.hexdigest()


def _watermark(scans: list[_Scan], ids: dict[str, list[str]], started: float, since: int | None) -> dict[str, Any]:
    """The newest updated_at seen, but never past the scan's start: a row written during the scan behind
    the iterator's cursor has updated_at >= the start, so the next pass reads it."""
    seen = max((u for s in scans for _, u, _ in s.rows), default=None)
    at = (since or 0) if seen is None else max(since or 0, min(seen, int(started)))
    edge = sorted((s.name, pk, d) for s in scans for pk, u, d in s.rows if u >= at)
    digest = hashlib.sha256(b"".join(_encode(n) + _encode(pk) + d for n, pk, d in edge)).hexdigest()
    return {UPDATED: at, "ids_digest": _ids_digest(ids), "edge_digest": digest}


def _ensure(store: DepartmentStore, name: str, schema: dict[str, Any]) -> None:
    """Create the collection as the core does, and refuse one whose shape differs from the backup's."""
    with _milvus(f"creating {name}"):
        store.ensure_department(_department(name))
    have, want = _shape(_describe(store.client, name)), _shape(schema)
    differ = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
    if differ:
        raise CheckFailed(
            f"Milvus collection {name}: the backed-up schema differs from the one this core creates "
            f"({', '.join(differ)})",
            hint="restore with the release that made the backup",
        )


def _load(client: Any, name: str, path: Path, *, upsert: bool) -> int:
    rows = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_WRITE_BATCH):
        with _milvus(f"writing {name}"):
            (client.upsert if upsert else client.insert)(name, batch.to_pylist())
        rows += batch.num_rows
    return rows


def _keys(client: Any, name: str, schema: dict[str, Any]) -> list[str]:
    pk = _pk(schema)
    return [str(r[pk]) for batch in _read(client, name, [pk]) for r in batch]


def _untar(shipment: Path, dest: Path) -> dict[str, Any]:
    """The shipment's files (only the names a shipment has, never a path) and its manifest."""
    try:
        with tarfile.open(shipment) as tar:
            for member in tar.getmembers():
                source = tar.extractfile(member) if _MEMBER.fullmatch(member.name) else None
                if source is None:
                    raise CheckFailed(f"vectors shipment {shipment.name} holds an unexpected entry {member.name!r}")
                with source, (dest / member.name).open("wb") as out:
                    shutil.copyfileobj(source, out)
        manifest: dict[str, Any] = json.loads((dest / "manifest.json").read_text())["collections"]
        files = {p.name for p in dest.iterdir()}
        for name in manifest:
            missing = {f"{name}.rows.parquet", f"{name}.ids.parquet"} - files
            if missing:
                raise KeyError(f"no {', '.join(sorted(missing))}")
    except (tarfile.TarError, OSError, ValueError, KeyError) as exc:
        raise CheckFailed(f"vectors shipment {shipment.name} is unreadable: {exc}") from None
    return manifest


class VectorsStore(Store):
    name: ClassVar[str] = "vectors"

    def backup(
        self, bucket: DrBucket, place: Place, prefix: str, previous: StoreBackup | None, progress: Progress
    ) -> StoreBackup:
        started = time.time()  # always full: Milvus has no incremental export
        objects: dict[str, str] = {}
        keys: dict[str, dict[str, str]] = {}
        scans: list[_Scan] = []
        client = place.vectors()
        try:
            with tempfile.TemporaryDirectory(prefix="membria-dr-vectors-") as tmp:
                for name in _collections(client):
                    schema = _describe(client, name)
                    local = Path(tmp) / f"{name}.parquet"
                    scans.append(_scan(client, name, schema, out=local))
                    keys[name] = {"data": f"{prefix}{name}.parquet", "schema": f"{prefix}{name}.schema.json"}
                    objects[keys[name]["data"]] = bucket.put_file(keys[name]["data"], local).sha256
                    objects[keys[name]["schema"]] = bucket.put_json(keys[name]["schema"], schema).sha256
                    local.unlink()
                    progress(f"vectors: {name}: {len(scans[-1].rows)} rows")
        finally:
            client.close()
        ids = {s.name: [pk for pk, _, _ in s.rows] for s in scans}
        return StoreBackup(
            self.name,
            objects,
            {s.name: s.total() for s in scans},
            _watermark(scans, ids, started, None),
            started,
            extra={"collections": keys},
        )

    def changes(self, place: Place, watermark: dict[str, Any] | None, workdir: Path) -> ShipBatch | None:
        try:
            since = None if watermark is None else int(watermark[UPDATED])
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"vectors watermark {watermark!r} has no integer {UPDATED}") from None
        started = time.time()
        with tempfile.TemporaryDirectory(prefix=".vectors-", dir=workdir) as tmp:
            parts, collections, scans, ids = Path(tmp), {}, [], {}
            client = place.vectors()
            try:
                for name in _collections(client):
                    schema = _describe(client, name)
                    # The keys first: a row added after this read is upserted after the deletes, not deleted.
                    ids[name] = _keys(client, name, schema)
                    pq.write_table(pa.table({"pk": pa.array(ids[name], pa.string())}), parts / f"{name}.ids.parquet")
                    scans.append(_scan(client, name, schema, since=since, out=parts / f"{name}.rows.parquet"))
                    collections[name] = {"schema": schema, "rows": len(scans[-1].rows), "ids": len(ids[name])}
            finally:
                client.close()
            mark = _watermark(scans, ids, started, since)
            if mark == watermark:
                return None  # the same keys, and the rows at or after the watermark are the ones already shipped
            (parts / "manifest.json").write_text(json.dumps({"format": 1, "collections": collections}))
            out = workdir / f"vectors-{int(started)}-{mark['ids_digest'][:12]}.tar"
            partial = out.with_name(f".{out.name}.tmp")
            with tarfile.open(partial, "w") as tar:
                for member in sorted(parts.iterdir()):
                    tar.add(member, arcname=member.name)
            os.replace(partial, out)
        return ShipBatch(out, mark, sum(len(s.rows) for s in scans), started)

    def restore(self, bucket: DrBucket, backup: StoreBackup, target: Place, workdir: Path, progress: Progress) -> None:
        collections: dict[str, dict[str, str]] = backup.extra.get("collections", {})
        client = target.vectors()
        try:
            for name in _collections(client):
                if _keys(client, name, _describe(client, name)):
                    raise CheckFailed(f"the restore target already has rows in Milvus collection {name}")
            store = DepartmentStore(client)
            for name in sorted(backup.sums):  # every collection created and checked before any row is written
                keys = collections.get(name)
                if keys is None:
                    raise CheckFailed(f"the backup lists Milvus collection {name} but not its objects")
                _ensure(store, name, bucket.get_json(keys["schema"], expect_sha256=backup.objects.get(keys["schema"])))
            for name in sorted(backup.sums):
                keys = collections[name]
                local = workdir / f"{name}.parquet"
                bucket.get_file(keys["data"], local, expect_sha256=backup.objects.get(keys["data"]))
                rows = _load(client, name, local, upsert=False)
                local.unlink()
                progress(f"vectors: {name}: {rows} rows restored")
        finally:
            client.close()

    def apply(self, shipment: Path, target: Place) -> int:
        applied = 0
        with tempfile.TemporaryDirectory(prefix=".vectors-", dir=shipment.parent) as tmp:
            parts = Path(tmp)
            collections = _untar(shipment, parts)
            client = target.vectors()
            try:
                for name in _collections(client):
                    if name not in collections:  # dropped at the source
                        applied += len(_keys(client, name, _describe(client, name)))
                        with _milvus(f"dropping {name}"):
                            client.drop_collection(name)
                store = DepartmentStore(client)
                for name, part in sorted(collections.items()):
                    _ensure(store, name, part["schema"])  # also checks the name: only then it names files
                    wanted = set(pq.read_table(parts / f"{name}.ids.parquet").column("pk").to_pylist())
                    stale = sorted(set(_keys(client, name, part["schema"])) - wanted)
                    for start in range(0, len(stale), _WRITE_BATCH):
                        with _milvus(f"deleting from {name}"):
                            client.delete(name, ids=stale[start : start + _WRITE_BATCH])
                    applied += len(stale) + _load(client, name, parts / f"{name}.rows.parquet", upsert=True)
            finally:
                client.close()
        return applied

    def sums(self, place: Place) -> dict[str, TableSum]:
        client = place.vectors()
        try:
            return {name: _scan(client, name, _describe(client, name)).total() for name in _collections(client)}
        finally:
            client.close()
