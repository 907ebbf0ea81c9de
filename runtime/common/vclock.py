"""Vector clocks and Lamport times for the sync engine (runtime/edge/DESIGN.md, "Sync model").

A vector clock maps a replica id (an *origin*) to the highest sequence number of that origin whose effect a
replica holds; an origin it has never heard of reads as 0 (zero entries are not stored, so `{}` and
`{"a": 0}` are the same clock). Clocks are immutable values: `merge` returns a new clock.

Lamport times order versions of one record across replicas: a local write takes `max(seen) + 1`, so a
write made after seeing a version always sorts after it; ties between replicas are broken by origin id
(`lww_key`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

# The same rule the gateway applies to replica ids (device names, "core").
REPLICA_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
_REPLICA_RE = re.compile(REPLICA_PATTERN)
# Sequence numbers and Lamport times travel as JSON numbers: keep them exact in every JSON reader.
MAX_COUNTER = 2**53 - 1

Order = Literal["equal", "before", "after", "concurrent"]


class ClockFormatError(ValueError):
    """A clock (or a replica id, or a counter) that is not well formed; the message says which part."""


def validate_replica_id(value: object, where: str = "replica id") -> str:
    if not isinstance(value, str) or not _REPLICA_RE.fullmatch(value):
        shown = repr(value)[:80]
        raise ClockFormatError(
            f"{where} {shown} is not a replica id: 1-128 characters, letters, digits and '_.:@-', "
            "starting with a letter or digit"
        )
    return value


def validate_counter(value: object, where: str, *, minimum: int = 0) -> int:
    # bool is an int in Python, but `true` is not a sequence number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClockFormatError(f"{where} must be an integer, not {type(value).__name__}")
    if not minimum <= value <= MAX_COUNTER:
        raise ClockFormatError(f"{where} must be between {minimum} and {MAX_COUNTER}, not {value}")
    return value


class VectorClock(Mapping[str, int]):
    """An immutable origin -> seq mapping. `clock[o]` and `clock.get(o)` are 0 for an unknown origin."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        items = entries.items() if isinstance(entries, Mapping) else entries
        clean: dict[str, int] = {}
        for origin, seq in items:
            validate_replica_id(origin, "clock origin")
            validate_counter(seq, f"clock[{origin!r}]")
            if seq:
                clean[origin] = max(seq, clean.get(origin, 0))
        self._entries = dict(sorted(clean.items()))

    # -- Mapping ------------------------------------------------------------------------------------

    def __getitem__(self, origin: str) -> int:
        return self._entries.get(origin, 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, origin: object) -> bool:
        return origin in self._entries

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VectorClock):
            return self._entries == other._entries
        if isinstance(other, Mapping):
            return self._entries == {k: v for k, v in other.items() if v}
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._entries.items()))

    def __repr__(self) -> str:
        return f"VectorClock({self._entries!r})"

    # -- the algebra --------------------------------------------------------------------------------

    def merge(self, other: Mapping[str, int]) -> VectorClock:
        """The pointwise maximum: everything either clock has seen."""
        merged = dict(self._entries)
        for origin, seq in other.items():
            if seq > merged.get(origin, 0):
                merged[origin] = seq
        return VectorClock(merged)

    def with_entry(self, origin: str, seq: int) -> VectorClock:
        """This clock with `origin` raised to at least `seq`."""
        return self.merge({origin: seq})

    def restricted(self, origins: Iterable[str]) -> VectorClock:
        """Only the entries of `origins` (what a sender can vouch for)."""
        keep = set(origins)
        return VectorClock({o: s for o, s in self._entries.items() if o in keep})

    def descends(self, other: Mapping[str, int]) -> bool:
        """True when this clock has seen everything `other` has (equal counts)."""
        return all(self[o] >= s for o, s in other.items())

    def dominates(self, other: Mapping[str, int]) -> bool:
        """Strictly after: everything `other` saw and more."""
        return self.descends(other) and self != other

    def concurrent(self, other: Mapping[str, int]) -> bool:
        """Neither has seen everything the other has."""
        return self.compare(other) == "concurrent"

    def compare(self, other: Mapping[str, int]) -> Order:
        other_clock = other if isinstance(other, VectorClock) else VectorClock(other)
        ahead = self.descends(other_clock)
        behind = other_clock.descends(self)
        if ahead and behind:
            return "equal"
        if ahead:
            return "after"
        if behind:
            return "before"
        return "concurrent"

    # -- JSON ---------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, int]:
        return dict(self._entries)

    @classmethod
    def from_json(cls, data: Any, where: str = "clock") -> VectorClock:
        """A clock from its JSON object `{"origin": seq, ...}`; ClockFormatError names the bad entry."""
        if not isinstance(data, dict):
            raise ClockFormatError(f"{where} must be a JSON object of replica id -> integer, not {type(data).__name__}")
        for origin, seq in data.items():
            validate_replica_id(origin, f"{where}: origin")
            validate_counter(seq, f"{where}[{origin!r}]")
        return cls(data)


# -- Lamport time -------------------------------------------------------------------------------------------


def lamport_tick(seen: int) -> int:
    """The Lamport time of a new local event after seeing `seen`."""
    if seen >= MAX_COUNTER:
        raise ClockFormatError(f"Lamport time {seen} cannot grow any further")
    return seen + 1


def lamport_observe(current: int, *remote: int) -> int:
    """The Lamport counter after receiving events stamped `remote`: the maximum seen."""
    return max(current, *remote) if remote else current


def lww_key(lamport: int, origin: str) -> tuple[int, str]:
    """The total order of versions of one record: Lamport time, then origin id as the tie-break."""
    return (lamport, origin)
