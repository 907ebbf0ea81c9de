"""The core server's response cache: keys and invalidation (SQLite in a temporary directory)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from runtime.core.cache import ResponseCache, cache_key

pytestmark = pytest.mark.unit

CHUNKS = [("c2", 1), ("c1", 3)]


def test_key_normalises_case_and_whitespace_and_ignores_chunk_order() -> None:
    key = cache_key("What is  the VX-55 procedure?", "gemma", CHUNKS)
    assert cache_key("  what is the vx-55\nprocedure?  ", "gemma", list(reversed(CHUNKS))) == key
    assert cache_key("What is the VX-55 procedure!", "gemma", CHUNKS) != key
    assert cache_key("What is the VX-55 procedure?", "qwen", CHUNKS) != key
    assert cache_key("What is the VX-55 procedure?", "gemma", [("c2", 2), ("c1", 3)]) != key  # new version
    assert cache_key("What is the VX-55 procedure?", "gemma", CHUNKS, {"max_tokens": 16}) != key


def test_put_get_and_invalidate_by_document(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    try:
        sources = [{"chunk_id": "c1", "doc_id": "vx", "department": "engineering"}]
        cache.put("k1", model="m", answer="A1", sources=sources, documents=[("engineering", "vx")])
        cache.put("k2", model="m", answer="A2", sources=[], documents=[("engineering", "pump"), ("hr", "vx")])
        hit = cache.get("k1")
        assert hit is not None
        assert (hit.answer, hit.sources, hit.hits) == ("A1", sources, 1)
        assert cache.get("missing") is None
        assert cache.invalidate_document("engineering", "vx") == 1  # not hr/vx: departments differ
        assert cache.get("k1") is None
        assert cache.get("k2") is not None
        assert cache.invalidate_document("engineering", "vx") == 0
    finally:
        cache.close()
    db = sqlite3.connect(tmp_path / "cache.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT count(*) FROM response_docs").fetchone()[0] == 2  # k1's rows cascaded away
    db.close()


def test_least_recently_used_entries_are_pruned(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite", max_entries=3)
    try:
        for i in range(3):
            cache.put(f"k{i}", model="m", answer=str(i), sources=[], documents=[])
        assert cache.get("k0") is not None  # k0 is now the most recently used
        cache.put("k3", model="m", answer="3", sources=[], documents=[])
        assert cache.count() == 3
        assert cache.get("k1") is None
        assert cache.get("k0") is not None
    finally:
        cache.close()
