"""Continuous shipping: every pass ships each store's changes since its watermark.

The watermark (the head record in the bucket) moves only after the shipment's data and record are on
both targets, so a pass that fails (S3 down, killed) loses nothing: the next pass ships the same changes
again, under the same sequence number. A pass that finds nothing new records that in the local
heartbeat file instead of writing to the bucket: the lag of an idle store stays near zero without
filling a locked bucket with empty objects.
"""

from __future__ import annotations

import json
import logging
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from appliance.dr import catalog
from appliance.dr.objects import DrBucket
from appliance.dr.stores import SHIPPED, make_store
from appliance.dr.stores.base import Place, Store
from runtime.common import atomic

log = logging.getLogger("membria.dr.shipper")


@dataclass(frozen=True)
class ShipOutcome:
    store: str
    items: int  # 0: nothing new
    sequence: int | None  # the shipment written, if any
    seconds: float
    error: str = ""


class Heartbeat:
    """The shipper's local record: per store, the last time a pass found the source fully shipped."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def record(self, store: str, *, shipped_up_to: float, error: str = "") -> None:
        data = self.read()
        data[store] = {"shipped_up_to": shipped_up_to, "checked_at": time.time(), "error": error}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path, json.dumps(data, indent=1, sort_keys=True))


def ship_store(bucket: DrBucket, place: Place, store: Store, heartbeat: Heartbeat | None = None) -> ShipOutcome:
    """Ship one store's changes since its head; raises S3Unavailable (retry later) and the store's errors."""
    started = time.monotonic()
    head = catalog.read_head(bucket, store.name)
    checked = time.time()
    with tempfile.TemporaryDirectory(prefix=f"membria-ship-{store.name}-") as tmp:
        batch = store.changes(place, head.watermark if head else None, Path(tmp))
        if batch is None:
            if heartbeat is not None:
                heartbeat.record(store.name, shipped_up_to=checked)
            return ShipOutcome(store.name, 0, None, time.monotonic() - started)
        sequence = (head.sequence if head else 0) + 1
        data_key = catalog.shipment_key(store.name, sequence)
        stored = bucket.put_file(data_key, batch.path)
    record = catalog.ShipRecord(
        store=store.name,
        sequence=sequence,
        watermark=batch.watermark,
        source_time=batch.source_time,
        shipped_at=time.time(),
        items=batch.items,
        data_key=data_key,
        sha256=stored.sha256,
    )
    bucket.put_json(catalog.record_key(store.name, sequence), record.to_wire())
    bucket.put_json(catalog.head_key(store.name), record.to_wire())
    if heartbeat is not None:
        heartbeat.record(store.name, shipped_up_to=batch.source_time)
    return ShipOutcome(store.name, batch.items, sequence, time.monotonic() - started)


def ship_pass(
    bucket: DrBucket, place: Place, heartbeat: Heartbeat | None, stores: list[str] | None = None
) -> list[ShipOutcome]:
    """One pass over the shipped stores. A store that fails is reported and the others still ship."""
    outcomes = []
    for name in stores or list(SHIPPED):
        started = time.monotonic()
        try:
            outcomes.append(ship_store(bucket, place, make_store(name), heartbeat))
        except Exception as exc:  # noqa: BLE001 - one broken store must not stop the others shipping
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            log.warning("shipping %s failed: %s", name, message)
            if heartbeat is not None:
                previous = heartbeat.read().get(name, {})
                heartbeat.record(name, shipped_up_to=float(previous.get("shipped_up_to", 0.0)), error=message)
            outcomes.append(ShipOutcome(name, 0, None, time.monotonic() - started, error=message))
    return outcomes


class Shipper:
    """The supervised loop: a pass every `interval` seconds until SIGTERM/SIGINT (the pass in flight
    finishes first). After a failed pass it retries sooner, backing off up to the interval."""

    def __init__(
        self,
        bucket_factory: Callable[[], DrBucket],
        place: Place,
        heartbeat: Heartbeat,
        interval: float,
        report: Callable[[list[ShipOutcome]], None] | None = None,
    ) -> None:
        self.bucket_factory = bucket_factory
        self.place = place
        self.heartbeat = heartbeat
        self.interval = interval
        self.report = report
        self.stopping = threading.Event()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        bucket: DrBucket | None = None
        retry_delay = 1.0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                bucket = bucket or self.bucket_factory()
                outcomes = ship_pass(bucket, self.place, self.heartbeat)
            except Exception as exc:  # noqa: BLE001 - opening the bucket failed (Vault down?): retry soon
                outcomes = [ShipOutcome("*", 0, None, 0.0, error=getattr(exc, "message", str(exc)))]
            if self.report is not None:
                self.report(outcomes)
            if any(o.error for o in outcomes):  # retry sooner, backing off up to the interval
                self.stopping.wait(retry_delay)
                retry_delay = min(retry_delay * 2, self.interval)
            else:
                retry_delay = 1.0
                self.stopping.wait(max(0.0, self.interval - (time.monotonic() - started)))
