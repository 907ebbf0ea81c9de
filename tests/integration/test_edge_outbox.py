"""The edge outbox delivering escalations through real gateways to the real core server, with a device
certificate from the lab's PKI.

Two gateway processes of our own play the primary and the secondary endpoint; they share one idempotency
store (as gateways of one site do), so an item that reached the core through one is replayed by the other.
The tests stop and start them to take the edge offline. The kill -9 tests run the worker as a process of its
own (tests/integration/outbox_worker.py) and kill it mid-delivery.

"Exactly once" is checked against the gateway's own records: its store holds one row per key with the
number of calls it made to the core for it, and its /metrics count every request sent to the core.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runtime.common.sqlite_db import connect
from runtime.common.tls import TlsFiles
from runtime.edge.outbox import Outbox, OutboxWorker
from runtime.edge.transport import GatewayTransport, GatewayUnreachable
from tests.conftest import REPO
from tests.integration.conftest import ExtraGateway, GatewayLab, metric_value

pytestmark = pytest.mark.integration

DEVICE_CN = "laptop-outbox-1"
CALLER = f"device:{DEVICE_CN}"
RAG = {"path": "/internal/rag"}
WORKER = Path(__file__).with_name("outbox_worker.py")


@dataclass
class Gateways:
    primary: ExtraGateway
    secondary: ExtraGateway
    store: Path  # the idempotency store both use
    device: TlsFiles

    def rag_calls(self) -> float:
        return sum(g.metric("membria_gateway_core_requests_total", **RAG) for g in (self.primary, self.secondary))

    def transport(self, *endpoints: str) -> GatewayTransport:
        # Quick retries: the waits are bounded and short, the behaviour is the production one.
        return GatewayTransport(
            list(endpoints) or [self.primary.url, self.secondary.url],
            self.device,
            timeout=120,
            retries_per_endpoint=2,
            backoff_base=0.05,
            backoff_max=0.2,
        )


@pytest.fixture(scope="module")
def gateways(lab: GatewayLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    root = tmp_path_factory.mktemp("outbox-gateways")
    shared = {"idempotency": {"path": str(root / "idempotency.sqlite")}}
    primary = ExtraGateway(lab, "gateway-primary", root / "primary", shared)
    secondary = ExtraGateway(lab, "gateway-secondary", root / "secondary", shared)
    device = lab.files(lab.issue("edge-device", DEVICE_CN, "engineering"), "outbox-laptop")
    primary.start()
    secondary.start()
    try:
        yield Gateways(primary, secondary, root / "idempotency.sqlite", device)
    finally:
        primary.stop()
        secondary.stop()


@pytest.fixture
def both_up(gateways: Gateways) -> Gateways:
    """Each test starts with both gateways running (a test that stops one starts it again here)."""
    for gateway in (gateways.primary, gateways.secondary):
        if not gateway.running():
            gateway.start()
    return gateways


def escalation(lab: GatewayLab, question: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": lab.model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 12,
        **extra,
    }


def store_rows(store: Path) -> dict[str, dict[str, Any]]:
    """The gateways' idempotency rows of the test device, by key."""
    conn = connect(store, read_only=True)
    try:
        rows = conn.execute(
            "SELECT key, state, upstream_calls, replays, body FROM idempotency WHERE caller = ?", (CALLER,)
        ).fetchall()
    finally:
        conn.close()
    return {k: {"state": s, "upstream_calls": u, "replays": r, "body": b} for k, s, u, r, b in rows}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


# --- offline, failover, reconnect --------------------------------------------------------------------------


def test_offline_the_item_waits_then_the_secondary_delivers_it_once(
    lab: GatewayLab, both_up: Gateways, tmp_path: Path
) -> None:
    gw = both_up
    outbox = Outbox(tmp_path / "edge.sqlite", backoff_base=0.05, backoff_max=0.1)
    gw.primary.stop()
    gw.secondary.stop()
    with gw.transport() as transport:
        first = outbox.enqueue("escalation", escalation(lab, "Which valve needs the calibration code?"))
        second = outbox.enqueue("escalation", escalation(lab, "How often are the seals of pump P-7 replaced?"))
        assert [i.id for i in outbox.pending()] == [first.id, second.id]

        offline = outbox.deliver_once(transport)
        assert offline.delivered == [] and offline.retrying == [first.id]
        assert offline.unreachable is not None
        assert gw.primary.url in offline.unreachable and gw.secondary.url in offline.unreachable
        waiting = outbox.get(first.id)
        assert waiting is not None
        assert (waiting.status, waiting.attempts) == ("pending", 1)
        assert waiting.next_attempt_at > waiting.created_at  # a retry is scheduled, with backoff
        assert waiting.last_error is not None and gw.primary.url in waiting.last_error
        untouched = outbox.get(second.id)
        assert untouched is not None and untouched.attempts == 0  # the pass stopped: it keeps its place

        # A second failed attempt backs off further.
        wait_for(lambda: [i.id for i in outbox.due()] == [first.id, second.id], 5, "the retry to be due")
        outbox.deliver_once(transport)
        again = outbox.get(first.id)
        assert again is not None and again.attempts == 2 and again.status == "pending"

        # The secondary comes back, the primary stays down: the queue is delivered there, in order.
        gw.secondary.start()
        report = outbox.deliver_once(transport, ignore_schedule=True)
    assert report.delivered == [first.id, second.id], report
    for item_id in (first.id, second.id):
        item = outbox.get(item_id)
        assert item is not None and item.status == "delivered"
        assert item.endpoint == gw.secondary.url and item.response_status == 200
        assert isinstance(item.response["choices"][0]["message"]["content"], str)
    # The secondary's counters started with its restart: the two calls are these two items'.
    assert gw.secondary.metric("membria_gateway_core_requests_total", **RAG) == 2
    rows = store_rows(gw.store)
    assert [rows[i.idempotency_key]["upstream_calls"] for i in (first, second)] == [1, 1]
    assert outbox.pending() == [] and outbox.counts() == {"pending": 0, "delivered": 2, "rejected": 0}
    # Nothing is sent twice: a further pass has nothing to do.
    with gw.transport() as transport:
        assert outbox.deliver_once(transport, ignore_schedule=True).delivered == []
    outbox.close()


def test_the_primary_is_used_first_when_it_is_up(lab: GatewayLab, both_up: Gateways, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "edge.sqlite")
    item = outbox.enqueue("escalation", escalation(lab, "Who enters the calibration code?"))
    with both_up.transport() as transport:
        assert outbox.deliver_once(transport).delivered == [item.id]
    delivered = outbox.get(item.id)
    assert delivered is not None and delivered.endpoint == both_up.primary.url
    outbox.close()


def test_the_transport_names_every_endpoint_when_none_answers(both_up: Gateways) -> None:
    both_up.primary.stop()
    both_up.secondary.stop()
    with both_up.transport() as transport, pytest.raises(GatewayUnreachable) as caught:
        transport.post_json("/v1/chat/completions", {"model": "x", "messages": []})
    assert set(caught.value.errors) == {both_up.primary.url, both_up.secondary.url}
    assert "ConnectError" in str(caught.value)


def test_a_failing_gateway_is_tried_n_times_then_the_secondary(
    lab: GatewayLab, both_up: Gateways, tmp_path: Path
) -> None:
    """A gateway that answers 503 (its core is unreachable) is retried `retries_per_endpoint` times, then the
    secondary answers."""
    broken = ExtraGateway(lab, "gateway-broken", tmp_path / "broken", {"core_url": "https://127.0.0.1:9"}).start()
    try:
        with GatewayTransport(
            [broken.url, both_up.secondary.url],
            both_up.device,
            retries_per_endpoint=3,
            backoff_base=0.05,
            backoff_max=0.2,
        ) as transport:
            answer = transport.post_json("/v1/knowledge/search", {"query": "valve calibration"})
        assert answer.status == 200 and answer.endpoint == both_up.secondary.url, answer
        route = {"route": "/v1/knowledge/search"}
        assert broken.metric("membria_gateway_requests_total", **route, status="503") == 3
        assert broken.metric("membria_gateway_requests_total", **route, status="200") == 0
    finally:
        broken.stop()


def test_a_429_is_waited_out_and_a_refusal_is_not_repeated(lab: GatewayLab, tmp_path: Path) -> None:
    """A gateway allowing one request every 4 s: the device's second request gets 429 (Retry-After: 4). The
    transport waits it out and retries; the answer then is a refusal (403), returned at once, not retried."""
    slow = ExtraGateway(
        lab, "gateway-slow", tmp_path / "slow", {"rate_limit": {"rate_per_second": 0.25, "burst": 1}}
    ).start()
    sales = lab.files(lab.issue("edge-device", "laptop-outbox-sales", "sales"), "outbox-sales")
    try:
        with lab.client(sales, url=slow.url) as client:
            assert client.get("/v1/knowledge/documents", params={"department": "sales"}).status_code == 200
        body = {"query": "valve", "departments": ["engineering"]}  # outside a sales laptop's scope
        with GatewayTransport([slow.url], sales, retries_per_endpoint=3, backoff_base=0.1, backoff_max=6) as transport:
            answer = transport.post_json("/v1/knowledge/search", body)
        assert answer.status == 403 and answer.body["error"]["code"] == "forbidden", answer
        text = lab.metrics(slow.url)
        route = {"route": "/v1/knowledge/search"}
        assert metric_value(text, "membria_gateway_requests_total", **route, status="429") == 1
        assert metric_value(text, "membria_gateway_requests_total", **route, status="403") == 1
    finally:
        slow.stop()


def test_a_refused_escalation_is_rejected_and_never_retried(lab: GatewayLab, both_up: Gateways, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "edge.sqlite")
    refused = outbox.enqueue("escalation", escalation(lab, "Hello?", model="gpt-17"))  # a model nobody serves
    fine = outbox.enqueue("escalation", escalation(lab, "What is the zorblax calibration?"))
    with both_up.transport() as transport:
        report = outbox.deliver_once(transport)
        assert report.rejected == [refused.id] and report.delivered == [fine.id]
        item = outbox.get(refused.id)
        assert item is not None and item.status == "rejected" and item.response_status == 404
        assert item.last_error is not None and "gpt-17" in item.last_error
        assert outbox.deliver_once(transport, ignore_schedule=True).rejected == []  # not retried
    outbox.close()


def test_the_worker_delivers_on_enqueue_and_reports_the_answer(
    lab: GatewayLab, both_up: Gateways, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "edge.sqlite")
    arrived: list[str] = []
    with both_up.transport() as transport:
        worker = OutboxWorker(outbox, transport, idle_seconds=600, on_delivered=lambda item: arrived.append(item.id))
        worker.start()
        try:
            # The worker idles for 10 minutes between passes: only the enqueue can wake it this soon.
            wait_for(lambda: worker.last_report is not None, 30, "the worker's first pass")
            item = outbox.enqueue("escalation", escalation(lab, "What does the HR policy say about leave?"))
            wait_for(lambda: arrived == [item.id], 120, "the escalated answer")
        finally:
            worker.stop()
    delivered = outbox.get(item.id)
    assert delivered is not None and delivered.status == "delivered"
    assert delivered.response["object"] == "chat.completion"
    outbox.close()


def test_stop_flushes_what_was_queued(lab: GatewayLab, both_up: Gateways, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "edge.sqlite", backoff_base=600, backoff_max=600)
    with both_up.transport() as transport:
        worker = OutboxWorker(outbox, transport, idle_seconds=600)
        # Queued and scheduled for 5 to 10 minutes from now: only the stop's flush delivers it this soon.
        item = outbox.enqueue("escalation", escalation(lab, "Who approves discounts above 15 percent?"))
        outbox.mark_failed_attempt(item.id, "simulated: offline a moment ago")
        worker.start()
        wait_for(lambda: worker.last_report is not None, 30, "the worker's first pass")
        assert outbox.get(item.id).status == "pending"  # type: ignore[union-attr]
        worker.stop()
    flushed = outbox.get(item.id)
    assert flushed is not None and flushed.status == "delivered"
    outbox.close()


# --- kill -9 ------------------------------------------------------------------------------------------------


def run_worker(db: Path, gw: Gateways, *extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(WORKER), "--db", str(db), "--endpoint", gw.primary.url]
    argv += ["--endpoint", gw.secondary.url, "--cert", str(gw.device.cert), "--key", str(gw.device.key)]
    argv += ["--ca", str(gw.device.ca), *extra]
    return subprocess.Popen(argv, cwd=REPO)


def enqueue_many(lab: GatewayLab, db: Path, count: int) -> list[str]:
    outbox = Outbox(db)
    run = uuid.uuid4().hex[:6]
    ids = [
        outbox.enqueue("escalation", escalation(lab, f"Question {n} of run {run}: how is pump P-{n} serviced?")).id
        for n in range(count)
    ]
    outbox.close()
    return ids


def check_exactly_once(db: Path, gw: Gateways, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every item delivered, each answer the one the gateway stored, each key sent to the core once."""
    outbox = Outbox(db)
    items = [outbox.get(i) for i in ids]
    outbox.close()
    rows = store_rows(gw.store)
    by_key: dict[str, dict[str, Any]] = {}
    for item in items:
        assert item is not None and item.status == "delivered", item
        row = rows[item.idempotency_key]
        assert (row["state"], row["upstream_calls"]) == ("done", 1), (item.id, row)
        assert item.response == json.loads(row["body"])
        by_key[item.idempotency_key] = row
    return by_key


def test_kill_9_mid_delivery_loses_nothing_and_duplicates_nothing(
    lab: GatewayLab, both_up: Gateways, tmp_path: Path
) -> None:
    gw = both_up
    db = tmp_path / "edge.sqlite"
    count = 10
    ids = enqueue_many(lab, db, count)
    before = gw.rag_calls()
    watcher = Outbox(db)

    def delivered() -> int:
        return watcher.counts()["delivered"]

    worker = run_worker(db, gw)
    try:
        wait_for(lambda: delivered() >= 3 or worker.poll() is not None, 300, "three deliveries")
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL
    at_kill = delivered()
    assert 3 <= at_kill < count, at_kill  # killed with some delivered and some not

    again = run_worker(db, gw)
    assert again.wait(timeout=600) == 0
    assert watcher.counts() == {"pending": 0, "delivered": count, "rejected": 0}
    watcher.close()
    check_exactly_once(db, gw, ids)
    assert gw.rag_calls() - before == count


def test_kill_9_between_the_answer_and_its_record_is_replayed(
    lab: GatewayLab, both_up: Gateways, tmp_path: Path
) -> None:
    """The worker dies right after the gateway answered item 2 and before the outbox recorded it: item 2 is
    sent again on restart, with its key, and the gateway replays the answer it stored instead of asking the
    core again."""
    gw = both_up
    db = tmp_path / "edge.sqlite"
    ids = enqueue_many(lab, db, 4)
    before = gw.rag_calls()
    dying = run_worker(db, gw, "--die-after-post", "2")
    assert dying.wait(timeout=600) == -signal.SIGKILL
    outbox = Outbox(db)
    states = [outbox.get(i).status for i in ids]  # type: ignore[union-attr]
    lost_key = outbox.get(ids[1]).idempotency_key  # type: ignore[union-attr]
    outbox.close()
    assert states == ["delivered", "pending", "pending", "pending"]
    assert store_rows(gw.store)[lost_key]["state"] == "done"  # the gateway has the answer the edge lost

    again = run_worker(db, gw)
    assert again.wait(timeout=600) == 0
    rows = check_exactly_once(db, gw, ids)
    assert rows[lost_key]["replays"] == 1
    assert gw.rag_calls() - before == len(ids)
