"""MEM-DR-RPO, MEM-DR-RTO: the DR copies are recent enough, and a recent drill proved they restore in time.

Read from the site's DR bucket (the catalog `appliance dr` keeps: backup manifests, shipment heads, drill
reports), from the controller, as `appliance dr status` and `appliance dr drill` do:
- RPO: for each store, the time its protected copy is current up to (its newest backup part, its last shipment,
  or the shipper's last pass that found nothing new: the heartbeat the DR agent keeps on the node) is within the
  site's `dr.rpo_seconds`. A store never backed up nor shipped fails.
- RTO: for each store, the newest drill report in the bucket that restored it is at most `drill_max_age_days`
  old, verified the restored copy against the source and measured its restore within the site's
  `dr.rto_seconds`. No drill at all, or a store no drill ever restored, is a failure ("run `appliance dr
  drill`").
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.audit.checks import membria_support as mem
from appliance.audit.targets import TargetSpec

_DRILL_ID = "%Y%m%dT%H%M%SZ"


def _bucket(target: TargetSpec) -> Any:
    from appliance.audit.facts import backends_from_facts
    from appliance.dr.objects import DrBucket

    return DrBucket.open(backends_from_facts(target.facts))


def _heartbeat(host: Any, target: TargetSpec) -> tuple[dict[str, Any], str]:
    """The DR shipper's heartbeat (per store: the last pass that found the source fully shipped), and whence."""
    dr = target.facts.get("dr") or {}
    path = mem.node_file(target, "dr_heartbeat", "/var/lib/membria/dr/shipper.json")
    if dr.get("heartbeat_on") == "controller":
        try:
            text: str | None = Path(path).read_text()
        except OSError:
            text = None
        whence = f"{path} (controller)"
    else:
        text = mem.read_text(host, path)
        whence = f"{path} (node)"
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        data = {}
    return (data if isinstance(data, dict) else {}), whence


def test_dr_backups_within_rpo(host: Any, target: TargetSpec, evidence: Any) -> None:
    from appliance.dr import catalog
    from appliance.dr.status import shipped_up_to
    from appliance.dr.stores import STORE_NAMES

    targets: dict[str, int] = (target.facts.get("dr") or {}).get("rpo_seconds") or {}
    bucket = _bucket(target)
    beats, whence = _heartbeat(host, target)
    backups = catalog.latest_parts(bucket, STORE_NAMES)
    now = time.time()
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for store in STORE_NAMES:
        up_to, sequence, backup_id = shipped_up_to(bucket, store, beats, backups)
        rpo = int(targets.get(store, 0))
        beat = beats.get(store) if isinstance(beats.get(store), dict) else {}
        lag = None if up_to is None else max(0.0, now - up_to)
        rows.append(
            {
                "store": store,
                "last_backup": backup_id,
                "last_shipment": sequence,
                "lag_seconds": None if lag is None else round(lag, 1),
                "rpo_seconds": rpo,
                "shipper_error": (beat or {}).get("error", ""),
            }
        )
        if backup_id is None and sequence is None:
            problems.append(f"{store}: never backed up nor shipped")
        elif lag is None or lag > rpo:
            problems.append(f"{store}: the protected copy is {lag:.0f} s old, over its RPO of {rpo} s")
        if beat and beat.get("error"):
            problems.append(f"{store}: the shipper's last pass failed: {beat['error']}")
    evidence.add(
        f"DR catalog in s3://{bucket.primary.bucket}/{bucket.root} and the shipper heartbeat {whence}",
        json.dumps(rows, indent=1),
        1 if problems else 0,
    )
    assert not problems, "; ".join(problems)


def _drill_time(drill_id: str) -> datetime | None:
    try:
        return datetime.strptime(drill_id.split("-", 1)[0], _DRILL_ID).replace(tzinfo=UTC)
    except ValueError:
        return None


def _drill_ids(bucket: Any) -> list[str]:
    """The drills recorded in the bucket, newest first."""
    ids = {k.split("/")[1] for k in bucket.list("drills/") if k.endswith("/report.json") and k.count("/") == 2}
    return sorted(ids, key=lambda i: (_drill_time(i) or datetime.min.replace(tzinfo=UTC), i), reverse=True)


def test_dr_drill_within_rto(target: TargetSpec, evidence: Any) -> None:
    from appliance.dr.stores import STORE_NAMES

    dr = target.facts.get("dr") or {}
    targets: dict[str, int] = dr.get("rto_seconds") or {}
    max_age = float(dr.get("drill_max_age_days") or 100)
    bucket = _bucket(target)
    where = f"s3://{bucket.primary.bucket}/{bucket.root}drills/"
    ids = _drill_ids(bucket)
    if not ids:
        evidence.add(f"DR drill reports in {where}", "none", 1)
        raise AssertionError(f"no DR drill was ever recorded in {where}: run `appliance dr drill`")
    # Each store's evidence is the newest drill that restored it: the node drills the stores it owns and Vault's
    # snapshot is drilled by whoever may read Vault (appliance/dr/DESIGN.md, "Who backs up what").
    newest: dict[str, tuple[str, dict[str, Any]]] = {}
    for drill_id in ids:
        if len(newest) == len(STORE_NAMES):
            break
        report: dict[str, Any] = bucket.get_json(f"drills/{drill_id}/report.json")
        for s in report.get("stores") or []:
            name = str(s.get("store"))
            if name in STORE_NAMES and name not in newest:
                newest[name] = (drill_id, s)
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for name in STORE_NAMES:
        if name not in newest:
            problems.append(f"no drill in {where} restored {name}: run `appliance dr drill --store {name}`")
            continue
        drill_id, s = newest[name]
        when = _drill_time(drill_id)
        age_days = (now - when).total_seconds() / 86400 if when else None
        target_s = int(targets.get(name, 0))
        rto = s.get("rto_seconds")
        rows.append(
            {
                "store": name,
                "drill_id": drill_id,
                "age_days": None if age_days is None else round(age_days, 1),
                "backup_id": (s.get("restore") or {}).get("backup_id"),
                "verified": s.get("verified"),
                "rto_seconds": rto,
                "rto_target_seconds": target_s,
                "error": s.get("error", ""),
            }
        )
        if age_days is None or age_days > max_age:
            problems.append(
                f"{name}: its newest drill ({drill_id}) is older than {max_age:g} days: run `appliance dr drill`"
            )
        if not s.get("verified"):
            problems.append(f"{name}: the restored copy was not verified ({s.get('error') or 'mismatches'})")
        if rto is None or float(rto) > target_s:
            problems.append(f"{name}: restored in {rto} s, over its RTO of {target_s} s")
    evidence.add(
        f"the newest DR drill of each store, in {where}",
        json.dumps(rows, indent=1),
        1 if problems else 0,
    )
    assert not problems, "; ".join(problems)
