"""The sync engine on real SQLite: local writes, the merge rules per kind, changes since a clock, patches,
snapshots, and strict parsing of wire data."""

from __future__ import annotations

import base64
import gzip
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from runtime.common.replica import (
    ImmutableRecord,
    LocalWrite,
    LoraNotShareable,
    Record,
    ReplicaStore,
    SyncError,
    SyncFormatError,
    SyncPayload,
)
from runtime.common.sync_wire import decode_snapshot, encode_snapshot
from runtime.common.vclock import VectorClock

pytestmark = pytest.mark.unit


def store(replica: str, path: Path | str = ":memory:") -> ReplicaStore:
    return ReplicaStore(path, replica)


def wire(record: Record) -> dict[str, Any]:
    """Through JSON text, as a transfer would carry it."""
    data: dict[str, Any] = json.loads(record.wire_json())
    return data


def send(source: ReplicaStore, target: ReplicaStore, since: VectorClock | None = None) -> list[Record]:
    """A full exchange source -> target (what a pull does), through the wire form."""
    payload = source.export(since or target.clock(), departments=["eng", "sales"])
    received = SyncPayload.from_wire(json.loads(payload.encode()))
    return target.import_payload(received).accepted


# -- local writes ---------------------------------------------------------------------------------------


def test_local_writes_get_seq_and_lamport_and_an_identical_rewrite_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "edge.sqlite"
    a = store("laptop-1", path)
    first = a.local_write("chunk", "c1", department="eng", topic="pumps", payload={"text": "v1"})
    assert (first.origin, first.seq, first.lamport) == ("laptop-1", 1, 1)
    assert a.local_write("chunk", "c1", department="eng", topic="pumps", payload={"text": "v1"}) == first
    second = a.local_write("chunk", "c1", department="eng", topic="pumps", payload={"text": "v2"})
    assert (second.seq, second.lamport) == (2, 2)
    assert a.get("chunk", "c1") == second
    assert a.clock() == {"laptop-1": 2}
    a.close()
    reopened = store("laptop-1", path)  # counters survive a restart
    assert reopened.local_write("chunk", "c2", department="eng", payload={"text": "x"}).seq == 3
    reopened.close()
    with pytest.raises(SyncError, match="belongs to replica 'laptop-1', not 'laptop-2'"):
        store("laptop-2", path)


def test_a_record_cannot_move_department_or_topic() -> None:
    a = store("laptop-1")
    a.local_write("chunk", "c1", department="eng", topic="pumps", payload={"text": "v1"})
    with pytest.raises(SyncError, match="belongs to department 'eng'"):
        a.local_write("chunk", "c1", department="sales", topic="pumps", payload={"text": "v1"})
    with pytest.raises(SyncError, match="has topic 'pumps'"):
        a.local_write("chunk", "c1", department="eng", topic="valves", payload={"text": "v1"})
    # A write or a delete that gives no topic keeps the record's topic.
    assert a.local_write("chunk", "c1", department="eng", payload={"text": "v2"}).topic == "pumps"
    tombstone = a.local_write("chunk", "c1", department="eng", payload={}, deleted=True)
    assert (tombstone.topic, tombstone.deleted, dict(tombstone.payload)) == ("pumps", True, {})


def test_writes_need_a_payload_and_deletes_carry_none() -> None:
    a = store("laptop-1")
    with pytest.raises(SyncFormatError, match="a write needs a payload"):
        a.local_write("chunk", "c1", department="eng")
    with pytest.raises(SyncFormatError, match="a delete carries no payload"):
        a.local_write("chunk", "c1", department="eng", payload={"text": "x"}, deleted=True)
    with pytest.raises(SyncFormatError, match="not plain JSON"):
        a.local_write("chunk", "c1", department="eng", payload={"value": float("nan")})
    with pytest.raises(SyncFormatError, match="not a department name"):
        a.local_write("chunk", "c1", department="Engineering", payload={"text": "x"})
    assert a.count(include_tombstones=True) == 0
    assert a.clock() == {}


def test_local_delete_tombstones_an_existing_record() -> None:
    a = store("laptop-1")
    assert a.local_delete("chunk", "nope") is None
    a.local_write("chunk", "c1", department="eng", topic="pumps", payload={"text": "v1"})
    tombstone = a.local_delete("chunk", "c1")
    assert tombstone is not None and tombstone.deleted and tombstone.topic == "pumps"
    assert a.count() == 0
    assert a.count(include_tombstones=True) == 1


def test_a_batch_of_local_writes_is_all_or_nothing() -> None:
    a = store("laptop-1")
    a.local_write("reasoning", "r1", department="eng", payload={"q": "why"})
    batch = [
        LocalWrite("chunk", "c1", "eng", None, {"text": "x"}),
        LocalWrite("reasoning", "r1", "eng", None, {"q": "rewritten"}),
    ]
    with pytest.raises(ImmutableRecord):
        a.local_write_many(batch)
    assert a.get("chunk", "c1") is None
    assert a.counter() == 1
    written = a.local_write_many([LocalWrite("chunk", f"c{i}", "eng", None, {"i": i}) for i in range(3)])
    assert [r.seq for r in written] == [2, 3, 4]


def test_a_transaction_commits_the_callers_own_sql_with_the_records() -> None:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    a = ReplicaStore(conn, "laptop-1")
    conn.execute("CREATE TABLE notes (chunk_id TEXT)")
    conn.commit()
    with pytest.raises(RuntimeError), a.transaction() as batch:
        batch.write_many([LocalWrite("chunk", "c1", "eng", None, {"text": "x"})])
        batch.conn.execute("INSERT INTO notes VALUES ('c1')")
        raise RuntimeError("crash before commit")
    assert a.get("chunk", "c1") is None
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 0
    with a.transaction() as batch:
        batch.write_many([LocalWrite("chunk", "c1", "eng", None, {"text": "x"})])
        batch.conn.execute("INSERT INTO notes VALUES ('c1')")
    assert a.get("chunk", "c1") is not None
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 1


# -- merge rules ------------------------------------------------------------------------------------------


def test_chunks_are_last_writer_wins_by_lamport_then_origin() -> None:
    a, b = store("laptop-a"), store("laptop-b")
    a.local_write("chunk", "c1", department="eng", payload={"text": "from a"})
    b.local_write("chunk", "c1", department="eng", payload={"text": "from b"})  # concurrent, same lamport 1
    send(a, b)
    send(b, a)
    # Equal Lamport times: the larger origin id wins, on both replicas.
    assert a.get("chunk", "c1") == b.get("chunk", "c1")
    winner = a.get("chunk", "c1")
    assert winner is not None and winner.payload == {"text": "from b"}
    # A write made after seeing b's version carries a later Lamport time and wins everywhere.
    later = a.local_write("chunk", "c1", department="eng", payload={"text": "a again"})
    assert later.lamport == 2
    send(a, b)
    assert b.get("chunk", "c1") == later


def test_a_delete_is_a_tombstone_that_wins_like_a_write_and_loses_to_later_writes() -> None:
    a, b = store("laptop-a"), store("laptop-b")
    a.local_write("chunk", "c1", department="eng", payload={"text": "v1"})
    send(a, b)
    b.local_delete("chunk", "c1")
    send(b, a)
    record = a.get("chunk", "c1")
    assert record is not None and record.deleted and record.payload == {}
    # Replaying the old write changes nothing.
    old = a.changes_since(VectorClock())
    assert all(r.deleted for r in old)
    revived = a.local_write("chunk", "c1", department="eng", payload={"text": "v2"})
    send(a, b)
    assert b.get("chunk", "c1") == revived


def test_reasoning_is_immutable_locally_and_later_peer_versions_are_ignored() -> None:
    a, b = store("laptop-a"), store("laptop-b")
    first = a.local_write("reasoning", "r1", department="eng", payload={"answer": "42"})
    assert a.local_write("reasoning", "r1", department="eng", payload={"answer": "42"}) == first  # same: no-op
    with pytest.raises(ImmutableRecord, match="already exists"):
        a.local_write("reasoning", "r1", department="eng", payload={"answer": "43"})
    with pytest.raises(ImmutableRecord, match="cannot be deleted"):
        a.local_write("reasoning", "r1", department="eng", deleted=True)
    send(a, b)
    forged = Record("reasoning", "r1", "eng", None, {"answer": "rewritten"}, False, "laptop-b", 9, 99)
    result = a.apply([forged], VectorClock())
    assert (result.accepted, result.ignored) == ([], 1)
    assert a.get("reasoning", "r1") == first


def test_concurrently_created_reasoning_converges_on_the_earliest_creation() -> None:
    a, b = store("laptop-a"), store("laptop-b")
    b.local_write("chunk", "warm-up", department="eng", payload={})  # b's Lamport time runs ahead
    a_version = a.local_write("reasoning", "r1", department="eng", payload={"answer": "a"})
    b.local_write("reasoning", "r1", department="eng", payload={"answer": "b"})
    send(a, b)
    send(b, a)
    assert a.get("reasoning", "r1") == b.get("reasoning", "r1") == a_version


def test_lora_records_never_leave_their_device() -> None:
    a, hub = store("laptop-a"), store("core")
    lora = a.local_write("lora", "adapter-1", department="eng", payload={"path": "/var/lib/lora/1"})
    a.local_write("chunk", "c1", department="eng", payload={"text": "x"})
    assert [r.kind for r in a.changes_since(VectorClock())] == ["chunk"]
    patch = a.export(VectorClock(), departments=["eng"])
    assert patch.records is not None and [r.kind for r in patch.records] == ["chunk"]
    snapshot = a.export(VectorClock(), departments=["eng"], max_patch_bytes=1)
    assert snapshot.snapshot is not None
    assert [r.kind for r in decode_snapshot(snapshot.snapshot)[0]] == ["chunk"]
    chunk = hub.local_write("chunk", "c9", department="eng", payload={"text": "y"})
    with pytest.raises(LoraNotShareable, match=r"records\[1\] \('adapter-1', from 'laptop-a'\) is a LoRA adapter"):
        hub.apply([chunk, lora], VectorClock({"laptop-a": 2}))
    assert hub.get("lora", "adapter-1") is None
    assert hub.clock() == {"core": 1}  # nothing of the refused batch was applied, not even the clock


# -- exchange ---------------------------------------------------------------------------------------------


def test_changes_since_returns_what_the_clock_has_not_seen_within_a_subscription() -> None:
    a = store("laptop-a")
    a.local_write("chunk", "e1", department="eng", payload={"n": 1})
    a.local_write("chunk", "e2", department="eng", topic="pumps", payload={"n": 2})
    a.local_write("chunk", "e3", department="eng", topic="valves", payload={"n": 3})
    a.local_write("chunk", "s1", department="sales", payload={"n": 4})
    ids = [r.record_id for r in a.changes_since(VectorClock())]
    assert ids == ["e1", "e2", "e3", "s1"]
    assert [r.record_id for r in a.changes_since({"laptop-a": 2})] == ["e3", "s1"]
    assert [r.record_id for r in a.changes_since({}, departments=["eng"])] == ["e1", "e2", "e3"]
    # A topic subscription gets its topics plus the department-wide (untagged) records.
    assert [r.record_id for r in a.changes_since({}, departments=["eng"], topics=["pumps"])] == ["e1", "e2"]
    assert a.changes_since(a.clock()) == []


def test_changes_since_walks_the_origin_index() -> None:
    conn = sqlite3.connect(":memory:")
    ReplicaStore(conn, "core")
    plan = " ".join(
        str(row[-1])
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM sync_records WHERE origin = ? AND seq > ? AND kind != 'lora'"
            " ORDER BY seq",
            ("a", 1),
        )
    )
    assert "USING INDEX sync_records_by_origin (origin=? AND seq>?)" in plan


def test_apply_merges_the_clock_counts_what_changed_and_advances_lamport() -> None:
    a, b = store("laptop-a"), store("laptop-b")
    for i in range(3):
        a.local_write("chunk", f"c{i}", department="eng", payload={"i": i})
    result = b.apply(a.changes_since(VectorClock()), a.clock())
    assert [r.record_id for r in result.accepted] == ["c0", "c1", "c2"]
    assert result.ignored == 0
    assert b.clock() == {"laptop-a": 3}
    again = b.apply(a.changes_since(VectorClock()), a.clock())  # a replayed transfer
    assert (again.accepted, again.ignored) == ([], 3)
    assert b.local_write("chunk", "mine", department="eng", payload={}).lamport == 4  # after all it has seen


def test_a_restored_older_copy_gives_its_unconfirmed_writes_fresh_seqs() -> None:
    original, hub = store("laptop-a"), store("core")
    for i in range(3):
        original.local_write("chunk", f"c{i}", department="eng", payload={"i": i})
    hub.apply(original.changes_since(VectorClock()), original.clock().restricted(["laptop-a"]))
    restored = store("laptop-a")  # the laptop restored from a copy older than all of that
    lost_seq = restored.local_write("chunk", "written-after-restore", department="eng", payload={"i": 9})
    assert lost_seq.seq == 1  # the seq the hub already knows as c0
    result = restored.apply(hub.changes_since(VectorClock()), hub.clock())  # the whole state
    assert [r.record_id for r in result.accepted] == ["c0", "c1", "c2"]
    assert [(r.record_id, r.seq, dict(r.payload)) for r in result.restamped] == [("written-after-restore", 4, {"i": 9})]
    assert result.restamped[0].lamport > max(r.lamport for r in result.accepted)
    assert restored.counter() == 4 and restored.clock()["laptop-a"] == 4
    assert restored.local_write("chunk", "next", department="eng", payload={}).seq == 5
    # The next push carries the re-stamped write: the hub would never have asked for seq 1 again.
    outgoing = restored.changes_since(hub.clock())
    assert [r.record_id for r in outgoing] == ["written-after-restore", "next"]
    hub.apply(outgoing, restored.clock().restricted(["laptop-a"]))
    assert hub.state_digest() == restored.state_digest()


def test_observe_moves_the_counter_past_a_peers_view_of_this_origin() -> None:
    a = store("core")
    a.local_write("chunk", "c1", department="eng", payload={})
    a.observe(VectorClock({"core": 20, "laptop-1": 99}))
    assert a.counter() == 20
    assert a.local_write("chunk", "c2", department="eng", payload={}).seq == 21
    a.observe(VectorClock({"core": 3}))
    assert a.counter() == 21


def test_export_is_a_patch_under_the_limit_and_a_snapshot_at_or_over_it() -> None:
    hub, device = store("core"), store("laptop-a")
    for i in range(20):
        hub.local_write("chunk", f"c{i}", department="eng", payload={"text": "pump maintenance " * 20, "i": i})
    hub.local_write("chunk", "s1", department="sales", payload={"text": "not subscribed"})
    patch = hub.export(VectorClock(), departments=["eng"])
    assert patch.mode == "patch" and patch.records is not None and len(patch.records) == 20
    encoded = json.loads(patch.encode())
    assert encoded == patch.to_wire()
    assert patch.bytes == len(json.dumps(encoded["records"], ensure_ascii=False, separators=(",", ":")).encode())
    at_limit = hub.export(VectorClock(), departments=["eng"], max_patch_bytes=patch.bytes)
    assert at_limit.mode == "snapshot"
    assert hub.export(VectorClock(), departments=["eng"], max_patch_bytes=patch.bytes + 1).mode == "patch"
    wire_form = at_limit.to_wire()
    assert wire_form["records"] is None
    assert at_limit.bytes == len(wire_form["snapshot_b64"])
    assert at_limit.bytes < patch.bytes  # repetitive text compresses
    result = device.import_payload(SyncPayload.from_wire(json.loads(at_limit.encode())))
    assert len(result.accepted) == 20
    assert device.state_digest() == hub.state_digest(["eng"])
    assert device.clock() == hub.clock()
    empty = hub.export(device.clock(), departments=["eng"])
    assert (empty.mode, empty.records, empty.bytes) == ("patch", (), 2)


def test_a_snapshot_is_the_whole_subscribed_state_not_only_the_delta() -> None:
    hub, device = store("core"), store("laptop-a")
    hub.local_write("chunk", "old", department="eng", payload={"text": "seen long ago"})
    send(hub, device)
    hub.local_write("chunk", "new", department="eng", payload={"text": "fresh"})
    snapshot = hub.export(device.clock(), departments=["eng"], max_patch_bytes=0)
    assert snapshot.snapshot is not None
    records, clock, header = decode_snapshot(snapshot.snapshot)
    assert [r.record_id for r in records] == ["new", "old"]
    assert clock == hub.clock()
    assert header["departments"] == ["eng"] and header["topics"] is None
    result = device.import_payload(snapshot)
    assert [r.record_id for r in result.accepted] == ["new"]  # only what changed local state
    assert result.ignored == 1


def test_state_digest_reflects_every_field_and_ignores_lora() -> None:
    a, b = store("laptop-a"), store("laptop-b")
    a.local_write("chunk", "c1", department="eng", payload={"text": "x"})
    send(a, b)
    assert a.state_digest() == b.state_digest()
    a.local_write("lora", "adapter", department="eng", payload={"path": "p"})
    assert a.state_digest() == b.state_digest()
    b.local_write("chunk", "c1", department="eng", payload={"text": "y"})
    assert a.state_digest() != b.state_digest()
    assert a.state_digest(["sales"]) == b.state_digest(["sales"])


def test_export_needs_a_subscription() -> None:
    with pytest.raises(SyncError, match="at least one department"):
        store("core").export(VectorClock(), departments=[])
    with pytest.raises(SyncFormatError, match="not a department name"):
        store("core").export(VectorClock(), departments=["Eng; DROP"])


# -- wire parsing ------------------------------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "kind": "chunk",
    "record_id": "c1",
    "department": "eng",
    "topic": None,
    "payload": {"text": "x"},
    "deleted": False,
    "origin": "laptop-1",
    "seq": 1,
    "lamport": 1,
}


def test_a_wire_record_round_trips() -> None:
    record = Record.from_wire(GOOD)
    assert record.to_wire() == GOOD
    assert json.loads(record.wire_json()) == GOOD
    assert Record.from_wire({k: v for k, v in GOOD.items() if k != "topic"}) == record  # topic may be left out
    tombstone = Record.from_wire({**GOOD, "deleted": True, "payload": None})
    assert tombstone.payload == {}
    odd = Record.from_wire({**GOOD, "record_id": 'quote" comma, \\ ünï', "topic": "a, b"})
    assert json.loads(odd.wire_json()) == odd.to_wire()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "model"}, "record: kind 'model' is not one of chunk, reasoning, lora"),
        ({"record_id": ""}, "record: record_id must be 1-512 characters long"),
        ({"record_id": "a\nb"}, "record: record_id 'a\\nb' has control characters"),
        ({"record_id": 7}, "record: record_id must be a string, not int"),
        ({"department": "Sales"}, "record: department 'Sales' is not a department name"),
        ({"topic": ""}, "record: topic must be 1-200 characters long"),
        ({"payload": [1]}, "record: payload must be a JSON object, not list"),
        ({"payload": None}, "record: payload must be a JSON object, not NoneType"),
        ({"deleted": 1}, "record: deleted must be true or false, not int"),
        ({"deleted": True}, "record: payload of a deleted record (a tombstone) must be empty"),
        ({"origin": "no spaces"}, "record: origin 'no spaces' is not a replica id"),
        ({"seq": 0}, "record: seq must be between 1 and"),
        ({"seq": "1"}, "record: seq must be an integer, not str"),
        ({"lamport": True}, "record: lamport must be an integer, not bool"),
        ({"lamport": 2**53}, "record: lamport must be between 1 and 9007199254740991"),
        ({"extra": 1}, "record: unknown field(s) 'extra'"),
    ],
)
def test_bad_wire_records_are_refused_with_a_precise_message(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SyncFormatError, match=re.escape(message)):
        Record.from_wire({**GOOD, **change})


def test_missing_fields_and_non_objects_are_named() -> None:
    with pytest.raises(SyncFormatError, match=re.escape("records[3]: missing field(s) 'lamport', 'seq'")):
        Record.from_wire({k: v for k, v in GOOD.items() if k not in ("seq", "lamport")}, "records[3]")
    with pytest.raises(SyncFormatError, match="must be a JSON object, not str"):
        Record.from_wire("chunk")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mode": "patch", "records": [], "snapshot_b64": None, "clock": {}}, "missing field(s) ['bytes']"),
        ({"mode": "delta", "records": [], "snapshot_b64": None, "clock": {}, "bytes": 2}, "mode must be"),
        ({"mode": "patch", "records": None, "snapshot_b64": None, "clock": {}, "bytes": 2}, "must be a list"),
        ({"mode": "patch", "records": [], "snapshot_b64": "eA==", "clock": {}, "bytes": 2}, "snapshot_b64 null"),
        ({"mode": "snapshot", "records": None, "snapshot_b64": "%%%", "clock": {}, "bytes": 3}, "not valid base64"),
        ({"mode": "snapshot", "records": [], "snapshot_b64": "eA==", "clock": {}, "bytes": 4}, "records null"),
        ({"mode": "patch", "records": [], "snapshot_b64": None, "clock": {"a": -1}, "bytes": 2}, "between 0"),
        (
            {"mode": "patch", "records": [{"kind": "chunk"}], "snapshot_b64": None, "clock": {}, "bytes": 2},
            "records[0]",
        ),
    ],
)
def test_bad_sync_payloads_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(SyncFormatError, match=re.escape(message)):
        SyncPayload.from_wire(data)


def _snapshot(text: str) -> bytes:
    return gzip.compress(text.encode(), mtime=0)


def test_malformed_snapshots_are_refused() -> None:
    record = Record.from_wire(GOOD)
    good = encode_snapshot([record], VectorClock({"laptop-1": 1}), replica="core", departments=["eng"], topics=None)
    assert decode_snapshot(good)[0] == [record]
    with pytest.raises(SyncFormatError, match="not gzip data"):
        decode_snapshot(b"plain text")
    with pytest.raises(SyncFormatError, match="truncated"):
        decode_snapshot(good[:-12])
    with pytest.raises(SyncFormatError, match="larger than 100 bytes uncompressed"):
        decode_snapshot(_snapshot("x" * 10_000), max_bytes=100)
    with pytest.raises(SyncFormatError, match="line 1: not a membria-sync-snapshot header"):
        decode_snapshot(_snapshot('{"format": "other"}\n'))
    header = json.loads(gzip.decompress(good).decode().splitlines()[0])
    with pytest.raises(SyncFormatError, match="announces 5 records but holds 1"):
        decode_snapshot(_snapshot(json.dumps({**header, "records": 5}) + "\n" + record.wire_json() + "\n"))
    with pytest.raises(SyncFormatError, match="snapshot line 2: not JSON"):
        decode_snapshot(_snapshot(json.dumps(header) + "\n{oops\n"))
    with pytest.raises(SyncFormatError, match=re.escape("snapshot line 2: seq must be")):
        decode_snapshot(_snapshot(json.dumps(header) + "\n" + json.dumps({**GOOD, "seq": -1}) + "\n"))
    # The payload's clock and the snapshot's own must agree.
    lying = SyncPayload("snapshot", None, good, VectorClock({"laptop-1": 9}), len(base64.b64encode(good)))
    with pytest.raises(SyncFormatError, match="is not the payload's"):
        store("laptop-2").import_payload(lying)
