"""Escalations waiting for the core: a durable queue in `edge.sqlite` (table `outbox`) and the thread that
delivers it through the gateway.

`enqueue` commits the item (synchronous=FULL: it survives a power cut) and returns at once; the user gets
the local answer meanwhile. Each item carries an idempotency key, sent as `Idempotency-Key` on every
attempt. The gateway stores the first answer under that key and replays it to any repeat, so:

* an item is marked delivered in the same transaction that stores the response, and only then;
* a crash (kill -9) between the POST and that transaction leaves the item pending: the next run POSTs it
  again with the same key and the gateway answers from its store. The core is called once, the user sees
  one answer.

Outcomes of an attempt: a 2xx stores the answer (`delivered`); 409 (the gateway is still answering the
same key) and an unreachable gateway schedule a retry with exponential backoff; any other 4xx marks the
item `rejected` with the gateway's reason, never retried (a refusal does not get better by asking again).
"""

from __future__ import annotations

import json
import logging
import random
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime.common.sqlite_db import connect
from runtime.edge.transport import GatewayResponse, GatewayTransport, GatewayUnreachable

log = logging.getLogger("membria.edge.outbox")

# What each kind of item is sent to.
KIND_PATHS: dict[str, str] = {"escalation": "/v1/chat/completions"}
Status = Literal["pending", "delivered", "rejected"]
# The gateway's rule for keys (runtime/gateway/idempotency.py): refuse here what it would refuse there.
_KEY = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")
_IN_PROGRESS = 409

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'rejected')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    finished_at REAL,
    response_status INTEGER,
    response TEXT,
    endpoint TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt_at);
"""
_COLUMNS = (
    "id, seq, kind, body, idempotency_key, status, attempts, created_at, next_attempt_at, last_error, finished_at,"
    " response_status, response, endpoint"
)


class OutboxError(ValueError):
    """An item the outbox cannot take (unknown kind, a body that is not a JSON object, a bad key)."""


@dataclass(frozen=True)
class OutboxItem:
    id: str
    seq: int  # delivery order
    kind: str
    body: dict[str, Any]
    idempotency_key: str
    status: Status
    attempts: int
    created_at: float
    next_attempt_at: float
    last_error: str | None
    finished_at: float | None  # delivered or rejected at
    response_status: int | None
    response: Any  # the gateway's JSON answer once delivered
    endpoint: str | None  # the gateway that answered


@dataclass
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    unreachable: str | None = None  # set when the pass stopped because no gateway answered


class Outbox:
    def __init__(
        self,
        path: Path | str,
        *,
        backoff_base: float = 2.0,
        backoff_max: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`backoff_base`/`backoff_max`: the wait before an item's next attempt after a failed one (doubling)."""
        self.path = Path(path)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._clock = clock
        self._db = connect(self.path, durable=True, check_same_thread=False)
        self._lock = threading.Lock()
        self._delivering = threading.Lock()  # one delivery pass at a time: an item is never POSTed twice at once
        self._listeners: list[Callable[[], None]] = []
        with self._lock, self._db:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_listener(self, wake: Callable[[], None]) -> None:
        """`wake()` is called after each enqueue (the worker starts delivering at once)."""
        self._listeners.append(wake)

    # -- the queue ------------------------------------------------------------------------------------------

    def enqueue(self, kind: str, body: dict[str, Any], *, idempotency_key: str | None = None) -> OutboxItem:
        """Queue `body` for delivery; committed before it returns. Enqueueing a key again with the same body
        returns the queued item (so a caller may retry its enqueue); with another body it is an error."""
        if kind not in KIND_PATHS:
            raise OutboxError(f"unknown outbox kind {kind!r}; kinds: {', '.join(KIND_PATHS)}")
        if not isinstance(body, dict):
            raise OutboxError(f"an outbox body must be a JSON object, not {type(body).__name__}")
        try:
            text = json.dumps(body, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise OutboxError(f"the outbox body is not JSON: {exc}") from exc
        key = idempotency_key or str(uuid.uuid4())
        if not _KEY.fullmatch(key):
            raise OutboxError("an idempotency key is 1 to 128 characters from A-Z a-z 0-9 _ - : .")
        now = self._clock()
        try:
            with self._lock, self._db:
                self._db.execute(
                    "INSERT INTO outbox (id, kind, body, idempotency_key, created_at, next_attempt_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (uuid.uuid4().hex, kind, text, key, now, now),
                )
        except sqlite3.IntegrityError:
            existing = self._one("idempotency_key = ?", key)
            if existing is None or existing.kind != kind or existing.body != json.loads(text):
                raise OutboxError(f"idempotency key {key!r} is already queued with another request") from None
            return existing
        item = self._one("idempotency_key = ?", key)
        assert item is not None
        for wake in list(self._listeners):
            wake()
        return item

    def get(self, item_id: str) -> OutboxItem | None:
        return self._one("id = ?", item_id)

    def pending(self) -> list[OutboxItem]:
        """Every item not yet delivered or rejected, in delivery order."""
        return self._many("status = 'pending'")

    def due(self, now: float | None = None) -> list[OutboxItem]:
        """Pending items whose next attempt is due, in delivery order."""
        return self._many("status = 'pending' AND next_attempt_at <= ?", self._clock() if now is None else now)

    def items(self) -> list[OutboxItem]:
        return self._many("1")

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall()
        return {"pending": 0, "delivered": 0, "rejected": 0, **{status: int(n) for status, n in rows}}

    def seconds_until_due(self) -> float | None:
        """How long until the next pending item is due (0 if one is); None when nothing is pending."""
        with self._lock:
            (soonest,) = self._db.execute("SELECT min(next_attempt_at) FROM outbox WHERE status = 'pending'").fetchone()
        return None if soonest is None else max(0.0, soonest - self._clock())

    # -- outcomes --------------------------------------------------------------------------------------------

    def mark_delivered(self, item_id: str, response: GatewayResponse) -> bool:
        """Store the answer and mark the item delivered, in one transaction. False if it was not pending."""
        with self._lock, self._db:
            changed = self._db.execute(
                "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, finished_at = ?,"
                " response_status = ?, response = ?, endpoint = ?, last_error = NULL"
                " WHERE id = ? AND status = 'pending'",
                (self._clock(), response.status, json.dumps(response.body), response.endpoint, item_id),
            ).rowcount
        return bool(changed)

    def mark_rejected(self, item_id: str, status: int, reason: str) -> bool:
        """The gateway refused the item for good: keep its answer, never retry it."""
        with self._lock, self._db:
            changed = self._db.execute(
                "UPDATE outbox SET status = 'rejected', attempts = attempts + 1, finished_at = ?,"
                " response_status = ?, last_error = ? WHERE id = ? AND status = 'pending'",
                (self._clock(), status, reason[:2000], item_id),
            ).rowcount
        return bool(changed)

    def mark_failed_attempt(self, item_id: str, error: str) -> OutboxItem | None:
        """Count a failed attempt and schedule the next one (exponential backoff with jitter)."""
        with self._lock, self._db:
            row = self._db.execute("SELECT attempts FROM outbox WHERE id = ? AND status = 'pending'", (item_id,))
            found = row.fetchone()
            if found is not None:
                attempts = int(found[0]) + 1
                ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** (attempts - 1))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not a secret
                self._db.execute(
                    "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                    (attempts, self._clock() + delay, error[:2000], item_id),
                )
        return self.get(item_id)

    # -- delivery --------------------------------------------------------------------------------------------

    def deliver_once(self, transport: GatewayTransport, *, ignore_schedule: bool = False) -> DeliveryReport:
        """Try each due item once, in order. Stops at the first item no gateway answered: the rest would
        fail the same way, and each keeps its place."""
        report = DeliveryReport()
        with self._delivering:
            for item in self.pending() if ignore_schedule else self.due():
                try:
                    response = transport.post_json(
                        KIND_PATHS[item.kind], item.body, idempotency_key=item.idempotency_key
                    )
                except GatewayUnreachable as exc:
                    self.mark_failed_attempt(item.id, str(exc))
                    report.retrying.append(item.id)
                    report.unreachable = str(exc)
                    break
                if 200 <= response.status < 300:
                    self.mark_delivered(item.id, response)
                    report.delivered.append(item.id)
                elif response.status == _IN_PROGRESS:  # the gateway is still answering this key
                    self.mark_failed_attempt(item.id, f"HTTP 409: {_reason(response)}")
                    report.retrying.append(item.id)
                else:
                    self.mark_rejected(item.id, response.status, f"HTTP {response.status}: {_reason(response)}")
                    report.rejected.append(item.id)
        return report

    # -- rows --------------------------------------------------------------------------------------------------

    def _one(self, where: str, *args: Any) -> OutboxItem | None:
        found = self._many(where, *args)
        return found[0] if found else None

    def _many(self, where: str, *args: Any) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE {where} ORDER BY seq", args).fetchall()  # noqa: S608 - fixed fragments
        return [_item(row) for row in rows]


def _item(row: tuple[Any, ...]) -> OutboxItem:
    (
        item_id,
        seq,
        kind,
        body,
        key,
        status,
        attempts,
        created_at,
        next_attempt_at,
        last_error,
        finished_at,
        response_status,
        response,
        endpoint,
    ) = row
    return OutboxItem(
        id=item_id,
        seq=seq,
        kind=kind,
        body=json.loads(body),
        idempotency_key=key,
        status=status,
        attempts=attempts,
        created_at=created_at,
        next_attempt_at=next_attempt_at,
        last_error=last_error,
        finished_at=finished_at,
        response_status=response_status,
        response=json.loads(response) if response is not None else None,
        endpoint=endpoint,
    )


def _reason(response: GatewayResponse) -> str:
    body = response.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"].get("code") or "")
    return json.dumps(body)[:500] if body is not None else "no body"


class OutboxWorker:
    """Delivers the outbox in the background: wakes on enqueue, otherwise when the next retry is due (at
    least every `idle_seconds`). `stop()` makes one last pass over what is pending, unless the gateway was
    unreachable on the last pass, then returns; whatever is left stays on disk for the next start."""

    def __init__(
        self,
        outbox: Outbox,
        transport: GatewayTransport,
        *,
        idle_seconds: float = 30.0,
        on_delivered: Callable[[OutboxItem], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.idle_seconds = idle_seconds
        self.on_delivered = on_delivered
        self.last_report: DeliveryReport | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._flush = True
        self._thread: threading.Thread | None = None
        outbox.add_listener(self.wake)

    def start(self) -> OutboxWorker:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="edge-outbox", daemon=True)
            self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, *, flush: bool = True, timeout: float = 60.0) -> None:
        self._flush = flush
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the outbox worker is still in a delivery after %.0fs; its item stays pending", timeout)

    def _pass(self, *, ignore_schedule: bool = False) -> None:
        try:
            report = self.outbox.deliver_once(self.transport, ignore_schedule=ignore_schedule)
        except Exception:  # the loop must outlive one bad pass (a closed file at shutdown, a full disk)
            log.exception("outbox delivery pass failed")
            return
        self.last_report = report
        if report.unreachable:
            log.info("gateway unreachable, %d item(s) wait: %s", len(self.outbox.pending()), report.unreachable)
        if self.on_delivered is not None:
            for item_id in report.delivered:
                item = self.outbox.get(item_id)
                if item is not None:
                    self.on_delivered(item)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before the pass: an enqueue during it triggers the next one
            self._pass()
            try:
                due = self.outbox.seconds_until_due()
            except sqlite3.Error:  # closed under us: nothing more to deliver from here
                log.exception("the outbox cannot be read")
                return
            self._wake.wait(self.idle_seconds if due is None else min(due, self.idle_seconds))
        last = self.last_report
        if self._flush and not (last and last.unreachable):
            self._pass(ignore_schedule=True)
