"""The audit row model, its canonical form, the chain and pseudonyms (pure: no database)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from runtime.common.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditRow,
    Head,
    canonical,
    chain,
    ddl,
    format_ts,
    pseudonymize,
    quote_table,
    row_hash,
)

pytestmark = pytest.mark.unit

KEY = b"0123456789abcdef0123456789abcdef"
TS = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def gateway_event(i: int = 0, subject: str = "alice@acme.example") -> dict[str, object]:
    """The dict runtime/gateway/app.py submits."""
    return {
        "request_id": f"req-{i}",
        "subject": subject,
        "device": "laptop-7",
        "departments": ["engineering", "legal"],
        "route": "/v1/chat/completions",
        "method": "POST",
        "model": "gemma-3-270m",
        "decision": "allow",
        "reason": "",
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "latency_ms": 56.789,
        "status": 200,
        "ts": TS + timedelta(seconds=i),
    }


def rows(n: int, start: int = 1) -> list[AuditRow]:
    return [AuditRow.from_event(AuditEvent.from_mapping(gateway_event(i)), start + i, KEY) for i in range(n)]


def test_canonical_form_is_a_fixed_order_json_array_with_explicit_timestamp() -> None:
    row = rows(1)[0]
    parts = json.loads(canonical(row, GENESIS_HASH))
    assert parts == [
        "membria-audit-v1",
        GENESIS_HASH,
        "2025-03-01T12:00:00.123456Z",
        "req-0",
        pseudonymize("alice@acme.example", KEY),
        "laptop-7",
        ["engineering", "legal"],
        "/v1/chat/completions",
        "POST",
        "gemma-3-270m",
        "allow",
        "",
        12,
        34,
        "56.789",
        200,
    ]
    assert canonical(row, GENESIS_HASH) == canonical(dataclasses.replace(row), GENESIS_HASH)


def test_timestamps_are_formatted_in_utc_with_six_digits_and_naive_ones_are_refused() -> None:
    plus3 = timezone(timedelta(hours=3))
    assert format_ts(datetime(2025, 1, 1, 3, 0, tzinfo=plus3)) == "2025-01-01T00:00:00.000000Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_ts(datetime(2025, 1, 1))  # naive: the point of the test
    with pytest.raises(ValueError, match="timezone-aware"):
        AuditEvent(request_id="r", subject="s", ts=datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ts", TS + timedelta(microseconds=1)),
        ("request_id", "req-x"),
        ("user_pseudonym", "f" * 64),
        ("device", "laptop-8"),
        ("departments", ("legal", "engineering")),
        ("route", "/v1/embeddings"),
        ("method", "GET"),
        ("model", "other"),
        ("decision", "deny"),
        ("reason", "no"),
        ("prompt_tokens", 13),
        ("completion_tokens", 35),
        ("latency_ms", 56.7890001),
        ("status", 403),
    ],
)
def test_every_content_field_changes_the_hash(field: str, value: Any) -> None:
    row = rows(1)[0]
    assert row_hash(dataclasses.replace(row, **{field: value}), GENESIS_HASH) != row_hash(row, GENESIS_HASH)


def test_seq_is_position_not_content_and_prev_hash_is_covered() -> None:
    row = rows(1)[0]
    assert row_hash(dataclasses.replace(row, seq=99), GENESIS_HASH) == row_hash(row, GENESIS_HASH)
    assert row_hash(row, "1" * 64) != row_hash(row, GENESIS_HASH)


def test_chain_starts_at_genesis_links_every_row_and_continues_across_batches() -> None:
    chained = chain(rows(5))
    assert chained[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(chained):
        assert after.prev_hash == before.row_hash
    for row in chained:
        assert row.row_hash == row_hash(row, row.prev_hash)
        assert len(row.row_hash) == 64
    first = chain(rows(2))
    rest = chain(rows(3, start=3)[0:3], first[-1].row_hash)
    assert [r.row_hash for r in first + rest] == [r.row_hash for r in chain(rows(2) + rows(3, start=3))]
    assert chain([]) == []


def test_pseudonym_is_stable_keyed_and_hex() -> None:
    a = pseudonymize("alice@acme.example", KEY)
    assert a == pseudonymize("alice@acme.example", KEY)
    assert a != pseudonymize("alice@acme.example", b"another key of enough length!!!")
    assert a != pseudonymize("bob@acme.example", KEY)
    assert len(a) == 64 and int(a, 16) >= 0
    with pytest.raises(ValueError, match="16 bytes"):
        pseudonymize("alice", b"short")


def test_the_raw_subject_never_appears_in_the_row() -> None:
    subject = "alice.secret-user@acme.example"
    event = AuditEvent.from_mapping(gateway_event(subject=subject))
    row = chain([AuditRow.from_event(event, 1, KEY)])[0]
    assert subject not in repr(event)
    assert subject not in repr(row)
    assert subject not in row.to_json()
    assert all(subject not in str(v) for v in row.values())
    assert subject.encode() not in canonical(row, row.prev_hash)
    assert row.user_pseudonym == pseudonymize(subject, KEY)
    anonymous = AuditRow.from_event(AuditEvent(request_id="r", subject=""), 1, KEY)
    assert anonymous.user_pseudonym == ""


def test_events_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown audit field"):
        AuditEvent.from_mapping({**gateway_event(), "user": "x"})
    with pytest.raises(ValueError, match="decision"):
        AuditEvent.from_mapping({**gateway_event(), "decision": "maybe"})
    with pytest.raises(ValueError, match="status"):
        AuditEvent.from_mapping({**gateway_event(), "status": 70000})
    with pytest.raises(ValueError, match="latency_ms"):
        AuditEvent.from_mapping({**gateway_event(), "latency_ms": float("nan")})
    with pytest.raises(ValueError, match="departments"):
        AuditEvent.from_mapping({**gateway_event(), "departments": "engineering"})
    odd = AuditEvent.from_mapping({**gateway_event(), "model": "x\ud800y"})
    assert odd.model.encode("utf-8")  # a lone surrogate from a JSON body is made storable
    assert AuditEvent(request_id="r", subject="s").ts.tzinfo is not None


def test_head_parses_seq_colon_hash() -> None:
    head = Head.parse(f"42:{'AB' * 32}")
    assert head == Head(42, "ab" * 32)
    assert Head.parse(str(head)) == head
    for bad in ("42", "x:" + "a" * 64, "42:" + "a" * 63, "42:" + "g" * 64):
        with pytest.raises(ValueError, match="SEQ:HASH"):
            Head.parse(bad)


def test_table_names_are_validated_and_the_ddl_matches_the_model() -> None:
    assert quote_table("audit_log") == "`audit_log`"
    assert quote_table("membria_audit.audit_log") == "`membria_audit`.`audit_log`"
    for bad in ("audit log", "x; DROP TABLE y", "`x`", "a.b.c", ""):
        with pytest.raises(ValueError, match="not a valid audit table name"):
            quote_table(bad)
    sql = ddl("audit_log")
    assert "ORDER BY seq" in sql and "ENGINE = MergeTree" in sql
    assert "ts DateTime64(6, 'UTC')" in sql and "departments Array(String)" in sql
    assert "decision Enum8('allow' = 1, 'deny' = 2, 'rate_limited' = 3, 'error' = 4)" in sql
