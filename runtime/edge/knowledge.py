"""The edge agent's knowledge core: everything the laptop knows, in one SQLite file (WAL).

Tables (this module owns them and no other module touches them):

- `chunks` — document chunks with a version, department, topic and labels ("local-only" ...);
  `chunks_fts` — a contentless FTS5 index of each chunk's title and `ingest.lexical_form(text)` (so
  "VX-55" is also indexed as the fused token "vx55" and an exact identifier outranks its neighbours);
  `chunk_vectors` — a sqlite-vec `vec0` table (cosine distance), rowid = the chunk's rowid, with the
  department as a *partition key* so that a KNN search scans only the departments it is given;
- `kg_entities`, `kg_relations` — a temporal knowledge graph: relations hold from `valid_from` (inclusive)
  to `valid_to` (exclusive, NULL = still valid); a change of fact closes the old relation and adds a new one,
  so history is never rewritten;
- `memory_turns` — conversation turns; `cached_answers` — answers keyed by the normalised question and the
  sorted departments, with the chunk versions they were built from;
- `knowledge_meta` — the schema version and the embedding model the vectors came from.

Retrieval is hybrid: FTS5 BM25 and vec0 KNN candidates (both restricted to the departments asked for) are
fused with reciprocal rank fusion, the same formula as the core's Milvus `RRFRanker`.

One connection per `KnowledgeCore`, guarded by a lock (so one instance may serve several threads); other
modules open their own connections to the same file and WAL lets them read while this one writes. Every
write is one transaction; a write that must read first takes the write lock up front (`BEGIN IMMEDIATE`).
Embedding (slow) happens before the write transaction, never inside it, so other writers are not blocked.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import unicodedata
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from runtime.common.embeddings import DIMENSION, Embedder
from runtime.common.ingest import document_hash, identifiers, lexical_form, normalize_text, prepare_document
from runtime.common.sqlite_db import connect, has_fts5

SCHEMA_VERSION = 1
RRF_K = 60
# The same rule as the core's departments (runtime.core.store.DEPARTMENT_PATTERN); edge code may not import it.
DEPARTMENT_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
_DEPARTMENT_RE = re.compile(DEPARTMENT_PATTERN)
_MAX_QUERY_TERMS = 32
# How much of `coverage` comes from the best hit's similarity (the rest: the question's words found).
COVERAGE_SIMILARITY_WEIGHT = 0.6
_COVERAGE_TOP_HITS = 3

Role = Literal["user", "assistant"]


class KnowledgeError(ValueError):
    """Bad input to the knowledge core, or a file it cannot use; the message says which and why."""


class UnknownEntity(KnowledgeError):
    """No entity of that id or name in the knowledge graph."""


class UnknownRelation(KnowledgeError):
    """No relation of that id in the knowledge graph."""


# -- records ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk as stored. `position` is its order within the document (pinned knowledge keeps it)."""

    chunk_id: str
    doc_id: str
    department: str
    title: str
    text: str
    version: int
    topic: str | None = None
    labels: tuple[str, ...] = ()
    position: int = 0

    def __post_init__(self) -> None:
        # Callers pass lists; a tuple keeps the record hashable and comparable.
        object.__setattr__(self, "labels", tuple(self.labels))


@dataclass(frozen=True)
class UpsertStats:
    inserted: int
    updated: int
    unchanged: int
    changed_ids: tuple[str, ...]  # inserted or updated chunks whose version changed
    vectors_written: int = 0  # vectors embedded, given or moved to another department's partition


@dataclass(frozen=True)
class KnowledgeHit:
    chunk_id: str
    doc_id: str
    version: int
    department: str
    topic: str | None
    title: str
    text: str
    labels: tuple[str, ...]
    score: float  # reciprocal rank fusion score (higher is better)
    similarity: float  # cosine similarity of the chunk to the question, clamped to [0, 1]
    fts_rank: int | None  # 1-based rank in the BM25 candidates, None if not among them
    vector_rank: int | None  # 1-based rank in the KNN candidates, None if not among them
    position: int = 0


@dataclass(frozen=True)
class Entity:
    id: int
    name: str
    type: str
    department: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Relation:
    id: int
    subject: str
    predicate: str
    object: str
    valid_from: datetime
    valid_to: datetime | None
    source_chunk: str | None

    def valid_at(self, at: datetime) -> bool:
        return self.valid_from <= at and (self.valid_to is None or at < self.valid_to)


@dataclass(frozen=True)
class Turn:
    id: int
    conversation_id: str
    role: Role
    text: str
    source: str | None
    created_at: datetime


@dataclass(frozen=True)
class CachedAnswer:
    question: str
    departments: tuple[str, ...]
    answer: str
    source: str
    chunk_versions: dict[str, int] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


# -- schema -----------------------------------------------------------------------------------------------

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS knowledge_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    department TEXT NOT NULL,
    topic TEXT,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    position INTEGER NOT NULL,
    version INTEGER NOT NULL,
    labels TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (department, doc_id, position);
CREATE INDEX IF NOT EXISTS chunks_by_pin ON chunks (doc_id, department, position);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    title, body, content='', tokenize='porter unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE IF NOT EXISTS chunk_vectors USING vec0(
    department text partition key,
    embedding float[{DIMENSION}] distance_metric=cosine
);
CREATE TABLE IF NOT EXISTS kg_entities (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    department TEXT NOT NULL,
    attributes TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kg_relations (
    id INTEGER PRIMARY KEY,
    subject_id INTEGER NOT NULL REFERENCES kg_entities (id) ON DELETE CASCADE,
    predicate TEXT NOT NULL,
    object_id INTEGER NOT NULL REFERENCES kg_entities (id) ON DELETE CASCADE,
    valid_from TEXT NOT NULL,
    valid_to TEXT,
    source_chunk TEXT,
    created_at TEXT NOT NULL,
    CHECK (valid_to IS NULL OR valid_to > valid_from),
    UNIQUE (subject_id, predicate, object_id, valid_from)
);
CREATE INDEX IF NOT EXISTS kg_relations_by_subject ON kg_relations (subject_id, predicate, valid_from);
CREATE INDEX IF NOT EXISTS kg_relations_by_object ON kg_relations (object_id, valid_from);
CREATE TABLE IF NOT EXISTS memory_turns (
    id INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text TEXT NOT NULL,
    source TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS memory_turns_by_conversation ON memory_turns (conversation_id, id);
CREATE TABLE IF NOT EXISTS cached_answers (
    key TEXT PRIMARY KEY,
    question TEXT NOT NULL,
    departments TEXT NOT NULL,
    answer TEXT NOT NULL,
    source TEXT NOT NULL,
    chunk_versions TEXT NOT NULL,
    created_at TEXT NOT NULL,
    invalidated_at TEXT
) WITHOUT ROWID;
"""

_CHUNK_COLUMNS = "id, chunk_id, doc_id, department, topic, title, text, position, version, labels"


@dataclass(frozen=True)
class _Row:
    """A `chunks` row with its rowid (the FTS and vector rows share it)."""

    rowid: int
    record: ChunkRecord


def _row(values: Sequence[Any]) -> _Row:
    rowid, chunk_id, doc_id, department, topic, title, text, position, version, labels = values
    record = ChunkRecord(chunk_id, doc_id, department, title, text, int(version), topic, tuple(json.loads(labels)))
    return _Row(int(rowid), _with_position(record, int(position)))


def _with_position(record: ChunkRecord, position: int) -> ChunkRecord:
    return ChunkRecord(
        record.chunk_id,
        record.doc_id,
        record.department,
        record.title,
        record.text,
        record.version,
        record.topic,
        record.labels,
        position,
    )


# -- the knowledge core -----------------------------------------------------------------------------------


class KnowledgeCore:
    """Chunks + hybrid retrieval, a temporal knowledge graph and agent memory in one SQLite file."""

    def __init__(self, path: Path, embedder: Embedder | None = None) -> None:
        self.path = Path(path)
        self._embedder = embedder
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = connect(self.path, vectors=True, check_same_thread=False)
        try:
            if not has_fts5(self._conn):
                raise KnowledgeError("this Python's SQLite has no FTS5; the knowledge core needs it")
            self._create_schema()
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    # -- lifecycle

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder.shared()
        return self._embedder

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> KnowledgeCore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise KnowledgeError(f"the knowledge core {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from its start (reads inside it stay valid)."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            with conn:  # commits, or rolls back on an exception
                yield conn

    def _create_schema(self) -> None:
        model = self.embedder.model_name  # a name only: the model itself loads on first use
        with self._write() as conn:
            for statement in _statements(_SCHEMA):
                conn.execute(statement)
            stored = dict(conn.execute("SELECT key, value FROM knowledge_meta").fetchall())
            if int(stored.get("schema_version", SCHEMA_VERSION)) > SCHEMA_VERSION:
                raise KnowledgeError(
                    f"{self.path} has knowledge schema version {stored['schema_version']}; this agent understands "
                    f"up to {SCHEMA_VERSION}: upgrade the agent"
                )
            if stored.get("embedding_model", model) != model or int(stored.get("dimension", DIMENSION)) != DIMENSION:
                raise KnowledgeError(
                    f"{self.path} holds vectors of the embedding model {stored.get('embedding_model')!r} "
                    f"({stored.get('dimension')} dimensions), not {model!r} ({DIMENSION}): rebuild the knowledge core"
                )
            conn.executemany(
                "INSERT OR REPLACE INTO knowledge_meta (key, value) VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("embedding_model", model), ("dimension", str(DIMENSION))],
            )

    # -- chunks

    def upsert_chunks(
        self, records: Sequence[ChunkRecord], *, vectors: Sequence[Sequence[float]] | None = None
    ) -> UpsertStats:
        """Insert or replace chunks by `chunk_id`, in one transaction.

        Only chunks that are new or whose text changed are embedded (in one batch); a chunk whose text is
        unchanged keeps its vector, and a new version (or title, topic, labels, position) just updates
        its row. `vectors`, if given, are the records' normalised embeddings in order (for callers that
        already have them); otherwise the embedder computes them. A repeated `chunk_id` in one batch:
        the last one wins."""
        batch = _dedupe([_check_record(r) for r in records], vectors)
        with self._lock:
            return self._apply(batch, stale_ids=())

    def delete_chunks(self, chunk_ids: Iterable[str]) -> int:
        """Delete chunks (and their FTS and vector rows); the number deleted (unknown ids are ignored)."""
        ids = list(dict.fromkeys(chunk_ids))
        if not ids:
            return 0
        with self._write() as conn:
            return self._delete_rows(conn, self._rows_by_id(conn, ids).values())

    def ingest_document(
        self,
        doc_id: str,
        department: str,
        filename: str,
        data: bytes,
        *,
        title: str | None = None,
        topic: str | None = None,
        labels: Sequence[str] = (),
    ) -> list[ChunkRecord]:
        """Parse and chunk an upload (TXT, MD, PDF) and store it as the document's next version.

        The document is identified by (department, doc_id). A re-ingest replaces its chunks: chunks that
        are gone are deleted, surviving texts keep their vectors. Its version is the previous one + 1
        (1 for a new document), applied to all its chunks; an identical re-upload (same title, texts,
        topic and labels) changes nothing and keeps the version. Bad files raise
        `runtime.common.ingest.IngestError` subclasses. Returns the stored chunks in order."""
        department = _check_department(department)
        label_tuple = _check_labels(labels)
        topic = _check_topic(topic)
        prepared = prepare_document(data, filename=filename, department=department, doc_id=doc_id, title=title)
        with self._lock:
            existing = self._document_rows(department, prepared.doc_id)
            old = [row.record for row in existing]
            unchanged = (
                bool(old)
                and document_hash(old[0].title, [r.text for r in old]) == prepared.doc_hash
                and [r.chunk_id for r in old] == list(prepared.chunk_ids)
                and {(r.version, r.topic, r.labels) for r in old} == {(old[0].version, topic, label_tuple)}
            )
            if unchanged:
                return old
            version = max((r.version for r in old), default=0) + 1
            new = [
                ChunkRecord(c.chunk_id, c.doc_id, department, c.title, c.text, version, topic, label_tuple, c.position)
                for c in prepared.chunks(version)
            ]
            keep = set(prepared.chunk_ids)
            self._apply(_dedupe(new, None), stale_ids=[r.chunk_id for r in old if r.chunk_id not in keep])
            return new

    def document_chunk_ids(self, department: str, doc_id: str) -> list[str]:
        """The ids of a stored document's chunks, in document order ([] if there is no such document)."""
        with self._lock:
            return [row.record.chunk_id for row in self._document_rows(_check_department(department), doc_id)]

    def get_chunks(self, chunk_ids: Iterable[str]) -> dict[str, ChunkRecord]:
        """The stored chunks among `chunk_ids`, by id."""
        ids = list(dict.fromkeys(chunk_ids))
        with self._lock:
            return {cid: row.record for cid, row in self._rows_by_id(self.conn, ids).items()}

    def _apply(self, batch: list[tuple[ChunkRecord, Sequence[float] | None]], stale_ids: Sequence[str]) -> UpsertStats:
        # Embed outside the write transaction: other writers to the file must not wait for the model.
        before = self._rows_by_id(self.conn, [r.chunk_id for r, _ in batch])
        wanted = {
            record.text
            for record, vector in batch
            if vector is None and (record.chunk_id not in before or before[record.chunk_id].record.text != record.text)
        }
        embedded = self._embed(wanted)
        with self._write() as conn:
            if stale_ids:
                self._delete_rows(conn, self._rows_by_id(conn, stale_ids).values())
            current = self._rows_by_id(conn, [r.chunk_id for r, _ in batch])
            late = {r.text for r, v in batch if v is None and r.text not in embedded and _needs_vector(r, current)}
            embedded.update(self._embed(late))  # another writer changed a text meanwhile: rare
            return self._write_batch(conn, batch, current, embedded)

    def _write_batch(
        self,
        conn: sqlite3.Connection,
        batch: list[tuple[ChunkRecord, Sequence[float] | None]],
        current: dict[str, _Row],
        embedded: dict[str, bytes],
    ) -> UpsertStats:
        now = _now_text()
        next_id = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM chunks").fetchone()[0]) + 1
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        fts_deletes: list[tuple[Any, ...]] = []
        fts_inserts: list[tuple[Any, ...]] = []
        vector_deletes: list[tuple[int]] = []
        vector_inserts: list[tuple[int, str, bytes]] = []
        changed: list[str] = []
        unchanged = 0
        for record, given in batch:
            old = current.get(record.chunk_id)
            if old is not None and old.record == record:
                unchanged += 1
                continue
            tail = (record.text, record.position, record.version, json.dumps(list(record.labels)), now)
            if old is None:
                rowid = next_id
                next_id += 1
                inserts.append(
                    (rowid, record.chunk_id, record.doc_id, record.department, record.topic, record.title, *tail)
                )
            else:
                rowid = old.rowid
                updates.append((record.doc_id, record.department, record.topic, record.title, *tail, old.rowid))
                if (old.record.title, old.record.text) != (record.title, record.text):
                    fts_deletes.append(("delete", rowid, old.record.title, lexical_form(old.record.text)))
            if old is None or (old.record.title, old.record.text) != (record.title, record.text):
                fts_inserts.append((rowid, record.title, lexical_form(record.text)))
            if (
                old is None
                or old.record.text != record.text
                or old.record.department != record.department
                or given is not None
            ):
                blob = _blob(given) if given is not None else embedded.get(record.text)
                if blob is None:  # only the department changed: move the stored vector to its new partition
                    blob = self._vector_blob(conn, rowid)
                if old is not None:
                    vector_deletes.append((rowid,))
                vector_inserts.append((rowid, record.department, blob))
            if old is None or old.record.version != record.version:
                changed.append(record.chunk_id)
        conn.executemany(
            "INSERT INTO chunks (id, chunk_id, doc_id, department, topic, title, text, position, version, labels,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            inserts,
        )
        conn.executemany(
            "UPDATE chunks SET doc_id = ?, department = ?, topic = ?, title = ?, text = ?, position = ?, version = ?,"
            " labels = ?, updated_at = ? WHERE id = ?",
            updates,
        )
        conn.executemany("INSERT INTO chunks_fts (chunks_fts, rowid, title, body) VALUES (?, ?, ?, ?)", fts_deletes)
        conn.executemany("INSERT INTO chunks_fts (rowid, title, body) VALUES (?, ?, ?)", fts_inserts)
        conn.executemany("DELETE FROM chunk_vectors WHERE rowid = ?", vector_deletes)
        conn.executemany("INSERT INTO chunk_vectors (rowid, department, embedding) VALUES (?, ?, ?)", vector_inserts)
        return UpsertStats(
            inserted=len(inserts),
            updated=len(updates),
            unchanged=unchanged,
            changed_ids=tuple(changed),
            vectors_written=len(vector_inserts),
        )

    def _delete_rows(self, conn: sqlite3.Connection, rows: Iterable[_Row]) -> int:
        rows = list(rows)
        # A contentless FTS5 row is removed by repeating the values it was indexed with.
        conn.executemany(
            "INSERT INTO chunks_fts (chunks_fts, rowid, title, body) VALUES ('delete', ?, ?, ?)",
            [(r.rowid, r.record.title, lexical_form(r.record.text)) for r in rows],
        )
        conn.executemany("DELETE FROM chunk_vectors WHERE rowid = ?", [(r.rowid,) for r in rows])
        conn.executemany("DELETE FROM chunks WHERE id = ?", [(r.rowid,) for r in rows])
        return len(rows)

    def _embed(self, texts: Iterable[str]) -> dict[str, bytes]:
        unique = sorted(set(texts))
        if not unique:
            return {}
        return {text: _blob(vector) for text, vector in zip(unique, self.embedder.embed(unique), strict=True)}

    def _rows_by_id(self, conn: sqlite3.Connection, chunk_ids: Sequence[str]) -> dict[str, _Row]:
        if not chunk_ids:
            return {}
        rows = conn.execute(
            f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE chunk_id IN (SELECT value FROM json_each(?))",  # noqa: S608
            (json.dumps(list(chunk_ids)),),
        ).fetchall()
        return {str(values[1]): _row(values) for values in rows}

    def _document_rows(self, department: str, doc_id: str) -> list[_Row]:
        rows = self.conn.execute(
            f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE department = ? AND doc_id = ?"  # noqa: S608
            " ORDER BY position, chunk_id",
            (department, doc_id),
        ).fetchall()
        return [_row(values) for values in rows]

    def _vector_blob(self, conn: sqlite3.Connection, rowid: int) -> bytes:
        row = conn.execute("SELECT embedding FROM chunk_vectors WHERE rowid = ?", (rowid,)).fetchone()
        if row is None:
            raise KnowledgeError(f"chunk row {rowid} has no vector; the knowledge core is inconsistent")
        return bytes(row[0])

    # -- retrieval

    def search(self, query: str, departments: Sequence[str], k: int = 5) -> list[KnowledgeHit]:
        """The `k` best chunks of `departments` for `query`: FTS5 BM25 and vector KNN candidates
        (max(4k, 20) of each, both restricted to the departments), fused with reciprocal rank fusion
        (score = sum of 1 / (60 + rank)). Any text is a valid query: FTS5 syntax is never passed through."""
        query = " ".join(query.split())
        wanted = _check_departments(departments)
        if not query or not wanted or k <= 0:
            return []
        pool = max(4 * k, 20)
        vector = self.embedder.embed_one(query)
        query_blob = _blob(vector)
        with self._lock:
            conn = self.conn
            lexical = self._fts_candidates(conn, query, wanted, pool)
            dense = self._knn_candidates(conn, query_blob, wanted, pool)
            fused = reciprocal_rank_fusion([lexical, dense], RRF_K)[:k]
            rows = {
                int(values[0]): _row(values)
                for values in conn.execute(
                    f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE id IN (SELECT value FROM json_each(?))",  # noqa: S608
                    (json.dumps([rowid for rowid, _ in fused]),),
                ).fetchall()
            }
            similarity = {rowid: _cosine(vector, self._vector_blob(conn, rowid)) for rowid, _ in fused}
        fts_rank = {rowid: rank for rank, rowid in enumerate(lexical, 1)}
        vector_rank = {rowid: rank for rank, rowid in enumerate(dense, 1)}
        hits = []
        for rowid, score in fused:
            record = rows[rowid].record
            hits.append(
                KnowledgeHit(
                    chunk_id=record.chunk_id,
                    doc_id=record.doc_id,
                    version=record.version,
                    department=record.department,
                    topic=record.topic,
                    title=record.title,
                    text=record.text,
                    labels=record.labels,
                    score=score,
                    similarity=similarity[rowid],
                    fts_rank=fts_rank.get(rowid),
                    vector_rank=vector_rank.get(rowid),
                    position=record.position,
                )
            )
        return hits

    def _fts_candidates(self, conn: sqlite3.Connection, query: str, departments: list[str], limit: int) -> list[int]:
        expression = fts_query(query)
        if not expression:
            return []
        rows = conn.execute(
            "SELECT chunks_fts.rowid FROM chunks_fts JOIN chunks ON chunks.id = chunks_fts.rowid"
            " WHERE chunks_fts MATCH ? AND chunks.department IN (SELECT value FROM json_each(?))"
            " ORDER BY bm25(chunks_fts), chunks_fts.rowid LIMIT ?",
            (expression, json.dumps(departments), limit),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def _knn_candidates(self, conn: sqlite3.Connection, query: bytes, departments: list[str], limit: int) -> list[int]:
        # One exact KNN per partition, merged by distance. sqlite-vec 0.1.9 does not support IN on a
        # partition key: `department IN ('a', 'b')` silently searches only 'a' (checked), so never use it.
        found: list[tuple[float, int]] = []
        for department in departments:
            found.extend(
                (float(distance), int(rowid))
                for rowid, distance in conn.execute(
                    "SELECT rowid, distance FROM chunk_vectors WHERE embedding MATCH ? AND k = ? AND department = ?",
                    (query, limit, department),
                )
            )
        return [rowid for _, rowid in sorted(found)[:limit]]

    def coverage(self, query: str, hits: Sequence[KnowledgeHit]) -> float:
        """How well `hits` cover `query`, in [0, 1]:

            coverage = 0.6 * s + 0.4 * w

        where `s` is the best hit's cosine similarity to the question (`KnowledgeHit.similarity`) and
        `w` the share of the question's content words (words of 2+ characters that are not stop words,
        plus fused identifiers such as "vx55") found in the text or title of the top 3 hits. Words are
        compared by their first 5 characters, a crude stem ("vacations" ~ "vacation"). A question with
        no content words gets `s` alone; no hits give 0."""
        if not hits:
            return 0.0
        best = max(0.0, min(1.0, max(h.similarity for h in hits)))
        wanted = {_stem(w) for w in content_words(query)}
        if not wanted:
            return best
        top = sorted(hits, key=lambda h: -h.score)[:_COVERAGE_TOP_HITS]
        present = {_stem(w) for h in top for w in _words(lexical_form(f"{h.title}\n{h.text}"))}
        share = len(wanted & present) / len(wanted)
        value = COVERAGE_SIMILARITY_WEIGHT * best + (1 - COVERAGE_SIMILARITY_WEIGHT) * share
        return max(0.0, min(1.0, value))

    def pinned_chunks(
        self, departments: Sequence[str], topics: Sequence[str] | None, max_chars: int
    ) -> list[ChunkRecord]:
        """Knowledge to pin for cache-augmented generation: the chunks of `departments` (and of `topics`,
        if given), ordered by (doc_id, department, position), as long a prefix of that order as fits in
        `max_chars` characters of text. The order is stable, so the same knowledge gives the same prompt."""
        wanted = _check_departments(departments)
        if not wanted or max_chars <= 0:
            return []
        sql = f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE department IN (SELECT value FROM json_each(?))"  # noqa: S608
        params: list[Any] = [json.dumps(wanted)]
        if topics is not None:
            sql += " AND topic IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(list(topics)))
        sql += " ORDER BY doc_id, department, position, chunk_id"
        out: list[ChunkRecord] = []
        used = 0
        with self._lock:
            for values in self.conn.execute(sql, params):
                record = _row(values).record
                if used + len(record.text) > max_chars:
                    break
                out.append(record)
                used += len(record.text)
        return out

    # -- stats

    def counts(self) -> dict[str, int]:
        """Sizes: chunks, documents, entities, relations, turns, cached_answers (valid ones only)."""
        queries = {
            "chunks": "SELECT COUNT(*) FROM chunks",
            "documents": "SELECT COUNT(*) FROM (SELECT 1 FROM chunks GROUP BY department, doc_id)",
            "entities": "SELECT COUNT(*) FROM kg_entities",
            "relations": "SELECT COUNT(*) FROM kg_relations",
            "turns": "SELECT COUNT(*) FROM memory_turns",
            "cached_answers": "SELECT COUNT(*) FROM cached_answers WHERE invalidated_at IS NULL",
        }
        with self._lock:
            return {name: int(self.conn.execute(sql).fetchone()[0]) for name, sql in queries.items()}

    def chunk_versions(self, chunk_ids: Iterable[str]) -> dict[str, int]:
        """chunk_id -> stored version, for the ids that are stored."""
        ids = list(dict.fromkeys(chunk_ids))
        with self._lock:
            return self._versions(self.conn, ids)

    def _versions(self, conn: sqlite3.Connection, chunk_ids: Sequence[str]) -> dict[str, int]:
        if not chunk_ids:
            return {}
        rows = conn.execute(
            "SELECT chunk_id, version FROM chunks WHERE chunk_id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(chunk_ids)),),
        ).fetchall()
        return {str(cid): int(version) for cid, version in rows}

    def documents(self, department: str | None = None) -> list[dict[str, Any]]:
        """One dict per stored document: doc_id, department, title, topic, version, chunks, chars, labels."""
        sql = (
            "SELECT doc_id, department, MIN(title), MIN(topic), MAX(version), COUNT(*), SUM(LENGTH(text)), MIN(labels)"
            " FROM chunks"
        )
        params: tuple[Any, ...] = ()
        if department is not None:
            sql += " WHERE department = ?"
            params = (_check_department(department),)
        sql += " GROUP BY department, doc_id ORDER BY department, doc_id"
        with self._lock:
            rows = self.conn.execute(sql, params).fetchall()
        keys = ("doc_id", "department", "title", "topic", "version", "chunks", "chars")
        return [dict(zip(keys, row[:7], strict=True)) | {"labels": json.loads(row[7])} for row in rows]

    # -- temporal knowledge graph

    def upsert_entity(self, name: str, type: str, department: str, attributes: Mapping[str, Any] | None = None) -> int:
        """The id of the entity called `name` (case- and Unicode-width-insensitive), created or updated:
        its type and department are replaced; `attributes` replace the stored ones when given."""
        display, key = _entity_key(name)
        if not type.strip():
            raise KnowledgeError("an entity needs a type")
        department = _check_department(department)
        attrs = None if attributes is None else _json_object(attributes)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO kg_entities (name, name_key, type, department, attributes, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name_key) DO UPDATE SET name = excluded.name,"
                " type = excluded.type, department = excluded.department,"
                " attributes = CASE WHEN ? THEN excluded.attributes ELSE attributes END,"
                " updated_at = excluded.updated_at",
                (display, key, type.strip(), department, attrs or "{}", _now_text(), attrs is not None),
            )
            return int(conn.execute("SELECT id FROM kg_entities WHERE name_key = ?", (key,)).fetchone()[0])

    def entity(self, entity: int | str) -> Entity:
        with self._lock:
            entity_id = self._entity_id(self.conn, entity)
            row = self.conn.execute(
                "SELECT id, name, type, department, attributes FROM kg_entities WHERE id = ?", (entity_id,)
            ).fetchone()
        return Entity(int(row[0]), str(row[1]), str(row[2]), str(row[3]), json.loads(row[4]))

    def add_relation(
        self,
        subject: int | str,
        predicate: str,
        object: int | str,
        *,
        valid_from: datetime,
        valid_to: datetime | None = None,
        source_chunk: str | None = None,
    ) -> int:
        """Record that `subject predicate object` holds from `valid_from` (inclusive) until `valid_to`
        (exclusive; None = still holds). Entities are ids or names of existing entities. Nothing is closed
        implicitly: a fact that replaces another needs `close_relation` on the old one. Recording the same
        (subject, predicate, object, valid_from) again returns the existing id."""
        predicate = predicate.strip()
        if not predicate:
            raise KnowledgeError("a relation needs a predicate")
        start = _utc_text(valid_from, "valid_from")
        end = None if valid_to is None else _utc_text(valid_to, "valid_to")
        if end is not None and end <= start:
            raise ValueError(f"valid_to ({end}) must be after valid_from ({start})")
        with self._write() as conn:
            subject_id = self._entity_id(conn, subject)
            object_id = self._entity_id(conn, object)
            conn.execute(
                "INSERT INTO kg_relations (subject_id, predicate, object_id, valid_from, valid_to, source_chunk,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (subject_id, predicate, object_id, valid_from) DO NOTHING",
                (subject_id, predicate, object_id, start, end, source_chunk, _now_text()),
            )
            row = conn.execute(
                "SELECT id FROM kg_relations"
                " WHERE subject_id = ? AND predicate = ? AND object_id = ? AND valid_from = ?",
                (subject_id, predicate, object_id, start),
            ).fetchone()
            return int(row[0])

    def close_relation(self, relation_id: int, valid_to: datetime) -> None:
        """End a relation at `valid_to` (exclusive). It must be open and `valid_to` after its `valid_from`."""
        end = _utc_text(valid_to, "valid_to")
        with self._write() as conn:
            row = conn.execute("SELECT valid_from, valid_to FROM kg_relations WHERE id = ?", (relation_id,)).fetchone()
            if row is None:
                raise UnknownRelation(f"no relation with id {relation_id}")
            if row[1] is not None:
                raise KnowledgeError(f"relation {relation_id} is already closed (valid until {row[1]})")
            if end <= row[0]:
                raise ValueError(f"valid_to ({valid_to.isoformat()}) must be after valid_from ({row[0]})")
            conn.execute("UPDATE kg_relations SET valid_to = ? WHERE id = ?", (end, relation_id))

    def relations(self, entity: int | str, *, at: datetime | None = None) -> list[Relation]:
        """Relations of `entity` (as subject or object) valid at `at` (default: now), by valid_from."""
        moment = _utc_text(at if at is not None else datetime.now(UTC), "at")
        return self._relations(
            entity, "AND r.valid_from <= ? AND (r.valid_to IS NULL OR r.valid_to > ?)", (moment, moment)
        )

    def history(self, entity: int | str, predicate: str | None = None) -> list[Relation]:
        """Every version of `entity`'s relations (as subject or object), optionally of one predicate,
        ordered by valid_from."""
        if predicate is None:
            return self._relations(entity, "", ())
        return self._relations(entity, "AND r.predicate = ?", (predicate.strip(),))

    def _relations(self, entity: int | str, condition: str, params: tuple[Any, ...]) -> list[Relation]:
        with self._lock:
            conn = self.conn
            entity_id = self._entity_id(conn, entity)
            sql = (
                "SELECT r.id, s.name, r.predicate, o.name, r.valid_from, r.valid_to, r.source_chunk"  # noqa: S608
                " FROM kg_relations r JOIN kg_entities s ON s.id = r.subject_id"
                " JOIN kg_entities o ON o.id = r.object_id"
                f" WHERE (r.subject_id = ? OR r.object_id = ?) {condition}"  # a fixed fragment, not input
                " ORDER BY r.valid_from, r.id"
            )
            rows = conn.execute(sql, (entity_id, entity_id, *params)).fetchall()
        return [
            Relation(
                id=int(r[0]),
                subject=str(r[1]),
                predicate=str(r[2]),
                object=str(r[3]),
                valid_from=datetime.fromisoformat(r[4]),
                valid_to=None if r[5] is None else datetime.fromisoformat(r[5]),
                source_chunk=r[6],
            )
            for r in rows
        ]

    @staticmethod
    def _entity_id(conn: sqlite3.Connection, entity: int | str) -> int:
        if isinstance(entity, int):
            row = conn.execute("SELECT id FROM kg_entities WHERE id = ?", (entity,)).fetchone()
        else:
            row = conn.execute("SELECT id FROM kg_entities WHERE name_key = ?", (_entity_key(entity)[1],)).fetchone()
        if row is None:
            raise UnknownEntity(f"no entity {entity!r} in the knowledge graph")
        return int(row[0])

    # -- agent memory

    def add_turn(self, conversation_id: str, role: Role, text: str, *, source: str | None = None) -> int:
        """Append a turn to a conversation; its id."""
        if not conversation_id.strip():
            raise KnowledgeError("a turn needs a conversation id")
        if role not in ("user", "assistant"):
            raise KnowledgeError(f"role must be 'user' or 'assistant', not {role!r}")
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO memory_turns (conversation_id, role, text, source, created_at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, text, source, _now_text()),
            )
            return int(cursor.lastrowid or 0)

    def turns(self, conversation_id: str, limit: int = 20) -> list[Turn]:
        """The last `limit` turns of a conversation, oldest first."""
        if limit <= 0:
            return []
        with self._lock:
            rows = self.conn.execute(
                "SELECT id, conversation_id, role, text, source, created_at FROM memory_turns"
                " WHERE conversation_id = ? ORDER BY id DESC LIMIT ?",
                (conversation_id, limit),
            ).fetchall()
        return [Turn(int(r[0]), str(r[1]), r[2], str(r[3]), r[4], datetime.fromisoformat(r[5])) for r in reversed(rows)]

    def cache_answer(
        self,
        question: str,
        departments: Sequence[str],
        answer: str,
        *,
        source: str,
        chunk_versions: Mapping[str, int],
    ) -> None:
        """Cache `answer` for the question (normalised) and the departments (as a set), replacing any
        earlier one, with the versions of the chunks it was built from. Those must be chunks stored
        here: `cached_answer` treats a chunk it cannot find as changed (an answer built from core-only
        chunks should be cached with the local chunks it relied on, or with none)."""
        depts = _check_departments(departments)
        key = answer_key(question, depts)
        versions = {str(cid): int(v) for cid, v in sorted(chunk_versions.items())}
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO cached_answers (key, question, departments, answer, source, chunk_versions,"
                " created_at, invalidated_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (key, question, json.dumps(depts), answer, source, json.dumps(versions), _now_text()),
            )

    def cached_answer(self, question: str, departments: Sequence[str]) -> CachedAnswer | None:
        """The cached answer for the question and departments, if every chunk version it used is still the
        stored one; otherwise it is marked invalidated and None is returned."""
        depts = _check_departments(departments)
        key = answer_key(question, depts)
        with self._lock:
            conn = self.conn
            row = conn.execute(
                "SELECT question, departments, answer, source, chunk_versions, created_at FROM cached_answers"
                " WHERE key = ? AND invalidated_at IS NULL",
                (key,),
            ).fetchone()
            if row is None:
                return None
            used: dict[str, int] = {str(k): int(v) for k, v in json.loads(row[4]).items()}
            if self._versions(conn, list(used)) != used:
                with conn:
                    conn.execute("UPDATE cached_answers SET invalidated_at = ? WHERE key = ?", (_now_text(), key))
                return None
        return CachedAnswer(
            question=str(row[0]),
            departments=tuple(json.loads(row[1])),
            answer=str(row[2]),
            source=str(row[3]),
            chunk_versions=used,
            created_at=datetime.fromisoformat(row[5]),
        )

    def invalidate_answers_for(self, chunk_ids: Iterable[str]) -> int:
        """Mark the valid cached answers that used any of `chunk_ids` (at any version); how many."""
        ids = list(dict.fromkeys(chunk_ids))
        if not ids:
            return 0
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE cached_answers SET invalidated_at = ? WHERE invalidated_at IS NULL AND EXISTS"
                " (SELECT 1 FROM json_each(cached_answers.chunk_versions) AS used"
                " WHERE used.key IN (SELECT value FROM json_each(?)))",
                (_now_text(), json.dumps(ids)),
            )
            return int(cursor.rowcount)


# -- pure helpers -----------------------------------------------------------------------------------------

# Words that carry no topic; dropped from FTS queries and from coverage (English: the corpus language).
STOP_WORDS = frozenset(
    """a about above after again all also am an and any are as at be been before being below between both but by
    can could did do does doing down during each few for from further had has have having he her here hers how i
    if in into is it its itself just me more most my no nor not of off on once only or other our out over own
    same she should so some such than that the their them then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you your yours""".split()
)
_WORD_RE = re.compile(r"\w+", re.UNICODE)
_ALNUM_RE = re.compile(r"[^\W_]+", re.UNICODE)  # what FTS5's unicode61 keeps: "_" separates tokens
# A query term: an identifier (the shape `ingest.identifiers` fuses) or a word.
_TERM_RE = re.compile(r"(?<![\w-])[^\W_]+(?:[-_/][^\W_]+)+(?![\w-])|\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def content_words(text: str) -> list[str]:
    """The question's topic words: words of 2+ characters that are not stop words, plus fused identifiers
    ("VX-55" -> "vx55"), lower-cased, in order, without repeats."""
    words = [w for w in _words(text) if len(w) >= 2 and w not in STOP_WORDS]
    return list(dict.fromkeys([*words, *identifiers(text)]))


def fts_query(text: str) -> str:
    """A safe FTS5 expression for any text: its words, each quoted, joined by OR; '' if it has no words.

    Quoting makes every word a plain term, so quotes, `*`, `-`, `:`, parentheses and AND/OR/NOT in the
    question are never FTS5 syntax. An identifier ("MCC-3") becomes the phrase of its parts ("mcc 3":
    FTS5 tokenizes a quoted string into a phrase) or its fused token ("mcc3", what `lexical_form` adds),
    never its loose parts: a bare "3" would match every chunk with a 3 in it, and those weak matches,
    also found by the vector side, would outrank the chunk that has the identifier. Stop words are
    dropped unless nothing else is left."""
    terms: list[str] = []
    for match in _TERM_RE.finditer(unicodedata.normalize("NFKC", text).casefold()):
        token = match.group(0)
        fused = identifiers(token)
        if fused and not _WORD_RE.fullmatch(token):
            terms += [" ".join(_ALNUM_RE.findall(token)), *fused]
        else:
            terms += _ALNUM_RE.findall(token)
    unique = list(dict.fromkeys(terms))
    topical = [t for t in unique if t not in STOP_WORDS]
    chosen = (topical or unique)[:_MAX_QUERY_TERMS]
    return " OR ".join(f'"{term}"' for term in chosen)  # terms are letters, digits and spaces: no quotes


def _stem(word: str) -> str:
    return word[:5]


def normalize_question(question: str) -> str:
    """What cached answers are keyed on: NFKC, case-folded, whitespace collapsed, end punctuation dropped."""
    return normalize_text(question).casefold().rstrip(" ?!.…")


def answer_key(question: str, departments: Sequence[str]) -> str:
    material = normalize_question(question) + "\x1f" + ",".join(sorted(set(departments)))
    return hashlib.sha256(material.encode()).hexdigest()


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of rowid rankings: (rowid, score), best first. Equal scores are ordered by
    the rank in the first ranking, then the next (the lexical side first: an exact term is the more
    specific evidence), then by rowid."""
    scores: dict[int, float] = {}
    positions = [{rowid: rank for rank, rowid in enumerate(ranking, 1)} for ranking in rankings]
    for ranks in positions:
        for rowid, rank in ranks.items():
            scores[rowid] = scores.get(rowid, 0.0) + 1.0 / (k + rank)
    unranked = 1 + max((len(r) for r in positions), default=0)
    return sorted(scores.items(), key=lambda item: (-item[1], *(r.get(item[0], unranked) for r in positions), item[0]))


def _blob(vector: Sequence[float]) -> bytes:
    if len(vector) != DIMENSION:
        raise KnowledgeError(f"a vector has {len(vector)} dimensions, expected {DIMENSION}")
    return array("f", vector).tobytes()


def _cosine(vector: Sequence[float], blob: bytes) -> float:
    """Cosine similarity of two normalised vectors (their dot product), clamped to [0, 1]."""
    other = array("f")
    other.frombytes(blob)
    return max(0.0, min(1.0, sum(a * b for a, b in zip(vector, other, strict=True))))


def _needs_vector(record: ChunkRecord, current: Mapping[str, _Row]) -> bool:
    old = current.get(record.chunk_id)
    return old is None or old.record.text != record.text


def _check_department(department: str) -> str:
    if not isinstance(department, str) or not _DEPARTMENT_RE.fullmatch(department):
        raise KnowledgeError(
            f"invalid department {department!r}: lower-case letters, digits and '-', starting with a letter"
        )
    return department


def _check_departments(departments: Sequence[str]) -> list[str]:
    """Sorted, without repeats; a bare string is refused (iterating it would search "h" and "r")."""
    if isinstance(departments, str):
        raise KnowledgeError(f"departments must be a list of names, not the string {departments!r}")
    return sorted({_check_department(d) for d in departments})


def _check_labels(labels: Iterable[str]) -> tuple[str, ...]:
    out = tuple(labels)
    if isinstance(labels, str) or any(not isinstance(x, str) or not x.strip() for x in out):
        raise KnowledgeError(f"labels must be a list of non-empty strings, not {labels!r}")
    return out


def _check_topic(topic: str | None) -> str | None:
    if topic is not None and (not isinstance(topic, str) or not topic.strip()):
        raise KnowledgeError(f"a topic must be a non-empty string or None, not {topic!r}")
    return topic


def _check_record(record: ChunkRecord) -> ChunkRecord:
    if not isinstance(record, ChunkRecord):
        raise KnowledgeError(f"expected a ChunkRecord, got {type(record).__name__}")
    if not record.chunk_id or not record.doc_id:
        raise KnowledgeError(f"a chunk needs a chunk_id and a doc_id: {record.chunk_id!r}, {record.doc_id!r}")
    _check_department(record.department)
    _check_labels(record.labels)
    _check_topic(record.topic)
    if not record.text.strip():
        raise KnowledgeError(f"chunk {record.chunk_id!r} has no text")
    if record.version < 0:
        raise KnowledgeError(f"chunk {record.chunk_id!r} has a negative version {record.version}")
    return record


def _dedupe(
    records: Sequence[ChunkRecord], vectors: Sequence[Sequence[float]] | None
) -> list[tuple[ChunkRecord, Sequence[float] | None]]:
    if vectors is not None and len(vectors) != len(records):
        raise KnowledgeError(f"{len(vectors)} vectors for {len(records)} chunks")
    pairs: dict[str, tuple[ChunkRecord, Sequence[float] | None]] = {}
    for i, record in enumerate(records):
        pairs.pop(record.chunk_id, None)  # the last one wins, in its own place
        pairs[record.chunk_id] = (record, None if vectors is None else vectors[i])
    return list(pairs.values())


def _entity_key(name: str) -> tuple[str, str]:
    display = normalize_text(name)
    if not display:
        raise KnowledgeError("an entity needs a name")
    return display, display.casefold()


def _json_object(attributes: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(attributes), sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise KnowledgeError(f"entity attributes must be JSON-serialisable: {exc}") from exc


def _utc_text(moment: datetime, what: str) -> str:
    """Fixed-width UTC ISO-8601 (so text order is time order); naive datetimes are refused."""
    if not isinstance(moment, datetime):
        raise KnowledgeError(f"{what} must be a datetime, not {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware: {moment.isoformat()}")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
