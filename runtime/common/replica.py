"""The sync engine: versioned records in SQLite, merged by kind, exchanged as patches or snapshots.

One `ReplicaStore` per replica (each edge device in its `edge.sqlite`, the core's hub in its own file); the
model is in runtime/edge/DESIGN.md ("Sync model"). The store keeps the latest version of each
`(kind, record_id)`; a version is stamped `(origin, seq, lamport)` by the replica that wrote it.

Merge rules, identical on every replica (so any order of exchanges converges):

- `chunk`: last writer wins by `(lamport, origin)`; a delete is a tombstone version like any other write
  (tombstones are kept: they are how a delete reaches a replica that was offline).
- `reasoning`: immutable. A local rewrite of an existing id raises `ImmutableRecord`; from a peer, a later
  version is ignored. If two replicas *created* the same id concurrently, the earliest `(lamport, origin)`
  wins everywhere (otherwise they would never agree); give reasoning records unique ids (uuid) to avoid it.
- `lora`: never leaves its device: `changes_since`, `export` and `state_digest` skip it, and `apply`
  refuses a batch that carries one (`LoraNotShareable`).

A record's department and topic are fixed when it is first written: a replica subscribed to the old
department would never hear that it moved. Write a new id instead. (A later write or delete that gives
no topic keeps the record's topic.)

Clocks: `clock[o] = n` means "the effect of every change of `o` up to `n` *within my subscription* is
here". `apply` writes the records and merges the sender's clock in one transaction, so the clock never
runs ahead of the data. Consequences callers must respect:

- a device that widens its subscription (more departments or topics) must pull with an empty clock
  (`export(VectorClock(), ...)` returns the whole subscribed state), because its clock says nothing about
  the departments it did not hold;
- a device vouches only for its own origin: the hub merges only `clock[pusher]` from a push;
- a replica restored from an older copy reuses seqs that may already name other changes elsewhere. The
  safe procedure is to restore under a *new* replica id (or start from an empty sync database and pull
  everything before writing).
  As a safety net, when a peer shows a replica a later seq of its own origin than its counter, `apply`
  gives its unconfirmed versions fresh seqs (`ApplyResult.restamped`), and the hub sends such a replica
  the whole state (runtime/core/sync_hub.py). The net cannot catch a restored copy that has already
  written as many changes as it lost before it syncs: its clock then looks normal.

Subscriptions: `departments` select records by department; `topics=None` means every topic, a list means
records with one of those topics *plus* untagged (topic `None`) records, which are department-wide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.common import sqlite_db
from runtime.common.sync_wire import (
    DEFAULT_MAX_SNAPSHOT_BYTES,
    KINDS,
    Kind,
    Mode,
    Record,
    SyncError,
    SyncFormatError,
    SyncPayload,
    check_department,
    decode_snapshot,
    encode_snapshot,
)
from runtime.common.vclock import MAX_COUNTER, ClockFormatError, VectorClock, lamport_tick, validate_replica_id

__all__ = [
    "KINDS",
    "SHARED_KINDS",
    "ApplyResult",
    "Batch",
    "ImmutableRecord",
    "Kind",
    "LocalWrite",
    "LoraNotShareable",
    "Mode",
    "Record",
    "ReplicaStore",
    "SyncError",
    "SyncFormatError",
    "SyncPayload",
    "wins",
]

SHARED_KINDS: tuple[Kind, ...] = ("chunk", "reasoning")
DEFAULT_MAX_PATCH_BYTES = 20 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sync_records (
    kind TEXT NOT NULL CHECK (kind IN ('chunk', 'reasoning', 'lora')),
    record_id TEXT NOT NULL,
    department TEXT NOT NULL,
    topic TEXT,
    payload TEXT NOT NULL,
    deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    lamport INTEGER NOT NULL,
    PRIMARY KEY (kind, record_id)
) WITHOUT ROWID;
-- changes_since walks each origin's seq range; snapshots and digests select by department.
CREATE INDEX IF NOT EXISTS sync_records_by_origin ON sync_records (origin, seq);
CREATE INDEX IF NOT EXISTS sync_records_by_department ON sync_records (department, topic);
CREATE TABLE IF NOT EXISTS sync_clock (
    origin TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sync_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    replica_id TEXT NOT NULL,
    counter INTEGER NOT NULL,
    lamport INTEGER NOT NULL
);
"""
_COLUMNS = "kind, record_id, department, topic, payload, deleted, origin, seq, lamport"


class ImmutableRecord(SyncError):
    """A local rewrite or delete of an existing reasoning record."""


class LoraNotShareable(SyncError):
    """A LoRA adapter record offered to another replica: adapters never leave their device."""


@dataclass(frozen=True)
class LocalWrite:
    """One write for `ReplicaStore.local_write_many` (the same arguments as `local_write`)."""

    kind: Kind
    record_id: str
    department: str
    topic: str | None = None
    payload: Mapping[str, Any] | None = None
    deleted: bool = False


@dataclass(frozen=True)
class ApplyResult:
    accepted: list[Record]  # versions that changed local state: reindex them, drop answers built on them
    ignored: int  # incoming versions that changed nothing (older, duplicates, later reasoning rewrites)
    # own versions given fresh seqs because this replica turned out to be a restored older copy (content
    # unchanged; the next push carries them)
    restamped: list[Record] = dataclasses.field(default_factory=list)


# -- the merge rule -------------------------------------------------------------------------------------------


def wins(incoming: Record, current: Record | None) -> bool:
    """Does `incoming` replace `current` (the stored version of the same key)? The same on every replica."""
    if current is None:
        return True
    if incoming.version == current.version:
        return False  # the same version again (a replayed or duplicated transfer)
    if incoming.kind == "reasoning":
        return incoming.version < current.version  # the first creation wins; later rewrites never do
    return incoming.version > current.version


# -- the store ------------------------------------------------------------------------------------------------


class Batch:
    """Local writes inside one transaction of `ReplicaStore.transaction()`; `conn` is there for the caller's
    own bookkeeping tables in the same file, so they commit (or roll back) with the records."""

    def __init__(self, store: ReplicaStore, conn: sqlite3.Connection) -> None:
        self._store = store
        self.conn = conn

    def write_many(self, writes: Iterable[LocalWrite]) -> list[Record]:
        """The new versions (writes identical to the stored version change nothing and are left out)."""
        return [record for record, new in self._store._write_local(self.conn, writes) if new]


class ReplicaStore:
    """One replica's records, clock and counters in SQLite (see the module docstring for the rules).

    Thread-safe: one connection behind a lock. Several `ReplicaStore`s (or processes) may share a file: writes
    take SQLite's write lock up front (`BEGIN IMMEDIATE`), reads run in one snapshot."""

    def __init__(self, path_or_conn: str | Path | sqlite3.Connection, replica_id: str) -> None:
        try:
            self.replica_id = validate_replica_id(replica_id)
        except ClockFormatError as exc:
            raise SyncError(str(exc)) from None
        # A connection passed in stays the caller's (not closed here) and must not be inside a transaction.
        self._own_conn = not isinstance(path_or_conn, sqlite3.Connection)
        self._conn: sqlite3.Connection = (
            path_or_conn if isinstance(path_or_conn, sqlite3.Connection) else sqlite_db.connect(path_or_conn)
        )
        self._lock = threading.RLock()
        try:
            self._conn.executescript(_SCHEMA)  # commits; IF NOT EXISTS makes it idempotent
            with self._write() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO sync_meta (id, replica_id, counter, lamport) VALUES (1, ?, 0, 0)",
                    (self.replica_id,),
                )
                (stored,) = conn.execute("SELECT replica_id FROM sync_meta WHERE id = 1").fetchone()
            if stored != self.replica_id:
                raise SyncError(f"this sync database belongs to replica {stored!r}, not {self.replica_id!r}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._own_conn:
            with self._lock:
                self._conn.close()

    # -- transactions ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot for several SELECTs (the clock must match the records read with it)."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.rollback()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Batch]:
        """Local writes and the caller's own SQL in one transaction."""
        with self._write() as conn:
            yield Batch(self, conn)

    # -- reading ----------------------------------------------------------------------------------------

    def clock(self) -> VectorClock:
        with self._lock:
            return self._clock(self._conn)

    def counter(self) -> int:
        """The last seq this replica gave one of its own writes."""
        with self._lock:
            return int(self._conn.execute("SELECT counter FROM sync_meta WHERE id = 1").fetchone()[0])

    def lamport(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT lamport FROM sync_meta WHERE id = 1").fetchone()[0])

    def get(self, kind: Kind, record_id: str) -> Record | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM sync_records WHERE kind = ? AND record_id = ?",  # noqa: S608
                (kind, record_id),
            ).fetchone()
        return None if row is None else _row_record(row)

    def count(self, kind: Kind | None = None, *, include_tombstones: bool = False) -> int:
        sql = "SELECT count(*) FROM sync_records WHERE (?1 IS NULL OR kind = ?1) AND (?2 OR deleted = 0)"
        with self._lock:
            return int(self._conn.execute(sql, (kind, include_tombstones)).fetchone()[0])

    def records(
        self, *, departments: Collection[str] | None = None, topics: Collection[str] | None = None
    ) -> list[Record]:
        """Every shareable record (tombstones included, LoRA left out) in the subscription, by key."""
        with self._read() as conn:
            return self._state(conn, departments, topics)

    def changes_since(
        self,
        clock: Mapping[str, int],
        *,
        departments: Collection[str] | None = None,
        topics: Collection[str] | None = None,
    ) -> list[Record]:
        """Shareable records whose `seq > clock[origin]` (LoRA never), optionally within a subscription."""
        since = clock if isinstance(clock, VectorClock) else VectorClock(clock)
        with self._read() as conn:
            return self._changes(conn, since, departments, topics)

    def state_digest(self, departments: Collection[str] | None = None, topics: Collection[str] | None = None) -> str:
        """sha256 of the shareable state (every field of every version, LoRA left out), for tests and drills:
        two replicas with the same subscription agree on it exactly when they hold the same versions."""
        digest = hashlib.sha256()
        for r in self.records(departments=departments, topics=topics):
            fields = (r.kind, r.record_id, r.department, r.topic or "", r.payload_json, str(int(r.deleted)))
            digest.update("\x1f".join((*fields, r.origin, str(r.seq), str(r.lamport))).encode() + b"\x1e")
        return digest.hexdigest()

    # -- local writes -------------------------------------------------------------------------------------

    def local_write(
        self,
        kind: Kind,
        record_id: str,
        *,
        department: str,
        topic: str | None = None,
        payload: Mapping[str, Any] | None = None,
        deleted: bool = False,
    ) -> Record:
        """Write (or delete: `deleted=True`, no payload) one record as this replica; returns the stored version.

        Writing what is already stored changes nothing and returns the stored version. Raises
        `ImmutableRecord` for a rewrite or delete of an existing reasoning record, `SyncError` for a record
        moved to another department or topic, `SyncFormatError` for malformed fields."""
        write = LocalWrite(kind, record_id, department, topic, payload, deleted)
        with self._write() as conn:
            ((record, _),) = self._write_local(conn, [write])
        return record

    def local_delete(self, kind: Kind, record_id: str) -> Record | None:
        """Tombstone an existing record (None when there is no such record)."""
        with self._write() as conn:
            current = self._fetch(conn, [(kind, record_id)]).get((kind, record_id))
            if current is None:
                return None
            write = LocalWrite(kind, record_id, current.department, current.topic, None, True)
            ((record, _),) = self._write_local(conn, [write])
        return record

    def local_write_many(self, writes: Iterable[LocalWrite]) -> list[Record]:
        """Several local writes in one transaction (all or none); returns the new versions."""
        with self.transaction() as batch:
            return batch.write_many(writes)

    def _write_local(self, conn: sqlite3.Connection, writes: Iterable[LocalWrite]) -> list[tuple[Record, bool]]:
        items = list(writes)
        counter, lamport = conn.execute("SELECT counter, lamport FROM sync_meta WHERE id = 1").fetchone()
        current = self._fetch(conn, [(w.kind, w.record_id) for w in items])
        out: list[tuple[Record, bool]] = []
        fresh: dict[tuple[str, str], Record] = {}
        for w in items:
            existing = current.get((w.kind, w.record_id))
            topic = w.topic
            if existing is not None:
                if w.department != existing.department:
                    raise SyncError(
                        f"{w.kind} {w.record_id!r} belongs to department {existing.department!r}; a record cannot "
                        f"move to {w.department!r}: write it under a new id"
                    )
                if topic is None:
                    topic = existing.topic  # topics never change: None means "whatever it has"
                if topic != existing.topic:
                    raise SyncError(
                        f"{w.kind} {w.record_id!r} has topic {existing.topic!r}; a record cannot move to topic "
                        f"{topic!r}: write it under a new id"
                    )
            if w.deleted and w.payload:
                raise SyncFormatError(f"{w.kind} {w.record_id!r}: a delete carries no payload")
            if not w.deleted and w.payload is None:
                raise SyncFormatError(f"{w.kind} {w.record_id!r}: a write needs a payload (a JSON object)")
            if w.kind == "reasoning" and w.deleted:
                raise ImmutableRecord(f"reasoning record {w.record_id!r} cannot be deleted: reasoning is immutable")
            if counter >= MAX_COUNTER:
                raise SyncError(f"replica {self.replica_id!r} has used every sequence number")
            candidate = Record(
                kind=w.kind,
                record_id=w.record_id,
                department=w.department,
                topic=topic,
                payload={} if w.deleted else dict(w.payload or {}),
                deleted=w.deleted,
                origin=self.replica_id,
                seq=counter + 1,
                lamport=lamport_tick(max(lamport, existing.lamport if existing else 0)),
            )
            if existing is not None and candidate.same_content(existing):
                out.append((existing, False))
                continue
            if existing is not None and w.kind == "reasoning":
                raise ImmutableRecord(
                    f"reasoning record {w.record_id!r} already exists (written by {existing.origin!r}): "
                    "reasoning is immutable, write a new id"
                )
            counter, lamport = candidate.seq, candidate.lamport
            current[candidate.key] = candidate
            fresh[candidate.key] = candidate
            out.append((candidate, True))
        if fresh:
            self._store(conn, fresh.values())
            conn.execute("UPDATE sync_meta SET counter = ?, lamport = ? WHERE id = 1", (counter, lamport))
            self._merge_clock(conn, {self.replica_id: counter})
        return out

    # -- exchange -----------------------------------------------------------------------------------------

    def apply(self, records: Iterable[Record], remote_clock: Mapping[str, int]) -> ApplyResult:
        """Merge a peer's records, then its clock, in one transaction (all or nothing).

        `remote_clock` is what the sender vouches for: for each origin, every change up to that seq within
        this replica's subscription is in `records` or already here. Raises `LoraNotShareable` (nothing is
        applied) if any record is a LoRA adapter."""
        incoming = list(records)
        for index, record in enumerate(incoming):
            if not isinstance(record, Record):
                raise SyncFormatError(f"records[{index}] is a {type(record).__name__}, not a Record")
            if record.kind == "lora":
                raise LoraNotShareable(
                    f"records[{index}] ({record.record_id!r}, from {record.origin!r}) is a LoRA adapter: "
                    "adapters never leave the device that trained them"
                )
        try:
            clock = remote_clock if isinstance(remote_clock, VectorClock) else VectorClock(remote_clock)
        except ClockFormatError as exc:
            raise SyncFormatError(str(exc)) from None
        with self._write() as conn:
            current: dict[tuple[str, str], Record | None] = dict(self._fetch(conn, [r.key for r in incoming]))
            winners: dict[tuple[str, str], Record] = {}
            for record in incoming:
                if wins(record, current.get(record.key)):
                    current[record.key] = record
                    winners[record.key] = record
            if winners:
                self._store(conn, winners.values())
            self._merge_clock(conn, clock)
            counter, lamport = conn.execute("SELECT counter, lamport FROM sync_meta WHERE id = 1").fetchone()
            lamport = max(lamport, *(r.lamport for r in incoming)) if incoming else lamport
            own_seen = max([clock[self.replica_id]] + [r.seq for r in incoming if r.origin == self.replica_id])
            restamped: list[Record] = []
            if own_seen > counter:
                restamped = self._restamp(conn, counter, own_seen, lamport, incoming)
                counter = own_seen + len(restamped)
                lamport += len(restamped)
                self._merge_clock(conn, {self.replica_id: counter})
            conn.execute("UPDATE sync_meta SET counter = ?, lamport = ? WHERE id = 1", (counter, lamport))
        return ApplyResult(list(winners.values()), len(incoming) - len(winners), restamped)

    def _restamp(
        self, conn: sqlite3.Connection, counter: int, own_seen: int, lamport: int, incoming: list[Record]
    ) -> list[Record]:
        """A peer knows changes of this replica's origin past its counter: this replica was restored from an
        older copy, and the seqs it gave since may already name other changes elsewhere (a peer holding them
        would never ask for these). Give every own version the peer did not just confirm a fresh seq after
        `own_seen`, so the next push carries it. LoRA records stay as they are (they never travel)."""
        confirmed = {(r.kind, r.record_id, r.seq) for r in incoming if r.origin == self.replica_id}
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM sync_records"  # noqa: S608 - a constant column list; values are bound
            " WHERE origin = ? AND seq <= ? AND kind != 'lora' ORDER BY seq",
            (self.replica_id, counter),
        )
        stale = [r for r in map(_row_record, rows) if (r.kind, r.record_id, r.seq) not in confirmed]
        fresh = [dataclasses.replace(r, seq=own_seen + n, lamport=lamport + n) for n, r in enumerate(stale, start=1)]
        self._store(conn, fresh)
        return fresh

    def observe(self, clock: Mapping[str, int]) -> None:
        """A peer's clock says this replica's own origin went further than its counter (it was restored from
        an older copy): move the counter past it so no seq is given twice. Unlike `apply` this re-stamps
        nothing: the peer's clock alone does not say which of this replica's versions it already has."""
        with self._write() as conn:
            conn.execute(
                "UPDATE sync_meta SET counter = max(counter, ?) WHERE id = 1", (clock.get(self.replica_id, 0),)
            )

    def export(
        self,
        since: Mapping[str, int],
        *,
        departments: Collection[str],
        topics: Collection[str] | None = None,
        max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES,
    ) -> SyncPayload:
        """What a peer at clock `since` subscribed to `departments`/`topics` lacks: a patch when the encoded
        delta is under `max_patch_bytes`, otherwise a snapshot of the whole subscribed state. An empty `since`
        asks for everything (what a device must do after widening its subscription)."""
        if not departments:
            raise SyncError("a subscription names at least one department")
        for department in departments:
            check_department(department)
        start = since if isinstance(since, VectorClock) else VectorClock(since)
        with self._read() as conn:
            clock = self._clock(conn)
            changes = self._changes(conn, start, departments, topics)
            size, parts = 2, []  # 2: the brackets
            for record in changes:
                parts.append(record.wire_json())
                size += len(parts[-1].encode()) + (1 if len(parts) > 1 else 0)  # and the commas
                if size >= max_patch_bytes:
                    break
            if size < max_patch_bytes:
                return SyncPayload("patch", tuple(changes), None, clock, size, "[" + ",".join(parts) + "]")
            state = self._state(conn, departments, topics)
        blob = encode_snapshot(
            state,
            clock,
            replica=self.replica_id,
            departments=sorted(departments),
            topics=None if topics is None else sorted(topics),
        )
        return SyncPayload("snapshot", None, blob, clock, 4 * ((len(blob) + 2) // 3))

    def import_payload(
        self, payload: SyncPayload, *, max_snapshot_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES
    ) -> ApplyResult:
        """Apply a pulled patch or snapshot through the same merge as `apply`."""
        if payload.mode == "patch":
            return self.apply(payload.records or (), payload.clock)
        if payload.snapshot is None:
            raise SyncFormatError("a snapshot payload without snapshot bytes")
        records, clock, _ = decode_snapshot(payload.snapshot, max_bytes=max_snapshot_bytes)
        if clock != payload.clock:
            raise SyncFormatError(
                f"the snapshot's clock {clock.to_json()} is not the payload's {payload.clock.to_json()}"
            )
        return self.apply(records, clock)

    # -- SQL --------------------------------------------------------------------------------------------------

    @staticmethod
    def _clock(conn: sqlite3.Connection) -> VectorClock:
        return VectorClock(conn.execute("SELECT origin, seq FROM sync_clock").fetchall())

    @staticmethod
    def _merge_clock(conn: sqlite3.Connection, clock: Mapping[str, int]) -> None:
        conn.executemany(
            "INSERT INTO sync_clock (origin, seq) VALUES (?, ?)"
            " ON CONFLICT (origin) DO UPDATE SET seq = max(seq, excluded.seq)",
            [(o, s) for o, s in clock.items() if s > 0],
        )

    @staticmethod
    def _store(conn: sqlite3.Connection, records: Iterable[Record]) -> None:
        conn.executemany(
            f"INSERT OR REPLACE INTO sync_records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            [
                (r.kind, r.record_id, r.department, r.topic, r.payload_json, int(r.deleted), r.origin, r.seq, r.lamport)
                for r in records
            ],
        )

    @staticmethod
    def _fetch(conn: sqlite3.Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Record]:
        by_kind: dict[str, list[str]] = {}
        for kind, record_id in set(keys):
            by_kind.setdefault(kind, []).append(record_id)
        found: dict[tuple[str, str], Record] = {}
        for kind, ids in by_kind.items():
            # One bound parameter (a JSON array) whatever the batch size; the primary key does the lookups.
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM sync_records"  # noqa: S608 - a constant column list; values are bound
                " WHERE kind = ? AND record_id IN (SELECT value FROM json_each(?))",
                (kind, json.dumps(ids)),
            )
            for row in rows:
                record = _row_record(row)
                found[record.key] = record
        return found

    @staticmethod
    def _origins(conn: sqlite3.Connection) -> Iterator[str]:
        """Distinct origins by hopping along the (origin, seq) index: one lookup per origin, not a scan."""
        origin = conn.execute("SELECT min(origin) FROM sync_records").fetchone()[0]
        while origin is not None:
            yield origin
            origin = conn.execute("SELECT min(origin) FROM sync_records WHERE origin > ?", (origin,)).fetchone()[0]

    def _changes(
        self,
        conn: sqlite3.Connection,
        since: VectorClock,
        departments: Collection[str] | None,
        topics: Collection[str] | None,
    ) -> list[Record]:
        scope_sql, scope_params = _scope(departments, topics)
        out: list[Record] = []
        for origin in list(self._origins(conn)):
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM sync_records WHERE origin = ? AND seq > ? AND kind != 'lora'{scope_sql}"  # noqa: S608
                " ORDER BY seq",
                [origin, since[origin], *scope_params],
            )
            out.extend(_row_record(row) for row in rows)
        return out

    @staticmethod
    def _state(
        conn: sqlite3.Connection, departments: Collection[str] | None, topics: Collection[str] | None
    ) -> list[Record]:
        scope_sql, scope_params = _scope(departments, topics)
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM sync_records WHERE kind != 'lora'{scope_sql} ORDER BY kind, record_id",  # noqa: S608
            scope_params,
        )
        return [_row_record(row) for row in rows]


def _scope(departments: Collection[str] | None, topics: Collection[str] | None) -> tuple[str, list[Any]]:
    """SQL for a subscription: departments, and topics (untagged records are department-wide)."""
    sql, params = "", list[Any]()
    if departments is not None:
        sql += f" AND department IN ({','.join('?' * len(departments))})"
        params.extend(departments)
    if topics is not None:
        sql += f" AND (topic IS NULL OR topic IN ({','.join('?' * len(topics))}))"
        params.extend(topics)
    return sql, params


def _row_record(row: Sequence[Any]) -> Record:
    return Record._trusted(row)
