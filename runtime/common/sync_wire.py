"""The sync wire format: records, pull payloads (patch or snapshot) and the errors for bad data.

A record travels as `{"kind", "record_id", "department", "topic", "payload", "deleted", "origin", "seq",
"lamport"}`; a pull answers `{"mode", "records", "snapshot_b64", "clock", "bytes"}` (runtime/edge/DESIGN.md,
"Wire"). Parsing is strict: an unknown or missing field, a wrong type or a malformed value raises
`SyncFormatError` naming the record and the field. A snapshot is gzip-compressed JSON lines: a header (format,
version, clock, subscription, record count), then one record a line.
"""

from __future__ import annotations

import base64
import builtins
import gzip
import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from runtime.common.rbac import NAME_PATTERN
from runtime.common.vclock import ClockFormatError, VectorClock, lww_key, validate_counter, validate_replica_id

Kind = Literal["chunk", "reasoning", "lora"]
KINDS: tuple[Kind, ...] = get_args(Kind)
Mode = Literal["patch", "snapshot"]

DEFAULT_MAX_SNAPSHOT_BYTES = 2 * 1024 * 1024 * 1024  # decompressed: a bound against gzip bombs
SNAPSHOT_FORMAT = "membria-sync-snapshot"
SNAPSHOT_VERSION = 1
MAX_RECORD_ID_CHARS = 512
MAX_TOPIC_CHARS = 200

_DEPARTMENT_RE = re.compile(NAME_PATTERN)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_WIRE_FIELDS = ("kind", "record_id", "department", "topic", "payload", "deleted", "origin", "seq", "lamport")
_REQUIRED_WIRE_FIELDS = frozenset(_WIRE_FIELDS) - {"topic"}
_PAYLOAD_WIRE_FIELDS = frozenset({"mode", "records", "snapshot_b64", "clock", "bytes"})


class SyncError(ValueError):
    """A sync operation cannot be done as asked; the message says why."""


class SyncFormatError(SyncError):
    """Wire data (a record, a clock, a payload, a snapshot) is not well formed; the message names the field."""


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _encode_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True)


def _check_text(value: object, name: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise SyncFormatError(f"{name} must be a string, not {type(value).__name__}")
    if not value or len(value) > max_chars:
        raise SyncFormatError(f"{name} must be 1-{max_chars} characters long")
    if _CONTROL_RE.search(value) or value != value.strip():
        raise SyncFormatError(f"{name} {value[:60]!r} has control characters or surrounding whitespace")
    return value


def check_department(value: object) -> str:
    if not isinstance(value, str) or not _DEPARTMENT_RE.fullmatch(value):
        raise SyncFormatError(
            f"department {str(value)[:60]!r} is not a department name: lower-case letters, digits and '-', "
            "starting with a letter"
        )
    return value


def _check_counter(value: object, name: str) -> int:
    try:
        return validate_counter(value, name, minimum=1)
    except ClockFormatError as exc:
        raise SyncFormatError(str(exc)) from None


@dataclass(frozen=True)
class Record:
    """One version of a record. Treat `payload` as read-only: its JSON form is computed once, here."""

    kind: Kind
    record_id: str
    department: str
    topic: str | None
    payload: Mapping[str, Any]
    deleted: bool
    origin: str
    seq: int
    lamport: int
    payload_json: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SyncFormatError(f"kind {str(self.kind)[:40]!r} is not one of {', '.join(KINDS)}")
        _check_text(self.record_id, "record_id", MAX_RECORD_ID_CHARS)
        check_department(self.department)
        if self.topic is not None:
            _check_text(self.topic, "topic", MAX_TOPIC_CHARS)
        if not isinstance(self.deleted, bool):
            raise SyncFormatError(f"deleted must be true or false, not {type(self.deleted).__name__}")
        if not isinstance(self.payload, Mapping):
            raise SyncFormatError(f"payload must be a JSON object, not {type(self.payload).__name__}")
        if self.deleted and self.payload:
            raise SyncFormatError("payload of a deleted record (a tombstone) must be empty")
        try:
            validate_replica_id(self.origin, "origin")
        except ClockFormatError as exc:
            raise SyncFormatError(str(exc)) from None
        _check_counter(self.seq, "seq")
        _check_counter(self.lamport, "lamport")
        if any(not isinstance(k, str) for k in self.payload):
            raise SyncFormatError("payload keys must be strings")
        try:
            encoded = _encode_json(self.payload)
        except (TypeError, ValueError) as exc:
            raise SyncFormatError(f"payload is not plain JSON: {exc}") from None
        object.__setattr__(self, "payload_json", encoded)

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.record_id)

    @property
    def version(self) -> tuple[int, str]:
        return lww_key(self.lamport, self.origin)

    def same_content(self, other: Record) -> bool:
        """Same visible state (department, topic, payload, deleted), whoever wrote it."""
        return (self.department, self.topic, self.deleted, self.payload_json) == (
            other.department,
            other.topic,
            other.deleted,
            other.payload_json,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "record_id": self.record_id,
            "department": self.department,
            "topic": self.topic,
            "payload": dict(self.payload),
            "deleted": self.deleted,
            "origin": self.origin,
            "seq": self.seq,
            "lamport": self.lamport,
        }

    def wire_json(self) -> str:
        """`to_wire()` as compact JSON, reusing the payload's encoding (most of a record's bytes)."""
        return (
            f'{{"kind":"{self.kind}","record_id":{_string(self.record_id)},"department":"{self.department}",'
            f'"topic":{"null" if self.topic is None else _string(self.topic)},"payload":{self.payload_json},'
            f'"deleted":{"true" if self.deleted else "false"},"origin":"{self.origin}",'
            f'"seq":{self.seq},"lamport":{self.lamport}}}'
        )

    @classmethod
    def _trusted(cls, row: Sequence[Any]) -> Record:
        """A record from a row of this store's own table, validated when it was written: skip the checks."""
        kind, record_id, department, topic, payload_json, deleted, origin, seq, lamport = row
        record = object.__new__(cls)
        values = {
            "kind": kind,
            "record_id": record_id,
            "department": department,
            "topic": topic,
            "payload": json.loads(payload_json),
            "deleted": bool(deleted),
            "origin": origin,
            "seq": seq,
            "lamport": lamport,
            "payload_json": payload_json,
        }
        for name, value in values.items():
            object.__setattr__(record, name, value)
        return record

    @classmethod
    def from_wire(cls, data: Any, where: str = "record") -> Record:
        """A record from its wire object; `SyncFormatError` says which field of `where` is wrong."""
        if not isinstance(data, dict):
            raise SyncFormatError(f"{where} must be a JSON object, not {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in _WIRE_FIELDS)
        if unknown:
            raise SyncFormatError(f"{where}: unknown field(s) {', '.join(repr(k[:40]) for k in unknown)}")
        missing = sorted(_REQUIRED_WIRE_FIELDS - data.keys())
        if missing:
            raise SyncFormatError(f"{where}: missing field(s) {', '.join(repr(k) for k in missing)}")
        payload = data["payload"]
        if payload is None and data["deleted"] is True:
            payload = {}  # a tombstone may say `null` for "no payload"
        try:
            return cls(
                kind=data["kind"],
                record_id=data["record_id"],
                department=data["department"],
                topic=data.get("topic"),
                payload=payload,
                deleted=data["deleted"],
                origin=data["origin"],
                seq=data["seq"],
                lamport=data["lamport"],
            )
        except SyncFormatError as exc:
            raise SyncFormatError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class SyncPayload:
    """What a pull returns: a patch (records) or a snapshot (gzip JSON lines of the whole subscribed state)."""

    mode: Mode
    records: tuple[Record, ...] | None
    snapshot: builtins.bytes | None  # the gzip bytes (base64 on the wire)
    clock: VectorClock
    bytes: int  # size on the wire of the records array (patch) or of the base64 text (snapshot)
    records_json: str | None = field(default=None, repr=False, compare=False)  # the patch's array, if encoded

    def to_wire(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "records": None if self.records is None else [r.to_wire() for r in self.records],
            "snapshot_b64": None if self.snapshot is None else base64.b64encode(self.snapshot).decode("ascii"),
            "clock": self.clock.to_json(),
            "bytes": self.bytes,
        }

    def encode(self) -> builtins.bytes:
        """The wire form as JSON bytes, without re-encoding payloads (a large patch is most of a response)."""
        if self.records is None:
            records = "null"
        else:
            records = self.records_json if self.records_json is not None else _records_json(self.records)
        snapshot = "null" if self.snapshot is None else '"' + base64.b64encode(self.snapshot).decode("ascii") + '"'
        clock = json.dumps(self.clock.to_json(), separators=(",", ":"))
        text = (
            f'{{"mode":"{self.mode}","records":{records},"snapshot_b64":{snapshot},'
            f'"clock":{clock},"bytes":{self.bytes}}}'
        )
        return text.encode()

    @classmethod
    def from_wire(cls, data: Any) -> SyncPayload:
        if not isinstance(data, dict):
            raise SyncFormatError(f"a sync payload must be a JSON object, not {type(data).__name__}")
        if data.keys() != _PAYLOAD_WIRE_FIELDS:
            extra = sorted(str(k)[:40] for k in data.keys() - _PAYLOAD_WIRE_FIELDS)
            missing = sorted(_PAYLOAD_WIRE_FIELDS - data.keys())
            raise SyncFormatError(f"sync payload: missing field(s) {missing}, unknown field(s) {extra}")
        mode = data["mode"]
        try:
            clock = VectorClock.from_json(data["clock"], "clock")
            size = validate_counter(data["bytes"], "bytes")
        except ClockFormatError as exc:
            raise SyncFormatError(f"sync payload: {exc}") from None
        if mode == "patch":
            if data["snapshot_b64"] is not None:
                raise SyncFormatError("sync payload: a patch has snapshot_b64 null")
            raw = data["records"]
            if not isinstance(raw, list):
                raise SyncFormatError("sync payload: records of a patch must be a list")
            records = tuple(Record.from_wire(r, f"records[{i}]") for i, r in enumerate(raw))
            return cls("patch", records, None, clock, size)
        if mode == "snapshot":
            if data["records"] is not None:
                raise SyncFormatError("sync payload: a snapshot has records null")
            text = data["snapshot_b64"]
            if not isinstance(text, str):
                raise SyncFormatError("sync payload: snapshot_b64 of a snapshot must be a base64 string")
            try:
                blob = base64.b64decode(text, validate=True)
            except ValueError:
                raise SyncFormatError("sync payload: snapshot_b64 is not valid base64") from None
            return cls("snapshot", None, blob, clock, size)
        raise SyncFormatError(f"sync payload: mode must be 'patch' or 'snapshot', not {str(mode)[:40]!r}")


def _records_json(records: Iterable[Record]) -> str:
    return "[" + ",".join(r.wire_json() for r in records) + "]"


# -- snapshots ------------------------------------------------------------------------------------------


def encode_snapshot(
    records: Sequence[Record],
    clock: VectorClock,
    *,
    replica: str,
    departments: Sequence[str],
    topics: Sequence[str] | None,
) -> bytes:
    """gzip-compressed JSON lines: a header (format, clock, subscription, count), then one record a line."""
    header = {
        "format": SNAPSHOT_FORMAT,
        "version": SNAPSHOT_VERSION,
        "replica": replica,
        "clock": clock.to_json(),
        "departments": sorted(departments),
        "topics": None if topics is None else sorted(topics),
        "records": len(records),
    }
    lines = [json.dumps(header, separators=(",", ":"))] + [r.wire_json() for r in records]
    # mtime=0: the same state always compresses to the same bytes
    return gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6, mtime=0)


def decode_snapshot(
    blob: bytes, *, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES
) -> tuple[list[Record], VectorClock, dict[str, Any]]:
    """(records, clock, header) from `encode_snapshot`'s bytes; SyncFormatError on anything malformed."""
    inflater = zlib.decompressobj(wbits=31)  # 31: gzip framing
    try:
        data = inflater.decompress(blob, max_bytes + 1)
    except zlib.error as exc:
        raise SyncFormatError(f"snapshot is not gzip data: {exc}") from None
    if len(data) > max_bytes or inflater.unconsumed_tail:
        raise SyncFormatError(f"snapshot is larger than {max_bytes} bytes uncompressed")
    if not inflater.eof:
        raise SyncFormatError("snapshot is truncated (the gzip stream does not end)")
    if inflater.unused_data:
        raise SyncFormatError("snapshot has data after the end of its gzip stream")
    try:
        lines = data.decode().splitlines()
    except UnicodeDecodeError:
        raise SyncFormatError("snapshot is not UTF-8 text") from None
    if not lines:
        raise SyncFormatError("snapshot is empty: no header line")
    header = _json_line(lines[0], 1)
    if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
        raise SyncFormatError(f"snapshot line 1: not a {SNAPSHOT_FORMAT} header")
    if header.get("version") != SNAPSHOT_VERSION:
        raise SyncFormatError(f"snapshot line 1: version {header.get('version')!r} is not {SNAPSHOT_VERSION}")
    try:
        clock = VectorClock.from_json(header.get("clock"), "snapshot clock")
    except ClockFormatError as exc:
        raise SyncFormatError(f"snapshot line 1: {exc}") from None
    records = [Record.from_wire(_json_line(line, n), f"snapshot line {n}") for n, line in enumerate(lines[1:], 2)]
    if header.get("records") != len(records):
        raise SyncFormatError(f"snapshot announces {header.get('records')!r} records but holds {len(records)}")
    return records, clock, header


def _json_line(line: str, number: int) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise SyncFormatError(f"snapshot line {number}: not JSON: {exc}") from None
