"""The gateway's memory of answered requests, by (caller, Idempotency-Key): a repeated escalation gets the
stored answer instead of a second call to the core.

One SQLite file (WAL) in the gateway's state directory; gateways that share it (one host, or a shared
volume) deduplicate across each other, so an edge that fails over mid-delivery is still answered once.

A request with a key first *claims* it: `INSERT ... ON CONFLICT DO NOTHING` inside an immediate transaction,
so of two concurrent requests exactly one gets the claim (across processes too). The other **waits**: it
polls until the first completes (then it is answered with the stored response), for at most `wait_seconds`;
past that it gets `KeyInProgress` (the gateway answers 409 with Retry-After, which the edge outbox retries).
Waiting rather than refusing at once means the usual race (a client retrying a slow request) resolves into
one answer for both.

A claim whose upstream call failed (any error: a 5xx, a refusal, a dropped connection) is *released*, so a
retry with the same key proceeds. A claim whose gateway died mid-call expires after `lease_seconds`.
Only 2xx answers are stored: errors are cheap to recompute and may not be permanent.

Every row counts its upstream calls and replays: the evidence that a key reached the core once.
Rows expire after `ttl_seconds` (7 days by default); expired rows are pruned on write.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.common.sqlite_db import connect

KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")
DEFAULT_TTL_SECONDS = 7 * 24 * 3600
_PRUNE_EVERY_SECONDS = 60.0  # pruning is a range delete on an index; no need to run it on every write

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    caller TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'released')),
    status INTEGER,
    body TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    upstream_calls INTEGER NOT NULL DEFAULT 0,
    replays INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (caller, key)
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at);
"""


class IdempotencyError(Exception):
    """Base class: each subclass is one answer the gateway gives instead of calling the core."""


class InvalidKey(IdempotencyError):
    """The header is not a valid key."""


class KeyReused(IdempotencyError):
    """The key was first used with a different request."""


class KeyInProgress(IdempotencyError):
    """Another request with this key is still being answered."""


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: Any  # the JSON answer as first sent


@dataclass(frozen=True)
class Claimed:
    """This request holds the key: call upstream, then `complete` or `release`."""


@dataclass(frozen=True)
class Replay:
    response: StoredResponse


@dataclass(frozen=True)
class _Busy:
    pass


Outcome = Claimed | Replay


def validate_key(key: str) -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise InvalidKey(
            "invalid Idempotency-Key header: it must be 1 to 128 characters from A-Z a-z 0-9 _ - : . "
            f"(got {len(key)} characters)"
        )
    return key


def request_hash(body: Any) -> str:
    """A hash of the request's meaning: canonical JSON, so key order and whitespace do not matter."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    def __init__(
        self,
        path: Path,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        lease_seconds: float = 180.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.ttl_seconds = ttl_seconds
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._db = connect(self.path, durable=True, check_same_thread=False)
        self._lock = threading.Lock()
        self._last_prune = 0.0
        with self._lock, self._db:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- one attempt -------------------------------------------------------------------------------------

    def try_begin(self, caller: str, key: str, req_hash: str) -> Outcome | _Busy:
        """Claim the key, or find its stored answer, or learn that another request holds it."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes sharing the file
            try:
                outcome = self._begin_locked(caller, key, req_hash, now)
            except BaseException:
                self._db.rollback()
                raise
            self._db.commit()
            return outcome

    def _begin_locked(self, caller: str, key: str, req_hash: str, now: float) -> Outcome | _Busy:
        if now - self._last_prune >= _PRUNE_EVERY_SECONDS:
            self._db.execute("DELETE FROM idempotency WHERE created_at < ?", (now - self.ttl_seconds,))
            self._last_prune = now
        inserted = self._db.execute(
            "INSERT INTO idempotency (caller, key, request_hash, state, created_at, updated_at, lease_until,"
            " upstream_calls) VALUES (?, ?, ?, 'pending', ?, ?, ?, 1) ON CONFLICT (caller, key) DO NOTHING",
            (caller, key, req_hash, now, now, now + self.lease_seconds),
        ).rowcount
        if inserted:
            return Claimed()
        row = self._db.execute(
            "SELECT request_hash, state, status, body, lease_until, created_at FROM idempotency"
            " WHERE caller = ? AND key = ?",
            (caller, key),
        ).fetchone()
        stored_hash, state, status, body, lease_until, created_at = row
        if created_at < now - self.ttl_seconds:  # expired but not pruned yet: a fresh start
            self._db.execute(
                "UPDATE idempotency SET request_hash = ?, state = 'pending', status = NULL, body = NULL,"
                " created_at = ?, updated_at = ?, lease_until = ?, upstream_calls = 1, replays = 0"
                " WHERE caller = ? AND key = ?",
                (req_hash, now, now, now + self.lease_seconds, caller, key),
            )
            return Claimed()
        if stored_hash != req_hash:
            raise KeyReused("idempotency key reused with a different request")
        if state == "done":
            self._db.execute(
                "UPDATE idempotency SET replays = replays + 1, updated_at = ? WHERE caller = ? AND key = ?",
                (now, caller, key),
            )
            return Replay(StoredResponse(int(status), json.loads(body)))
        if state == "released" or lease_until < now:  # failed before, or its gateway died mid-call
            self._db.execute(
                "UPDATE idempotency SET state = 'pending', lease_until = ?, updated_at = ?,"
                " upstream_calls = upstream_calls + 1 WHERE caller = ? AND key = ?",
                (now + self.lease_seconds, now, caller, key),
            )
            return Claimed()
        return _Busy()

    # -- after the upstream call ---------------------------------------------------------------------------

    def complete(self, caller: str, key: str, status: int, body: Any) -> None:
        """Store the answer of a claimed key; later requests with the key get it."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE idempotency SET state = 'done', status = ?, body = ?, updated_at = ?"
                " WHERE caller = ? AND key = ? AND state = 'pending'",
                (status, json.dumps(body, ensure_ascii=False), self._clock(), caller, key),
            )

    def release(self, caller: str, key: str) -> None:
        """Give a claim back after a failure, so a retry with the key calls upstream again."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE idempotency SET state = 'released', updated_at = ? WHERE caller = ? AND key = ?"
                " AND state = 'pending'",
                (self._clock(), caller, key),
            )

    # -- waiting for a concurrent request --------------------------------------------------------------------

    async def begin(
        self, caller: str, key: str, req_hash: str, *, wait_seconds: float, poll_seconds: float = 0.1
    ) -> Outcome:
        """`try_begin`, polling while another request holds the key, for at most `wait_seconds`."""
        deadline = time.monotonic() + wait_seconds
        while True:
            outcome = await asyncio.to_thread(self.try_begin, caller, key, req_hash)
            if not isinstance(outcome, _Busy):
                return outcome
            if time.monotonic() >= deadline:
                raise KeyInProgress(f"a request with this idempotency key is still in progress after {wait_seconds:g}s")
            await asyncio.sleep(poll_seconds)

    def stats(self, caller: str, key: str) -> dict[str, Any] | None:
        """The row's bookkeeping (state, upstream_calls, replays) for operators and tests."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, status, upstream_calls, replays FROM idempotency WHERE caller = ? AND key = ?",
                (caller, key),
            ).fetchone()
        if row is None:
            return None
        return {"state": row[0], "status": row[1], "upstream_calls": row[2], "replays": row[3]}
