"""The core server's sync hub for real: documents ingested into Milvus Lite (with the packaged embedding
model) become chunk records that devices pull; devices push their own records; patches, snapshots and
refusals go through `/internal/sync/push|pull` exactly as the gateway forwards them.

The devices are real `ReplicaStore`s (SQLite files), as on a laptop. Sync never calls the big model, so the
core is given an LLM endpoint nothing listens on (as the peer-check test in test_core_server.py does).
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from runtime.common.replica import ReplicaStore, SyncPayload
from runtime.common.vclock import VectorClock
from runtime.core.app import create_app
from runtime.core.service import CoreService
from runtime.core.sync_hub import SyncHub
from tests.integration.test_core_server import assert_error, core_settings, upload

pytestmark = pytest.mark.integration

MAX_PUSH = 256 * 1024
SECTIONS = [f"## Step {i}\n\nStep {i}: check pump P-{i} and note the pressure in the shift log." for i in range(5)]
MANUAL = "# Pump room manual\n\n" + "\n\n".join(SECTIONS)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    directory = tmp_path_factory.mktemp("core-sync")
    settings = core_settings(directory, "http://127.0.0.1:9/v1", sync_max_push_bytes=MAX_PUSH)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def hub(client: TestClient) -> SyncHub:
    app = client.app
    assert isinstance(app, FastAPI)
    core: CoreService = app.state.service
    return core.sync_hub


def pull(client: TestClient, device: ReplicaStore, departments: list[str], **extra: Any) -> dict[str, Any]:
    body = {"replica": device.replica_id, "clock": device.clock().to_json(), "departments": departments, **extra}
    response = client.post("/internal/sync/pull", json=body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    assert set(data) == {"mode", "records", "snapshot_b64", "clock", "bytes"}
    return data


def push_body(device: ReplicaStore, since: VectorClock, departments: list[str]) -> dict[str, Any]:
    """What the gateway forwards: the device's body plus the caller's sync scope."""
    return {
        "replica": device.replica_id,
        "records": [r.to_wire() for r in device.changes_since(since)],
        "clock": device.clock().to_json(),
        "departments": departments,
    }


def test_a_device_pulls_ingested_chunks_then_an_empty_delta(client: TestClient, tmp_path: Path) -> None:
    assert upload(client, "engineering", "pump-room.md", MANUAL.encode()).status_code == 200
    device = ReplicaStore(tmp_path / "laptop-1.sqlite", "laptop-1")

    first = pull(client, device, ["engineering"])
    assert first["mode"] == "patch" and first["snapshot_b64"] is None
    records = [r for r in first["records"] if r["payload"].get("doc_id") == "pump-room"]
    assert len(records) == 5
    assert [r["payload"]["chunk_index"] for r in records] == [0, 1, 2, 3, 4]
    for record in records:
        assert (record["kind"], record["department"], record["topic"], record["deleted"]) == (
            "chunk",
            "engineering",
            None,
            False,
        )
        assert record["origin"] == "core"
        assert set(record["payload"]) == {"doc_id", "title", "text", "labels", "chunk_index"}
        assert record["payload"]["title"] == "Pump room manual"
        assert record["payload"]["labels"] == []
    assert "pump P-3" in records[3]["payload"]["text"]
    # record ids are the chunk ids Milvus holds
    milvus_ids = hub_service(client).store.document_chunk_ids("engineering", "pump-room")
    assert {r["record_id"] for r in records} == set(milvus_ids)
    assert first["clock"]["core"] >= 5
    assert first["bytes"] == len(json.dumps(first["records"], ensure_ascii=False, separators=(",", ":")).encode())

    applied = device.import_payload(SyncPayload.from_wire(first))
    assert len(applied.accepted) == len(first["records"])
    assert device.clock() == VectorClock.from_json(first["clock"])

    again = pull(client, device, ["engineering"])
    assert (again["mode"], again["records"], again["bytes"]) == ("patch", [], 2)
    assert again["clock"] == first["clock"]
    device.close()


def test_reupload_and_delete_reach_devices_as_new_versions_and_tombstones(client: TestClient, tmp_path: Path) -> None:
    assert upload(client, "maintenance", "pump-room.md", MANUAL.encode()).status_code == 200
    device = ReplicaStore(tmp_path / "laptop-1.sqlite", "laptop-1")
    device.import_payload(SyncPayload.from_wire(pull(client, device, ["maintenance"])))
    held = {r.record_id for r in device.records() if not r.deleted}
    assert len(held) == 5

    edited = MANUAL.replace("Step 2: check pump P-2", "Step 2: replace the seal of pump P-2")
    assert upload(client, "maintenance", "pump-room.md", edited.encode()).json()["changed"] is True
    delta = pull(client, device, ["maintenance"])
    assert sorted((r["deleted"], r["payload"].get("chunk_index")) for r in delta["records"]) == [
        (False, 2),
        (True, None),
    ]
    device.import_payload(SyncPayload.from_wire(delta))
    live = {r.record_id: r for r in device.records() if not r.deleted}
    assert len(live) == 5 and "replace the seal" in live[max(live, key=lambda k: live[k].lamport)].payload["text"]

    # Uploading the same text again changes nothing anywhere.
    assert upload(client, "maintenance", "pump-room.md", edited.encode()).json()["changed"] is False
    assert pull(client, device, ["maintenance"])["records"] == []

    assert client.delete("/internal/documents/maintenance/pump-room").status_code == 200
    gone = pull(client, device, ["maintenance"])
    assert len(gone["records"]) == 5 and all(r["deleted"] and r["payload"] == {} for r in gone["records"])
    device.import_payload(SyncPayload.from_wire(gone))
    assert device.count() == 0
    assert device.state_digest(["maintenance"]) == hub(client).store.state_digest(["maintenance"])
    device.close()


def test_a_pushed_device_record_reaches_another_device_but_not_its_sender(client: TestClient, tmp_path: Path) -> None:
    laptop1 = ReplicaStore(tmp_path / "laptop-1.sqlite", "laptop-1")
    laptop2 = ReplicaStore(tmp_path / "laptop-2.sqlite", "laptop-2")
    laptop1.import_payload(SyncPayload.from_wire(pull(client, laptop1, ["quality"])))
    note = laptop1.local_write(
        "chunk", "laptop-1-note-1", department="quality", topic="kilns", payload={"text": "Kiln K-7 runs hot."}
    )
    chain = laptop1.local_write(
        "reasoning", "chain-1", department="quality", payload={"question": "why hot?", "answer": "worn liner"}
    )
    laptop1.local_write("lora", "adapter-1", department="quality", payload={"path": "/var/lib/lora/1"})

    response = client.post("/internal/sync/push", json=push_body(laptop1, VectorClock(), ["quality", "sales"]))
    assert response.status_code == 200, response.text
    pushed = response.json()
    assert pushed["accepted"] == 2  # the LoRA adapter never left the laptop
    assert pushed["clock"]["laptop-1"] == laptop1.counter() == 3
    assert hub(client).store.get("chunk", "laptop-1-note-1") == note

    replay = client.post("/internal/sync/push", json=push_body(laptop1, VectorClock(), ["quality"]))
    assert replay.json()["accepted"] == 0  # a repeated push changes nothing

    seen = pull(client, laptop2, ["quality"])
    ids = {r["record_id"]: r for r in seen["records"]}
    assert ids["laptop-1-note-1"]["payload"] == {"text": "Kiln K-7 runs hot."}
    assert ids["laptop-1-note-1"]["topic"] == "kilns"
    assert ids["chain-1"]["kind"] == "reasoning" and ids["chain-1"]["origin"] == "laptop-1"
    assert "adapter-1" not in ids
    laptop2.import_payload(SyncPayload.from_wire(seen))
    assert laptop2.get("reasoning", "chain-1") == chain

    # A topic subscription gets its topics and department-wide records, not other topics.
    ovens = pull(client, ReplicaStore(":memory:", "laptop-3"), ["quality"], topics=["ovens"])["records"]
    assert [r["record_id"] for r in ovens] == ["chain-1"]  # untagged; the "kilns" note is left out
    kilns = pull(client, ReplicaStore(":memory:", "laptop-4"), ["quality"], topics=["kilns"])["records"]
    assert sorted(r["record_id"] for r in kilns) == ["chain-1", "laptop-1-note-1"]
    back = pull(client, laptop1, ["quality"])
    assert back["records"] == []  # its own changes do not come back to the sender
    laptop1.close()
    laptop2.close()


def test_a_tiny_patch_limit_returns_a_snapshot_of_the_subscription(client: TestClient, tmp_path: Path) -> None:
    assert upload(client, "safety", "pump-room.md", MANUAL.encode()).status_code == 200
    device = ReplicaStore(tmp_path / "laptop-9.sqlite", "laptop-9")
    data = pull(client, device, ["safety"], max_patch_bytes=64)
    assert data["mode"] == "snapshot" and data["records"] is None
    assert data["bytes"] == len(data["snapshot_b64"])
    lines = gzip.decompress(base64.b64decode(data["snapshot_b64"])).decode().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "membria-sync-snapshot"
    assert header["departments"] == ["safety"]
    assert header["clock"] == data["clock"]
    assert header["records"] == len(lines) - 1 == 5
    result = device.import_payload(SyncPayload.from_wire(data))
    assert len(result.accepted) == 5
    assert device.state_digest() == hub(client).store.state_digest(["safety"])
    assert pull(client, device, ["safety"])["records"] == []
    device.close()


def test_pushes_outside_the_callers_scope_or_with_lora_are_refused_whole(client: TestClient) -> None:
    device = ReplicaStore(":memory:", "laptop-5")
    device.local_write("chunk", "ok-1", department="quality", payload={"text": "fine"})
    device.local_write("chunk", "hr-1", department="hr", payload={"text": "salaries"})
    refused = client.post("/internal/sync/push", json=push_body(device, VectorClock(), ["quality"]))
    assert_error(refused, 403, "forbidden")
    message = refused.json()["error"]["message"]
    assert "records[1] (chunk 'hr-1') is in department 'hr', outside the caller's sync scope (quality)" == message
    assert hub(client).store.get("chunk", "ok-1") is None  # nothing of a refused push is applied

    lora = device.local_write("lora", "adapter", department="quality", payload={"path": "x"})
    body = push_body(device, VectorClock(), ["quality", "hr"])
    body["records"].append(lora.to_wire())
    refused_lora = client.post("/internal/sync/push", json=body)
    assert_error(refused_lora, 400, "lora_refused")
    assert "adapters never leave" in refused_lora.json()["error"]["message"]

    no_scope = client.post("/internal/sync/push", json=push_body(device, VectorClock(), []))
    assert_error(no_scope, 403, "forbidden")
    assert_error(client.post("/internal/sync/pull", json={"replica": "x", "clock": {}, "departments": []}), 403)


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("push", {"replica": "laptop-1", "records": [], "clock": {}}, 422, "departments: Field required"),
        ("push", {"replica": "laptop-1", "records": {}, "clock": {}, "departments": ["qa"]}, 422, "records"),
        (
            "push",
            {"replica": "laptop-1", "records": [{"kind": "chunk"}], "clock": {}, "departments": ["qa"]},
            422,
            "records[0]: missing field(s) 'deleted', 'department', 'lamport', 'origin', 'payload', 'record_id', 'seq'",
        ),
        (
            "push",
            {
                "replica": "laptop-1",
                "records": [
                    {
                        "kind": "chunk",
                        "record_id": "c1",
                        "department": "qa",
                        "payload": {"text": "x"},
                        "deleted": False,
                        "origin": "laptop-1",
                        "seq": "one",
                        "lamport": 1,
                    }
                ],
                "clock": {"laptop-1": 1},
                "departments": ["qa"],
            },
            422,
            "records[0]: seq must be an integer, not str",
        ),
        (
            "push",
            {
                "replica": "laptop-1",
                "records": [
                    {
                        "kind": "chunk",
                        "record_id": "c1",
                        "department": "qa",
                        "payload": {"text": "x"},
                        "deleted": False,
                        "origin": "laptop-1",
                        "seq": 5,
                        "lamport": 1,
                    }
                ],
                "clock": {"laptop-1": 1},
                "departments": ["qa"],
            },
            422,
            "records[0] (chunk 'c1') has seq 5, beyond the pushed clock's 1 for 'laptop-1'",
        ),
        ("push", {"replica": "bad id", "records": [], "clock": {}, "departments": ["qa"]}, 422, "not a replica id"),
        ("push", {"replica": "core", "records": [], "clock": {}, "departments": ["qa"]}, 403, "the hub's own"),
        ("pull", {"replica": "laptop-1", "clock": {"laptop-1": -3}, "departments": ["qa"]}, 422, "between 0 and"),
        ("pull", {"replica": "laptop-1", "clock": [], "departments": ["qa"]}, 422, "clock"),
        ("pull", {"replica": "laptop-1", "clock": {}, "departments": ["QA!"]}, 422, "departments.0"),
        ("pull", {"replica": "laptop-1", "clock": {}, "departments": ["qa"], "extra": 1}, 422, "extra"),
        ("pull", {"replica": "laptop-1", "clock": {}, "departments": ["qa"], "max_patch_bytes": -1}, 422, "max_patch"),
    ],
)
def test_bad_wire_bodies_get_a_4xx_with_a_precise_message(
    client: TestClient, path: str, body: dict[str, Any], status: int, fragment: str
) -> None:
    response = client.post(f"/internal/sync/{path}", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_malformed_json_and_oversized_pushes_are_refused(client: TestClient) -> None:
    broken = client.post(
        "/internal/sync/push",
        content=b'{"replica": "laptop-1", "records": [',
        headers={"content-type": "application/json"},
    )
    assert_error(broken, 422, "invalid_request")
    assert "JSON" in broken.json()["error"]["message"]
    big = {"replica": "laptop-1", "records": [], "clock": {}, "departments": ["qa"], "pad": "x" * MAX_PUSH}
    assert_error(client.post("/internal/sync/push", json=big), 413, "too_large")


def test_a_device_restored_from_an_older_copy_recovers_without_losing_its_new_write(
    client: TestClient, tmp_path: Path
) -> None:
    device = ReplicaStore(tmp_path / "laptop-7.sqlite", "laptop-7")
    for i in range(3):
        device.local_write("chunk", f"l7-{i}", department="field-ops", payload={"i": i})
    assert client.post("/internal/sync/push", json=push_body(device, VectorClock(), ["field-ops"])).status_code == 200
    restored = ReplicaStore(tmp_path / "laptop-7-restored.sqlite", "laptop-7")  # an older (empty) copy
    new = restored.local_write("chunk", "l7-new", department="field-ops", payload={"i": 99})
    assert new.seq == 1  # a seq the hub already knows as l7-0

    ignored = client.post("/internal/sync/push", json=push_body(restored, VectorClock(), ["field-ops"]))
    assert ignored.status_code == 200, ignored.text
    assert ignored.json()["accepted"] == 0  # not applied: (laptop-7, 1) already names another change
    assert hub(client).store.get("chunk", "l7-new") is None

    data = pull(client, restored, ["field-ops"])  # the hub answers with the whole state, whatever the clock
    assert {"l7-0", "l7-1", "l7-2"} <= {r["record_id"] for r in data["records"]}
    result = restored.import_payload(SyncPayload.from_wire(data))
    assert [(r.record_id, r.seq) for r in result.restamped] == [("l7-new", 4)]
    since = VectorClock.from_json(data["clock"])
    pushed = client.post("/internal/sync/push", json=push_body(restored, since, ["field-ops"]))
    assert pushed.json()["accepted"] == 1
    stored = hub(client).store.get("chunk", "l7-new")
    assert stored is not None and (stored.seq, dict(stored.payload)) == (4, {"i": 99})
    device.close()
    restored.close()


def test_sync_routes_answer_only_the_gateway(tmp_path: Path, client: TestClient) -> None:
    settings = core_settings(tmp_path, "http://127.0.0.1:9/v1", require_gateway_peer=True)
    core = CoreService(settings, embedder=hub_service(client).embedder)
    with TestClient(create_app(settings, service=core)) as guarded:
        body = {"replica": "laptop-1", "clock": {}, "departments": ["qa"]}
        assert_error(guarded.post("/internal/sync/pull", json=body), 403, "forbidden")
        assert_error(guarded.post("/internal/sync/push", json={**body, "records": []}), 403, "forbidden")
    core.close()


def hub_service(client: TestClient) -> CoreService:
    app = client.app
    assert isinstance(app, FastAPI)
    core: CoreService = app.state.service
    return core
