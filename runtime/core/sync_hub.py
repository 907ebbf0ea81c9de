"""The core's sync hub: the replica (id "core") every device pushes to and pulls from, fed by document ingest.

It is `runtime.common.replica.ReplicaStore` on its own SQLite file in the core's data dir, plus one
bookkeeping table (`hub_document_chunks`: which chunk ids a document has) so that a re-upload or a delete
can tombstone the chunks that went away. Both are written in one transaction.

Ingest: every chunk of an ingested document becomes a `chunk` record (record_id = the chunk id, payload
`{doc_id, title, text, labels, chunk_index}`, topic None: documents carry no topic yet); chunks that
disappeared become tombstones. Re-ingesting an unchanged document writes nothing.

Push (`push`): a device's records go to the hub only: chunks a device wrote are *not* put into Milvus
(the core's RAG does not see them; out of scope for now). Every record's department must be in the caller's
sync scope (`departments`, filled by the gateway from RBAC), LoRA records are refused, and the hub merges
only the pusher's own clock entry: a device vouches for its own changes, not for what it holds of others'
(its clock covers only its subscription).

Pull (`pull`): `ReplicaStore.export` for the device's clock and subscription, a patch or a snapshot.

A device restored from an older copy shows a clock behind what the hub already has from it. Its pushes
are then ignored (nothing applied, `accepted: 0`: its seqs may name other changes already here), and its
next pull gets the whole subscribed state whatever clock it sends; applying that gives its unsynced writes
fresh seqs (`ReplicaStore.apply`), and the push after it carries them. No special client code is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.common.ingest import PreparedDocument
from runtime.common.replica import (
    DEFAULT_MAX_PATCH_BYTES,
    LocalWrite,
    LoraNotShareable,
    Record,
    ReplicaStore,
    SyncError,
    SyncFormatError,
    SyncPayload,
)
from runtime.common.sync_wire import check_department
from runtime.common.vclock import ClockFormatError, VectorClock, validate_replica_id

log = logging.getLogger("membria.core.sync")

HUB_REPLICA_ID = "core"
_LOCK_STRIPES = 64
_SCHEMA = """
CREATE TABLE IF NOT EXISTS hub_document_chunks (
    department TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    PRIMARY KEY (department, doc_id, chunk_id)
) WITHOUT ROWID
"""


class SyncForbidden(SyncError):
    """A push outside the caller's sync scope (the API answers 403)."""


@dataclass(frozen=True)
class PushResult:
    accepted: int
    clock: VectorClock

    def to_wire(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "clock": self.clock.to_json()}


class SyncHub:
    def __init__(
        self,
        path: str | Path,
        *,
        replica_id: str = HUB_REPLICA_ID,
        max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES,
    ) -> None:
        self.store = ReplicaStore(path, replica_id)
        self.max_patch_bytes = max_patch_bytes
        with self.store.transaction() as batch:
            batch.conn.execute(_SCHEMA)
        self._doc_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    @property
    def replica_id(self) -> str:
        return self.store.replica_id

    def close(self) -> None:
        self.store.close()

    # -- ingest ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def document_lock(self, department: str, doc_id: str) -> Iterator[None]:
        """Hold around a document's store write and its hub update, so two uploads of one document reach
        the hub in the order they reached Milvus."""
        digest = hashlib.sha256(f"{department}\x1f{doc_id}".encode()).digest()
        with self._doc_locks[digest[0] % _LOCK_STRIPES]:
            yield

    def document_replaced(self, prepared: PreparedDocument) -> list[Record]:
        """Record the document's current chunks (and tombstones for the ones it lost); the new versions."""
        department, doc_id = prepared.department, prepared.doc_id
        new_ids = list(prepared.chunk_ids)
        writes = [
            LocalWrite(
                "chunk",
                chunk_id,
                department,
                None,
                {"doc_id": doc_id, "title": prepared.title, "text": text, "labels": [], "chunk_index": index},
            )
            for index, (chunk_id, text) in enumerate(zip(new_ids, prepared.texts, strict=True))
        ]
        with self.store.transaction() as batch:
            old_ids = self._document_chunks(batch.conn, department, doc_id)
            gone = sorted(old_ids - set(new_ids))
            writes += [LocalWrite("chunk", chunk_id, department, None, None, True) for chunk_id in gone]
            changed = batch.write_many(writes)
            batch.conn.execute(
                "DELETE FROM hub_document_chunks WHERE department = ? AND doc_id = ?", (department, doc_id)
            )
            batch.conn.executemany(
                "INSERT OR IGNORE INTO hub_document_chunks (department, doc_id, chunk_id) VALUES (?, ?, ?)",
                [(department, doc_id, chunk_id) for chunk_id in new_ids],
            )
        if changed:
            log.info("sync hub: %s/%s: %d record(s) changed (%d removed)", department, doc_id, len(changed), len(gone))
        return changed

    def document_deleted(self, department: str, doc_id: str) -> list[Record]:
        """Tombstone every chunk of the document; the tombstones."""
        with self.store.transaction() as batch:
            gone = sorted(self._document_chunks(batch.conn, department, doc_id))
            changed = batch.write_many(LocalWrite("chunk", chunk_id, department, None, None, True) for chunk_id in gone)
            batch.conn.execute(
                "DELETE FROM hub_document_chunks WHERE department = ? AND doc_id = ?", (department, doc_id)
            )
        return changed

    @staticmethod
    def _document_chunks(conn: Any, department: str, doc_id: str) -> set[str]:
        rows = conn.execute(
            "SELECT chunk_id FROM hub_document_chunks WHERE department = ? AND doc_id = ?", (department, doc_id)
        )
        return {str(row[0]) for row in rows}

    # -- the wire -------------------------------------------------------------------------------------------

    def push(
        self,
        replica: str,
        records: Sequence[Any],
        clock: Mapping[str, Any],
        departments: Sequence[str],
    ) -> PushResult:
        """Merge a device's pushed records (wire objects). Raises SyncFormatError (malformed), SyncForbidden
        (outside `departments`), LoraNotShareable; nothing is applied unless all is well."""
        replica = _replica(replica)
        if replica == self.replica_id:
            raise SyncForbidden(f"replica id {replica!r} is the hub's own")
        scope = _scope(departments)
        pushed = _clock(clock)
        parsed = [Record.from_wire(item, f"records[{index}]") for index, item in enumerate(records)]
        for index, record in enumerate(parsed):
            where = f"records[{index}] ({record.kind} {record.record_id!r})"
            if record.kind == "lora":
                raise LoraNotShareable(f"{where} is a LoRA adapter: adapters never leave the device that trained them")
            if record.department not in scope:
                raise SyncForbidden(
                    f"{where} is in department {record.department!r}, outside the caller's sync scope "
                    f"({', '.join(sorted(scope))})"
                )
            if record.origin == replica and record.seq > pushed[replica]:
                raise SyncFormatError(
                    f"{where} has seq {record.seq}, beyond the pushed clock's {pushed[replica]} for {replica!r}"
                )
        self.store.observe(pushed)
        if self._restored(replica, pushed):
            return PushResult(0, self.store.clock())
        # A device vouches only for its own origin: its other entries cover only its subscription.
        result = self.store.apply(parsed, pushed.restricted([replica]))
        log.info(
            "sync push from %s: %d record(s), %d accepted, %d ignored",
            replica,
            len(parsed),
            len(result.accepted),
            result.ignored,
        )
        return PushResult(len(result.accepted), self.store.clock())

    def pull(
        self,
        replica: str,
        clock: Mapping[str, Any],
        departments: Sequence[str],
        topics: Sequence[str] | None = None,
        max_patch_bytes: int | None = None,
    ) -> SyncPayload:
        """What `replica` at `clock` lacks in its subscription: a patch, or a snapshot when the delta is at
        least `max_patch_bytes` (capped by the hub's own limit)."""
        replica = _replica(replica)
        scope = _scope(departments)
        since = _clock(clock)
        self.store.observe(since)  # the hub restored from an older copy must not reuse its own seqs
        if self._restored(replica, since):
            since = VectorClock()  # the whole state: its clock cannot be trusted
        limit = self.max_patch_bytes if max_patch_bytes is None else min(max_patch_bytes, self.max_patch_bytes)
        payload = self.store.export(since, departments=sorted(scope), topics=topics, max_patch_bytes=limit)
        log.info("sync pull by %s: %s, %d bytes", replica, payload.mode, payload.bytes)
        return payload

    def _restored(self, replica: str, clock: VectorClock) -> bool:
        """True when `replica` shows a clock behind its own changes the hub already has (an older copy)."""
        known = self.store.clock()[replica]
        if clock[replica] >= known:
            return False
        log.warning(
            "sync: replica %s is at %d of its own changes but the hub has up to %d: a restored older copy; "
            "its pushes wait until it has pulled the whole state",
            replica,
            clock[replica],
            known,
        )
        return True


def _replica(value: Any) -> str:
    try:
        return validate_replica_id(value, "replica")
    except ClockFormatError as exc:
        raise SyncFormatError(str(exc)) from None


def _clock(value: Any) -> VectorClock:
    try:
        return VectorClock.from_json(value, "clock")
    except ClockFormatError as exc:
        raise SyncFormatError(str(exc)) from None


def _scope(departments: Sequence[str]) -> frozenset[str]:
    if not departments:
        raise SyncForbidden("no departments in the caller's sync scope: nothing may be synced")
    for department in departments:
        check_department(department)
    return frozenset(departments)
