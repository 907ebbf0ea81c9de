"""What is in the DR bucket: backup manifests and each store's chain of shipments.

- `backups/<id>/manifest.json` is written last, so a backup without one (killed half-way) is ignored.
- `ship/<store>/<seq>-<random>.bin` is a shipment's data, `ship/<store>/<seq>.json` its record, `ship/<store>/head.json`
  the newest record. The order of writes (data, record, head) means a crash leaves at worst a data
  object nobody points to; the next pass ships the same changes again under the same sequence number.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance import __version__
from appliance.dr.objects import DrBucket, MissingObject
from appliance.dr.stores.base import StoreBackup

_BACKUP_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def new_backup_id(now: float | None = None) -> str:
    stamp = datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def valid_backup_id(value: str) -> bool:
    return bool(_BACKUP_ID.fullmatch(value))


@dataclass
class Manifest:
    backup_id: str
    site: str
    started_at: float
    finished_at: float
    stores: dict[str, StoreBackup]
    ship_sequences: dict[str, int]  # each store's newest shipment when the backup started
    version: str = __version__

    def to_wire(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id,
            "site": self.site,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "stores": {name: part.to_wire() for name, part in self.stores.items()},
            "ship_sequences": self.ship_sequences,
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> Manifest:
        return cls(
            backup_id=str(value["backup_id"]),
            site=str(value["site"]),
            started_at=float(value["started_at"]),
            finished_at=float(value["finished_at"]),
            stores={name: StoreBackup.from_wire(part) for name, part in value["stores"].items()},
            ship_sequences={k: int(v) for k, v in value.get("ship_sequences", {}).items()},
            version=str(value.get("version", "")),
        )


def manifest_key(backup_id: str) -> str:
    return f"backups/{backup_id}/manifest.json"


def write_manifest(bucket: DrBucket, manifest: Manifest) -> None:
    bucket.put_json(manifest_key(manifest.backup_id), manifest.to_wire())


def backup_ids(bucket: DrBucket) -> list[str]:
    """Complete backups (those with a manifest), oldest first."""
    ids = []
    for key in bucket.list("backups/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json" and valid_backup_id(parts[1]):
            ids.append(parts[1])
    return sorted(ids)


def read_manifest(bucket: DrBucket, backup_id: str) -> Manifest:
    try:
        return Manifest.from_wire(bucket.get_json(manifest_key(backup_id)))
    except MissingObject:
        raise MissingObject(
            f"backup {backup_id} has no manifest in the bucket (it never finished, or it is not this site's)"
        ) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise MissingObject(f"the manifest of backup {backup_id} is malformed: {exc}") from None


def latest_manifest(bucket: DrBucket) -> Manifest | None:
    """The newest complete backup."""
    ids = backup_ids(bucket)
    return read_manifest(bucket, ids[-1]) if ids else None


def latest_manifests(bucket: DrBucket, stores: list[str] | tuple[str, ...]) -> dict[str, Manifest]:
    """For each store, the newest complete backup that includes it. Backups need not cover every store: the
    node's DR agent backs up the stores it owns and Vault's snapshot is taken by whoever holds that right
    (appliance/dr/DESIGN.md, "Who backs up what"). One listing; each manifest read at most once."""
    found: dict[str, Manifest] = {}
    for backup_id in reversed(backup_ids(bucket)):
        if len(found) == len(stores):
            break
        manifest = read_manifest(bucket, backup_id)
        for name in stores:
            if name not in found and name in manifest.stores:
                found[name] = manifest
    return found


def latest_parts(bucket: DrBucket, stores: list[str] | tuple[str, ...]) -> dict[str, tuple[str, StoreBackup]]:
    """For each store, (backup id, its part) of the newest backup that includes it."""
    return {name: (m.backup_id, m.stores[name]) for name, m in latest_manifests(bucket, stores).items()}


# --- shipments ---------------------------------------------------------------------------------------


@dataclass
class ShipRecord:
    store: str
    sequence: int
    watermark: dict[str, Any]
    source_time: float  # the source's state up to this time is shipped
    shipped_at: float
    items: int
    data_key: str  # the shipment's data object (unique per attempt, so a record never names another's data)
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "sequence": self.sequence,
            "watermark": self.watermark,
            "source_time": self.source_time,
            "shipped_at": self.shipped_at,
            "items": self.items,
            "data_key": self.data_key,
            "sha256": self.sha256,
            "extra": self.extra,
        }

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> ShipRecord:
        return cls(
            store=str(value["store"]),
            sequence=int(value["sequence"]),
            watermark=dict(value["watermark"]),
            source_time=float(value["source_time"]),
            shipped_at=float(value["shipped_at"]),
            items=int(value["items"]),
            data_key=str(value["data_key"]),
            sha256=str(value.get("sha256", "")),
            extra=dict(value.get("extra", {})),
        )


def shipment_key(store: str, sequence: int) -> str:
    """A new data key for shipment `sequence`: a retried attempt never overwrites an earlier one's data."""
    return f"ship/{store}/{sequence:012d}-{secrets.token_hex(4)}.bin"


def record_key(store: str, sequence: int) -> str:
    return f"ship/{store}/{sequence:012d}.json"


def head_key(store: str) -> str:
    return f"ship/{store}/head.json"


def read_head(bucket: DrBucket, store: str) -> ShipRecord | None:
    try:
        return ShipRecord.from_wire(bucket.get_json(head_key(store)))
    except MissingObject:
        return None


def shipments_after(bucket: DrBucket, store: str, sequence: int) -> list[ShipRecord]:
    """Records of `store`'s shipments with a sequence above `sequence`, in order; a gap is an error."""
    records = []
    for key in bucket.list(f"ship/{store}/"):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) > sequence:
            records.append(ShipRecord.from_wire(bucket.get_json(key)))
    records.sort(key=lambda r: r.sequence)
    expected = sequence + 1
    for record in records:
        if record.sequence != expected:
            raise MissingObject(
                f"shipment {expected} of {store} is missing from the bucket (found {record.sequence} next): "
                "the changes between them cannot be restored"
            )
        expected += 1
    return records
