"""Property: three devices and the core's hub converge, whatever the interleaving of edits and syncs.

Hypothesis draws a sequence of operations: edits on any replica (chunk writes, rewrites, deletes, reasoning
records, attempts to rewrite reasoning, LoRA records), syncs between a device and the hub (push or pull,
through the JSON wire form, some pulls with a tiny patch limit so they come back as snapshots), and
partitions (a request lost before the hub, a response lost after it, a device offline for a while). Then
every device pushes and pulls twice with nothing lost, and:

- each device holds exactly the hub's state for its subscription (same state digest, same clock);
- the hub holds, for every record, the version the merge rules pick among every version ever written;
- LoRA records never appear anywhere but on their own device;
- a reasoning record, wherever it is, is the version first written.

Replicas are real `ReplicaStore`s (in-memory SQLite), the hub is the real `SyncHub`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.common.replica import ImmutableRecord, Record, ReplicaStore, SyncPayload, wins
from runtime.common.vclock import VectorClock
from runtime.core.sync_hub import SyncHub

pytestmark = pytest.mark.unit

# chunk id -> (department, topic): fixed, as a record never moves
CHUNKS: dict[str, tuple[str, str | None]] = {
    "c0": ("eng", None),
    "c1": ("eng", "pumps"),
    "c2": ("eng", "valves"),
    "c3": ("sales", None),
    "c4": ("sales", "pricing"),
    "c5": ("sales", "travel"),
}
HUB = "core"


@dataclass(frozen=True)
class Subscription:
    departments: tuple[str, ...]
    topics: tuple[str, ...] | None

    def sees(self, department: str, topic: str | None) -> bool:
        return department in self.departments and (self.topics is None or topic is None or topic in self.topics)


SUBSCRIPTIONS: dict[str, Subscription] = {
    "laptop-1": Subscription(("eng",), None),
    "laptop-2": Subscription(("eng", "sales"), None),
    "laptop-3": Subscription(("sales",), ("pricing",)),
    HUB: Subscription(("eng", "sales"), None),
}
DEVICES = ("laptop-1", "laptop-2", "laptop-3")
REPLICAS = (*DEVICES, HUB)


@dataclass
class Device:
    store: ReplicaStore
    hub_clock: VectorClock = field(default_factory=VectorClock)  # the hub's clock as last heard
    offline: bool = False


@dataclass
class World:
    hub: SyncHub
    devices: dict[str, Device]
    written: list[Record] = field(default_factory=list)  # every shareable version ever created
    first_reasoning: dict[str, Record] = field(default_factory=dict)
    loras: dict[str, str] = field(default_factory=dict)  # lora id -> its device
    counters: dict[str, int] = field(default_factory=dict)

    def store(self, replica: str) -> ReplicaStore:
        return self.hub.store if replica == HUB else self.devices[replica].store

    def next_id(self, prefix: str, replica: str) -> str:
        self.counters[replica] = self.counters.get(replica, 0) + 1
        return f"{prefix}-{replica}-{self.counters[replica]}"

    # -- edits --------------------------------------------------------------------------------------------

    def write(self, replica: str, pick: int, value: int, delete: bool) -> None:
        visible = [cid for cid, (d, t) in CHUNKS.items() if SUBSCRIPTIONS[replica].sees(d, t)]
        chunk_id = visible[pick % len(visible)]
        department, topic = CHUNKS[chunk_id]
        store = self.store(replica)
        before = store.get("chunk", chunk_id)
        if delete:
            record = store.local_write("chunk", chunk_id, department=department, topic=topic, deleted=True)
        else:
            payload = {"text": f"v{value}", "doc_id": "doc"}
            record = store.local_write("chunk", chunk_id, department=department, topic=topic, payload=payload)
        if record != before:
            self.written.append(record)

    def reasoning(self, replica: str, pick: int) -> None:
        department = SUBSCRIPTIONS[replica].departments[pick % len(SUBSCRIPTIONS[replica].departments)]
        record_id = self.next_id("r", replica)
        record = self.store(replica).local_write(
            "reasoning", record_id, department=department, payload={"question": record_id, "answer": pick}
        )
        self.written.append(record)
        self.first_reasoning[record_id] = record

    def rewrite_reasoning(self, replica: str, pick: int) -> None:
        store = self.store(replica)
        held = [r for r in store.records() if r.kind == "reasoning"]
        if not held:
            return
        target = held[pick % len(held)]
        with pytest.raises(ImmutableRecord):
            store.local_write(
                "reasoning", target.record_id, department=target.department, payload={"answer": "rewritten"}
            )

    def lora(self, device: str, pick: int) -> None:
        record_id = self.next_id("l", device)
        department = SUBSCRIPTIONS[device].departments[0]
        self.store(device).local_write("lora", record_id, department=department, payload={"adapter": pick})
        self.loras[record_id] = device

    # -- syncs, through the wire form -------------------------------------------------------------------------

    def push(self, name: str, fault: str) -> None:
        device = self.devices[name]
        if device.offline or fault == "request_lost":
            return
        body = _over_the_wire(
            {
                "replica": name,
                "records": [r.to_wire() for r in device.store.changes_since(device.hub_clock)],
                "clock": device.store.clock().to_json(),
                "departments": list(SUBSCRIPTIONS[name].departments),
            }
        )
        result = _over_the_wire(
            self.hub.push(body["replica"], body["records"], body["clock"], body["departments"]).to_wire()
        )
        if fault != "response_lost":
            device.hub_clock = device.hub_clock.merge(VectorClock.from_json(result["clock"]))

    def pull(self, name: str, fault: str, limit: int | None) -> None:
        device = self.devices[name]
        if device.offline or fault == "request_lost":
            return
        sub = SUBSCRIPTIONS[name]
        body = _over_the_wire(
            {
                "replica": name,
                "clock": device.store.clock().to_json(),
                "departments": list(sub.departments),
                "topics": None if sub.topics is None else list(sub.topics),
                "max_patch_bytes": limit,
            }
        )
        payload = self.hub.pull(
            body["replica"], body["clock"], body["departments"], body["topics"], body["max_patch_bytes"]
        )
        if fault == "response_lost":
            return
        received = SyncPayload.from_wire(json.loads(payload.encode()))
        device.store.import_payload(received)
        device.hub_clock = device.hub_clock.merge(received.clock)


def _over_the_wire(data: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(json.dumps(data))
    return decoded


replicas = st.sampled_from(REPLICAS)
devices = st.sampled_from(DEVICES)
picks = st.integers(min_value=0, max_value=11)
faults = st.sampled_from(["none", "none", "none", "request_lost", "response_lost"])
limits = st.sampled_from([None, None, 0, 200, 2000])  # None: the hub's 20 MiB; 0 and 200: snapshots

operations = st.one_of(
    st.tuples(st.just("write"), replicas, picks, st.integers(min_value=0, max_value=3)),
    st.tuples(st.just("delete"), replicas, picks),
    st.tuples(st.just("reasoning"), replicas, picks),
    st.tuples(st.just("rewrite_reasoning"), replicas, picks),
    st.tuples(st.just("lora"), devices, picks),
    st.tuples(st.just("push"), devices, faults),
    st.tuples(st.just("pull"), devices, faults, limits),
    st.tuples(st.just("offline"), devices),
)


def run(world: World, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "write":
        world.write(op[1], op[2], op[3], delete=False)
    elif kind == "delete":
        world.write(op[1], op[2], 0, delete=True)
    elif kind == "reasoning":
        world.reasoning(op[1], op[2])
    elif kind == "rewrite_reasoning":
        world.rewrite_reasoning(op[1], op[2])
    elif kind == "lora":
        world.lora(op[1], op[2])
    elif kind == "push":
        world.push(op[1], op[2])
    elif kind == "pull":
        world.pull(op[1], op[2], op[3])
    elif kind == "offline":
        world.devices[op[1]].offline = not world.devices[op[1]].offline


def expected_state(written: list[Record]) -> dict[tuple[str, str], Record]:
    """The merge rules applied to every version ever written, in write order: what everyone must end with."""
    state: dict[tuple[str, str], Record] = {}
    for record in written:
        if wins(record, state.get(record.key)):
            state[record.key] = record
    return state


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operations, min_size=1, max_size=80))
def test_random_edits_syncs_and_partitions_converge(ops: list[tuple[Any, ...]]) -> None:
    hub = SyncHub(":memory:")
    world = World(hub, {name: Device(ReplicaStore(":memory:", name)) for name in DEVICES})
    try:
        for op in ops:
            run(world, op)
        for device in world.devices.values():
            device.offline = False
        for _ in range(2):
            for name in DEVICES:
                world.push(name, "none")
                world.pull(name, "none", None)

        expected = expected_state(world.written)
        assert hub.store.records() == [expected[key] for key in sorted(expected)]
        for name in DEVICES:
            store, sub = world.devices[name].store, SUBSCRIPTIONS[name]
            assert store.state_digest(sub.departments, sub.topics) == hub.store.state_digest(
                sub.departments, sub.topics
            ), name
            # The subscription as this test understands it, independently of the store's own filter.
            visible = [expected[k] for k in sorted(expected) if sub.sees(expected[k].department, expected[k].topic)]
            assert store.records() == visible, name
            assert store.clock() == hub.store.clock(), name
            assert hub.store.clock()[name] == store.counter()
        for record_id, owner in world.loras.items():
            assert world.devices[owner].store.get("lora", record_id) is not None
            for replica in REPLICAS:
                if replica != owner:
                    assert world.store(replica).get("lora", record_id) is None, f"{record_id} reached {replica}"
        for record_id, first in world.first_reasoning.items():
            for replica in REPLICAS:
                held_version = world.store(replica).get("reasoning", record_id)
                assert held_version in (None, first), f"{record_id} changed on {replica}"
            assert hub.store.get("reasoning", record_id) == first
    finally:
        hub.close()
        for device in world.devices.values():
            device.store.close()


def test_the_oracle_is_not_vacuous() -> None:
    """The final check compares against the merge of every version: a lost update would show."""
    hub = SyncHub(":memory:")
    world = World(hub, {name: Device(ReplicaStore(":memory:", name)) for name in DEVICES})
    world.write("laptop-1", 0, 1, delete=False)
    world.write("laptop-2", 0, 2, delete=False)  # concurrent with laptop-1's write: laptop-2 wins the tie
    world.push("laptop-1", "none")
    world.push("laptop-2", "request_lost")  # laptop-2's push never arrives
    expected = expected_state(world.written)
    assert hub.store.records() != [expected[key] for key in sorted(expected)]
    world.push("laptop-2", "none")
    assert hub.store.records() == [expected[key] for key in sorted(expected)]
    winner = hub.store.get("chunk", "c0")
    assert winner is not None and winner.origin == "laptop-2"
    hub.close()
