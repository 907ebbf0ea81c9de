"""Vector clocks and Lamport helpers: the algebra, the JSON form and its validation."""

from __future__ import annotations

import re
from typing import Any

import pytest

from runtime.common.vclock import (
    MAX_COUNTER,
    ClockFormatError,
    VectorClock,
    lamport_observe,
    lamport_tick,
    lww_key,
)

pytestmark = pytest.mark.unit


def test_unknown_origins_read_as_zero_and_zero_entries_are_dropped() -> None:
    clock = VectorClock({"a": 3, "b": 0})
    assert clock["a"] == 3
    assert clock["zzz"] == 0
    assert clock.get("zzz") == 0
    assert "b" not in clock
    assert len(clock) == 1
    assert clock == VectorClock({"a": 3}) == {"a": 3, "c": 0}
    assert VectorClock() == VectorClock({}) == {}


def test_merge_is_the_pointwise_maximum_and_returns_a_new_clock() -> None:
    left = VectorClock({"a": 3, "b": 1})
    right = VectorClock({"b": 5, "c": 2})
    merged = left.merge(right)
    assert merged.to_json() == {"a": 3, "b": 5, "c": 2}
    assert left.to_json() == {"a": 3, "b": 1}  # unchanged
    assert merged == right.merge(left)  # commutative
    assert merged.merge(merged) == merged  # idempotent
    assert left.with_entry("a", 2) == left  # never lowers
    assert left.with_entry("d", 7)["d"] == 7


def test_compare_tells_equal_before_after_and_concurrent() -> None:
    base = VectorClock({"a": 1, "b": 1})
    later = VectorClock({"a": 2, "b": 1})
    other = VectorClock({"a": 1, "b": 2})
    assert base.compare(VectorClock({"a": 1, "b": 1})) == "equal"
    assert base.compare(later) == "before"
    assert later.compare(base) == "after"
    assert later.compare(other) == "concurrent"
    assert later.concurrent(other) and other.concurrent(later)
    assert later.dominates(base) and not base.dominates(later)
    assert base.descends(base) and not base.dominates(base)
    assert VectorClock().compare({"a": 1}) == "before"


def test_restricted_keeps_only_the_named_origins() -> None:
    clock = VectorClock({"laptop-1": 4, "core": 9, "laptop-2": 2})
    assert clock.restricted(["laptop-1"]).to_json() == {"laptop-1": 4}
    assert clock.restricted([]) == VectorClock()


def test_json_round_trip_is_sorted_and_exact() -> None:
    clock = VectorClock({"z": 1, "a": MAX_COUNTER})
    data = clock.to_json()
    assert list(data) == ["a", "z"]
    assert VectorClock.from_json(data) == clock
    assert hash(VectorClock.from_json(data)) == hash(clock)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([["a", 1]], "must be a JSON object"),
        ({"a": "1"}, "clock['a'] must be an integer, not str"),
        ({"a": True}, "must be an integer, not bool"),
        ({"a": 1.5}, "must be an integer, not float"),
        ({"a": -1}, "between 0 and"),
        ({"a": MAX_COUNTER + 1}, "between 0 and"),
        ({"": 1}, "is not a replica id"),
        ({"bad id": 1}, "is not a replica id"),
        ({"-leading": 1}, "is not a replica id"),
    ],
)
def test_bad_json_clocks_are_refused_with_a_precise_message(data: Any, message: str) -> None:
    with pytest.raises(ClockFormatError, match=re.escape(message)):
        VectorClock.from_json(data)


def test_lamport_helpers() -> None:
    assert lamport_tick(0) == 1
    assert lamport_tick(41) == 42
    assert lamport_observe(5, 3, 9, 2) == 9
    assert lamport_observe(5) == 5
    with pytest.raises(ClockFormatError, match="cannot grow"):
        lamport_tick(MAX_COUNTER)
    # Lamport time first, then the origin id breaks ties: every replica orders versions the same way.
    assert sorted([lww_key(2, "b"), lww_key(3, "a"), lww_key(2, "a")]) == [(2, "a"), (2, "b"), (3, "a")]
