"""Open SQLite files the same way everywhere: WAL, a busy timeout, foreign keys, sqlite-vec on request.

WAL lets readers run while one writer commits, so the edge agent's modules can each hold their own
connection to the one `edge.sqlite` file. `synchronous=NORMAL` in WAL mode loses nothing that was
committed before the last checkpoint-safe fsync of the WAL... except on power loss, where it may lose the
last transactions but never corrupts; stores that must survive power loss pass `durable=True` (FULL).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

BUSY_TIMEOUT_MS = 10_000


class SqliteUnsupported(RuntimeError):
    """This Python's sqlite3 cannot do what is asked (no extension loading, no FTS5)."""


def connect(
    path: Path | str,
    *,
    vectors: bool = False,
    durable: bool = False,
    check_same_thread: bool = False,
    read_only: bool = False,
) -> sqlite3.Connection:
    """A connection in autocommit-off mode (use `with conn:` for transactions), WAL journal, rows as tuples."""
    if read_only:
        conn = sqlite3.connect(
            f"file:{Path(path)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=check_same_thread
        )
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=check_same_thread)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not read_only:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys = ON")
        if vectors:
            load_sqlite_vec(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def load_sqlite_vec(conn: sqlite3.Connection) -> None:
    """Load the sqlite-vec extension (from the `sqlite-vec` wheel) into `conn`."""
    if not hasattr(conn, "enable_load_extension"):
        raise SqliteUnsupported(
            "this Python's sqlite3 module cannot load extensions (needed for sqlite-vec); "
            "use Debian's /usr/bin/python3 or another build with loadable extensions"
        )
    import sqlite_vec

    conn.enable_load_extension(True)
    try:
        sqlite_vec.load(conn)
    finally:
        conn.enable_load_extension(False)


def has_fts5(conn: sqlite3.Connection) -> bool:
    return bool(conn.execute("SELECT sqlite_compileoption_used('ENABLE_FTS5')").fetchone()[0])
