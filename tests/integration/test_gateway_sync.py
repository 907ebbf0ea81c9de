"""Sync through the gateway: POST /v1/sync/push and /v1/sync/pull with device certificates from the lab's PKI,
forwarded to the real core server's hub (which holds the lab corpus as chunk records).

RBAC: action `sync` on the departments (a pull's subscription, every pushed record's department); refused
pushes and pulls never reach the core, which the gateway's count of requests sent to it shows.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from runtime.common.sync_wire import SyncPayload, decode_snapshot
from runtime.common.tls import TlsFiles
from tests.integration.conftest import GatewayLab, metric_value

pytestmark = pytest.mark.integration


def device(lab: GatewayLab, cn: str, department: str) -> TlsFiles:
    return lab.files(lab.issue("edge-device", cn, department), cn)


@pytest.fixture(scope="module")
def devices(lab: GatewayLab) -> dict[str, TlsFiles]:
    return {
        "eng-a": device(lab, "laptop-sync-eng-a", "engineering"),
        "eng-b": device(lab, "laptop-sync-eng-b", "engineering"),
        "sales": device(lab, "laptop-sync-sales", "sales"),
    }


def core_sync_calls(lab: GatewayLab) -> float:
    text = lab.metrics()
    return sum(
        metric_value(text, "membria_gateway_core_requests_total", path=p)
        for p in ("/internal/sync/push", "/internal/sync/pull")
    )


def chunk(replica: str, seq: int, department: str, text: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "chunk",
        "record_id": f"{replica}-note-{seq}",
        "department": department,
        "topic": None,
        "payload": {"text": text},
        "deleted": False,
        "origin": replica,
        "seq": seq,
        "lamport": seq,
        **extra,
    }


def pull_body(replica: str, departments: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "replica": replica,
        "clock": {},
        "departments": departments,
        "topics": None,
        "max_patch_bytes": 20 * 1024 * 1024,
        **extra,
    }


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def test_a_pushed_chunk_reaches_the_devices_of_its_department_only(
    lab: GatewayLab, devices: dict[str, TlsFiles]
) -> None:
    # A fresh laptop (the hub outlives this test): its replica id is its certificate's name.
    replica = f"laptop-sync-eng-a-{uuid.uuid4().hex[:6]}"
    note = chunk(replica, 1, "engineering", "The VX-55 valve is greased every 500 hours.")
    with lab.client(device(lab, replica, "engineering")) as client:
        pushed = client.post("/v1/sync/push", json={"replica": replica, "records": [note], "clock": {replica: 1}})
    assert pushed.status_code == 200, pushed.text
    assert pushed.json()["accepted"] == 1
    assert pushed.json()["clock"][replica] == 1

    # Another engineering laptop pulls from scratch: a patch with the note and the engineering corpus.
    with lab.client(devices["eng-b"]) as client:
        pulled = client.post("/v1/sync/pull", json=pull_body("laptop-sync-eng-b", ["engineering"]))
    assert pulled.status_code == 200, pulled.text
    patch = SyncPayload.from_wire(pulled.json())
    assert patch.mode == "patch" and patch.records is not None
    by_id = {r.record_id: r for r in patch.records}
    assert by_id[note["record_id"]].payload == note["payload"]
    assert {r.department for r in patch.records} == {"engineering"}
    assert any(r.origin == "core" for r in patch.records)  # the corpus, ingested on the core
    assert patch.clock.to_json()[replica] == 1

    # The same pull, asked to keep patches under one byte, comes back as a snapshot of the same state.
    with lab.client(devices["eng-b"]) as client:
        small = client.post("/v1/sync/pull", json=pull_body("laptop-sync-eng-b", ["engineering"], max_patch_bytes=1))
    assert small.status_code == 200, small.text
    snapshot = SyncPayload.from_wire(small.json())
    assert snapshot.mode == "snapshot" and snapshot.snapshot is not None
    records, _, header = decode_snapshot(snapshot.snapshot)
    assert header["departments"] == ["engineering"]
    assert {r.record_id for r in records} == set(by_id)

    # A sales laptop subscribed to its whole scope (no departments named) sees sales knowledge only.
    with lab.client(devices["sales"]) as client:
        sales = client.post("/v1/sync/pull", json=pull_body("laptop-sync-sales", []))
    assert sales.status_code == 200, sales.text
    sales_patch = SyncPayload.from_wire(sales.json())
    assert sales_patch.records
    assert {r.department for r in sales_patch.records} == {"sales"}
    assert note["record_id"] not in {r.record_id for r in sales_patch.records}


DENIED: list[tuple[str, str, dict[str, Any]]] = [
    ("pull engineering", "/v1/sync/pull", pull_body("laptop-sync-sales", ["engineering"])),
    ("pull sales and engineering", "/v1/sync/pull", pull_body("laptop-sync-sales", ["sales", "engineering"])),
    ("pull a department the site does not have", "/v1/sync/pull", pull_body("laptop-sync-sales", ["finance"])),
    (
        "push an engineering chunk",
        "/v1/sync/push",
        {
            "replica": "laptop-sync-sales",
            "records": [chunk("laptop-sync-sales", 1, "engineering", "x")],
            "clock": {"laptop-sync-sales": 1},
        },
    ),
    (
        "push sales and engineering chunks",
        "/v1/sync/push",
        {
            "replica": "laptop-sync-sales",
            "records": [
                chunk("laptop-sync-sales", 1, "sales", "x"),
                chunk("laptop-sync-sales", 2, "engineering", "y"),
            ],
            "clock": {"laptop-sync-sales": 2},
        },
    ),
]


@pytest.mark.parametrize(("why", "path", "body"), DENIED, ids=[d[0] for d in DENIED])
def test_a_sales_device_cannot_sync_other_departments(
    lab: GatewayLab, devices: dict[str, TlsFiles], why: str, path: str, body: dict[str, Any]
) -> None:
    before = core_sync_calls(lab)
    with lab.client(devices["sales"]) as client:
        response = client.post(path, json=body)
    assert response.status_code == 403, (why, response.text)
    assert error_code(response) == "forbidden"
    assert core_sync_calls(lab) == before


def test_a_user_without_a_department_cannot_sync(lab: GatewayLab) -> None:
    with lab.client("gus") as client:  # a site certificate no binding names
        response = client.post("/v1/sync/pull", json=pull_body("gus-laptop", []))
    assert response.status_code == 403, response.text


def test_a_lora_adapter_never_leaves_the_device(lab: GatewayLab, devices: dict[str, TlsFiles]) -> None:
    before = core_sync_calls(lab)
    replica = "laptop-sync-eng-a"
    adapter = chunk(replica, 2, "engineering", "", kind="lora", payload={"adapter_b64": "AAAA"})
    body = {"replica": replica, "records": [chunk(replica, 1, "engineering", "fine"), adapter], "clock": {replica: 2}}
    with lab.client(devices["eng-a"]) as client:
        response = client.post("/v1/sync/push", json=body)
    assert response.status_code == 400, response.text
    assert error_code(response) == "lora_refused"
    assert "records[1]" in response.json()["error"]["message"]
    assert core_sync_calls(lab) == before  # refused whole, at the gateway


def _push(replica: str, **record: Any) -> dict[str, Any]:
    return {"replica": replica, "records": [{**chunk(replica, 1, "engineering", "t"), **record}], "clock": {replica: 1}}


MALFORMED: list[tuple[str, str, dict[str, Any]]] = [
    ("record without lamport", "/v1/sync/push", {**_push("r1"), "records": [{"kind": "chunk", "record_id": "x"}]}),
    ("unknown record field", "/v1/sync/push", _push("r1", colour="blue")),
    ("unknown kind", "/v1/sync/push", _push("r1", kind="memory")),
    ("seq 0", "/v1/sync/push", _push("r1", seq=0)),
    ("seq as text", "/v1/sync/push", _push("r1", seq="1")),
    ("deleted as a number", "/v1/sync/push", _push("r1", deleted=0)),
    ("payload a list", "/v1/sync/push", _push("r1", payload=["x"])),
    ("bad replica id", "/v1/sync/push", {**_push("r1"), "replica": "no spaces allowed"}),
    ("negative clock", "/v1/sync/pull", {**pull_body("r1", ["engineering"]), "clock": {"core": -1}}),
    ("department not a name", "/v1/sync/pull", pull_body("r1", ["Engineering"])),
    ("unknown field", "/v1/sync/pull", {**pull_body("r1", ["engineering"]), "since": 3}),
    ("no replica", "/v1/sync/pull", {"clock": {}, "departments": ["engineering"]}),
]


@pytest.mark.parametrize(("why", "path", "body"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_sync_bodies_are_422_and_reach_nothing(
    lab: GatewayLab, devices: dict[str, TlsFiles], why: str, path: str, body: dict[str, Any]
) -> None:
    before = core_sync_calls(lab)
    with lab.client(devices["eng-a"]) as client:
        response = client.post(path, json=body)
    assert response.status_code == 422, (why, response.text)
    assert error_code(response) == "invalid_request"
    assert core_sync_calls(lab) == before


def test_the_hubs_refusal_comes_back_as_a_client_error(lab: GatewayLab, devices: dict[str, TlsFiles]) -> None:
    """Well formed for the gateway, refused by the hub (a record's seq beyond the pushed clock): the device gets
    the hub's 4xx and its reason, not a 5xx."""
    replica = f"laptop-sync-eng-a-{uuid.uuid4().hex[:6]}"
    body = {"replica": replica, "records": [chunk(replica, 5, "engineering", "t")], "clock": {replica: 1}}
    with lab.client(device(lab, replica, "engineering")) as client:
        response = client.post("/v1/sync/push", json=body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "core_refused"
    assert "beyond the pushed clock" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/sync/push", "/v1/sync/pull"])
def test_a_device_syncs_only_as_itself(lab: GatewayLab, devices: dict[str, TlsFiles], path: str) -> None:
    """Replica ids are bound to the device certificate: laptop A cannot push or pull as laptop B."""
    before = core_sync_calls(lab)
    other = "laptop-sync-eng-b"
    body = (
        {"replica": other, "records": [chunk(other, 1, "engineering", "forged")], "clock": {other: 1}}
        if path.endswith("push")
        else pull_body(other, ["engineering"])
    )
    with lab.client(devices["eng-a"]) as client:
        response = client.post(path, json=body)
    assert response.status_code == 403, response.text
    assert "laptop-sync-eng-a" in response.json()["error"]["message"]
    assert core_sync_calls(lab) == before
