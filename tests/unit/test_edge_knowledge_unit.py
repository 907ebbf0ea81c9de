"""The knowledge core's pure parts: safe FTS5 queries, content words, answer keys, rank fusion."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.edge.knowledge import (
    STOP_WORDS,
    ChunkRecord,
    answer_key,
    content_words,
    fts_query,
    normalize_question,
    reciprocal_rank_fusion,
)

pytestmark = pytest.mark.unit

NASTY = [
    '"',
    'say "hello',
    "vacation*",
    "-excluded",
    "title:secret",
    "(unbalanced",
    "a) b (c",
    "AND",
    "OR NOT AND",
    "NEAR(a b, 3)",
    "^start",
    "{title body}: x",
    "a + b",
    "'; DROP TABLE chunks; --",
    "\\",
    "x\x00y",
    "日本語のテキスト",
    "émigré café",
]


@pytest.fixture(scope="module")
def fts() -> Iterator[sqlite3.Connection]:
    """A real FTS5 table with the knowledge core's tokenizer, holding a few rows."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(title, body, tokenize='porter unicode61 remove_diacritics 2')")
    conn.executemany(
        "INSERT INTO t (title, body) VALUES (?, ?)",
        [
            ("Valve", "Lock out pump P-12 at panel MCC-3, slot 7.\np12 mcc3"),
            ("Valve", "Panel MCC-4 and level 3 gloves.\nmcc4"),
            ("Vacation", "Employees get 28 days of paid vacation."),
            ("Café", "Émigré staff may order coffee."),
        ],
    )
    yield conn
    conn.close()


def match(conn: sqlite3.Connection, text: str) -> list[int]:
    expression = fts_query(text)
    if not expression:
        return []
    return [int(r[0]) for r in conn.execute("SELECT rowid FROM t WHERE t MATCH ? ORDER BY rank", (expression,))]


@pytest.mark.parametrize("text", NASTY)
def test_fts_syntax_in_a_question_is_never_fts_syntax(fts: sqlite3.Connection, text: str) -> None:
    match(fts, text)  # raises sqlite3.OperationalError if the expression is not valid FTS5


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_makes_a_valid_fts_query(text: str) -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(title, body, tokenize='porter unicode61 remove_diacritics 2')")
    conn.execute("INSERT INTO t VALUES ('a', 'b')")
    expression = fts_query(text)
    if expression:
        conn.execute("SELECT rowid FROM t WHERE t MATCH ?", (expression,)).fetchall()
    conn.close()


def test_identifiers_become_phrases_and_fused_tokens_not_loose_parts(fts: sqlite3.Connection) -> None:
    assert fts_query("MCC-3") == '"mcc 3" OR "mcc3"'
    assert fts_query("panel MCC-3?") == '"panel" OR "mcc 3" OR "mcc3"'
    # A bare "3" would match the MCC-4 row ("level 3"); the phrase and the fused token do not.
    assert match(fts, "MCC-3") == [1]
    assert sorted(match(fts, "mcc 3")) == [1, 2]  # words typed apart stay plain words


def test_operators_and_stop_words_are_dropped_but_words_are_kept(fts: sqlite3.Connection) -> None:
    assert fts_query('what is "the" NOT (vacation*) policy AND') == '"vacation" OR "policy"'
    assert fts_query("the of and") == '"the" OR "of" OR "and"'  # nothing else left: keep them
    assert fts_query("?!* ()") == ""
    assert match(fts, "cafe emigre") == [4]  # diacritics folded on both sides
    assert match(fts, "vacations") == [3]  # porter stemming


def test_content_words_drop_stop_words_and_add_fused_identifiers() -> None:
    assert content_words("How do I close valve VX-55 on the P-12 line?") == [
        "close",
        "valve",
        "vx",
        "55",
        "12",
        "line",
        "vx55",
        "p12",
    ]
    assert content_words("what is it?") == []
    assert all(w == w.lower() for w in STOP_WORDS)


def test_answer_keys_ignore_case_spacing_end_punctuation_and_department_order() -> None:
    assert normalize_question("  How many  days?? ") == "how many days"
    assert answer_key("How many days?", ["sales", "hr"]) == answer_key("how many   DAYS", ["hr", "sales", "hr"])
    assert answer_key("How many days?", ["hr"]) != answer_key("How many days?", ["hr", "sales"])
    assert answer_key("How many days?", ["hr"]) != answer_key("How many weeks?", ["hr"])


def test_reciprocal_rank_fusion_scores_and_ties() -> None:
    fused = reciprocal_rank_fusion([[10, 20, 30], [30, 40]], 60)
    scores = dict(fused)
    assert scores[30] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[10] == pytest.approx(1 / 61)
    assert scores[40] == pytest.approx(1 / 62)
    # 20 (first ranking, rank 2) and 40 (second ranking, rank 2) tie at 1/62: the first ranking's goes first.
    assert [rowid for rowid, _ in fused] == [30, 10, 20, 40]
    assert reciprocal_rank_fusion([[], []], 60) == []


def test_chunk_record_labels_are_a_tuple() -> None:
    record = ChunkRecord("c1", "d", "hr", "T", "text", 1, labels=["local-only"])  # type: ignore[arg-type]
    assert record.labels == ("local-only",)
    assert hash(record)
