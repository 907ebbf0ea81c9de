"""The gateway's audit writer: request handlers submit events, a background thread chains and inserts them.

`submit` is what handlers call (FastAPI async handlers on the event loop, or threads): it validates the
event, appends it to an in-memory queue under a lock held for microseconds, and returns. It never blocks on
the database. The writer thread takes events in submission order, gives each the next `seq`, pseudonymizes
the subject, chains the rows (`runtime.common.audit.chain`) and inserts them with clickhouse-connect's
`client.insert` in batches: every `batch_size` rows or `flush_interval_s` after the oldest waiting event,
whichever comes first.

Nothing is dropped silently:

* a failed insert keeps its batch and is retried with exponential backoff (`retry_initial_s` doubling up
  to `retry_max_s`) for as long as it takes; a retry first checks whether the failed attempt landed after
  all (and carries the same `insert_deduplication_token`), so a retry never duplicates rows;
* the queue is bounded (`max_pending` rows accepted but not yet durable). When it is full, `submit` raises
  `AuditQueueFull` at once instead of blocking the event loop or discarding a row: the gateway answers
  503 (no audit row, no service). `has_capacity()` lets a handler refuse before doing the work;
* `close()` (graceful shutdown) flushes everything and is idempotent. If the database stays unreachable
  past its timeout, the rows not written are chained and logged as JSON lines at ERROR level (logger
  ``membria.audit``: pseudonymized, re-insertable in order) and `AuditFlushError` says how many.

On `start()` the writer resumes the chain from the table's last row (max seq and its row_hash), creating
the table if needed. The writer takes a client factory, so the same code runs on chDB (lab) and on a
ClickHouse server. With chDB, one process at a time may open the database (see `runtime.common.audit`):
`release_between_batches=True` (what `for_dsn` picks for ``chdb://``) opens it for each batch and closes
it afterwards, so `appliance audit-log verify` and `appliance lab status` can open it between batches.
Only one writer may write a table at a time: two writers would fork the chain.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runtime.common.audit import (
    COLUMN_NAMES,
    COLUMN_TYPES,
    DEFAULT_TABLE,
    GENESIS_HASH,
    AuditEvent,
    AuditRow,
    ClientFactory,
    Head,
    chain,
    client_factory,
    ddl,
    is_embedded_dsn,
    pseudonymize,
    quote_table,
    read_head,
)

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = logging.getLogger("membria.audit")


class AuditError(RuntimeError):
    """Base class of the audit writer's errors."""


class AuditQueueFull(AuditError):
    """`max_pending` rows are waiting for the database: refuse the request rather than lose its audit row."""


class AuditDbUnavailable(AuditError):
    """The writer could not reach the audit DB at start-up to resume the chain."""


class AuditFlushError(AuditError):
    """Rows could not be written before `close()` gave up; they were logged (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class WriterStatus:
    pending: int  # accepted, not yet durable
    head: Head | None  # the last row known to be in the table
    last_error: str | None  # the last insert error, cleared by the next success
    running: bool


class AuditWriter:
    def __init__(
        self,
        client_factory: ClientFactory,
        *,
        pseudonym_key: bytes,
        table: str = DEFAULT_TABLE,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        max_pending: int = 100_000,
        release_between_batches: bool = False,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
        startup_timeout_s: float = 30.0,
        create_table: bool = True,
    ) -> None:
        if batch_size < 1 or max_pending < batch_size:
            raise ValueError("batch_size must be >= 1 and max_pending >= batch_size")
        if flush_interval_s <= 0 or retry_initial_s <= 0 or retry_max_s < retry_initial_s:
            raise ValueError("flush and retry intervals must be positive (retry_max_s >= retry_initial_s)")
        pseudonymize("", pseudonym_key)  # refuse a bad key now, not on the writer thread
        self._factory = client_factory
        self._key = bytes(pseudonym_key)
        self._table = table
        self._quoted = quote_table(table)
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._max_pending = max_pending
        self._release = release_between_batches
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._startup_timeout = startup_timeout_s
        self._create_table = create_table

        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[AuditEvent] = deque()
        self._oldest_at = 0.0  # monotonic time the oldest queued event arrived
        self._taken: list[AuditEvent] = []  # out of the queue, not yet durable
        self._inflight: list[AuditRow] = []  # the same, chained (writer thread; read by close)
        self._closing = False
        self._closed = False
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Client | None = None
        self._next_seq = 1
        self._prev_hash = GENESIS_HASH
        self._head: Head | None = None
        self._last_error: str | None = None

    @classmethod
    def for_dsn(
        cls, dsn: str, *, pseudonym_key: bytes, password: str = "", table: str = DEFAULT_TABLE, **options: Any
    ) -> AuditWriter:
        """A writer for ``chdb:///path`` (releases the engine between batches) or a ClickHouse server DSN."""
        options.setdefault("release_between_batches", is_embedded_dsn(dsn))
        return cls(client_factory(dsn, password=password), pseudonym_key=pseudonym_key, table=table, **options)

    # -- the request side --------------------------------------------------------------------------------------

    def submit(self, event: AuditEvent | Mapping[str, Any]) -> None:
        """Queue one event; returns at once. Raises `AuditQueueFull` when the bound is reached, `AuditError`
        after `close()`, `ValueError` for a malformed event."""
        item = event if isinstance(event, AuditEvent) else AuditEvent.from_mapping(event)
        with self._cond:
            if self._closing:
                raise AuditError("the audit writer is closed")
            if len(self._queue) + len(self._taken) >= self._max_pending:
                raise AuditQueueFull(
                    f"{self._max_pending} audit rows are waiting for the audit DB"
                    + (f" (last error: {self._last_error})" if self._last_error else "")
                )
            if not self._queue:
                self._oldest_at = time.monotonic()
            self._queue.append(item)
            if len(self._queue) == 1 or len(self._queue) >= self._batch_size:
                self._cond.notify_all()  # the first event starts the interval, a full batch ends it

    def has_capacity(self) -> bool:
        with self._cond:
            return not self._closing and len(self._queue) + len(self._taken) < self._max_pending

    def status(self) -> WriterStatus:
        with self._cond:
            return WriterStatus(
                pending=len(self._queue) + len(self._taken),
                head=self._head,
                last_error=self._last_error,
                running=self._thread is not None and self._thread.is_alive(),
            )

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> AuditWriter:
        """Resume the chain from the table's last row (creating the table if needed) and start the thread.

        Retries for `startup_timeout_s` (in the lab another process may hold chDB for a moment), then raises
        `AuditDbUnavailable`. Blocking: from async code use `astart`.
        """
        with self._cond:
            if self._thread is not None:
                return self
            if self._closing:
                raise AuditError("the audit writer is closed")
        deadline = time.monotonic() + self._startup_timeout
        delay = self._retry_initial
        while True:
            try:
                client = self._connect()
                if self._create_table:
                    client.command(ddl(self._table))
                head = read_head(client, self._table)
                break
            except Exception as exc:  # any failure to reach the DB is retried, then reported
                self._disconnect()
                if time.monotonic() + delay > deadline:
                    raise AuditDbUnavailable(f"cannot resume the audit chain in {self._table}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, self._retry_max)
        self._head = head
        self._next_seq = head.seq + 1 if head else 1
        self._prev_hash = head.row_hash if head else GENESIS_HASH
        if self._release:
            self._disconnect()
        thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        with self._cond:
            self._thread = thread
        thread.start()
        atexit.register(self._close_at_exit)  # a safety net: the service's shutdown should call close()
        return self

    async def astart(self) -> AuditWriter:
        return await asyncio.to_thread(self.start)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event submitted so far is in the table (or `timeout` passes); True when it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._thread is None and self._queue:
                raise AuditError("the audit writer has not been started")
            self._oldest_at = 0.0  # a flush request does not wait for the interval
            self._cond.notify_all()
            while self._queue or self._taken:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
                self._oldest_at = 0.0
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush and stop (graceful shutdown). Idempotent. Waits up to `timeout` seconds (None: for ever)
        for the database; rows still unwritten then are logged and `AuditFlushError` is raised."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
            queued = bool(self._queue)
        try:
            if thread is None and queued:
                # Events were submitted to a writer that never started: start it now to write them.
                with self._cond:
                    self._closing = False
                try:
                    self.start()
                except AuditError as exc:
                    self._last_error = str(exc)
                finally:
                    with self._cond:
                        self._closing = True
                        self._cond.notify_all()
                        thread = self._thread
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    self._abandon.set()
                    with self._cond:
                        self._cond.notify_all()
                    thread.join(10)
            self._report_unwritten()
        finally:
            self._closed = True
            self._disconnect()
            atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        with contextlib.suppress(AuditFlushError):  # the unwritten rows are in the log already
            self.close()

    async def aclose(self, timeout: float | None = 30.0) -> None:
        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> AuditWriter:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the writer thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here must not silently stop auditing: say so loudly
            with self._cond:
                self._last_error = f"the audit writer thread stopped: {type(exc).__name__}: {exc}"
            log.exception("the audit writer thread stopped; audit rows are no longer written")
            raise

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                while (
                    self._queue
                    and len(self._queue) < self._batch_size
                    and not self._closing
                    and (remaining := self._oldest_at + self._interval - time.monotonic()) > 0
                ):
                    self._cond.wait(remaining)
                if not self._queue:
                    return  # closing, and everything is written
                self._taken = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
                self._oldest_at = time.monotonic()
            rows = self._chain(self._taken)  # hashing happens outside the lock submitters take
            with self._cond:
                self._inflight = rows
            written = self._insert(rows)
            with self._cond:
                if written:
                    self._taken, self._inflight = [], []
                self._cond.notify_all()
            if not written:
                return  # abandoned by close(); the rows stay in _inflight for _report_unwritten

    def _chain(self, events: list[AuditEvent]) -> list[AuditRow]:
        rows = [AuditRow.from_event(e, self._next_seq + i, self._key) for i, e in enumerate(events)]
        chained = chain(rows, self._prev_hash)
        self._next_seq += len(chained)
        self._prev_hash = chained[-1].row_hash
        return chained

    def _insert(self, rows: list[AuditRow]) -> bool:
        """Insert `rows` until it works (True) or close() abandons the writer (False)."""
        token = f"audit-{rows[0].seq}-{rows[-1].seq}"
        delay = self._retry_initial
        failures = 0
        while True:
            try:
                client = self._connect()
                todo = rows
                if failures:
                    # The failed attempt may have landed (an error after the commit): never insert twice.
                    landed = int(str(client.command(f"SELECT max(seq) FROM {self._quoted}")))  # noqa: S608
                    todo = [r for r in rows if r.seq > landed]
                if todo:
                    client.insert(
                        self._table,  # clickhouse-connect quotes it (validated by quote_table)
                        [r.values() for r in todo],
                        column_names=list(COLUMN_NAMES),
                        column_type_names=list(COLUMN_TYPES),
                        settings={"insert_deduplication_token": token},
                    )
                if self._release:
                    self._disconnect()
                with self._cond:
                    self._head = Head(rows[-1].seq, rows[-1].row_hash)
                    self._last_error = None
                if failures:
                    log.warning(
                        "audit rows %d..%d written after %d failed attempt(s)", rows[0].seq, rows[-1].seq, failures
                    )
                return True
            except Exception as exc:  # noqa: BLE001 - keep the batch and retry whatever went wrong
                failures += 1
                self._disconnect()
                message = f"{type(exc).__name__}: {exc}"
                with self._cond:
                    self._last_error = message
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "audit insert of rows %d..%d failed (attempt %d), retrying: %s",
                        rows[0].seq,
                        rows[-1].seq,
                        failures,
                        message,
                    )
                if self._abandon.wait(delay):
                    return False
                delay = min(delay * 2, self._retry_max)

    def _connect(self) -> Client:
        if self._client is None:
            self._client = self._factory()
        return self._client

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken connection must not hide the real error
                log.debug("closing the audit DB client failed", exc_info=True)

    def _report_unwritten(self) -> None:
        with self._cond:
            rows = list(self._inflight)
            events = ([] if rows else list(self._taken)) + list(self._queue)
            self._queue.clear()
            self._taken, self._inflight = [], []
        if events and self._thread is not None:
            rows += self._chain(events)
        elif events:  # never started: the chain position is unknown, so seq 0 and no hashes
            rows += [AuditRow.from_event(e, 0, self._key) for e in events]
        if not rows:
            return
        for row in rows:
            log.error("audit row not written: %s", row.to_json())
        raise AuditFlushError(
            f"{len(rows)} audit row(s) (seq {rows[0].seq}..{rows[-1].seq}) could not be written to {self._table}"
            f" before shutdown; they are in the log above. Last error: {self._last_error}"
        )
