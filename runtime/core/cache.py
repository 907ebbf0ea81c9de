"""Response cache: answers already given, keyed by what produced them, in SQLite (WAL).

Key = sha256 of
- the prompt normalised for case and whitespace (`"What is  X?"` and `"what is x?"` are one question),
- the model,
- the sorted `(chunk_id, version)` pairs of the chunks the answer was built from,
- the generation settings (max_tokens, temperature, top_p): a 16-token answer is not an answer to a
  request for 512 tokens.

Because chunk ids and versions are part of the key, an answer is only ever reused for a caller whose
retrieval returned exactly those chunks (so it has access to them), and a new version of a source
document changes the key by itself. The entries that reference a document are also deleted when it is
re-uploaded or deleted (`invalidate_document`), so stale answers do not linger on disk.

Writes are transactions; the database is in WAL mode with `synchronous=NORMAL` (a crash loses at most
the last writes, never corrupts). The cache holds at most `max_entries` answers, least recently used
go first.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    answer TEXT NOT NULL,
    sources TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_hit_at REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS response_docs (
    key TEXT NOT NULL REFERENCES responses(key) ON DELETE CASCADE,
    department TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    PRIMARY KEY (key, department, doc_id)
);
CREATE INDEX IF NOT EXISTS response_docs_by_doc ON response_docs (department, doc_id);
CREATE INDEX IF NOT EXISTS responses_by_use ON responses (last_hit_at);
"""


@dataclass(frozen=True)
class CachedAnswer:
    key: str
    model: str
    answer: str
    sources: list[dict[str, Any]]
    created_at: float
    hits: int


def normalize_prompt(prompt: str) -> str:
    return " ".join(prompt.casefold().split())


def cache_key(
    prompt: str, model: str, chunks: Iterable[tuple[str, int]], params: Mapping[str, Any] | None = None
) -> str:
    material = {
        "prompt": normalize_prompt(prompt),
        "model": model,
        "chunks": sorted([str(cid), int(version)] for cid, version in chunks),
        "params": dict(params or {}),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: Path, *, max_entries: int = 10_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._puts = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            row = self._db.execute(
                "SELECT model, answer, sources, created_at, hits FROM responses WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE responses SET hits = hits + 1, last_hit_at = ? WHERE key = ?", (time.time(), key))
        model, answer, sources, created_at, hits = row
        return CachedAnswer(key, model, answer, json.loads(sources), created_at, hits + 1)

    def put(
        self,
        key: str,
        *,
        model: str,
        answer: str,
        sources: list[dict[str, Any]],
        documents: Iterable[tuple[str, str]],
    ) -> None:
        """Store an answer; `documents` are the (department, doc_id) pairs its sources came from."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM responses WHERE key = ?", (key,))
                self._db.execute(
                    "INSERT INTO responses (key, model, answer, sources, created_at, last_hit_at) VALUES (?,?,?,?,?,?)",
                    (key, model, answer, json.dumps(sources, ensure_ascii=False), now, now),
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO response_docs (key, department, doc_id) VALUES (?,?,?)",
                    [(key, dept, doc) for dept, doc in set(documents)],
                )
                self._puts += 1
                if self._puts % 100 == 0 or self.max_entries < 100:
                    self._prune()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _prune(self) -> None:
        (count,) = self._db.execute("SELECT count(*) FROM responses").fetchone()
        excess = count - self.max_entries
        if excess > 0:
            self._db.execute(
                "DELETE FROM responses WHERE key IN (SELECT key FROM responses ORDER BY last_hit_at LIMIT ?)",
                (excess,),
            )

    def invalidate_document(self, department: str, doc_id: str) -> int:
        """Delete every answer built on the document; returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "DELETE FROM responses WHERE key IN "
                    "(SELECT key FROM response_docs WHERE department = ? AND doc_id = ?)",
                    (department, doc_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(cursor.rowcount)

    def count(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM responses").fetchone()
        return int(count)

    def ping(self) -> None:
        with self._lock:
            self._db.execute("SELECT 1").fetchone()
