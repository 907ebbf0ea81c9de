"""The gateway's Idempotency-Key on POST /v1/chat/completions, against the lab (real core server, real model).

"One upstream call" is shown three ways, each real: the gateway's count of requests it sent to the core
server (`membria_gateway_core_requests_total{path="/internal/rag"}` on /metrics), the store's own row for
the key (`upstream_calls`, `replays`), and the audit log, where the replay's row says it was one.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.common.sqlite_db import connect
from runtime.gateway.idempotency import (
    Claimed,
    IdempotencyStore,
    InvalidKey,
    KeyInProgress,
    Replay,
    StoredResponse,
    request_hash,
    validate_key,
)
from tests.integration.conftest import ExtraGateway, GatewayLab, audit_rows_until, metric_value

pytestmark = pytest.mark.integration

RAG = {"path": "/internal/rag"}
DEVICE = "eng-laptop"  # IDENTITIES in conftest: an engineering laptop
DEVICE_CALLER = "device:laptop-eng-1"


def chat(model: str, question: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 16,
        **extra,
    }


def rag_calls(lab: GatewayLab) -> float:
    return metric_value(lab.metrics(), "membria_gateway_core_requests_total", **RAG)


def store_row(db: Path, caller: str, key: str) -> dict[str, Any] | None:
    conn = connect(db, read_only=True)
    try:
        row = conn.execute(
            "SELECT state, status, upstream_calls, replays, body FROM idempotency WHERE caller = ? AND key = ?",
            (caller, key),
        ).fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    return dict(zip(("state", "status", "upstream_calls", "replays", "body"), row, strict=True))


def lab_store(lab: GatewayLab) -> Path:
    return Path(lab.config["state_dir"]) / "idempotency.sqlite"


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def test_a_repeated_key_is_replayed_without_a_second_core_call(lab: GatewayLab) -> None:
    key = str(uuid.uuid4())
    body = chat(lab.model, f"How are the O-ring seals of pump P-{uuid.uuid4().hex[:6]} replaced?")
    before = rag_calls(lab)
    with lab.client(DEVICE) as client:
        first = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
        second = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    assert second.status_code == 200, second.text
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()  # the very answer, id included
    assert rag_calls(lab) - before == 1

    row = store_row(lab_store(lab), DEVICE_CALLER, key)
    assert row is not None
    assert (row["state"], row["status"], row["upstream_calls"], row["replays"]) == ("done", 200, 1, 1)

    # The audit log has both requests; the replay's row says it was one, naming the key by its digest only.
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    ids = {first.headers["x-request-id"]: "first", second.headers["x-request-id"]: "replay"}
    logged = audit_rows_until(lab, lambda rows: set(ids) <= {r["request_id"] for r in rows})
    rows = {r["request_id"]: r for r in logged if r["request_id"] in ids}
    assert set(rows) == set(ids)
    for request_id, which in ids.items():
        row_text = rows[request_id]
        assert row_text["route"] == "/v1/chat/completions" and row_text["status"] == 200
        assert key not in row_text["reason"]
        if which == "replay":
            assert f"idempotent replay (key #{tag})" in row_text["reason"]
        else:
            assert f"idempotency key #{tag}" in row_text["reason"] and "replay" not in row_text["reason"]

    # Control: without the key the same request does reach the core again (the counter is live).
    with lab.client(DEVICE) as client:
        third = client.post("/v1/chat/completions", json=body)
    assert third.status_code == 200 and "Idempotent-Replayed" not in third.headers
    assert rag_calls(lab) - before == 2


def test_a_key_belongs_to_its_caller(lab: GatewayLab) -> None:
    key = str(uuid.uuid4())
    body = chat(lab.model, "What does the engineering team test before every pressure test?")
    before = rag_calls(lab)
    with lab.client(DEVICE) as client:
        mine = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
    with lab.client("alice") as client:  # the same key from someone else is someone else's request
        theirs = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
    assert mine.status_code == 200 and theirs.status_code == 200, (mine.text, theirs.text)
    assert "Idempotent-Replayed" not in theirs.headers
    assert theirs.json()["id"] != mine.json()["id"]
    assert rag_calls(lab) - before == 2


def test_the_same_key_with_another_request_is_422(lab: GatewayLab) -> None:
    key = str(uuid.uuid4())
    with lab.client(DEVICE) as client:
        first = client.post(
            "/v1/chat/completions",
            json=chat(lab.model, "Who approves large discounts?"),
            headers={"Idempotency-Key": key},
        )
        assert first.status_code == 200, first.text
        before = rag_calls(lab)
        for other in (
            chat(lab.model, "Who approves small discounts?"),  # another question
            chat(lab.model, "Who approves large discounts?", max_tokens=17),  # the same question, other options
        ):
            reused = client.post("/v1/chat/completions", json=other, headers={"Idempotency-Key": key})
            assert reused.status_code == 422, reused.text
            assert error_code(reused) == "idempotency_key_reused"
            assert reused.json()["error"]["message"] == "idempotency key reused with a different request"
    assert rag_calls(lab) == before
    row = store_row(lab_store(lab), DEVICE_CALLER, key)
    assert row is not None and (row["upstream_calls"], row["replays"]) == (1, 0)


@pytest.mark.parametrize(
    "key",
    ["", "a" * 129, "has space", "slash/not/allowed", "semi;colon", "caf\u00e9".encode()],
    ids=["empty", "129 characters", "space", "slash", "semicolon", "non-ASCII"],
)
def test_a_malformed_key_is_400_and_reaches_nothing(lab: GatewayLab, key: str | bytes) -> None:
    before = rag_calls(lab)
    with lab.client(DEVICE) as client:
        response = client.post("/v1/chat/completions", json=chat(lab.model, "Hello?"), headers={"Idempotency-Key": key})
    assert response.status_code == 400, response.text
    assert error_code(response) == "invalid_idempotency_key"
    assert "1 to 128 characters" in response.json()["error"]["message"]
    assert rag_calls(lab) == before


def test_the_longest_valid_key_is_accepted(lab: GatewayLab) -> None:
    key = "A-z_0:9." + "k" * 120
    with lab.client(DEVICE) as client:
        response = client.post(
            "/v1/chat/completions", json=chat(lab.model, "Hello there?"), headers={"Idempotency-Key": key}
        )
    assert len(key) == 128 and response.status_code == 200, response.text


def test_a_key_with_a_stream_is_400(lab: GatewayLab) -> None:
    before = rag_calls(lab)
    with lab.client(DEVICE) as client:
        response = client.post(
            "/v1/chat/completions",
            json=chat(lab.model, "Hello?", stream=True),
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
    assert response.status_code == 400, response.text
    assert error_code(response) == "idempotency_not_streamable"
    assert rag_calls(lab) == before


def test_concurrent_requests_with_one_key_make_one_core_call(lab: GatewayLab) -> None:
    """Four requests with one key at once: one reaches the core, the others wait for its answer and get it."""
    key = str(uuid.uuid4())
    body = chat(lab.model, f"List the steps of a pressure test ({uuid.uuid4().hex[:6]}).", max_tokens=64)
    before = rag_calls(lab)
    start = threading.Barrier(4)
    responses: list[httpx.Response] = []
    lock = threading.Lock()
    tls = lab.who(DEVICE)

    def post() -> None:
        with lab.client(tls) as client:
            start.wait()
            response = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=post) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(responses) == 4
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert len({r.text for r in responses}) == 1  # one answer, four times
    assert sorted(r.headers.get("Idempotent-Replayed", "") for r in responses) == ["", "true", "true", "true"]
    assert rag_calls(lab) - before == 1
    row = store_row(lab_store(lab), DEVICE_CALLER, key)
    assert row is not None and (row["upstream_calls"], row["replays"]) == (1, 3)


def test_a_failed_core_call_releases_the_key(lab: GatewayLab, tmp_path: Path) -> None:
    """Two gateways share one store: `broken` reaches no core server (its call fails, 503), `working` does.
    The failure leaves the key free: the retry through `working` calls the core, and only then is it stored."""
    shared = {"idempotency": {"path": str(tmp_path / "shared-idempotency.sqlite")}}
    dead_core = "https://127.0.0.1:9"  # discard port: nothing listens
    broken = ExtraGateway(lab, "gateway-idem-broken", tmp_path / "broken", {**shared, "core_url": dead_core})
    working = ExtraGateway(lab, "gateway-idem-working", tmp_path / "working", shared)
    broken.start()
    working.start()
    try:
        key = str(uuid.uuid4())
        body = chat(lab.model, "When are the O-ring seals replaced?")
        headers = {"Idempotency-Key": key}
        with lab.client(DEVICE, url=broken.url) as client:
            failed = client.post("/v1/chat/completions", json=body, headers=headers)
        assert failed.status_code == 503, failed.text
        assert error_code(failed) == "core_unavailable"
        row = store_row(working.idempotency_db, DEVICE_CALLER, key)
        assert row is not None and (row["state"], row["upstream_calls"], row["body"]) == ("released", 1, None)

        with lab.client(DEVICE, url=working.url) as client:
            retried = client.post("/v1/chat/completions", json=body, headers=headers)
            replayed = client.post("/v1/chat/completions", json=body, headers=headers)
        assert retried.status_code == 200 and "Idempotent-Replayed" not in retried.headers, retried.text
        assert replayed.status_code == 200 and replayed.headers["Idempotent-Replayed"] == "true"
        assert replayed.json() == retried.json()
        assert working.metric("membria_gateway_core_requests_total", **RAG) == 1
        # The broken gateway now replays the stored answer too: the store is shared.
        with lab.client(DEVICE, url=broken.url) as client:
            again = client.post("/v1/chat/completions", json=body, headers=headers)
        assert again.status_code == 200 and again.json() == retried.json(), again.text
        row = store_row(working.idempotency_db, DEVICE_CALLER, key)
        assert row is not None and (row["state"], row["upstream_calls"], row["replays"]) == ("done", 2, 2)
    finally:
        broken.stop()
        working.stop()


# --- the store itself (real SQLite files; a settable clock stands in for waiting days) ----------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_of_many_connections_claiming_one_key_at_once_exactly_one_wins(tmp_path: Path) -> None:
    """Eight stores (eight connections, as eight gateway workers would hold) race for one key."""
    stores = [IdempotencyStore(tmp_path / "idem.sqlite") for _ in range(8)]
    start = threading.Barrier(len(stores))
    outcomes: list[object] = []
    lock = threading.Lock()

    def claim(store: IdempotencyStore) -> None:
        start.wait()
        outcome = store.try_begin("device:d1", "k1", "h1")
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(outcomes) == 8
    assert sum(isinstance(o, Claimed) for o in outcomes) == 1
    stores[0].complete("device:d1", "k1", 200, {"answer": 42})
    replay = stores[5].try_begin("device:d1", "k1", "h1")
    assert isinstance(replay, Replay) and replay.response == StoredResponse(200, {"answer": 42})
    assert stores[1].stats("device:d1", "k1") == {"state": "done", "status": 200, "upstream_calls": 1, "replays": 1}
    for store in stores:
        store.close()


def test_a_claim_whose_gateway_died_expires_after_its_lease(tmp_path: Path) -> None:
    clock = Clock()
    store = IdempotencyStore(tmp_path / "idem.sqlite", lease_seconds=150, clock=clock)
    assert isinstance(store.try_begin("device:d1", "k1", "h1"), Claimed)
    clock.now += 149
    assert not isinstance(store.try_begin("device:d1", "k1", "h1"), Claimed | Replay)  # still held
    clock.now += 2
    assert isinstance(store.try_begin("device:d1", "k1", "h1"), Claimed)  # taken over
    assert store.stats("device:d1", "k1") == {"state": "pending", "status": None, "upstream_calls": 2, "replays": 0}
    store.close()


def test_waiting_for_a_held_key_gives_up_with_in_progress(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path / "idem.sqlite")
    assert isinstance(store.try_begin("device:d1", "k1", "h1"), Claimed)
    with pytest.raises(KeyInProgress, match="still in progress"):
        asyncio.run(store.begin("device:d1", "k1", "h1", wait_seconds=0.3, poll_seconds=0.05))
    store.close()


def test_answers_expire_and_are_pruned(tmp_path: Path) -> None:
    clock = Clock()
    store = IdempotencyStore(tmp_path / "idem.sqlite", ttl_seconds=3600, clock=clock)
    for key in ("old-1", "old-2"):
        assert isinstance(store.try_begin("user:u", key, "h"), Claimed)
        store.complete("user:u", key, 200, {"k": key})
    clock.now += 3601
    # An expired key is a new key: another request may use it, and it calls upstream again.
    assert isinstance(store.try_begin("user:u", "old-1", "another request"), Claimed)
    assert store.stats("user:u", "old-2") is None  # pruned by that write
    store.close()


def test_keys_are_checked(tmp_path: Path) -> None:
    assert validate_key("a") == "a" and validate_key("x" * 128) == "x" * 128
    for bad in ("", "x" * 129, "a b", "a/b", "ключ"):
        with pytest.raises(InvalidKey, match="1 to 128 characters"):
            validate_key(bad)
    assert request_hash({"a": 1, "b": [1, 2]}) == request_hash({"b": [1, 2], "a": 1})
    assert request_hash({"a": 1}) != request_hash({"a": 2})
