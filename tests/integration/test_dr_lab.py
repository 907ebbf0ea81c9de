"""`appliance dr` end to end on the lab: real OpenBao (raft), moto S3, chDB, Milvus Lite (inside the core
server) and the SQLite state, through the CLI as an operator runs it.

The order matters and is the operator's: init (done by `lab up`), backup, more traffic, ship, status,
drill, restore; then the faults. Each CLI call is its own process (chDB and Milvus Lite admit one
process at a time, and the lab's core server holds Milvus Lite: DR reaches it through its published URI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.dr import catalog
from appliance.dr.objects import DrBucket
from tests.conftest import REPO
from tests.integration.conftest import GatewayLab

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def appliance(lab: GatewayLab, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--site", str(lab.site_file), "--state-dir", str(lab.state.root)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def chat(lab: GatewayLab, question: str) -> None:
    body = {"model": lab.model, "messages": [{"role": "user", "content": question}], "max_tokens": 8}
    with lab.client("alice") as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def upload(lab: GatewayLab, doc_id: str, text: str) -> None:
    with lab.client("alice") as client:
        response = client.post(
            "/v1/knowledge/documents",
            data={"department": "engineering", "doc_id": doc_id},
            files={"file": (f"{doc_id}.txt", text.encode(), "text/plain")},
        )
        assert response.status_code == 201, response.text


def bucket(lab: GatewayLab) -> DrBucket:
    return DrBucket.open(lab.backends)


@pytest.fixture(scope="module")
def backed_up(lab: GatewayLab) -> str:
    """A first full backup of the lab (after some traffic), and its id."""
    chat(lab, "what is the VX-55 torque setting?")
    upload(lab, "dr-before", "Before the backup: the DR runbook lives in the ops wiki, page 7.")
    out = ok(appliance(lab, "dr", "backup"))
    assert "backup" in out and "complete" in out
    ids = catalog.backup_ids(bucket(lab))
    assert ids
    return ids[-1]


def test_init_is_idempotent_after_lab_up(lab: GatewayLab) -> None:
    out = ok(appliance(lab, "dr", "init", "--dry-run"))
    assert "would change" not in out
    assert "already set" in out and "default retention governance 30 days" in out
    assert "already set up; nothing changed" in ok(appliance(lab, "dr", "init"))
    primary = lab.backends.s3("primary")
    lock = primary.client.get_object_lock_configuration(Bucket=primary.bucket)["ObjectLockConfiguration"]
    retention = lock["Rule"]["DefaultRetention"]
    assert (retention["Mode"], retention["Days"], retention.get("Years", 0)) == ("GOVERNANCE", 30, 0)
    rules = primary.client.get_bucket_lifecycle_configuration(Bucket=primary.bucket)["Rules"]
    assert rules[0]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 90


def test_backup_covers_every_store(lab: GatewayLab, backed_up: str) -> None:
    manifest = catalog.read_manifest(bucket(lab), backed_up)
    assert set(manifest.stores) == {"vault", "state", "audit_db", "vectors"}
    assert manifest.stores["audit_db"].sums and all(s.rows > 0 for s in manifest.stores["audit_db"].sums.values())
    assert any(name.startswith("membria_dept_engineering") for name in manifest.stores["vectors"].sums)
    assert manifest.stores["vault"].sums["snapshot"].rows > 0
    listed = ok(appliance(lab, "dr", "list"))
    assert backed_up in listed


def test_ship_then_status_shows_lag_within_rpo(lab: GatewayLab, backed_up: str) -> None:
    chat(lab, "after the backup: who signs off a release?")
    upload(lab, "dr-after", "After the backup: releases are signed off by the duty engineer.")
    out = ok(appliance(lab, "dr", "ship", "--once"))
    assert "audit_db" in out and "vectors" in out
    heads = {name: catalog.read_head(bucket(lab), name) for name in ("audit_db", "vectors", "state")}
    assert all(h is not None and h.items > 0 for h in heads.values()), heads
    rows = json.loads(ok(appliance(lab, "dr", "status", "--json")))
    by_store = {r["store"]: r for r in rows}
    for name in ("audit_db", "vectors", "state", "vault"):
        assert by_store[name]["over_rpo"] is False, by_store[name]
        assert by_store[name]["lag_seconds"] < by_store[name]["rpo_seconds"]
    # A second pass right away has nothing new to ship and writes nothing to the bucket.
    before = len(bucket(lab).list("ship/"))
    ok(appliance(lab, "dr", "ship", "--once"))
    assert len(bucket(lab).list("ship/")) == before


def test_status_flags_a_store_over_its_rpo(lab: GatewayLab, backed_up: str, tmp_path: Path) -> None:
    # A site whose audit RPO is 1 s, with nothing shipped since: flagged, exit 1.
    data = json.loads(json.dumps(lab.site.model_dump(mode="json")))
    data["dr"]["rpo_seconds"]["audit_db"] = 1
    site_file = tmp_path / "strict.json"
    site_file.write_text(json.dumps(data))
    time.sleep(2)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "dr",
            "status",
            "--site",
            str(site_file),
            "--state-dir",
            str(lab.state.root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 1
    assert "lag above the RPO: audit_db" in result.stderr


def test_drill_restores_verifies_and_reports(lab: GatewayLab, backed_up: str, tmp_path: Path) -> None:
    chat(lab, "unshipped: this question happens after the last shipment")
    out = ok(appliance(lab, "dr", "drill", "--out", str(tmp_path), timeout=600))
    assert "drill passed" in out
    reports = sorted(tmp_path.glob("drill-*.json"))
    assert len(reports) == 1
    report: dict[str, Any] = json.loads(reports[0].read_text())
    assert report["ok"] is True and report["backup_id"] == backed_up
    stores = {s["store"]: s for s in report["stores"]}
    assert set(stores) == {"vault", "state", "audit_db", "vectors"}
    for s in stores.values():
        assert s["verified"] and s["rto_seconds"] <= s["rto_target_seconds"] and s["rpo_seconds"] is not None
    # The question asked after the last shipment is what a real disaster would have lost: counted, and the
    # comparison still proves the copy plus exactly those rows equals the source.
    assert stores["audit_db"]["unshipped_changes"] >= 1
    assert stores["audit_db"]["restore"]["shipments"] >= 1
    markdown = reports[0].with_suffix(".md").read_text()
    assert "Result: **PASSED**" in markdown and "| audit_db | yes |" in markdown
    assert f"drills/{report['drill_id']}/report.json" in bucket(lab).list("drills/")


def test_restore_into_a_directory_verifies_against_the_manifest(
    lab: GatewayLab, backed_up: str, tmp_path: Path
) -> None:
    target = tmp_path / "restored"
    out = ok(appliance(lab, "dr", "restore", "--into", str(target), "--store", "state", "--store", "audit_db"))
    assert "verified against its manifest" in out
    assert (target / "state" / "sync-hub.sqlite").exists()
    assert (target / "chdb").is_dir()
    again = appliance(lab, "dr", "restore", "--into", str(target), "--store", "state")
    assert again.returncode == 2 and "is not empty" in again.stderr


def test_in_place_restore_shows_the_plan_without_yes(lab: GatewayLab, backed_up: str) -> None:
    out = ok(appliance(lab, "dr", "restore", "--in-place"))
    assert "run again with --yes" in out


def test_each_store_restores_from_its_own_newest_backup(lab: GatewayLab, backed_up: str, tmp_path: Path) -> None:
    """A backup of some stores only (a node backs up its own stores, Vault's snapshot is taken apart) does not hide
    the other stores' backups: without --backup each store comes from its own newest backup; with --backup, a store
    that backup lacks is refused before anything is restored."""
    b = bucket(lab)
    audit_db_backup = catalog.latest_manifests(b, ["audit_db"])["audit_db"].backup_id
    ok(appliance(lab, "dr", "backup", "--store", "state"))
    newest = catalog.backup_ids(b)[-1]
    assert newest != audit_db_backup and set(catalog.read_manifest(b, newest).stores) == {"state"}
    out = ok(appliance(lab, "dr", "restore", "--into", str(tmp_path / "r"), "--store", "state", "--store", "audit_db"))
    assert f"state {newest}" in out and f"audit_db {audit_db_backup}" in out
    refused = appliance(lab, "dr", "restore", "--into", str(tmp_path / "x"), "--backup", newest, "--store", "audit_db")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"backup {newest} does not include audit_db" in refused.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_a_corrupted_shipment_fails_the_restore_clearly(lab: GatewayLab, backed_up: str, tmp_path: Path) -> None:
    b = bucket(lab)
    upload(lab, "dr-corrupt", "A document shipped and then corrupted in the bucket.")
    ok(appliance(lab, "dr", "ship", "--once"))
    head = catalog.read_head(b, "vectors")
    assert head is not None
    full = b.full_key(head.data_key)
    blob = bytearray(b.primary.client.get_object(Bucket=b.primary.bucket, Key=full)["Body"].read())
    blob[60] ^= 0xFF
    b.primary.client.put_object(Bucket=b.primary.bucket, Key=full, Body=bytes(blob))
    result = appliance(lab, "dr", "restore", "--into", str(tmp_path / "r"), "--store", "vectors")
    assert result.returncode == 1
    assert f"{full} in the primary bucket is corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    # Put the good bytes back as the newest version for the tests after this one.
    blob[60] ^= 0xFF
    b.primary.client.put_object(Bucket=b.primary.bucket, Key=full, Body=bytes(blob))


def test_a_missing_shipment_is_named(lab: GatewayLab, backed_up: str, tmp_path: Path) -> None:
    b = bucket(lab)
    chat(lab, "an audited question for the shipment that will go missing")
    ok(appliance(lab, "dr", "ship", "--once"))
    head = catalog.read_head(b, "audit_db")
    assert head is not None
    full = b.full_key(catalog.record_key("audit_db", head.sequence))
    listed = b.primary.client.list_object_versions(Bucket=b.primary.bucket, Prefix=full)
    # A delete marker hides the record (the locked versions underneath cannot be deleted).
    b.primary.client.delete_object(Bucket=b.primary.bucket, Key=full)
    try:
        chat(lab, "one more audited question so the next shipment follows the hidden one")
        ok(appliance(lab, "dr", "ship", "--once"))
        result = appliance(lab, "dr", "restore", "--into", str(tmp_path / "r"), "--store", "audit_db")
        assert result.returncode == 1
        assert f"shipment {head.sequence} of audit_db is missing" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        # Bring the record back as the newest version (moto refuses CopyObject into a locked bucket).
        version = listed["Versions"][0]["VersionId"]
        old = b.primary.client.get_object(Bucket=b.primary.bucket, Key=full, VersionId=version)
        b.primary.client.put_object(
            Bucket=b.primary.bucket,
            Key=full,
            Body=old["Body"].read(),
            Metadata=old["Metadata"],
            ChecksumAlgorithm="SHA256",
        )


def test_a_wrong_data_key_in_vault_is_a_clear_error(lab: GatewayLab, backed_up: str, tmp_path: Path) -> None:
    # The S3 refusal of wrong keys is tested against moto with IAM auth in test_dr_bucket.py; here the other
    # credential DR depends on: the client-side data key in Vault, replaced by another one.
    import base64

    path = lab.site.dr.encryption_key_vault_path
    good = lab.backends.read_secret(path)
    other = base64.b64encode(os.urandom(32)).decode()
    lab.backends.write_secret(path, {**good, "key_b64": other})
    try:
        result = appliance(lab, "dr", "restore", "--into", str(tmp_path / "r"), "--store", "state")
    finally:
        lab.backends.write_secret(path, good)
    assert result.returncode == 1
    assert "encrypted with another data key than the one in Vault" in result.stderr
    assert other not in result.stdout + result.stderr and good["key_b64"] not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_kill_during_a_backup_leaves_the_next_one_consistent(lab: GatewayLab, backed_up: str, tmp_path: Path) -> None:
    before = catalog.backup_ids(bucket(lab))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "dr",
            "backup",
            "--site",
            str(lab.site_file),
            "--state-dir",
            str(lab.state.root),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Kill it once it has written objects of its own but before its manifest.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        keys = bucket(lab).list("backups/")
        new = {k.split("/")[1] for k in keys} - set(before)
        if new:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert catalog.backup_ids(bucket(lab)) == before  # the half-written one has no manifest: it does not exist
    ok(appliance(lab, "dr", "backup"))
    after = catalog.backup_ids(bucket(lab))
    assert len(after) == len(before) + 1
    ok(appliance(lab, "dr", "restore", "--into", str(tmp_path / "r"), "--store", "audit_db", "--store", "state"))


def test_s3_down_during_shipping_loses_nothing(lab: GatewayLab, backed_up: str, tmp_path: Path) -> None:
    """The shipper's pass fails while the endpoint is cut (the head does not move); after it returns, one pass
    ships everything written meanwhile, and a restore equals the source."""
    import boto3
    from botocore.config import Config

    from appliance.backends import S3Target
    from appliance.dr.objects import S3Unavailable
    from appliance.dr.places import ScratchPlace, SitePlace
    from appliance.dr.restore import compare, restore_store
    from appliance.dr.shipper import ship_store
    from appliance.dr.stores import make_store
    from tests.integration.dr_support import Outage

    real = bucket(lab)
    outage = Outage(lab.site.lab.ports.s3)
    creds = lab.backends.read_secret("membria/s3-primary")
    client = boto3.client(
        "s3",
        endpoint_url=outage.url,
        region_name="us-east-1",
        aws_access_key_id=creds["access_key"],
        aws_secret_access_key=creds["secret_key"],
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=30),
    )
    via = DrBucket(
        S3Target(client, real.primary.bucket, outage.url),
        real.replica,
        real.key,
        real.policy,
        site_name=lab.site.site.name,
    )
    store, place = make_store("state"), SitePlace(lab.backends)
    ship_store(via, place, store)  # start from a shipped state
    head_before = catalog.read_head(real, "state")
    outage.down()
    upload(lab, "dr-outage-1", "Written while S3 is down: the first of two documents.")
    with pytest.raises(S3Unavailable):
        ship_store(via, place, store)
    upload(lab, "dr-outage-2", "Written while S3 is down: the second of two documents.")
    with pytest.raises(S3Unavailable):
        ship_store(via, place, store)
    assert catalog.read_head(real, "state") == head_before  # the watermark did not move
    outage.up()
    outcome = ship_store(via, place, store)
    assert outcome.items > 0 and outcome.sequence == (head_before.sequence if head_before else 0) + 1
    manifest = catalog.latest_manifest(real)
    assert manifest is not None
    target = ScratchPlace(tmp_path / "target", lab.backends)
    restored = restore_store(real, manifest, "state", target, tmp_path, lambda _: None)
    source = store.sums(place)
    assert (
        compare(
            "state",
            {k: v for k, v in source.items() if k.startswith("sync-hub:")},
            {k: v for k, v in restored.sums.items() if k.startswith("sync-hub:")},
        )
        == []
    )


def test_a_restore_that_does_not_match_its_manifest_fails_loudly(
    lab: GatewayLab, backed_up: str, tmp_path: Path
) -> None:
    """A backup whose data restores to something else than its manifest recorded (here: the manifest says
    one more row) is refused, naming the table and both counts."""
    b = bucket(lab)
    manifest = catalog.read_manifest(b, backed_up)
    part = manifest.stores["state"]
    table, total = next((k, v) for k, v in sorted(part.sums.items()) if v.rows > 0)
    part.sums[table] = type(total)(total.rows + 1, total.digest)
    forged = catalog.Manifest(
        backup_id=catalog.new_backup_id(manifest.started_at - 60),  # older: never "the newest backup"
        site=manifest.site,
        started_at=manifest.started_at,
        finished_at=manifest.finished_at,
        stores={"state": part},
        ship_sequences=manifest.ship_sequences,
    )
    catalog.write_manifest(b, forged)
    result = appliance(
        lab, "dr", "restore", "--into", str(tmp_path / "r"), "--backup", forged.backup_id, "--store", "state"
    )
    assert result.returncode == 1
    assert f"state/{table}: {total.rows} rows restored, {total.rows + 1} expected" in result.stderr
    assert "does not match its manifest" in result.stderr
