"""The edge knowledge core on a real SQLite file with sqlite-vec and the real embedding model."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from runtime.common.embeddings import Embedder
from runtime.common.ingest import EmptyDocument, UnreadableDocument, UnsupportedDocumentType
from runtime.common.sqlite_db import connect
from runtime.edge.knowledge import (
    RRF_K,
    ChunkRecord,
    KnowledgeCore,
    KnowledgeError,
    UnknownEntity,
    UnknownRelation,
)
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.integration

DEPARTMENTS = ["engineering", "hr", "sales"]
# Real sentences on other subjects, filed under "facilities": they crowd the vector side of a search.
FILLER = [
    "The cafeteria serves lunch from 11:30 to 14:00 on weekdays.",
    "Parking spaces on level B are reserved for visitors and car sharing.",
    "The main entrance closes at 20:00; use the side door with your badge afterwards.",
    "Meeting rooms are booked in the calendar and released after 15 minutes if nobody shows up.",
    "Bicycles may be parked in the courtyard racks, not in the corridors.",
    "The fitness room is open to all employees after signing the house rules.",
    "Lost and found items are kept at reception for one month.",
    "Printers on every floor print double-sided by default to save paper.",
    "The roof terrace is closed in winter and during storms.",
    "Plants in the open office are watered by the cleaning team on Mondays.",
    "Coffee machines are descaled every second Friday by the facilities team.",
    "Fire drills happen twice a year and are announced one day in advance.",
    "The library lends books for three weeks and extends them once on request.",
    "Lockers are assigned for a year; keys are returned when you leave.",
    "The shuttle bus to the train station leaves every twenty minutes at rush hour.",
    "Guests receive a visitor badge at reception and must be accompanied.",
    "Air conditioning is set to 23 degrees in summer and 21 in winter.",
    "The mother-and-child room on the second floor can be booked at reception.",
    "Recycling bins are sorted into paper, plastic, glass and residual waste.",
    "Umbrellas can be borrowed at the entrance on rainy days.",
    "The company choir rehearses on Thursday evenings in the auditorium.",
    "Desk sharing applies on the third floor; clear your desk every evening.",
    "The cleaning team vacuums the offices every night after 19:00.",
    "Deliveries for employees are not accepted at reception.",
    "The garden behind the building has benches and a barbecue area.",
    "Water dispensers are refilled every morning by the facilities team.",
    "Smoking is allowed only in the marked area by the car park.",
    "Christmas decorations go up on the first of December.",
    "Noise-cancelling headphones can be borrowed from the IT desk.",
    "The elevator in the east wing is reserved for goods on Tuesday mornings.",
]


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    shared = Embedder.shared()
    shared.ensure_loaded()
    return shared


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[KnowledgeCore]:
    """The example corpus (hr, sales, engineering) plus the filler sentences; read-only for the tests."""
    core = KnowledgeCore(tmp_path_factory.mktemp("corpus") / "edge.sqlite", embedder)
    for path in sorted((EXAMPLES / "corpus").glob("*/*")):
        core.ingest_document(path.stem, path.parent.name, path.name, path.read_bytes())
    core.upsert_chunks([record(f"filler-{i}", text, "facilities", doc="facilities") for i, text in enumerate(FILLER)])
    yield core
    core.close()


@pytest.fixture
def core(tmp_path: Path, embedder: Embedder) -> Iterator[KnowledgeCore]:
    with KnowledgeCore(tmp_path / "edge.sqlite", embedder) as fresh:
        yield fresh


def record(chunk_id: str, text: str, department: str = "hr", *, version: int = 1, doc: str = "doc") -> ChunkRecord:
    return ChunkRecord(chunk_id, doc, department, "Title", text, version)


def corpus_file(name: str) -> bytes:
    return next((EXAMPLES / "corpus").glob(f"*/{name}")).read_bytes()


def make_pdf(lines: list[str], title: str) -> bytes:
    """A one-page PDF with a Helvetica text layer and a /Title, written by hand (no PDF writer in the venv)."""
    ops = ["BT", "/F1 11 Tf", "14 TL", "72 720 Td"]
    ops += [f"({line.replace('(', '[').replace(')', ']')}) Tj T*" for line in lines]
    stream = "\n".join([*ops, "ET"]).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
        b" /Contents 5 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        f"<< /Title ({title}) >>".encode("latin-1"),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# -- hybrid retrieval -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "doc_id", "expected"),
    [
        ("Am I allowed to telecommute?", "remote-work", "work remotely up to two days"),
        ("If I get ill while on holiday, do I get those days back?", "vacation-policy", "fall ill during"),
        ("How much do reps earn on renewals?", "commission-plan", "3% on renewals"),
    ],
)
def test_paraphrased_questions_find_the_chunk_by_meaning(
    corpus: KnowledgeCore, question: str, doc_id: str, expected: str
) -> None:
    top = corpus.search(question, DEPARTMENTS, k=3)[0]
    assert (top.doc_id, top.vector_rank) == (doc_id, 1)
    assert expected in top.text


def test_a_question_sharing_no_word_with_the_answer_is_answered_by_vectors(corpus: KnowledgeCore) -> None:
    top = corpus.search("Am I allowed to telecommute?", DEPARTMENTS, k=3)[0]
    assert top.doc_id == "remote-work"
    assert top.fts_rank is None  # "telecommute" is nowhere in the corpus: the dense side found it alone


def test_an_exact_identifier_is_found_by_fts(corpus: KnowledgeCore) -> None:
    top = corpus.search("MCC-3", DEPARTMENTS, k=3)[0]
    assert top.fts_rank == 1
    assert "MCC-3" in top.text


def test_near_identical_identifiers_are_told_apart(core: KnowledgeCore) -> None:
    template = "Close valve {v} slowly, one turn every 10 seconds, and watch pressure gauge {g} fall."
    tags = [("VX-55", "PG-55"), ("VX-56", "PG-56"), ("VX-57", "PG-57"), ("VY-55", "PG-58")]
    core.upsert_chunks([record(f"c{i}", template.format(v=v, g=g), "engineering") for i, (v, g) in enumerate(tags)])
    for i, (valve, gauge) in enumerate(tags):
        for query in (valve, f"how do I close {valve}?", gauge):
            top = core.search(query, ["engineering"], k=2)[0]
            assert (query, top.chunk_id, top.fts_rank) == (query, f"c{i}", 1)


def test_similarity_is_the_cosine_for_every_hit_even_fts_only_ones(corpus: KnowledgeCore, embedder: Embedder) -> None:
    # k=1 takes 20 candidates per side; engineering's 8 chunks and the 30 filler sentences push the
    # MCC-3 chunk (unlike its identifier to the model) out of the vector candidates.
    hits = corpus.search("MCC-3", ["engineering", "facilities"], k=1)
    assert len(hits) == 1
    assert (hits[0].fts_rank, hits[0].vector_rank) == (1, None)
    assert "MCC-3" in hits[0].text
    for question, departments in (("MCC-3", ["engineering", "facilities"]), ("vacation carry-over", DEPARTMENTS)):
        query = embedder.embed_one(question)
        for hit in corpus.search(question, departments, k=5):
            expected = max(0.0, min(1.0, dot(query, embedder.embed_one(hit.text))))
            assert hit.similarity == pytest.approx(expected, abs=1e-4)
            ranks = [r for r in (hit.fts_rank, hit.vector_rank) if r is not None]
            assert hit.score == pytest.approx(sum(1 / (RRF_K + r) for r in ranks))


def test_department_scoping_never_leaks(corpus: KnowledgeCore) -> None:
    questions = ["How many vacation days do I get?", "commission on renewals", "VX-55", "MCC-3 panel", "lunch"]
    scopes = [["hr"], ["sales"], ["engineering"], ["facilities"], ["hr", "sales"], ["engineering", "facilities"]]
    for question in questions:
        for scope in scopes:
            hits = corpus.search(question, scope, k=10)
            assert hits, (question, scope)
            assert {h.department for h in hits} <= set(scope), (question, scope)
    assert corpus.search("vacation", ["finance"], k=5) == []  # a department with nothing in it


def test_the_same_text_in_two_departments_is_returned_only_for_the_asked_one(core: KnowledgeCore) -> None:
    text = "Expense reports are due on the fifth working day of the month."
    core.upsert_chunks([record("hr-1", text, "hr"), record("sales-1", text, "sales"), record("x", "Lunch.", "sales")])
    assert [h.chunk_id for h in core.search("when are expense reports due", ["sales"], k=5)] == ["sales-1", "x"]
    assert [h.chunk_id for h in core.search("when are expense reports due", ["hr"], k=5)] == ["hr-1"]
    both = core.search("when are expense reports due", ["hr", "sales"], k=5)
    assert {h.chunk_id for h in both[:2]} == {"hr-1", "sales-1"}


@pytest.mark.parametrize(
    "query",
    [
        '"',
        'vacation"',
        "vacation*",
        "-vacation",
        "title:vacation",
        "(vacation",
        "vacation)",
        "NOT",
        "AND OR NOT",
        "NEAR(vacation days)",
        "^vacation",
        "{title}: vacation",
        "'; DROP TABLE chunks; --",
        "!!!",
    ],
)
def test_fts_syntax_in_a_query_does_not_raise(corpus: KnowledgeCore, query: str) -> None:
    hits = corpus.search(query, ["hr", "sales"], k=5)
    assert len(hits) == 5  # the vector side always has candidates
    assert {h.department for h in hits} <= {"hr", "sales"}
    if "vacation" in query:
        assert hits[0].doc_id == "vacation-policy"


def test_empty_queries_and_bad_arguments(corpus: KnowledgeCore) -> None:
    assert corpus.search("", DEPARTMENTS) == []
    assert corpus.search(" \n\t ", DEPARTMENTS) == []
    assert corpus.search("vacation", []) == []
    assert corpus.search("vacation", ["hr"], k=0) == []
    with pytest.raises(KnowledgeError, match="invalid department 'HR; DROP'"):
        corpus.search("vacation", ["HR; DROP"])
    with pytest.raises(KnowledgeError, match="not the string 'hr'"):
        corpus.search("vacation", "hr")


def test_coverage_is_high_for_an_answered_question_and_low_for_an_unrelated_one(corpus: KnowledgeCore) -> None:
    on_topic = "How many days of paid vacation do employees get?"
    off_topic = "What is the half-life of tritium in a fusion reactor?"
    covered = corpus.coverage(on_topic, corpus.search(on_topic, ["hr"], k=3))
    uncovered = corpus.coverage(off_topic, corpus.search(off_topic, ["hr"], k=3))
    assert 0.0 <= uncovered < 0.35 < 0.5 < covered <= 1.0
    assert corpus.coverage(on_topic, []) == 0.0


# -- writes: chunks, ingest, versions ---------------------------------------------------------------------


def test_upsert_embeds_only_new_or_changed_text(core: KnowledgeCore) -> None:
    first = [record("a", "Alpha policy text about badges."), record("b", "Bravo rules on parking."), record("c", "X")]
    stats = core.upsert_chunks(first)
    assert (stats.inserted, stats.updated, stats.unchanged, stats.vectors_written) == (3, 0, 0, 3)
    assert set(stats.changed_ids) == {"a", "b", "c"}
    stats = core.upsert_chunks(first)
    assert (stats.inserted, stats.updated, stats.unchanged, stats.changed_ids) == (0, 0, 3, ())
    # A new version with the same text: the row changes, the vector is kept.
    stats = core.upsert_chunks([record("a", "Alpha policy text about badges.", version=2)])
    assert (stats.updated, stats.vectors_written, stats.changed_ids) == (1, 0, ("a",))
    # New text: re-embedded and re-indexed; the old words are gone from the FTS index.
    stats = core.upsert_chunks([record("b", "Bravo rules on bicycles.", version=2)])
    assert (stats.updated, stats.vectors_written, stats.changed_ids) == (1, 1, ("b",))
    assert [h.fts_rank for h in core.search("parking", ["hr"], k=3)] == [None, None, None]
    assert core.search("bicycles", ["hr"], k=1)[0].chunk_id == "b"
    assert core.chunk_versions(["a", "b", "c", "zzz"]) == {"a": 2, "b": 2, "c": 1}


def test_delete_removes_the_chunk_from_search(core: KnowledgeCore) -> None:
    core.upsert_chunks([record("keep", "Keep this note about parking."), record("gone", "Zeppelin hangar rules.")])
    assert core.delete_chunks(["gone", "never-existed"]) == 1
    assert core.delete_chunks([]) == 0
    assert [h.chunk_id for h in core.search("zeppelin hangar", ["hr"], k=5)] == ["keep"]
    counts = core.conn.execute("SELECT (SELECT COUNT(*) FROM chunks), (SELECT COUNT(*) FROM chunk_vectors)")
    assert counts.fetchone() == (1, 1)


def test_a_chunk_moved_to_another_department_moves_its_vector(core: KnowledgeCore) -> None:
    core.upsert_chunks([record("m", "Quarterly sales targets by region.", "hr")])
    core.upsert_chunks([record("m", "Quarterly sales targets by region.", "sales", version=2)])
    assert core.search("sales targets", ["hr"], k=3) == []
    hit = core.search("sales targets", ["sales"], k=3)[0]
    assert (hit.chunk_id, hit.department, hit.version, hit.vector_rank) == ("m", "sales", 2, 1)


def test_precomputed_vectors_are_used_and_checked(core: KnowledgeCore, embedder: Embedder) -> None:
    texts = ["Badges are renewed every two years.", "The canteen closes at three."]
    stats = core.upsert_chunks([record("p", texts[0]), record("q", texts[1])], vectors=embedder.embed(texts))
    assert stats.vectors_written == 2
    top = core.search("when do I renew my badge", ["hr"], k=1)[0]
    assert top.chunk_id == "p"
    assert top.similarity == pytest.approx(
        dot(embedder.embed_one("when do I renew my badge"), embedder.embed_one(texts[0])), abs=1e-4
    )
    with pytest.raises(KnowledgeError, match="3 dimensions, expected 384"):
        core.upsert_chunks([record("r", "x")], vectors=[[0.1, 0.2, 0.3]])
    with pytest.raises(KnowledgeError, match="1 vectors for 2 chunks"):
        core.upsert_chunks([record("r", "x"), record("s", "y")], vectors=[[0.0] * 384])
    assert core.counts()["chunks"] == 2


def test_reingest_replaces_chunks_and_bumps_versions(core: KnowledgeCore) -> None:
    original = "\n\n".join(
        [
            "# Travel policy",
            "## Booking\n\nBook trains in second class and flights in economy through the travel desk.",
            "## Hotels\n\nHotels up to 120 EUR per night; the zeppelin lounge is never reimbursed.",
            "## Meals\n\nMeals are reimbursed up to 40 EUR per day with receipts.",
        ]
    )
    v1 = core.ingest_document("travel", "hr", "travel.md", original.encode())
    assert {r.version for r in v1} == {1} and len(v1) == 3
    assert [r.position for r in v1] == [0, 1, 2]
    edited = original.replace(
        "## Hotels\n\nHotels up to 120 EUR per night; the zeppelin lounge is never reimbursed.\n\n", ""
    )
    edited = edited.replace("40 EUR", "45 EUR")
    v2 = core.ingest_document("travel", "hr", "travel.md", edited.encode())
    assert {r.version for r in v2} == {2} and len(v2) == 2
    assert v2[0].chunk_id == v1[0].chunk_id  # the untouched section keeps its id
    assert core.document_chunk_ids("hr", "travel") == [r.chunk_id for r in v2]
    assert core.get_chunks([v2[1].chunk_id, v1[1].chunk_id]) == {v2[1].chunk_id: v2[1]}
    assert core.document_chunk_ids("sales", "travel") == []
    assert core.chunk_versions([r.chunk_id for r in v1]) == {v1[0].chunk_id: 2}  # the others are gone
    assert all(h.fts_rank is None for h in core.search("zeppelin lounge", ["hr"], k=5))
    assert "45 EUR" in core.search("meal allowance per day", ["hr"], k=1)[0].text
    # An identical upload is not a new version; a new topic or label is.
    assert core.ingest_document("travel", "hr", "travel.md", edited.encode()) == v2
    v3 = core.ingest_document("travel", "hr", "travel.md", edited.encode(), topic="travel", labels=["local-only"])
    assert {(r.version, r.topic, r.labels) for r in v3} == {(3, "travel", ("local-only",))}
    assert core.search("meal allowance", ["hr"], k=1)[0].labels == ("local-only",)
    assert core.documents("hr") == [
        {
            "doc_id": "travel",
            "department": "hr",
            "title": "Travel policy",
            "topic": "travel",
            "version": 3,
            "chunks": 2,
            "chars": sum(len(r.text) for r in v3),
            "labels": ["local-only"],
        }
    ]


def test_txt_md_and_pdf_are_ingested_and_bad_files_refused(core: KnowledgeCore) -> None:
    txt = core.ingest_document("remote-work", "hr", "remote-work.txt", corpus_file("remote-work.txt"))
    md = core.ingest_document("vacation", "hr", "vacation-policy.md", corpus_file("vacation-policy.md"))
    pdf_bytes = make_pdf(
        ["Forklift FL-7 must be inspected every morning.", "Only certified drivers may use it."], "Forklift rules"
    )
    pdf = core.ingest_document("forklift", "engineering", "forklift.pdf", pdf_bytes)
    assert (txt[0].title, md[0].title, pdf[0].title) == ("Remote work guidelines", "Vacation policy", "Forklift rules")
    assert core.search("FL-7 inspection", ["engineering"], k=1)[0].doc_id == "forklift"
    before = core.counts()
    with pytest.raises(UnsupportedDocumentType):
        core.ingest_document("report", "hr", "report.docx", b"PK\x03\x04 not really")
    with pytest.raises(EmptyDocument):
        core.ingest_document("empty", "hr", "empty.txt", b" \n\n ")
    with pytest.raises(UnreadableDocument):
        core.ingest_document("latin", "hr", "latin.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(KnowledgeError, match="invalid department"):
        core.ingest_document("x", "Human Resources", "x.txt", b"text")
    assert (
        core.counts()
        == before
        == {
            "chunks": len(txt) + len(md) + len(pdf),
            "documents": 3,
            "entities": 0,
            "relations": 0,
            "turns": 0,
            "cached_answers": 0,
        }
    )


def test_pinned_chunks_follow_document_order_topics_and_the_size_limit(core: KnowledgeCore) -> None:
    core.ingest_document("vacation", "hr", "vacation-policy.md", corpus_file("vacation-policy.md"), topic="leave")
    core.ingest_document("onboarding", "hr", "onboarding.md", corpus_file("onboarding-policy.md"), topic="people")
    core.ingest_document("quotes", "sales", "quote-approval.md", corpus_file("quote-approval.md"))
    everything = core.pinned_chunks(["hr"], None, 1_000_000)
    assert [(r.doc_id, r.position) for r in everything] == [("onboarding", i) for i in range(3)] + [
        ("vacation", i) for i in range(4)
    ]
    assert {r.doc_id for r in core.pinned_chunks(["hr"], ["leave"], 1_000_000)} == {"vacation"}
    limit = len(everything[0].text) + len(everything[1].text) + 1
    assert core.pinned_chunks(["hr"], None, limit) == everything[:2]
    assert core.pinned_chunks(["hr", "sales"], None, 1_000_000)[-1].doc_id == "vacation"
    assert core.pinned_chunks([], None, 1000) == []


# -- agent memory -----------------------------------------------------------------------------------------


def test_cached_answer_is_invalidated_when_a_used_chunk_changes_only(core: KnowledgeCore) -> None:
    vacation = corpus_file("vacation-policy.md")
    core.ingest_document("vacation", "hr", "vacation-policy.md", vacation)
    core.ingest_document("remote", "hr", "remote-work.txt", corpus_file("remote-work.txt"))
    hits = [h for h in core.search("How many vacation days do I get?", ["hr"], k=3) if h.doc_id == "vacation"]
    used = {h.chunk_id: h.version for h in hits}
    core.cache_answer("How many vacation days do I get?", ["hr"], "28 days.", source="local", chunk_versions=used)
    found = core.cached_answer("  how many VACATION days do i get ", ["hr"])
    assert found is not None and (found.answer, found.source, found.chunk_versions) == ("28 days.", "local", used)
    assert core.cached_answer("How many vacation days do I get?", ["hr", "sales"]) is None  # other scope
    # An unrelated document changes: the answer stays.
    core.ingest_document("remote", "hr", "remote-work.txt", corpus_file("remote-work.txt").replace(b"two", b"three"))
    assert core.cached_answer("How many vacation days do I get?", ["hr"]) is not None
    # A chunk it used changes version: gone, and marked so.
    core.ingest_document("vacation", "hr", "vacation-policy.md", vacation.replace(b"28 calendar", b"30 calendar"))
    assert core.cached_answer("How many vacation days do I get?", ["hr"]) is None
    row = core.conn.execute("SELECT invalidated_at FROM cached_answers").fetchone()
    assert row[0] is not None and core.counts()["cached_answers"] == 0


def test_invalidate_answers_for_marks_answers_that_used_the_chunks(core: KnowledgeCore) -> None:
    core.upsert_chunks([record("a", "Parking is free."), record("b", "Lunch is at noon."), record("c", "Gym.")])
    core.cache_answer("parking?", ["hr"], "Free.", source="local", chunk_versions={"a": 1})
    core.cache_answer("lunch?", ["hr"], "Noon.", source="core", chunk_versions={"b": 1, "c": 1})
    core.cache_answer("hello?", ["hr"], "Hi.", source="local", chunk_versions={})
    assert core.invalidate_answers_for(["c", "unknown"]) == 1
    assert core.invalidate_answers_for(["c"]) == 0
    assert core.invalidate_answers_for([]) == 0
    assert core.cached_answer("lunch?", ["hr"]) is None
    assert core.cached_answer("parking?", ["hr"]) is not None
    core.delete_chunks(["a"])  # a deleted chunk is not current either
    assert core.cached_answer("parking?", ["hr"]) is None
    assert core.cached_answer("hello?", ["hr"]) is not None  # used no chunk: nothing can make it stale
    core.cache_answer("lunch?", ["hr"], "At noon.", source="local", chunk_versions={"b": 1})  # replaced, valid
    assert core.cached_answer("lunch?", ["hr"]) is not None


def test_turns_are_the_last_n_oldest_first(core: KnowledgeCore) -> None:
    for i in range(25):
        core.add_turn("conv-1", "user" if i % 2 == 0 else "assistant", f"turn {i}", source="local" if i % 2 else None)
    core.add_turn("conv-2", "user", "elsewhere")
    turns = core.turns("conv-1", limit=20)
    assert [t.text for t in turns] == [f"turn {i}" for i in range(5, 25)]
    assert (turns[0].role, turns[1].role, turns[1].source) == ("assistant", "user", None)
    assert turns[0].created_at.tzinfo is not None
    assert [t.text for t in core.turns("conv-2")] == ["elsewhere"]
    with pytest.raises(KnowledgeError, match="role must be"):
        core.add_turn("conv-1", "system", "no")  # type: ignore[arg-type]


# -- temporal knowledge graph -----------------------------------------------------------------------------


def test_relation_valid_then_closed_answers_for_any_moment(core: KnowledgeCore) -> None:
    alice = core.upsert_entity("Alice Martin", "person", "engineering", {"role": "technician"})
    core.upsert_entity("Bob Keller", "person", "engineering")
    core.upsert_entity("Pump P-12", "equipment", "engineering")
    start = datetime(2024, 1, 1, 9, 0, tzinfo=timezone(timedelta(hours=3)))  # 06:00 UTC
    handover = datetime(2024, 6, 1, tzinfo=UTC)
    first = core.add_relation(alice, "responsible_for", "pump p-12", valid_from=start, source_chunk="chunk-1")
    core.close_relation(first, handover)
    second = core.add_relation("Bob Keller", "responsible_for", "Pump P-12", valid_from=handover)

    def holders(at: datetime | None) -> list[str]:
        return [r.subject for r in core.relations("Pump P-12", at=at)]

    assert holders(start - timedelta(microseconds=1)) == []
    assert holders(start) == ["Alice Martin"]
    assert holders(datetime(2024, 3, 1, tzinfo=UTC)) == ["Alice Martin"]
    assert holders(handover) == ["Bob Keller"]  # valid_to is exclusive
    assert holders(None) == ["Bob Keller"]
    history = core.history("Pump P-12", "responsible_for")
    assert [(r.id, r.subject, r.valid_from, r.valid_to) for r in history] == [
        (first, "Alice Martin", start, handover),
        (second, "Bob Keller", handover, None),
    ]
    assert history[0].valid_from.tzinfo == UTC and history[0].source_chunk == "chunk-1"
    assert [r.object for r in core.relations("alice martin", at=start)] == ["Pump P-12"]  # either side
    assert core.history("Alice Martin", "manages") == []
    # Recording the same fact again is idempotent.
    assert core.add_relation("Bob Keller", "responsible_for", "Pump P-12", valid_from=handover) == second
    assert core.counts()["relations"] == 2


def test_kg_refuses_bad_times_and_unknown_things(core: KnowledgeCore) -> None:
    core.upsert_entity("Alice", "person", "hr")
    core.upsert_entity("HR portal", "system", "hr")
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match=r"valid_to .* must be after valid_from"):
        core.add_relation("Alice", "uses", "HR portal", valid_from=t0, valid_to=t0)
    with pytest.raises(ValueError, match="timezone-aware"):
        core.add_relation("Alice", "uses", "HR portal", valid_from=datetime(2024, 1, 1))
    with pytest.raises(UnknownEntity, match="'Carol'"):
        core.add_relation("Alice", "knows", "Carol", valid_from=t0)
    rel = core.add_relation("Alice", "uses", "HR portal", valid_from=t0)
    with pytest.raises(ValueError, match="must be after"):
        core.close_relation(rel, t0 - timedelta(days=1))
    core.close_relation(rel, t0 + timedelta(days=1))
    with pytest.raises(KnowledgeError, match="already closed"):
        core.close_relation(rel, t0 + timedelta(days=2))
    with pytest.raises(UnknownRelation):
        core.close_relation(9999, t0 + timedelta(days=2))
    assert core.history("Alice")[0].valid_to == t0 + timedelta(days=1)


def test_upsert_entity_is_keyed_by_name(core: KnowledgeCore) -> None:
    first = core.upsert_entity("Valve VX-55", "equipment", "engineering", {"bar": 16})
    assert core.upsert_entity("valve  vx-55", "valve", "engineering") == first  # attributes kept
    assert core.entity(first).attributes == {"bar": 16} and core.entity("VALVE VX-55").type == "valve"
    core.upsert_entity("Valve VX-55", "valve", "engineering", {"bar": 10, "room": "B"})
    assert core.entity(first).attributes == {"bar": 10, "room": "B"}
    with pytest.raises(KnowledgeError):
        core.upsert_entity("  ", "valve", "engineering")
    assert core.counts()["entities"] == 1


# -- the file: WAL, concurrency, persistence -----------------------------------------------------------


def test_wal_lets_a_second_connection_read_while_the_first_writes(core: KnowledgeCore) -> None:
    core.upsert_chunks([record("a", "Parking is free for employees.")])
    assert core.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reader = connect(core.path, vectors=True)
    try:
        reader.execute("BEGIN")  # a read snapshot, held open across the writer's commit
        assert reader.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 1
        # With a rollback journal this commit would wait for the reader, then fail with "database is locked".
        core.upsert_chunks([record("b", "Lunch is served at noon.")])
        assert reader.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 1  # its snapshot
        reader.commit()
        assert reader.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 2
        # And the other way round: another connection holds the write lock, the core still reads.
        reader.execute("BEGIN IMMEDIATE")
        reader.execute(
            "INSERT INTO memory_turns (conversation_id, role, text, created_at) VALUES ('c', 'user', 'hi', ?)",
            (datetime.now(UTC).isoformat(),),
        )
        assert core.turns("c") == []
        assert core.search("parking", ["hr"], k=1)[0].chunk_id == "a"
        reader.commit()
        assert [t.text for t in core.turns("c")] == ["hi"]
    finally:
        reader.close()


def test_everything_survives_close_and_reopen(tmp_path: Path, embedder: Embedder) -> None:
    path = tmp_path / "edge.sqlite"
    with KnowledgeCore(path, embedder) as core:
        core.ingest_document("vacation", "hr", "vacation-policy.md", corpus_file("vacation-policy.md"))
        hit = core.search("carry over unused days", ["hr"], k=1)[0]
        core.cache_answer("carry over?", ["hr"], "5 days.", source="local", chunk_versions={hit.chunk_id: 1})
        core.upsert_entity("Alice", "person", "hr")
        core.upsert_entity("HR portal", "system", "hr")
        core.add_relation("Alice", "uses", "HR portal", valid_from=datetime(2024, 1, 1, tzinfo=UTC))
        core.add_turn("conv", "user", "carry over?")
        counts = core.counts()
    with pytest.raises(KnowledgeError, match="closed"):
        core.counts()
    with KnowledgeCore(path, embedder) as again:
        assert again.counts() == counts
        assert again.search("carry over unused days", ["hr"], k=1)[0] == hit
        assert again.cached_answer("carry over?", ["hr"]) is not None
        assert [r.subject for r in again.relations("HR portal")] == ["Alice"]
        assert [t.text for t in again.turns("conv")] == ["carry over?"]
        meta = dict(again.conn.execute("SELECT key, value FROM knowledge_meta").fetchall())
        assert meta == {"schema_version": "1", "embedding_model": embedder.model_name, "dimension": "384"}


def test_a_file_from_a_newer_agent_is_refused(tmp_path: Path, embedder: Embedder) -> None:
    path = tmp_path / "edge.sqlite"
    KnowledgeCore(path, embedder).close()
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE knowledge_meta SET value = '99' WHERE key = 'schema_version'")
    raw.close()
    with pytest.raises(KnowledgeError, match="schema version 99"):
        KnowledgeCore(path, embedder)


def test_one_instance_serves_several_threads(core: KnowledgeCore) -> None:
    core.ingest_document("vacation", "hr", "vacation-policy.md", corpus_file("vacation-policy.md"))
    errors: list[BaseException] = []
    top: list[str] = []

    def work(n: int) -> None:
        try:
            for i in range(5):
                core.add_turn(f"conv-{n}", "user", f"question {i}")
                top.append(core.search("sick during vacation", ["hr"], k=2)[0].text)
                core.cache_answer(f"q{n}-{i}", ["hr"], "a", source="local", chunk_versions={})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(top) == 20 and all("fall ill" in text for text in top)
    assert (core.counts()["turns"], core.counts()["cached_answers"]) == (20, 20)
