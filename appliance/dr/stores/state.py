"""The runtime's SQLite state's DR: see appliance/dr/DESIGN.md, row `state`.

The files are the place's `sqlite_files()`: the core's sync hub (`sync-hub`) and the gateway's idempotency
store (`gateway-idempotency`). A backup is SQLite's online backup of each file (a consistent copy while the
runtime writes), uploaded through DrBucket. A file that does not exist yet is skipped and named in
`extra["missing"]`.

Shipping (one gzip tar per batch):
- the sync hub: its replica changes since the shipped vector clock (`ReplicaStore.changes_since`) as a sync
  patch, plus the replica's counters and its `hub_document_chunks` bookkeeping table (whole, when it changed).
  Applied through `ReplicaStore.import_payload`, the same merge the hub uses for its peers.
- every other file (the idempotency store): a fresh online copy when the digest of its rows changed; applied
  by replacing the target's file atomically.

Sums: per `<file>:<table>`, the row count and a sha256 over every row in primary-key order (rowid order for
a table without one). SQLite's own tables and virtual tables are left out; the shadow tables that hold a
virtual table's data (FTS5's `_data`, `_content`...) are ordinary tables and counted.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.dr.objects import DrBucket
from appliance.dr.stores.base import Place, Progress, ShipBatch, Store, StoreBackup, TableSum
from appliance.errors import CheckFailed
from runtime.common.replica import Record, ReplicaStore, SyncError, SyncPayload
from runtime.common.vclock import ClockFormatError, VectorClock

HUB = "sync-hub"
IDEMPOTENCY = "gateway-idempotency"
SHIPMENT_FORMAT = "membria-dr-state"
SHIPMENT_VERSION = 1
_HUB_PAYLOAD = "sync-hub.json"
_HUB_META = "sync-hub-meta.json"
_MANIFEST = "manifest.json"


def _digest_key(name: str) -> str:
    """The watermark entry holding a whole-copy file's digest."""
    return "idempotency_digest" if name == IDEMPOTENCY else f"digest:{name}"


# -- SQLite helpers ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _existing(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to a file that must exist (mode=rw never creates one); closed afterwards."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise CheckFailed(f"state: cannot open {path}: {exc}") from None
    # Any bytes a TEXT value holds, even invalid UTF-8, read back losslessly (and hash the same).
    conn.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
    try:
        yield conn
    except sqlite3.DatabaseError as exc:
        raise CheckFailed(f"state: {path} cannot be read as SQLite: {exc}") from None
    finally:
        conn.close()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _tables(conn: sqlite3.Connection) -> list[str]:
    """Tables whose rows `SELECT *` reads: not SQLite's own, not virtual ones (their shadow tables are)."""
    rows = conn.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'table' ORDER BY name").fetchall()
    return [
        str(name)
        for name, sql in rows
        if not str(name).startswith("sqlite_") and not str(sql or "").lstrip().upper().startswith("CREATE VIRTUAL")
    ]


def _order_by(conn: sqlite3.Connection, table: str) -> str:
    pk = sorted((int(row[5]), str(row[1])) for row in conn.execute(f"PRAGMA table_info({_quote(table)})") if row[5])
    listed = conn.execute("SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?", (table,)).fetchone()
    columns = [_quote(column) for _, column in pk]
    if not (listed and listed[0]):
        columns.append("_rowid_")  # the order of a table without a primary key; ties of a nullable one
    return ", ".join(columns)


def _encode(value: Any) -> bytes:
    """One value, typed and length-prefixed, so different rows never hash alike."""
    if value is None:
        return b"n;"
    if isinstance(value, int):
        return b"i%d;" % value
    if isinstance(value, float):
        return b"f" + value.hex().encode() + b";"
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    return (b"s" if isinstance(value, str) else b"b") + b"%d:" % len(raw) + raw


def _table_sum(conn: sqlite3.Connection, table: str) -> TableSum:
    digest, rows = hashlib.sha256(), 0
    cursor = conn.execute(f"SELECT * FROM {_quote(table)} ORDER BY {_order_by(conn, table)}")  # noqa: S608
    for row in cursor:
        digest.update(b"".join(_encode(value) for value in row) + b"\n")
        rows += 1
    return TableSum(rows, digest.hexdigest())


def file_sums(path: Path, name: str) -> dict[str, TableSum]:
    """`<name>:<table>` -> rows and digest, all read in one transaction (one consistent state)."""
    with _existing(path) as conn:
        conn.execute("BEGIN")
        try:
            return {f"{name}:{table}": _table_sum(conn, table) for table in _tables(conn)}
        finally:
            conn.rollback()


def _combined(sums: dict[str, TableSum]) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(sums.items()):
        digest.update(f"{key}\x1f{value.rows}\x1f{value.digest}\x1e".encode())
    return digest.hexdigest()


def _holds_rows(path: Path) -> str | None:
    """The first table of `path` that has a row, or None."""
    with _existing(path) as conn:
        for table in _tables(conn):
            if conn.execute(f"SELECT 1 FROM {_quote(table)} LIMIT 1").fetchone():  # noqa: S608
                return table
    return None


def online_copy(source: Path, dest: Path) -> None:
    """SQLite's online backup of `source` into a new self-contained `dest` (rollback journal, no -wal)."""
    dest.unlink(missing_ok=True)
    with _existing(source) as src:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)  # all pages in one step: one consistent state while writers go on
            out.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.Error as exc:
            raise CheckFailed(f"state: the online backup of {source} failed: {exc}") from None
        finally:
            out.close()


def _release(path: Path) -> None:
    """Fold `path`'s WAL into it and drop the -wal/-shm files, so a replaced file inherits no stale WAL.
    Refuses a file that another connection holds open (a live runtime)."""
    if path.exists():
        with _existing(path) as conn:
            (mode,) = conn.execute("PRAGMA journal_mode = DELETE").fetchone()
        if str(mode).lower() != "delete":
            raise CheckFailed(f"state: {path} is in use by another process; stop it before restoring over it")
    for suffix in ("-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def _replace(staged: Path, dest: Path) -> None:
    """Put `staged` (in dest's directory) in place of `dest` atomically, and make the rename durable."""
    _release(dest)
    os.replace(staged, dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the sync hub -----------------------------------------------------------------------------------------------


def _hub_identity(path: Path) -> tuple[str, int, int]:
    """(replica id, counter, lamport) from the hub's `sync_meta`."""
    with _existing(path) as conn:
        try:
            row = conn.execute("SELECT replica_id, counter, lamport FROM sync_meta WHERE id = 1").fetchone()
        except sqlite3.OperationalError:
            row = None
    if row is None:
        raise CheckFailed(f"state: {path} is not a sync database (no sync_meta row)")
    return str(row[0]), int(row[1]), int(row[2])


def _hub_documents(path: Path) -> list[list[str]]:
    with _existing(path) as conn:
        try:
            rows = conn.execute(
                "SELECT department, doc_id, chunk_id FROM hub_document_chunks ORDER BY department, doc_id, chunk_id"
            ).fetchall()
        except sqlite3.OperationalError:
            return []  # a plain replica file without the hub's bookkeeping
    return [[str(d), str(doc), str(chunk)] for d, doc, chunk in rows]


def _documents_digest(rows: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _hub_watermark(copy: Path) -> dict[str, Any]:
    """What a backup's copy of the hub covers: its clock, counters and bookkeeping digest."""
    replica_id, counter, lamport = _hub_identity(copy)
    with _existing(copy) as conn:
        clock = VectorClock(conn.execute("SELECT origin, seq FROM sync_clock").fetchall())
    return {
        "clock": clock.to_json(),
        "hub_meta": [replica_id, counter, lamport],
        "hub_documents": _documents_digest(_hub_documents(copy)),
    }


def _hub_changes(path: Path, watermark: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any], int] | None:
    """The hub's part of a shipment (members, new watermark entries, items), or None if nothing changed."""
    replica_id, _, _ = _hub_identity(path)
    try:
        since = VectorClock.from_json(watermark.get("clock", {}), "watermark clock")
    except ClockFormatError as exc:
        raise CheckFailed(f"state: the shipped watermark is malformed: {exc}") from None
    try:
        store = ReplicaStore(path, replica_id)
    except SyncError as exc:
        raise CheckFailed(f"state: {path}: {exc}") from None
    try:
        # The clock and counters first: a change made while reading is then shipped again next time (applying
        # it twice changes nothing), never covered by a clock that went out without it.
        clock = store.clock()
        meta = [replica_id, store.counter(), store.lamport()]
        records = store.changes_since(since)
    finally:
        store.close()
    documents = _hub_documents(path)
    documents_digest = _documents_digest(documents)
    documents_changed = documents_digest != watermark.get("hub_documents")
    if not records and clock == since and meta == watermark.get("hub_meta") and not documents_changed:
        return None
    records_json = "[" + ",".join(r.wire_json() for r in records) + "]"
    payload = SyncPayload("patch", tuple(records), None, clock, len(records_json), records_json)
    hub_meta = {
        "replica_id": replica_id,
        "counter": meta[1],
        "lamport": meta[2],
        "documents": documents if documents_changed else None,
    }
    members = {_HUB_PAYLOAD: payload.encode(), _HUB_META: json.dumps(hub_meta).encode()}
    marks = {"clock": clock.to_json(), "hub_meta": meta, "hub_documents": documents_digest}
    return members, marks, len(records) + (len(documents) if documents_changed else 0)


def _apply_hub(path: Path, payload: SyncPayload, meta: dict[str, Any]) -> int:
    from runtime.core.sync_hub import SyncHub  # the hub owns its schema (bookkeeping table included)

    replica_id = str(meta["replica_id"])
    records: tuple[Record, ...] = payload.records or ()
    try:
        hub = SyncHub(path, replica_id=replica_id)
    except SyncError as exc:
        raise CheckFailed(f"state: the restored sync hub {path}: {exc}") from None
    try:
        store = hub.store
        # Replaying the hub's own changes: its counter must first reach their seqs, or `apply` would take the
        # copy for a restored older replica and give its versions new seqs.
        own = max([payload.clock[replica_id]] + [r.seq for r in records if r.origin == replica_id])
        store.observe({replica_id: own})
        store.import_payload(payload)
        documents = meta.get("documents")
        with store.transaction() as batch:
            batch.conn.execute(
                "UPDATE sync_meta SET counter = max(counter, ?), lamport = max(lamport, ?) WHERE id = 1",
                (int(meta["counter"]), int(meta["lamport"])),
            )
            if documents is not None:
                batch.conn.execute("DELETE FROM hub_document_chunks")
                batch.conn.executemany(
                    "INSERT INTO hub_document_chunks (department, doc_id, chunk_id) VALUES (?, ?, ?)",
                    [tuple(row) for row in documents],
                )
    except SyncError as exc:
        raise CheckFailed(f"state: the sync hub shipment does not apply to {path}: {exc}") from None
    finally:
        hub.close()
    return len(records) + (len(documents) if documents is not None else 0)


# -- the store --------------------------------------------------------------------------------------------------


class StateStore(Store):
    name = "state"

    def backup(
        self, bucket: DrBucket, place: Place, prefix: str, previous: StoreBackup | None, progress: Progress
    ) -> StoreBackup:
        objects: dict[str, str] = {}
        files: dict[str, str] = {}
        sums: dict[str, TableSum] = {}
        watermark: dict[str, Any] = {}
        missing: list[str] = []
        source_time = time.time()  # each copy holds at least everything committed before this
        with tempfile.TemporaryDirectory(prefix="membria-dr-state-") as tmp:
            for name, path in sorted(place.sqlite_files().items()):
                if not path.exists():
                    missing.append(name)
                    progress(f"state: {name} ({path}) does not exist yet; skipped")
                    continue
                copy = Path(tmp) / f"{name}.sqlite"
                online_copy(path, copy)
                copy_sums = file_sums(copy, name)
                if name == HUB:
                    watermark.update(_hub_watermark(copy))
                else:
                    watermark[_digest_key(name)] = _combined(copy_sums)
                stored = bucket.put_file(prefix + f"{name}.sqlite", copy)
                objects[stored.key] = stored.sha256
                files[name] = stored.key
                sums.update(copy_sums)
                progress(f"state: {name}: {sum(s.rows for s in copy_sums.values())} rows, {stored.size} bytes")
        return StoreBackup(
            store=self.name,
            objects=objects,
            sums=sums,
            watermark=watermark,
            source_time=source_time,
            extra={"files": files, "missing": missing},
        )

    def changes(self, place: Place, watermark: dict[str, Any] | None, workdir: Path) -> ShipBatch | None:
        mark = dict(watermark or {})
        source_time = time.time()
        members: dict[str, bytes] = {}
        items = 0
        workdir.mkdir(parents=True, exist_ok=True)
        for name, path in sorted(place.sqlite_files().items()):
            if not path.exists():
                continue
            if name == HUB:
                hub = _hub_changes(path, mark)
                if hub is not None:
                    members.update(hub[0])
                    mark.update(hub[1])
                    items += hub[2]
                continue
            copy = workdir / f"{name}.sqlite"
            online_copy(path, copy)
            copy_sums = file_sums(copy, name)
            digest = _combined(copy_sums)
            if digest != mark.get(_digest_key(name)):
                members[f"{name}.sqlite"] = copy.read_bytes()
                mark[_digest_key(name)] = digest
                items += sum(s.rows for s in copy_sums.values())
            copy.unlink()
        if not members:
            return None
        manifest = {"format": SHIPMENT_FORMAT, "version": SHIPMENT_VERSION, "members": sorted(members)}
        members[_MANIFEST] = json.dumps(manifest).encode()
        batch = workdir / "state-shipment.tar.gz"
        _write_tar(batch, members)
        return ShipBatch(path=batch, watermark=mark, items=items, source_time=source_time)

    def restore(self, bucket: DrBucket, backup: StoreBackup, target: Place, workdir: Path, progress: Progress) -> None:
        files: dict[str, str] = dict(backup.extra.get("files", {}))
        places = target.sqlite_files()
        unknown = sorted(set(files) - set(places))
        if unknown:
            raise CheckFailed(f"state: the target has no place for {', '.join(unknown)}")
        for name in files:  # all checks before the first write
            dest = places[name]
            table = _holds_rows(dest) if dest.exists() else None
            if table is not None:
                raise CheckFailed(
                    f"state: {dest} already holds data (table {table} has rows): a restore goes into an empty target"
                )
        for name, key in sorted(files.items()):
            dest = places[name]
            dest.parent.mkdir(parents=True, exist_ok=True)
            _release(dest)
            progress(f"state: restoring {name} into {dest}")
            bucket.get_file(key, dest, expect_sha256=backup.objects[key])  # decrypted, checked, renamed in

    def apply(self, shipment: Path, target: Place) -> int:
        members = _read_tar(shipment)
        places = target.sqlite_files()
        items = 0
        if _HUB_PAYLOAD in members:
            try:
                payload = SyncPayload.from_wire(json.loads(members[_HUB_PAYLOAD]))
                meta = json.loads(members[_HUB_META])
            except (KeyError, ValueError, SyncError) as exc:
                raise CheckFailed(f"state: {shipment}: the sync hub part is malformed: {exc}") from None
            if HUB not in places:
                raise CheckFailed(f"state: {shipment} holds sync hub changes, which the target has no place for")
            items += _apply_hub(places[HUB], payload, meta)
        for member, data in sorted(members.items()):
            if not member.endswith(".sqlite"):
                continue
            name = member.removesuffix(".sqlite")
            if name not in places:
                raise CheckFailed(f"state: {shipment} holds {name}, which the target has no place for")
            dest = places[name]
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, staged_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".dr", dir=dest.parent)
            staged = Path(staged_name)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                staged_sums = file_sums(staged, name)  # also proves it is a readable SQLite file
                _replace(staged, dest)
            finally:
                staged.unlink(missing_ok=True)
            items += sum(s.rows for s in staged_sums.values())
        return items

    def sums(self, place: Place) -> dict[str, TableSum]:
        out: dict[str, TableSum] = {}
        for name, path in sorted(place.sqlite_files().items()):
            if path.exists():
                out.update(file_sums(path, name))
        return out


# -- shipment files ---------------------------------------------------------------------------------------------


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))


def _read_tar(path: Path) -> dict[str, bytes]:
    """The members of a shipment by name (plain files only, read into memory, never extracted to paths)."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                handle = tar.extractfile(info) if info.isfile() else None
                if handle is None or "/" in info.name:
                    raise CheckFailed(f"state: {path}: unexpected member {info.name[:80]!r}")
                out[info.name] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CheckFailed(f"state: {path} is not a state shipment: {exc}") from None
    try:
        manifest = json.loads(out[_MANIFEST])
    except (KeyError, ValueError):
        raise CheckFailed(f"state: {path} is not a state shipment (no manifest)") from None
    if manifest.get("format") != SHIPMENT_FORMAT or manifest.get("version") != SHIPMENT_VERSION:
        raise CheckFailed(f"state: {path} is not a version {SHIPMENT_VERSION} {SHIPMENT_FORMAT} shipment")
    if sorted(set(out) - {_MANIFEST}) != manifest.get("members"):
        raise CheckFailed(f"state: {path}: its members do not match its manifest")
    return out
