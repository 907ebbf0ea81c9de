"""Restore a backup plus every later shipment into a place, verifying as it goes.

Each store is restored from its part of the backup, then checked against the counts and checksums the
backup recorded (so a backup that does not restore to what it claimed fails here, before anything is
built on it), then every shipment after the backup is applied in order. Objects are checked by
`DrBucket` (sha256 of the plaintext, authenticated decryption) as they are read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.dr import catalog
from appliance.dr.objects import DrBucket
from appliance.dr.stores import make_store
from appliance.dr.stores.base import Place, Progress, TableSum
from appliance.errors import CheckFailed


@dataclass
class Mismatch:
    store: str
    table: str
    expected: TableSum | None
    actual: TableSum | None

    def describe(self) -> str:
        if self.expected is None:
            return f"{self.store}/{self.table}: present in the restore ({self.actual}) but not in the source"
        if self.actual is None:
            return f"{self.store}/{self.table}: missing from the restore (source has {self.expected.rows} rows)"
        if self.expected.rows != self.actual.rows:
            return f"{self.store}/{self.table}: {self.actual.rows} rows restored, {self.expected.rows} expected"
        return f"{self.store}/{self.table}: same {self.actual.rows} rows but the content checksum differs"

    def to_wire(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "table": self.table,
            "expected": self.expected.to_wire() if self.expected else None,
            "actual": self.actual.to_wire() if self.actual else None,
            "detail": self.describe(),
        }


def compare(store: str, expected: dict[str, TableSum], actual: dict[str, TableSum]) -> list[Mismatch]:
    out = []
    for table in sorted(set(expected) | set(actual)):
        if expected.get(table) != actual.get(table):
            out.append(Mismatch(store, table, expected.get(table), actual.get(table)))
    return out


@dataclass
class StoreRestore:
    store: str
    backup_id: str
    shipments: int
    items_applied: int
    restored_up_to: float  # source time the restored copy corresponds to
    seconds: float
    sums: dict[str, TableSum] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "backup_id": self.backup_id,
            "shipments": self.shipments,
            "items_applied": self.items_applied,
            "restored_up_to": self.restored_up_to,
            "seconds": round(self.seconds, 3),
            "tables": {k: v.to_wire() for k, v in self.sums.items()},
        }


def restore_store(
    bucket: DrBucket,
    manifest: catalog.Manifest,
    name: str,
    target: Place,
    workdir: Path,
    progress: Progress,
    *,
    with_shipments: bool = True,
) -> StoreRestore:
    """Restore one store; raises CheckFailed (listing the tables) if the backup does not verify."""
    if name not in manifest.stores:
        raise CheckFailed(f"backup {manifest.backup_id} does not include the store {name}")
    started = time.monotonic()
    store = make_store(name)
    part = manifest.stores[name]
    progress(f"{name}: restoring backup {manifest.backup_id}")
    store.restore(bucket, part, target, workdir, progress)
    comparable = store.can_compare(target)
    restored = store.sums(target) if comparable else {}
    mismatches = compare(name, part.sums, restored) if comparable else []
    if mismatches:
        raise CheckFailed(
            f"{name}: the restore of backup {manifest.backup_id} does not match its manifest: "
            + "; ".join(m.describe() for m in mismatches)
        )
    shipped = 0
    applied = 0
    up_to = part.source_time
    if with_shipments:
        records = catalog.shipments_after(bucket, name, manifest.ship_sequences.get(name, 0))
        for record in records:
            progress(f"{name}: applying shipment {record.sequence} ({record.items} items)")
            path = bucket.get_file(
                record.data_key, workdir / f"{name}-{record.sequence}.bin", expect_sha256=record.sha256
            )
            applied += store.apply(path, target)
            path.unlink(missing_ok=True)
            shipped += 1
            up_to = max(up_to, record.source_time)
    # A full read of a large collection is the costly part of a restore: read again only if something changed.
    sums = store.sums(target) if comparable and applied else restored
    return StoreRestore(name, manifest.backup_id, shipped, applied, up_to, time.monotonic() - started, sums)


def choose_manifests(bucket: DrBucket, backup_id: str | None, stores: list[str]) -> dict[str, catalog.Manifest]:
    """The backup each store restores from: the named one for all of them, or each store's newest backup (backups
    may cover some stores only: the node's own stores and Vault's snapshot are taken apart). Raises CheckFailed
    naming every store that has no backup to restore from, before anything is restored."""
    if backup_id is not None:
        if not catalog.valid_backup_id(backup_id):
            raise CheckFailed(f"{backup_id!r} is not a backup id (they look like 20261121T120000Z-a1b2c3)")
        manifest = catalog.read_manifest(bucket, backup_id)
        missing = [name for name in stores if name not in manifest.stores]
        if missing:
            raise CheckFailed(
                f"backup {backup_id} does not include {', '.join(missing)} (it holds {', '.join(manifest.stores)})",
                hint="leave out --backup to restore each store from its own newest backup, or name the stores with "
                "--store",
            )
        return {name: manifest for name in stores}
    manifests = catalog.latest_manifests(bucket, stores)
    missing = [name for name in stores if name not in manifests]
    if missing:
        raise CheckFailed(
            f"there is no complete backup of {', '.join(missing)} in the bucket",
            hint="run `appliance dr backup" + "".join(f" --store {name}" for name in missing) + "` first",
        )
    return manifests


def backups_used(backup_ids: dict[str, str]) -> str:
    """The backups a restore or drill used (store -> backup id), for a title: one id, or each store's."""
    if len(set(backup_ids.values())) == 1:
        return next(iter(backup_ids.values()))
    return ", ".join(f"{name} {backup_id}" for name, backup_id in backup_ids.items())
