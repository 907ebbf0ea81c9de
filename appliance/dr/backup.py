"""`appliance dr backup`: a full backup of every store, recorded by a manifest written last."""

from __future__ import annotations

import time

from appliance.dr import catalog
from appliance.dr.objects import DrBucket
from appliance.dr.stores import STORE_NAMES, make_store
from appliance.dr.stores.base import Place, Progress, StoreBackup


def run_backup(
    bucket: DrBucket, place: Place, *, site_name: str, stores: list[str] | None = None, progress: Progress
) -> catalog.Manifest:
    """Back up `stores` (default all) into a new backup id. Stores that back up incrementally (the audit
    DB) build on their part of the newest earlier backup. A backup killed half-way has no manifest and
    is ignored by restores; its objects expire with the bucket's lifecycle."""
    names = stores or list(STORE_NAMES)
    backup_id = catalog.new_backup_id()
    started = time.time()
    # Shipments up to these sequences were shipped before the backup read anything: they are in it.
    ship_sequences = {}
    for name in names:
        head = catalog.read_head(bucket, name)
        ship_sequences[name] = head.sequence if head else 0
    previous_parts = catalog.latest_parts(bucket, names)
    parts: dict[str, StoreBackup] = {}
    for name in names:
        store = make_store(name)
        previous = previous_parts[name][1] if name in previous_parts else None
        progress(f"{name}: backing up")
        parts[name] = store.backup(bucket, place, f"backups/{backup_id}/{name}/", previous, progress)
        progress(f"{name}: done ({sum(s.rows for s in parts[name].sums.values())} rows)")
    manifest = catalog.Manifest(
        backup_id=backup_id,
        site=site_name,
        started_at=started,
        finished_at=time.time(),
        stores=parts,
        ship_sequences=ship_sequences,
    )
    catalog.write_manifest(bucket, manifest)
    return manifest
