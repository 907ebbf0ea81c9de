"""The audit log: one row per gateway request, pseudonymized and hash-chained, in ClickHouse (chDB in the lab).

What a row holds: who (the subject pseudonymized with an HMAC key from Vault; the raw subject is never
stored), device, departments, route, method, model, decision, reason, tokens, latency and HTTP status,
plus `seq` (1, 2, 3, ... in submission order), `prev_hash` and `row_hash`.

The chain: ``row_hash = sha256(canonical(row, prev_hash))`` where the first row's prev_hash is 64 zeros
(`GENESIS_HASH`). `seq` is the row's *position*, not part of its content: the chain itself fixes the order,
so rewriting a seq shows up as a reordered row or a gap rather than as an edit. `verify_chain` reads the
table in seq pages (never the whole table in memory) and tells apart an edited row (its row_hash no longer
matches its content), a deleted row (a gap, and the next row chains to a hash that no row has), reordered
rows (a row chains to a hash that exists, but elsewhere) and a bad genesis.

A plain chain has one blind spot: whoever can rewrite every row from k to the end, hashes included, or
simply drop the newest rows, leaves a chain that verifies. The head (last seq, its row_hash) is therefore
also recorded elsewhere, out of the database's reach — a checkpoint: every `verify_chain` returns the head,
and given the head recorded earlier (`expected_head`) it checks that this row is still there, unchanged.

chDB facts, checked with clickhouse-connect 1.12.0 and chdb 4.4.0 (they decide how the lab verifies):

* Two OS processes cannot open the same chDB path at once, not even read-only (``chdb_options={"mode":
  "ro"}``). The engine flocks ``<path>/status``; the second process gets ``ProgrammingError: Unable to
  open the chdb engine at '<path>': Failed to create connection: Code: 36. DB::Exception: Error
  initializing EmbeddedServer: . (BAD_ARGUMENTS)`` and the engine prints ``Code: 76. DB::Exception:
  Cannot lock file <path>/status. Another server instance in same directory is already running.
  (CANNOT_OPEN_FILE)`` on stderr. The status file names the holder (``PID: 1234``).
* One process cannot open two chDB paths at once: ``EmbeddedServer already initialized with path 'A',
  cannot connect with different path 'B'``. Several clients on the *same* path in one process are fine
  and share the engine.
* Once every client of a path is closed, the engine is shut down and the lock released: the same process
  can open another path or reopen the first, and another process can open it. A killed process (SIGKILL)
  leaves no stale lock (it is an flock). Opening the engine, inserting a batch and closing it costs about
  80 ms.

Hence, in the lab, the gateway's audit writer does not hold the engine: it opens it for each batch and
closes it afterwards (`release_between_batches`, chosen automatically for ``chdb://`` DSNs), and
`appliance audit-log verify` waits until the engine is free (`chdb_engine_holder`), then takes it for the
length of the read while the gateway's writer keeps its rows in memory and retries. Both sides read and
write the real database; no copy is involved. In production the same code talks to a ClickHouse server,
where none of this matters.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

GENESIS_HASH = "0" * 64
HASH_FORMAT = "membria-audit-v1"
DEFAULT_TABLE = "audit_log"

Decision = Literal["allow", "deny", "rate_limited", "error"]
DECISIONS: tuple[str, ...] = get_args(Decision)
FindingKind = Literal["edited", "deleted", "reordered", "bad_genesis"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_DECISION_TYPE = "Enum8(" + ", ".join(f"'{d}' = {i}" for i, d in enumerate(DECISIONS, start=1)) + ")"

# Column order is the insert order and the order `verify_chain` reads back.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("seq", "UInt64"),
    ("ts", "DateTime64(6, 'UTC')"),
    ("request_id", "String"),
    ("user_pseudonym", "String"),
    ("device", "String"),
    ("departments", "Array(String)"),
    ("route", "String"),
    ("method", "LowCardinality(String)"),
    ("model", "String"),
    ("decision", _DECISION_TYPE),
    ("reason", "String"),
    ("prompt_tokens", "UInt32"),
    ("completion_tokens", "UInt32"),
    ("latency_ms", "Float64"),
    ("status", "UInt16"),
    ("prev_hash", "String"),
    ("row_hash", "String"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _ in COLUMNS)
COLUMN_TYPES: tuple[str, ...] = tuple(kind for _, kind in COLUMNS)

_UINT32_MAX = 2**32 - 1


# --- pseudonyms -------------------------------------------------------------------------------------------


def pseudonymize(subject: str, key: bytes) -> str:
    """HMAC-SHA256 of the subject under `key` (held in Vault), hex. Stable for one key, unlinkable without it."""
    if not isinstance(key, bytes | bytearray) or len(key) < 16:
        raise ValueError("the audit pseudonym key must be at least 16 bytes")
    return hmac.new(bytes(key), subject.encode("utf-8"), hashlib.sha256).hexdigest()


# --- events and rows ----------------------------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(UTC)


def _clean_text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"audit field {name} must be a string, not {type(value).__name__}")
    # Client-controlled text can carry lone surrogates (JSON "\ud800"), which UTF-8 cannot store.
    return value.encode("utf-8", "replace").decode("utf-8")


def _clean_int(value: object, name: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueError(f"audit field {name} must be an integer in 0..{maximum}, not {value!r}")
    return value


def _clean_ts(value: object) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"audit field ts must be a timezone-aware datetime, not {value!r}")
    return value.astimezone(UTC)


def _clean_latency(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"audit field latency_ms must be a finite number >= 0, not {value!r}")
    return float(value)


def _clean_decision(value: object) -> str:
    if value not in DECISIONS:
        raise ValueError(f"audit field decision must be one of {', '.join(DECISIONS)}, not {value!r}")
    return str(value)


def _clean_departments(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"audit field departments must be a list of strings, not {value!r}")
    return tuple(_clean_text(d, "departments") for d in value)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What a request handler submits. `subject` is the raw user id: it is pseudonymized before storage."""

    request_id: str
    subject: str = field(repr=False)
    device: str = ""
    departments: tuple[str, ...] = ()
    route: str = ""
    method: str = ""
    model: str = ""
    decision: str = "deny"
    reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    status: int = 0
    ts: datetime = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        for name in ("request_id", "subject", "device", "route", "method", "model", "reason"):
            object.__setattr__(self, name, _clean_text(getattr(self, name), name))
        object.__setattr__(self, "departments", _clean_departments(self.departments))
        object.__setattr__(self, "decision", _clean_decision(self.decision))
        for name in ("prompt_tokens", "completion_tokens"):
            _clean_int(getattr(self, name), name, _UINT32_MAX)
        _clean_int(self.status, "status", 65535)
        object.__setattr__(self, "latency_ms", _clean_latency(self.latency_ms))
        object.__setattr__(self, "ts", _clean_ts(self.ts))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AuditEvent:
        """Build from the dict a handler submits (the gateway's middleware sends one); unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown audit field(s): {', '.join(unknown)}")
        values = dict(data)
        if "departments" in values and isinstance(values["departments"], list):
            values["departments"] = tuple(values["departments"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One row of the audit table. `prev_hash`/`row_hash` are empty until `chain` fills them."""

    seq: int
    ts: datetime
    request_id: str
    user_pseudonym: str
    device: str
    departments: tuple[str, ...]
    route: str
    method: str
    model: str
    decision: str
    reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    status: int
    prev_hash: str = ""
    row_hash: str = ""

    @classmethod
    def from_event(cls, event: AuditEvent, seq: int, key: bytes) -> AuditRow:
        """The row for `event` at position `seq`; an empty subject (no identity) stays an empty pseudonym."""
        return cls(
            seq=seq,
            ts=event.ts,
            request_id=event.request_id,
            user_pseudonym=pseudonymize(event.subject, key) if event.subject else "",
            device=event.device,
            departments=event.departments,
            route=event.route,
            method=event.method,
            model=event.model,
            decision=event.decision,
            reason=event.reason,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            latency_ms=event.latency_ms,
            status=event.status,
        )

    def values(self) -> list[Any]:
        """The row as insert values, in `COLUMN_NAMES` order."""
        return [
            self.seq,
            self.ts,
            self.request_id,
            self.user_pseudonym,
            self.device,
            list(self.departments),
            self.route,
            self.method,
            self.model,
            self.decision,
            self.reason,
            self.prompt_tokens,
            self.completion_tokens,
            self.latency_ms,
            self.status,
            self.prev_hash,
            self.row_hash,
        ]

    def to_json(self) -> str:
        """One JSON line (for the log of rows that could not be written at shutdown)."""
        data = {name: value for name, value in zip(COLUMN_NAMES, self.values(), strict=True)}
        data["ts"] = format_ts(self.ts)
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# --- canonical form and the chain ----------------------------------------------------------------------------


def format_ts(ts: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC, always six fractional digits."""
    if ts.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    utc = ts.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond:06d}Z"


def ts_from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def canonical(row: AuditRow, prev_hash: str) -> bytes:
    """The bytes `row_hash` covers: a format tag, prev_hash and every content field in a fixed order.

    A compact JSON array: strings are escaped unambiguously, integers are decimal, the timestamp is
    `format_ts`, latency is Python's shortest round-trip repr of the Float64 that is stored. `seq` and
    `row_hash` are not content (see the module docstring).
    """
    parts: list[Any] = [
        HASH_FORMAT,
        prev_hash,
        format_ts(row.ts),
        row.request_id,
        row.user_pseudonym,
        row.device,
        list(row.departments),
        row.route,
        row.method,
        row.model,
        row.decision,
        row.reason,
        int(row.prompt_tokens),
        int(row.completion_tokens),
        repr(float(row.latency_ms)),
        int(row.status),
    ]
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def row_hash(row: AuditRow, prev_hash: str) -> str:
    return hashlib.sha256(canonical(row, prev_hash)).hexdigest()


def chain(rows: Iterable[AuditRow], prev_hash: str = GENESIS_HASH) -> list[AuditRow]:
    """The rows, in the given order, with prev_hash/row_hash filled, continuing from `prev_hash`."""
    out: list[AuditRow] = []
    for row in rows:
        digest = row_hash(row, prev_hash)
        out.append(replace(row, prev_hash=prev_hash, row_hash=digest))
        prev_hash = digest
    return out


# --- the table -----------------------------------------------------------------------------------------------


def quote_table(table: str) -> str:
    """`table` or `database.table`, backquoted; anything else is refused (it is interpolated into SQL)."""
    if not _TABLE_RE.match(table):
        raise ValueError(f"not a valid audit table name: {table!r} (letters, digits, _; optionally db.table)")
    return ".".join(f"`{part}`" for part in table.split("."))


def ddl(table: str = DEFAULT_TABLE) -> str:
    """CREATE TABLE IF NOT EXISTS for the audit table (MergeTree ordered by seq).

    The deduplication window lets a writer retry a batch whose insert may have landed before the error
    (same `insert_deduplication_token`) without leaving duplicates.
    """
    columns = ",\n".join(f"    {name} {kind}" for name, kind in COLUMNS)
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_table(table)} (\n{columns}\n)\n"
        "ENGINE = MergeTree\nORDER BY seq\nSETTINGS non_replicated_deduplication_window = 1000"
    )


@dataclass(frozen=True, slots=True)
class Head:
    """The last row of the chain: a checkpoint to keep out of the database's reach (`SEQ:HASH`)."""

    seq: int
    row_hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.row_hash}"

    @classmethod
    def parse(cls, text: str) -> Head:
        seq, sep, digest = text.strip().partition(":")
        if not sep or not seq.isdigit() or not _HASH_RE.match(digest.lower()):
            raise ValueError(f"a head is SEQ:HASH (a number, a colon, 64 hex digits), not {text!r}")
        return cls(int(seq), digest.lower())


def table_exists(client: Client, table: str) -> bool:
    return str(client.command(f"EXISTS TABLE {quote_table(table)}")).strip() == "1"


def read_head(client: Client, table: str = DEFAULT_TABLE) -> Head | None:
    """The row with the highest seq, or None for an empty table."""
    sql = f"SELECT seq, row_hash FROM {quote_table(table)} ORDER BY seq DESC, row_hash DESC LIMIT 1"  # noqa: S608
    result = client.query(sql)
    rows = result.result_rows
    return Head(int(rows[0][0]), str(rows[0][1])) if rows else None


_SELECT_COLUMNS = ", ".join("toUnixTimestamp64Micro(ts)" if name == "ts" else name for name in COLUMN_NAMES)


def _row_from_db(values: Sequence[Any]) -> AuditRow:
    data = dict(zip(COLUMN_NAMES, values, strict=True))
    data["ts"] = ts_from_micros(int(data["ts"]))
    data["departments"] = tuple(data["departments"])
    return AuditRow(**data)


def iter_rows(client: Client, table: str = DEFAULT_TABLE, *, page_size: int = 10_000) -> Iterator[AuditRow]:
    """Every row in (seq, row_hash) order, one page of `page_size` rows in memory at a time.

    Keyset pages (``(seq, row_hash) > (last seq, last hash)``) rather than one long stream: each page is a
    finished query, so lookups can run between pages on the same connection (chDB forbids a query on a
    handle whose stream is open), and duplicate seq values cannot fall between two pages.
    """
    quoted = quote_table(table)
    last: tuple[int, str] | None = None
    while True:
        if last is None:
            sql = f"SELECT {_SELECT_COLUMNS} FROM {quoted} ORDER BY seq, row_hash LIMIT {int(page_size)}"  # noqa: S608
            params: dict[str, Any] = {}
        else:
            after = "seq >= {s:UInt64} AND (seq, row_hash) > ({s:UInt64}, {h:String})"
            sql = f"SELECT {_SELECT_COLUMNS} FROM {quoted} WHERE {after} ORDER BY seq, row_hash LIMIT {int(page_size)}"  # noqa: S608
            params = {"s": last[0], "h": last[1]}
        page = client.query(sql, parameters=params).result_rows
        for values in page:
            yield _row_from_db(values)
        if len(page) < page_size:
            return
        last = (int(page[-1][0]), str(page[-1][-1]))


# --- verification ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    seq: int
    kind: FindingKind
    detail: str


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    rows_checked: int
    findings: list[Finding]
    head: Head | None
    truncated: bool = False  # more findings than `max_findings`; only the first ones are listed


def verify_chain(
    client: Client,
    table: str = DEFAULT_TABLE,
    *,
    expected_head: Head | None = None,
    page_size: int = 10_000,
    max_findings: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Walk the table in seq order and check every row's hash and its link to the row before it.

    Per row: its row_hash must match its content (else *edited*). Per link, when a row's prev_hash is not
    the previous row's row_hash, the hash it points to is looked up: found at another seq, the rows are
    *reordered*; found nowhere, with a seq gap before it, rows were *deleted*; found nowhere without a gap,
    the previous row was *edited* and its hash recomputed. The first row must chain to `GENESIS_HASH` and
    have seq 1. With `expected_head` (a checkpoint kept elsewhere) the row at that seq must still carry
    that hash, which catches a truncated tail or a chain rewritten to the end.
    """
    quoted = quote_table(table)
    findings: list[Finding] = []
    flagged_reordered: set[int] = set()
    truncated = False

    def add(seq: int, kind: FindingKind, detail: str) -> bool:
        nonlocal truncated
        if len(findings) >= max_findings:
            truncated = True
            return False
        findings.append(Finding(seq, kind, detail))
        return True

    def holder_of(digest: str) -> int | None:
        """The seq of the row whose row_hash is `digest` (a full scan: only run for broken links)."""
        if truncated:
            return None
        sql = f"SELECT seq FROM {quoted} WHERE row_hash = {{h:String}} ORDER BY seq LIMIT 1"  # noqa: S608
        rows = client.query(sql, parameters={"h": digest}).result_rows
        return int(rows[0][0]) if rows else None

    prev: AuditRow | None = None
    checked = 0
    expected_hash_seen: str | None = None
    for row in iter_rows(client, table, page_size=page_size):
        checked += 1
        if progress is not None and checked % page_size == 0:
            progress(checked)
        if expected_head is not None and row.seq == expected_head.seq and expected_hash_seen is None:
            expected_hash_seen = row.row_hash
        if row_hash(row, row.prev_hash) != row.row_hash:
            add(row.seq, "edited", "the row's content no longer matches its row_hash")
        if prev is None:
            _check_first(row, holder_of, add)
        elif row.prev_hash != prev.row_hash:
            _check_link(row, prev, holder_of, add, flagged_reordered)
        elif row.seq != prev.seq + 1:
            add(
                row.seq,
                "edited",
                f"seq jumps from {prev.seq} to {row.seq} although the chain is intact: seq values were rewritten",
            )
        prev = row

    head = Head(prev.seq, prev.row_hash) if prev is not None else None
    if expected_head is not None:
        _check_checkpoint(expected_head, head, expected_hash_seen, add)
    return VerifyResult(ok=not findings, rows_checked=checked, findings=findings, head=head, truncated=truncated)


_Add = Callable[[int, FindingKind, str], bool]
_Lookup = Callable[[str], "int | None"]


def _check_first(row: AuditRow, holder_of: _Lookup, add: _Add) -> None:
    if row.prev_hash == GENESIS_HASH:
        if row.seq != 1:
            add(row.seq, "bad_genesis", f"the genesis row has seq {row.seq}, not 1")
        return
    before = holder_of(row.prev_hash)
    if before is not None:
        add(row.seq, "reordered", f"the first row by seq chains to the row at seq {before}")
    elif row.seq > 1:
        add(
            1,
            "deleted",
            f"seq 1..{row.seq - 1} missing: the first row left (seq {row.seq}) chains to a row not in the log",
        )
    else:
        add(row.seq, "bad_genesis", "the first row's prev_hash is not the genesis hash (64 zeros)")


def _check_link(row: AuditRow, prev: AuditRow, holder_of: _Lookup, add: _Add, flagged: set[int]) -> None:
    if row.seq == prev.seq:
        add(row.seq, "reordered", f"seq {row.seq} appears more than once")
        return
    if row.prev_hash == GENESIS_HASH:
        add(row.seq, "bad_genesis", f"a second chain starts at seq {row.seq} (its prev_hash is the genesis hash)")
        return
    before = holder_of(row.prev_hash)
    if before is not None:
        # A row whose chain predecessor was itself flagged as moved is only a consequence: after seq 5 and 6
        # are swapped, 7 still chains to the row now at 5. Report the moved rows, not their neighbours.
        if before not in flagged and add(
            row.seq, "reordered", f"in the chain this row follows seq {before}, but by seq it follows {prev.seq}"
        ):
            flagged.add(row.seq)
    elif row.seq > prev.seq + 1:
        missing = f"seq {prev.seq + 1}" if row.seq == prev.seq + 2 else f"seq {prev.seq + 1}..{row.seq - 1}"
        add(prev.seq + 1, "deleted", f"{missing} missing: row {row.seq} chains to a row that is not in the log")
    else:
        add(
            prev.seq,
            "edited",
            f"row {row.seq} chains to a hash no row has: row {prev.seq} was changed and its hash recomputed "
            "(or rows were deleted and the rest renumbered)",
        )


def _check_checkpoint(expected: Head, head: Head | None, seen: str | None, add: _Add) -> None:
    if head is None or expected.seq > head.seq:
        end = "the log is empty" if head is None else f"the log ends at seq {head.seq}"
        add(expected.seq, "deleted", f"{end}, but the checkpoint records seq {expected.seq}: the tail was deleted")
    elif seen is None:
        add(expected.seq, "deleted", f"no row has seq {expected.seq}, which the checkpoint records")
    elif seen != expected.row_hash:
        add(
            expected.seq,
            "edited",
            f"the row at seq {expected.seq} has hash {seen[:16]}…, the checkpoint records {expected.row_hash[:16]}…: "
            "the chain was rewritten",
        )


# --- opening the audit DB --------------------------------------------------------------------------------------

ClientFactory = Callable[[], "Client"]


class AuditDbBusy(RuntimeError):
    """The embedded (chDB) audit DB is held by another process; retry later."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"the embedded audit DB at {path} is held by {who} (chDB admits one process at a time)")
        self.path = path
        self.pid = pid


def is_embedded_dsn(dsn: str) -> bool:
    return dsn.startswith("chdb:")


def chdb_path(dsn: str) -> Path:
    """The directory of a ``chdb:///abs/path`` DSN."""
    parsed = urlparse(dsn)
    if parsed.scheme != "chdb" or parsed.netloc or not parsed.path.startswith("/"):
        raise ValueError(f"an embedded audit DSN is chdb:///absolute/path, not {dsn!r}")
    return Path(unquote(parsed.path))


def chdb_engine_holder(path: Path) -> int | None:
    """Whether a process holds the chDB engine at `path`: its pid (0 if unknown), or None when it is free.

    Probes the engine's own lock (an flock on ``<path>/status``) without starting an engine, so a waiting
    caller does not make chDB print lock errors. The answer can be stale a moment later: callers still
    handle a failed open.
    """
    try:
        fd = os.open(path / "status", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                match = re.search(rb"PID:\s*(\d+)", os.pread(fd, 4096, 0))
                if match:
                    return int(match.group(1))
            return 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def is_engine_lock_error(exc: BaseException) -> bool:
    """Whether opening chDB failed because another process (or another path in this one) holds the engine."""
    text = str(exc)
    return "EmbeddedServer" in text or "Cannot lock file" in text


def client_factory(dsn: str, *, password: str = "") -> ClientFactory:
    """A factory of clickhouse-connect clients for `dsn`: ``chdb:///abs/path`` (lab) or
    ``clickhouse[s]://user@host:port/db`` / ``http[s]://...`` (a ClickHouse server over HTTP).

    For chDB the factory raises `AuditDbBusy` without touching the engine when another process holds it.
    """
    import clickhouse_connect

    if is_embedded_dsn(dsn):
        path = chdb_path(dsn)

        def open_embedded() -> Client:
            holder = chdb_engine_holder(path)
            if holder is not None and holder != os.getpid():
                raise AuditDbBusy(path, holder)
            return clickhouse_connect.get_client(dsn=f"chdb://{path}")

        return open_embedded

    parsed = urlparse(dsn)
    if parsed.scheme not in ("clickhouse", "clickhouses", "http", "https") or not parsed.hostname:
        raise ValueError(f"an audit DSN is chdb:///path or clickhouse[s]://host:port/db, not {dsn!r}")
    secure = parsed.scheme in ("clickhouses", "https")

    def open_server() -> Client:
        return clickhouse_connect.get_client(
            host=parsed.hostname,
            port=parsed.port or (8443 if secure else 8123),
            username=unquote(parsed.username or "default"),
            password=password or unquote(parsed.password or ""),
            database=(parsed.path or "/").strip("/") or "default",
            secure=secure,
        )

    return open_server


def connect_when_free(dsn: str, wait_s: float, *, poll_s: float = 0.2) -> Client:
    """A client on the audit DB. An embedded chDB admits one process at a time (the gateway's writer holds it
    while it writes a batch): wait up to `wait_s` for it, then raise AuditDbBusy. For scripts run on a node."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if is_embedded_dsn(dsn) and chdb_engine_holder(chdb_path(dsn)) is not None:
                raise AuditDbBusy(chdb_path(dsn), None)
            return client_factory(dsn)()
        except Exception as exc:
            if not (isinstance(exc, AuditDbBusy) or is_engine_lock_error(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(poll_s)
