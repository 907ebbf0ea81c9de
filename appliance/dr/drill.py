"""`appliance dr drill`: restore into an empty target, verify it against the live source, measure RTO and
RPO, and write a report an auditor can read (JSON and Markdown, also kept in the locked bucket).

The simulated disaster happens when the drill starts. For each store:
- **RPO achieved** = disaster time minus the time the store's protected copy was current up to (its last
  shipment, the shipper's last idle pass, or its backup). That is what a real disaster would have lost.
- **restore**: its part of the newest backup that includes it (or of the backup named), checked against that
  backup's manifest, plus every later shipment.
- **verify**: the restored copy is compared, table by table, with the live source. Changes the source
  made after the watermark (what the RPO says would be lost) are first applied to the copy, counted and
  reported, so the comparison proves the copy plus exactly those changes equals the source.
- **RTO measured** = time from the start of the store's restore to the end of its verification.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.backends import Backends
from appliance.dr import catalog
from appliance.dr.objects import DrBucket
from appliance.dr.places import ScratchPlace, SitePlace
from appliance.dr.restore import Mismatch, StoreRestore, compare, restore_store
from appliance.dr.shipper import Heartbeat
from appliance.dr.status import heartbeat_path, shipped_up_to
from appliance.dr.stores import STORE_NAMES, make_store
from appliance.dr.stores.base import Progress
from runtime.common import atomic


@dataclass
class StoreDrill:
    store: str
    rpo_target: int
    rto_target: int
    rpo_seconds: float | None = None
    rto_seconds: float | None = None
    restore: StoreRestore | None = None
    unshipped_changes: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    error: str = ""

    @property
    def verified(self) -> bool:
        return not self.error and not self.mismatches and self.restore is not None

    @property
    def ok(self) -> bool:
        return (
            self.verified
            and self.rpo_seconds is not None
            and self.rpo_seconds <= self.rpo_target
            and self.rto_seconds is not None
            and self.rto_seconds <= self.rto_target
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "ok": self.ok,
            "verified": self.verified,
            "rpo_seconds": None if self.rpo_seconds is None else round(self.rpo_seconds, 1),
            "rpo_target_seconds": self.rpo_target,
            "rto_seconds": None if self.rto_seconds is None else round(self.rto_seconds, 1),
            "rto_target_seconds": self.rto_target,
            "unshipped_changes": self.unshipped_changes,
            "restore": self.restore.to_wire() if self.restore else None,
            "mismatches": [m.to_wire() for m in self.mismatches],
            "error": self.error,
        }


@dataclass
class DrillReport:
    drill_id: str
    site: str
    disaster_time: float
    backups: dict[str, str]  # store -> the backup it was restored from (each store's newest, unless named)
    stores: list[StoreDrill]
    finished_at: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.stores) and all(s.ok for s in self.stores)

    @property
    def backup_id(self) -> str:
        """The newest backup the drill restored from (each store's is in `backups`)."""
        return max(self.backups.values(), default="")

    def to_wire(self) -> dict[str, Any]:
        return {
            "drill_id": self.drill_id,
            "site": self.site,
            "disaster_time": _iso(self.disaster_time),
            "finished_at": _iso(self.finished_at),
            "backup_id": self.backup_id,
            "backups": dict(self.backups),
            "ok": self.ok,
            "stores": [s.to_wire() for s in self.stores],
        }

    def markdown(self) -> str:
        lines = [
            f"# DR drill {self.drill_id} — site {self.site}",
            "",
            f"- Result: **{'PASSED' if self.ok else 'FAILED'}**",
            f"- Simulated disaster: {_iso(self.disaster_time)}",
            "- Restored from "
            + ", ".join(f"{store} `{backup}`" for store, backup in self.backups.items())
            + " plus later shipments, into an empty target",
            f"- Finished: {_iso(self.finished_at)}",
            "",
            "| store | verified | RPO achieved | RPO target | RTO measured | RTO target | shipments | "
            "unshipped changes | result |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self.stores:
            lines.append(
                f"| {s.store} | {'yes' if s.verified else 'NO'} | {_secs(s.rpo_seconds)} | {s.rpo_target} s | "
                f"{_secs(s.rto_seconds)} | {s.rto_target} s | {s.restore.shipments if s.restore else '-'} | "
                f"{s.unshipped_changes} | {'ok' if s.ok else 'FAILED'} |"
            )
        lines += ["", "## Per table", "", "| store | table | rows | checksum |", "|---|---|---|---|"]
        for s in self.stores:
            for table, total in sorted((s.restore.sums if s.restore else {}).items()):
                lines.append(f"| {s.store} | {table} | {total.rows} | `{total.digest[:16]}` |")
        problems = [(s.store, s.error) for s in self.stores if s.error] + [
            (m.store, m.describe()) for s in self.stores for m in s.mismatches
        ]
        if problems:
            lines += ["", "## Problems", ""] + [f"- **{store}**: {text}" for store, text in problems]
        lines += [
            "",
            "RPO achieved: the disaster time minus the time the protected copy was current up to. "
            "RTO measured: restore plus verification of the store. Unshipped changes: what the source changed "
            "after the protected copy (lost in a real disaster); they were applied to the copy before the "
            "comparison, so a verified store equals the source exactly.",
            "",
        ]
        return "\n".join(lines)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "-"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def run_drill(
    backends: Backends,
    bucket: DrBucket,
    *,
    workdir: Path,
    stores: list[str] | None = None,
    backup_id: str | None = None,
    progress: Progress,
) -> DrillReport:
    from appliance.dr.restore import choose_manifests

    site = backends.site
    disaster = time.time()
    names = stores or list(STORE_NAMES)
    beats = Heartbeat(heartbeat_path(backends)).read()
    backups = catalog.latest_parts(bucket, names)
    copies = {name: shipped_up_to(bucket, name, beats, backups)[0] for name in names}
    manifests = choose_manifests(bucket, backup_id, names)
    report = DrillReport(
        drill_id=f"{datetime.fromtimestamp(disaster, UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}",
        site=site.site.name,
        disaster_time=disaster,
        backups={name: manifests[name].backup_id for name in names},
        stores=[],
    )
    source = SitePlace(backends)
    target = ScratchPlace(workdir / "target", backends)
    try:
        for name in names:
            drill = StoreDrill(name, getattr(site.dr.rpo_seconds, name), getattr(site.dr.rto_seconds, name))
            report.stores.append(drill)
            up_to = copies[name]
            drill.rpo_seconds = None if up_to is None else max(0.0, disaster - up_to)
            started = time.monotonic()
            try:
                drill.restore = restore_store(bucket, manifests[name], name, target, workdir, progress)
                drill.unshipped_changes, drill.mismatches = _verify(
                    name, source, target, bucket, manifests[name], drill.restore, progress
                )
            except Exception as exc:  # noqa: BLE001 - a store that fails is reported; the drill goes on
                drill.error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            drill.rto_seconds = time.monotonic() - started
    finally:
        target.close()
    report.finished_at = time.time()
    return report


def _verify(
    name: str,
    source: SitePlace,
    target: ScratchPlace,
    bucket: DrBucket,
    manifest: catalog.Manifest,
    restored: StoreRestore,
    progress: Progress,
) -> tuple[int, list[Mismatch]]:
    store = make_store(name)
    head = catalog.read_head(bucket, name)
    part = manifest.stores[name]
    shipped_after_backup = head is not None and head.sequence > manifest.ship_sequences.get(name, 0)
    watermark = head.watermark if head is not None and shipped_after_backup else part.watermark
    unshipped = 0
    mismatches: list[Mismatch] = []
    if not store.can_compare(target):
        return 0, []  # checked by checksum only (see StoreRestore.sums: empty)
    for attempt in range(3):
        progress(f"{name}: verifying against the source")
        # The restore's own final sums are the target's on the first comparison: no second full read.
        target_sums = restored.sums if attempt == 0 else store.sums(target)
        mismatches = compare(name, store.sums(source), target_sums)
        if not mismatches:
            break
        with tempfile.TemporaryDirectory(prefix=f"membria-drill-{name}-") as tmp:
            batch = store.changes(source, watermark, Path(tmp))
            if batch is None:
                break
            progress(f"{name}: {batch.items} change(s) after the watermark; applying them before comparing")
            unshipped += store.apply(batch.path, target)
            watermark = batch.watermark
    return unshipped, mismatches


def write_report(report: DrillReport, out_dir: Path, bucket: DrBucket | None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"drill-{report.drill_id}.json"
    md_path = out_dir / f"drill-{report.drill_id}.md"
    atomic.write_text(json_path, json.dumps(report.to_wire(), indent=2) + "\n")
    atomic.write_text(md_path, report.markdown())
    if bucket is not None:  # kept, locked, next to the backups it tested
        bucket.put_file(f"drills/{report.drill_id}/report.json", json_path)
        bucket.put_file(f"drills/{report.drill_id}/report.md", md_path)
    return json_path, md_path
