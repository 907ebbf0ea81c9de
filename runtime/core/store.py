"""Chunk storage in Milvus, one collection per department.

Isolation decision: **a collection per department** (`membria_dept_<department>`), not a partition key
with a filter, and not a database per department.

- Partition key + `department == "x"` filter: every search in one shared collection would be safe only
  as long as every code path remembers the filter; one forgotten or badly built expression leaks every
  department. BM25 statistics (document frequencies) would also be shared across departments, so the
  scores one department sees would depend on another department's text. Milvus RBAC cannot grant a
  role less than the whole collection, so production could not back the isolation with grants either.
- A collection per department makes a leak impossible by construction: there is no query that spans
  collections, so `search(departments=[sales])` can only name `membria_dept_sales`; nothing it could
  forget to filter on exists there. Each collection has its own BM25 statistics. In production Milvus
  RBAC grants privileges per collection (`Search`/`Query` on `membria_dept_sales` to the role of a
  sales-scoped service), so the grants can mirror the departments exactly, and dropping a department
  is dropping its collection.
- A database per department is as isolated, but a `MilvusClient` is bound to one database
  (`using_database` switches the shared client's state, which is a race between concurrent requests),
  a multi-department search would need one client per database, and the site file names a single
  Milvus database per site. Collections give the same guarantee within the site's database.

Department names follow the site's name rule (`^[a-z][a-z0-9-]{0,62}$`); '-' becomes '_' in the
collection name, which is a bijection because department names cannot contain '_'.

The same code runs against Milvus Lite (a local file URI, the lab and the tests) and a Milvus server
(an http(s) URI plus a token, production): pass a URI or a ready `pymilvus.MilvusClient`.

Every collection has: `chunk_id` (primary key), `doc_id`, `version`, `doc_hash`, `title`, `position`,
`doc_chunks`, `source_name`, `kind`, `updated_at`, `text`, `lexical` (the text plus its identifiers
fused, "VX-55" → "vx55"; see `ingest.lexical_form`), `dense` (384-dim, cosine) and `sparse`, filled
by Milvus's BM25 function from `lexical` (the lexical half of hybrid search).
Collections are created with Strong consistency: a search right after an upload or a delete sees it.

Milvus has no transactions. `upsert_document` writes the new version first and deletes the chunks
that disappeared afterwards, so a reader sees the old or the new chunk set plus, for an instant,
both; a crash between the two steps leaves stale chunks that the next upload of the document removes
(it replaces everything with that doc_id).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.common.embeddings import DIMENSION
from runtime.common.ingest import PreparedDocument, lexical_form, valid_doc_id

DEPARTMENT_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
_DEPARTMENT_RE = re.compile(DEPARTMENT_PATTERN)
DEFAULT_PREFIX = "membria_dept_"

# Milvus counts VARCHAR lengths in bytes.
_TEXT_MAX_BYTES = 65535
_TITLE_MAX_BYTES = 2048
_NAME_MAX_BYTES = 1024
_QUERY_LIMIT = 16384  # Milvus's cap on offset + limit of one query
_WRITE_BATCH = 256
_LOCK_STRIPES = 64

OUTPUT_FIELDS = ["chunk_id", "doc_id", "version", "title", "position", "text"]


class StoreError(RuntimeError):
    """Milvus failed or cannot be reached."""


class InvalidDepartment(ValueError):
    """Not a department name."""


class DocumentNotFound(LookupError):
    """No such document in that department."""


@dataclass(frozen=True)
class StoredDocument:
    department: str
    doc_id: str
    version: int
    title: str
    chunks: int
    source_name: str
    kind: str
    updated_at: int  # unix seconds


@dataclass(frozen=True)
class UpsertResult:
    department: str
    doc_id: str
    version: int
    previous_version: int | None
    chunks: int
    unchanged_chunks: int
    removed_chunks: int
    changed: bool  # False when the upload was identical to the stored version
    title: str = ""


def lite_uri_file(path: Path) -> Path:
    """Where a running core publishes the loopback URI of the Milvus Lite server it holds for `path`."""
    return path.with_name(path.name + ".uri")


def validate_department(department: str) -> str:
    if not isinstance(department, str) or not _DEPARTMENT_RE.fullmatch(department):
        raise InvalidDepartment(
            f"invalid department {department!r}: lower-case letters, digits and '-', starting with a letter"
        )
    return department


def _clip(text: str, max_bytes: int) -> str:
    data = text.encode()
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", "ignore")


def _quoted(doc_id: str) -> str:
    """A doc id as a Milvus string literal. Only ids matching DOC_ID_PATTERN get here (no quotes, no
    backslashes): Milvus Lite does not support filter templates, so validation is what keeps filters safe."""
    if not valid_doc_id(doc_id):
        raise ValueError(f"invalid doc_id {doc_id!r}")
    return f'"{doc_id}"'


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _quiet_lite_iterator_warning() -> None:
    """Milvus Lite never returns the session timestamp pymilvus's query iterator asks for, so every
    listing would log a warning; the client-side timestamp it falls back on is right for Lite."""
    logger = logging.getLogger("pymilvus.client.iterator.query_iterator")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("failed to get mvccTs"))


@contextlib.contextmanager
def milvus_call(what: str) -> Iterator[None]:
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as exc:
        raise StoreError(f"Milvus: {what} failed: {getattr(exc, 'message', exc)}") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise StoreError(f"Milvus: {what} failed: {exc}") from exc


class DepartmentStore:
    """Per-department chunk collections in one Milvus (Lite file or server)."""

    def __init__(
        self,
        client: Any,
        *,
        token: str | None = None,
        db_name: str | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        """`client`: a `pymilvus.MilvusClient`, or a URI (a Milvus Lite file path, or http(s)://host:port
        with `token` and optionally `db_name` for a server)."""
        if isinstance(client, str):
            from pymilvus import MilvusClient

            if "://" not in client:
                _quiet_lite_iterator_warning()

            with milvus_call(f"connecting to {client.split('@')[-1]}"):
                client = MilvusClient(uri=client, token=token or "", db_name=db_name or "")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,100}", prefix):
            raise ValueError(f"invalid collection prefix {prefix!r}")
        self.client = client
        self.prefix = prefix
        self._ensured: set[str] = set()
        self._ensure_lock = threading.Lock()
        self._doc_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    # -- departments ------------------------------------------------------------------------------------

    def collection_name(self, department: str) -> str:
        return self.prefix + validate_department(department).replace("-", "_")

    def departments(self) -> list[str]:
        with milvus_call("listing collections"):
            names = self.client.list_collections()
        return sorted(n[len(self.prefix) :].replace("_", "-") for n in names if n.startswith(self.prefix))

    def has_department(self, department: str) -> bool:
        """True when the department has a collection (which is then loaded and searchable)."""
        name = self.collection_name(department)
        if name in self._ensured:
            return True
        with self._ensure_lock, milvus_call(f"opening {name}"):
            if name in self._ensured:
                return True
            if not self.client.has_collection(name):
                return False
            self.client.load_collection(name)  # a reopened Milvus starts with collections released
            self._ensured.add(name)
        return True

    def ensure_department(self, department: str) -> str:
        """Create the department's collection if it does not exist; returns its name."""
        name = self.collection_name(department)
        if name in self._ensured:
            return name
        with self._ensure_lock, milvus_call(f"creating {name}"):
            if not self.client.has_collection(name):
                self._create(name, department)
            self.client.load_collection(name)
            self._ensured.add(name)
        return name

    def _create(self, name: str, department: str) -> None:
        from pymilvus import DataType, Function, FunctionType

        schema = self.client.create_schema(auto_id=False, description=f"Membria chunks of department {department}")
        schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=128)
        schema.add_field("version", DataType.INT64)
        schema.add_field("doc_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("title", DataType.VARCHAR, max_length=_TITLE_MAX_BYTES)
        schema.add_field("position", DataType.INT64)
        schema.add_field("doc_chunks", DataType.INT64)
        schema.add_field("source_name", DataType.VARCHAR, max_length=_NAME_MAX_BYTES)
        schema.add_field("kind", DataType.VARCHAR, max_length=16)
        schema.add_field("updated_at", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=_TEXT_MAX_BYTES)
        schema.add_field("lexical", DataType.VARCHAR, max_length=_TEXT_MAX_BYTES, enable_analyzer=True)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=DIMENSION)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(
            Function(
                name="text_bm25",
                function_type=FunctionType.BM25,
                input_field_names=["lexical"],
                output_field_names=["sparse"],
            )
        )
        index = self.client.prepare_index_params()
        index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        index.add_index("doc_id", index_type="INVERTED")
        self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")

    def drop_department(self, department: str) -> None:
        name = self.collection_name(department)
        with self._ensure_lock, milvus_call(f"dropping {name}"):
            self.client.drop_collection(name)
            self._ensured.discard(name)

    def ping(self) -> int:
        """A real request: the number of department collections."""
        return len(self.departments())

    # -- documents --------------------------------------------------------------------------------------

    def _doc_lock(self, department: str, doc_id: str) -> threading.Lock:
        digest = hashlib.sha256(f"{department}\x1f{doc_id}".encode()).digest()
        return self._doc_locks[digest[0] % _LOCK_STRIPES]

    def _doc_rows(self, name: str, doc_id: str, fields: Sequence[str]) -> list[dict[str, Any]]:
        with milvus_call(f"reading {doc_id} from {name}"):
            rows = self.client.query(
                name, filter=f"doc_id == {_quoted(doc_id)}", output_fields=list(fields), limit=_QUERY_LIMIT
            )
        return [dict(r) for r in rows]

    def document_chunk_ids(self, department: str, doc_id: str) -> dict[str, int]:
        """chunk_id -> version of the stored chunks of a document (empty when there is none)."""
        if not self.has_department(department):
            return {}
        rows = self._doc_rows(self.collection_name(department), doc_id, ["chunk_id", "version"])
        return {str(r["chunk_id"]): int(r["version"]) for r in rows}

    def upsert_document(
        self, prepared: PreparedDocument, embed: Callable[[Sequence[str]], list[list[float]]]
    ) -> UpsertResult:
        """Store `prepared` as the document's next version (or leave it if nothing changed).

        Chunks whose id survives keep their stored vectors (only new text is embedded); chunks that
        disappeared are deleted."""
        department, doc_id = prepared.department, prepared.doc_id
        name = self.ensure_department(department)
        with self._doc_lock(department, doc_id):
            existing = self._doc_rows(name, doc_id, ["chunk_id", "version", "doc_hash"])
            old_ids = {str(r["chunk_id"]) for r in existing}
            old_version = max((int(r["version"]) for r in existing), default=None)
            new_ids = list(prepared.chunk_ids)
            unchanged = [cid for cid in new_ids if cid in old_ids]
            identical = (
                old_version is not None
                and old_ids == set(new_ids)
                and {r["doc_hash"] for r in existing} == {prepared.doc_hash}
                and {int(r["version"]) for r in existing} == {old_version}
            )
            if identical:
                assert old_version is not None
                return UpsertResult(
                    department, doc_id, old_version, old_version, len(new_ids), len(new_ids), 0, False, prepared.title
                )

            version = (old_version or 0) + 1
            vectors = self._stored_vectors(name, unchanged)
            fresh = [(cid, text) for cid, text in zip(new_ids, prepared.texts, strict=True) if cid not in vectors]
            for (cid, _), vector in zip(fresh, embed([text for _, text in fresh]), strict=True):
                vectors[cid] = vector
            now = int(time.time())
            rows = [
                {
                    "chunk_id": chunk.chunk_id,
                    "doc_id": doc_id,
                    "version": version,
                    "doc_hash": prepared.doc_hash,
                    "title": _clip(prepared.title, _TITLE_MAX_BYTES),
                    "position": chunk.position,
                    "doc_chunks": len(new_ids),
                    "source_name": _clip(prepared.source_name, _NAME_MAX_BYTES),
                    "kind": prepared.kind,
                    "updated_at": now,
                    "text": _clip(chunk.text, _TEXT_MAX_BYTES),
                    "lexical": _clip(lexical_form(chunk.text), _TEXT_MAX_BYTES),
                    "dense": vectors[chunk.chunk_id],
                }
                for chunk in prepared.chunks(version)
            ]
            with milvus_call(f"writing {doc_id} v{version} to {name}"):
                for start in range(0, len(rows), _WRITE_BATCH):
                    self.client.upsert(name, rows[start : start + _WRITE_BATCH])
            stale = sorted(old_ids - set(new_ids))
            with milvus_call(f"removing old chunks of {doc_id} from {name}"):
                for start in range(0, len(stale), _WRITE_BATCH):
                    self.client.delete(name, ids=stale[start : start + _WRITE_BATCH])
            return UpsertResult(
                department, doc_id, version, old_version, len(new_ids), len(unchanged), len(stale), True, prepared.title
            )

    def _stored_vectors(self, name: str, ids: Sequence[str]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        with milvus_call(f"reading vectors from {name}"):
            for start in range(0, len(ids), _WRITE_BATCH):
                for row in self.client.get(name, ids=list(ids[start : start + _WRITE_BATCH]), output_fields=["dense"]):
                    out[str(row["chunk_id"])] = [float(x) for x in row["dense"]]
        return out

    def delete_document(self, department: str, doc_id: str) -> int:
        """Delete every chunk of the document; returns how many. DocumentNotFound if there were none."""
        if not valid_doc_id(doc_id):
            raise DocumentNotFound(f"no document {doc_id!r} in {department}")
        if not self.has_department(department):
            raise DocumentNotFound(f"no document {doc_id!r} in {department}")
        name = self.collection_name(department)
        with self._doc_lock(department, doc_id):
            ids = [str(r["chunk_id"]) for r in self._doc_rows(name, doc_id, ["chunk_id"])]
            if not ids:
                raise DocumentNotFound(f"no document {doc_id!r} in {department}")
            with milvus_call(f"deleting {doc_id} from {name}"):
                for start in range(0, len(ids), _WRITE_BATCH):
                    self.client.delete(name, ids=ids[start : start + _WRITE_BATCH])
        return len(ids)

    def list_documents(self, department: str) -> list[StoredDocument]:
        """The department's documents (one row per doc_id: its chunk at position 0), sorted by doc_id."""
        if not self.has_department(department):
            return []
        name = self.collection_name(department)
        fields = ["doc_id", "version", "title", "doc_chunks", "source_name", "kind", "updated_at"]
        rows: list[dict[str, Any]] = []
        with milvus_call(f"listing {name}"):
            iterator = self.client.query_iterator(name, batch_size=1000, filter="position == 0", output_fields=fields)
            try:
                while batch := iterator.next():
                    rows.extend(dict(r) for r in batch)
            finally:
                iterator.close()
        latest: dict[str, dict[str, Any]] = {}
        for r in rows:  # after a crash mid-upsert two versions can each have a chunk at position 0
            if str(r["doc_id"]) not in latest or int(r["version"]) > int(latest[str(r["doc_id"])]["version"]):
                latest[str(r["doc_id"])] = r
        return sorted(
            (
                StoredDocument(
                    department=department,
                    doc_id=str(r["doc_id"]),
                    version=int(r["version"]),
                    title=str(r["title"]),
                    chunks=int(r["doc_chunks"]),
                    source_name=str(r["source_name"]),
                    kind=str(r["kind"]),
                    updated_at=int(r["updated_at"]),
                )
                for r in latest.values()
            ),
            key=lambda d: d.doc_id,
        )
