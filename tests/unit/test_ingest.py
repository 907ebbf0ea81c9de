"""Parsing, chunking and chunk identity of the core server's ingestion (pure functions)."""

from __future__ import annotations

import itertools

import pytest

from runtime.common.ingest import (
    ChunkingConfig,
    DocumentTooLarge,
    EmptyDocument,
    IngestError,
    IngestLimits,
    UnreadableDocument,
    UnsupportedDocumentType,
    chunk_ids,
    chunk_text,
    detect_kind,
    doc_id_from_filename,
    document_hash,
    identifiers,
    lexical_form,
    normalize_text,
    parse_document,
    prepare_document,
)

pytestmark = pytest.mark.unit

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def paragraph(n: int, length: int = 260) -> str:
    """A distinct paragraph of about `length` characters, several sentences long."""
    out: list[str] = []
    i = n
    while len(" ".join(out)) < length:
        out.append(f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} item {n}-{i}.")
        i += 3
    return " ".join(out)


def long_doc(count: int = 24) -> list[str]:
    return [paragraph(n, 180 + (n * 37) % 220) for n in range(count)]


# -- types and parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ctype", "kind"),
    [
        ("a.txt", None, "txt"),
        ("A.MD", "application/octet-stream", "md"),
        ("notes.markdown", None, "md"),
        ("scan.pdf", "application/pdf", "pdf"),
        ("README", "text/markdown; charset=utf-8", "md"),
        ("blob", "text/plain", "txt"),
    ],
)
def test_detect_kind_by_extension_then_content_type(name: str, ctype: str | None, kind: str) -> None:
    assert detect_kind(name, ctype) == kind


@pytest.mark.parametrize(
    ("name", "ctype"),
    [("report.docx", None), ("sheet.xlsx", "application/octet-stream"), ("tool.exe", "text/plain"), ("x", None)],
)
def test_other_types_are_refused(name: str, ctype: str | None) -> None:
    with pytest.raises(UnsupportedDocumentType, match="accepted: TXT"):
        detect_kind(name, ctype)


def test_text_decoding_bom_line_endings_and_refusals() -> None:
    parsed = parse_document("\ufeffTitle line\r\n\r\nBody text.\r\n".encode(), "a.txt")
    assert parsed.text == "Title line\n\nBody text.\n"
    assert parsed.title == "Title line"
    assert "Привет" in parse_document("Привет, мир".encode(), "ru.txt").text
    assert "utf16" in parse_document("utf16 text".encode("utf-16"), "w.txt").text
    with pytest.raises(UnreadableDocument, match="not UTF-8"):
        parse_document("Привет".encode("cp1251"), "legacy.txt")
    with pytest.raises(UnsupportedDocumentType, match="binary"):
        parse_document(b"MZ\x00\x00\x90", "fake.txt")
    with pytest.raises(UnsupportedDocumentType, match="is a PDF"):
        parse_document(b"%PDF-1.4\n...", "renamed.txt")
    with pytest.raises(UnsupportedDocumentType, match="not a PDF"):
        parse_document(b"hello", "fake.pdf")
    with pytest.raises(EmptyDocument):
        parse_document(b" \n\n \n", "empty.md")
    with pytest.raises(UnreadableDocument, match="readable PDF"):
        parse_document(b"%PDF-1.4\nthis is not really a pdf", "broken.pdf")


def test_byte_limit_is_checked_before_parsing() -> None:
    with pytest.raises(DocumentTooLarge, match="limit is 1024"):
        parse_document(b"x" * 1025, "big.txt", limits=IngestLimits(max_bytes=1024))


def test_markdown_title_from_front_matter_or_first_h1() -> None:
    assert parse_document(b"---\ntitle: 'From front matter'\n---\n# H1\n\nText", "a.md").title == "From front matter"
    parsed = parse_document(b"Intro\n\n# The Heading #\n\nText", "a.md")
    assert parsed.title == "The Heading"
    assert not parsed.text.startswith("---")


# -- chunking -------------------------------------------------------------------------------------------


def test_headings_start_chunks_and_every_chunk_carries_its_heading_path() -> None:
    md = (
        "# Valve VX-55\n\nIntro text.\n\n## Steps\n\n1. Close it.\n2. Drain it.\n\n"
        "### Detail\n\nDeep.\n\n## After\n\nDone."
    )
    chunks = chunk_text(md, markdown=True)
    assert chunks == [
        "Valve VX-55\n\nIntro text.",
        "Valve VX-55 > Steps\n\n1. Close it.\n2. Drain it.",
        "Valve VX-55 > Steps > Detail\n\nDeep.",
        "Valve VX-55 > After\n\nDone.",
    ]


def test_setext_headings_fences_and_rules() -> None:
    md = "Title\n=====\n\nText one.\n\n***\n\n```\ncode line 1\n\ncode line 2\n```\n\nSub\n---\n\nText two."
    chunks = chunk_text(md, markdown=True)
    assert chunks[0].startswith("Title\n\nText one.")
    assert "code line 1\n\ncode line 2" in chunks[0]  # the blank line inside the fence did not split it
    assert "***" not in "".join(chunks)
    assert chunks[-1] == "Title > Sub\n\nText two."
    # Plain text has no headings: '#' lines are text.
    assert chunk_text("# not a heading\n\nbody", markdown=False) == ["# not a heading\n\nbody"]


def test_chunks_stay_near_the_target_size() -> None:
    config = ChunkingConfig(target_chars=800, overlap_chars=120)
    chunks = chunk_text("\n\n".join(long_doc(40)), markdown=False, config=config)
    assert len(chunks) > 5
    assert all(len(c) <= 800 for c in chunks)
    assert sum(len(c) for c in chunks) / len(chunks) > 350  # paragraphs are packed, not one per chunk


def test_a_long_paragraph_is_split_at_sentences_with_overlap() -> None:
    sentences = [f"Sentence number {i} says something about valve VX-{i} and its seal." for i in range(40)]
    chunks = chunk_text(" ".join(sentences), markdown=False, config=ChunkingConfig(800, 120))
    assert len(chunks) >= 3
    assert all(len(c) <= 800 for c in chunks)
    for before, after in itertools.pairwise(chunks):
        last_sentence = before.rsplit(". ", 1)[-1]
        assert after.startswith(last_sentence)  # the overlap: the next window repeats the tail
    joined = " ".join(chunks)
    assert all(s in joined for s in sentences)  # nothing lost at the cuts


def test_a_huge_sentence_without_punctuation_is_still_cut() -> None:
    text = " ".join(["word"] * 1000)
    chunks = chunk_text(text, markdown=False, config=ChunkingConfig(300, 50))
    assert all(len(c) <= 300 for c in chunks)


def test_chunking_config_is_checked() -> None:
    with pytest.raises(ValueError, match="target_chars"):
        ChunkingConfig(target_chars=50)
    with pytest.raises(ValueError, match="overlap"):
        ChunkingConfig(target_chars=300, overlap_chars=200)


# -- identity -------------------------------------------------------------------------------------------


def test_ids_ignore_whitespace_but_not_content_and_include_department_and_doc() -> None:
    a = chunk_ids("eng", "doc", ["Close the valve.\nThen drain."])
    assert chunk_ids("eng", "doc", ["  Close   the valve. Then drain.  "]) == a
    assert chunk_ids("eng", "doc", ["Close the valve. Then drain!"]) != a
    assert chunk_ids("sales", "doc", ["Close the valve.\nThen drain."]) != a
    assert chunk_ids("eng", "doc2", ["Close the valve.\nThen drain."]) != a
    assert len(a[0]) == 32


def test_identical_chunks_in_one_document_get_distinct_stable_ids() -> None:
    ids = chunk_ids("eng", "doc", ["Same.", "Other.", "Same."])
    assert len(set(ids)) == 3
    assert chunk_ids("eng", "doc", ["Same.", "Other.", "Same."]) == ids


def test_editing_one_paragraph_keeps_the_ids_of_the_other_chunks() -> None:
    paragraphs = long_doc(30)
    before = prepare_document("\n\n".join(paragraphs).encode(), filename="manual.txt", department="eng")
    edited = list(paragraphs)
    edited[15] = edited[15] + " One more sentence was added to this paragraph here."
    after = prepare_document("\n\n".join(edited).encode(), filename="manual.txt", department="eng")
    kept = set(before.chunk_ids) & set(after.chunk_ids)
    changed_after = [cid for cid in after.chunk_ids if cid not in kept]
    assert len(before.chunk_ids) >= 8
    edited_chunks = [cid for cid, text in zip(after.chunk_ids, after.texts, strict=True) if "One more sentence" in text]
    assert edited_chunks, "the edit must be in some chunk"
    assert changed_after == edited_chunks, "an edit must change exactly the chunks that hold it"
    assert after.doc_hash != before.doc_hash


def test_inserting_a_paragraph_at_the_start_keeps_later_ids_though_positions_move() -> None:
    paragraphs = long_doc(30)
    before = prepare_document("\n\n".join(paragraphs).encode(), filename="m.txt", department="eng")
    after = prepare_document(
        ("\n\n".join([paragraph(99, 300), *paragraphs])).encode(), filename="m.txt", department="eng"
    )
    kept = set(before.chunk_ids) & set(after.chunk_ids)
    assert len(kept) >= len(before.chunk_ids) - 3
    moved = [cid for cid in kept if before.chunk_ids.index(cid) != after.chunk_ids.index(cid)]
    assert moved, "positions changed, ids did not"


def test_document_hash_follows_content_and_title_not_whitespace() -> None:
    texts = ["First chunk.", "Second chunk."]
    h = document_hash("Title", texts)
    assert document_hash("Title", ["First   chunk.", "Second\nchunk."]) == h
    assert document_hash("Other title", texts) != h
    assert document_hash("Title", [*texts, "Third."]) != h


def test_prepare_document_ids_titles_and_limits() -> None:
    doc = prepare_document(b"# Heading\n\nBody.", filename="Safety Procedure (v2).md", department="engineering")
    assert doc.doc_id == "safety-procedure-v2"
    assert doc.title == "Heading"
    assert doc.kind == "md"
    assert [c.position for c in doc.chunks(3)] == [0]
    assert doc.chunks(3)[0].version == 3
    assert doc.chunks(3)[0].department == "engineering"
    assert prepare_document(b"text", filename="x.txt", department="d", title="  Given   title ").title == "Given title"
    assert prepare_document(b"text", filename="quarterly_report.txt", department="d").title == "quarterly report"
    with pytest.raises(IngestError, match="invalid doc_id"):
        prepare_document(b"text", filename="x.txt", department="d", doc_id='bad"id')
    many = "\n\n".join(f"# H{i}\n\nText {i}." for i in range(20))
    with pytest.raises(DocumentTooLarge, match="chunks"):
        prepare_document(many.encode(), filename="m.md", department="d", limits=IngestLimits(max_chunks=10))


def test_doc_id_from_filename() -> None:
    assert doc_id_from_filename("Vacation Policy 2024.MD") == "vacation-policy-2024"
    assert doc_id_from_filename("...") == "document"
    assert doc_id_from_filename("отпуск.txt") == "document"


def test_identifiers_are_fused_for_the_lexical_index() -> None:
    assert identifiers("Close VX-55, then VX-55 again; check P-12 and PO_2024/117.") == ["vx55", "p12", "po2024117"]
    assert identifiers("a well-known pre-check at 0.5 bar") == []  # no digit, or a decimal
    assert lexical_form("Valve VX-55.") == "Valve VX-55.\nvx55"
    assert lexical_form("no codes here") == "no codes here"


def test_normalize_text() -> None:
    assert normalize_text("  a\u00a0b\n\tc  ") == "a b c"
    assert normalize_text("ﬁle") == "file"  # NFKC
