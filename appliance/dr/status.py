"""`appliance dr status`: how far behind the source each store's protected copy is.

A store's copy is current up to the newest of: its last shipment's source time, the shipper's last pass
that found nothing new (the local heartbeat), and its part of the newest backup. The lag is now minus
that; a lag above the store's RPO is flagged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.backends import Backends
from appliance.dr import catalog
from appliance.dr.objects import DrBucket
from appliance.dr.shipper import Heartbeat
from appliance.dr.stores import SHIPPED, STORE_NAMES
from appliance.dr.stores.base import StoreBackup

PRODUCTION_HEARTBEAT = Path("/var/lib/membria/dr/shipper.json")


def heartbeat_path(backends: Backends) -> Path:
    if backends.state is None:
        return PRODUCTION_HEARTBEAT
    return backends.state.data_dir / "dr" / "shipper.json"


@dataclass(frozen=True)
class StoreLag:
    store: str
    shipped_up_to: float | None  # None: never backed up nor shipped
    lag_seconds: float | None
    rpo_seconds: int
    last_shipment: int | None
    last_backup: str | None
    error: str  # the shipper's last error for this store, if its last pass failed

    @property
    def over_rpo(self) -> bool:
        return self.lag_seconds is None or self.lag_seconds > self.rpo_seconds

    def to_wire(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "shipped_up_to": self.shipped_up_to,
            "lag_seconds": None if self.lag_seconds is None else round(self.lag_seconds, 1),
            "rpo_seconds": self.rpo_seconds,
            "over_rpo": self.over_rpo,
            "last_shipment": self.last_shipment,
            "last_backup": self.last_backup,
            "error": self.error,
        }


def shipped_up_to(
    bucket: DrBucket, store: str, heartbeat: dict[str, Any], backups: dict[str, tuple[str, StoreBackup]]
) -> tuple[float | None, int | None, str | None]:
    """(time the store's copy is current up to, last shipment sequence, last backup id); `backups` is
    `catalog.latest_parts`."""
    candidates: list[float] = []
    head = catalog.read_head(bucket, store) if store in SHIPPED else None
    if head is not None:
        candidates.append(head.source_time)
    beat = heartbeat.get(store)
    if isinstance(beat, dict) and beat.get("shipped_up_to"):
        candidates.append(float(beat["shipped_up_to"]))
    backup_id, part = backups.get(store, (None, None))
    if part is not None:
        candidates.append(part.source_time)
    return (max(candidates) if candidates else None, head.sequence if head else None, backup_id)


def lags(backends: Backends, bucket: DrBucket, *, now: float | None = None) -> list[StoreLag]:
    now = now or time.time()
    beats = Heartbeat(heartbeat_path(backends)).read()
    backups = catalog.latest_parts(bucket, STORE_NAMES)
    out = []
    for store in STORE_NAMES:
        up_to, sequence, backup_id = shipped_up_to(bucket, store, beats, backups)
        beat = beats.get(store) if isinstance(beats.get(store), dict) else {}
        out.append(
            StoreLag(
                store=store,
                shipped_up_to=up_to,
                lag_seconds=None if up_to is None else max(0.0, now - up_to),
                rpo_seconds=getattr(backends.site.dr.rpo_seconds, store),
                last_shipment=sequence,
                last_backup=backup_id,
                error=str(beat.get("error", "")) if beat else "",
            )
        )
    return out
