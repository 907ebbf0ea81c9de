"""From an uploaded file to chunks with stable ids: parse (TXT, Markdown, PDF), chunk, identify.

Parsing refuses what it does not understand with a specific exception: `UnsupportedDocumentType` (the
API answers 415), `DocumentTooLarge` (413: too many bytes, pages or chunks), `UnreadableDocument` and
`EmptyDocument` (422). Text must be UTF-8 (a BOM is fine): guessing a legacy code page would silently
index mojibake.

Chunking is paragraph- and heading-aware and aims at ~`target_chars` (800) per chunk:

- Markdown headings start a new chunk, and every chunk begins with its heading path ("Valve VX-55 >
  Steps"), so a chunk read alone (by the retriever, by the model) still says what it is about;
- paragraphs (blank-line separated; fenced code blocks and lists stay whole) are packed into a chunk
  up to the target; a paragraph longer than the target is split at sentence boundaries into windows
  that overlap by ~`overlap_chars` (the small overlap keeps a sentence that straddles a cut findable);
- boundaries are content-defined: a *cut paragraph* (at least a quarter of the target long, with an
  even content hash) always starts a new run of paragraphs, and runs are packed greedily up to the
  target from their own start. Greedy packing of the whole document would shift every later
  boundary when one paragraph grows or is inserted; with runs, an edit changes the chunks of its own
  run (and at most a neighbour's, if the edit makes or unmakes a cut paragraph) and nothing else.

Ids: `chunk_id = sha256(department, doc_id, normalized text, occurrence)`. The normalized text (NFKC,
whitespace collapsed) makes re-wrapped lines or trailing spaces irrelevant; position is *not* part of
the id, so a chunk whose text survives a re-upload keeps its id even if it moved. `occurrence`
separates identical chunks within one document. The department is part of the id so that ids are
unique across the whole site (the response cache keys on them).

A document's `doc_hash` (title + normalized chunk texts) decides whether a re-upload is a new version:
the store keeps the version when the hash is unchanged and increments it otherwise.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

DocumentKind = Literal["txt", "md", "pdf"]

DOC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_DOC_ID_RE = re.compile(DOC_ID_PATTERN)

EXTENSIONS: dict[str, DocumentKind] = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "md",
    ".markdown": "md",
    ".pdf": "pdf",
}
CONTENT_TYPES: dict[str, DocumentKind] = {
    "text/plain": "txt",
    "text/markdown": "md",
    "text/x-markdown": "md",
    "application/pdf": "pdf",
}
# Content types that say nothing about the file: fall back on the extension alone.
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})


class IngestError(ValueError):
    """The document cannot be ingested; the message says why, for the uploader."""


class UnsupportedDocumentType(IngestError):
    """Not TXT, Markdown or PDF (or not what its name claims)."""


class DocumentTooLarge(IngestError):
    """Over a limit: bytes, PDF pages or chunks."""


class UnreadableDocument(IngestError):
    """The right type, but it cannot be read (corrupt or encrypted PDF, text that is not UTF-8)."""


class EmptyDocument(IngestError):
    """No text to index (an empty file, a scanned PDF without a text layer)."""


@dataclass(frozen=True)
class IngestLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pages: int = 500
    max_chunks: int = 5000


@dataclass(frozen=True)
class ChunkingConfig:
    target_chars: int = 800
    overlap_chars: int = 120

    def __post_init__(self) -> None:
        if self.target_chars < 100:
            raise ValueError("target_chars must be at least 100")
        if not 0 <= self.overlap_chars <= self.target_chars // 3:
            raise ValueError("overlap_chars must be between 0 and a third of target_chars")

    @property
    def min_cut_chars(self) -> int:
        """Only a paragraph at least this long may start a run (so short lines do not become chunks)."""
        return self.target_chars // 4


@dataclass(frozen=True)
class ParsedDocument:
    kind: DocumentKind
    text: str
    title: str | None  # what the document says its title is (Markdown H1, front matter, PDF metadata)
    pages: int | None = None


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    version: int
    department: str
    title: str
    position: int
    text: str


@dataclass(frozen=True)
class PreparedDocument:
    """A parsed, chunked document, not yet stored: the store assigns the version."""

    doc_id: str
    department: str
    title: str
    kind: DocumentKind
    source_name: str
    pages: int | None
    texts: tuple[str, ...]
    chunk_ids: tuple[str, ...]
    doc_hash: str

    def chunks(self, version: int) -> list[Chunk]:
        return [
            Chunk(cid, self.doc_id, version, self.department, self.title, pos, text)
            for pos, (cid, text) in enumerate(zip(self.chunk_ids, self.texts, strict=True))
        ]


# -- type detection and parsing -------------------------------------------------------------------------


def detect_kind(filename: str, content_type: str | None = None) -> DocumentKind:
    """The document kind from the file name, else from the declared content type; refuses the rest."""
    suffix = PurePath(filename or "").suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    declared = (content_type or "").split(";")[0].strip().lower()
    if not suffix and declared in CONTENT_TYPES:
        return CONTENT_TYPES[declared]
    described = f"{filename!r}" + (f" ({declared})" if declared not in _GENERIC_TYPES else "")
    raise UnsupportedDocumentType(
        f"unsupported document type: {described}; accepted: TXT (.txt), Markdown (.md) and PDF (.pdf)"
    )


def parse_document(
    data: bytes, filename: str, content_type: str | None = None, limits: IngestLimits | None = None
) -> ParsedDocument:
    limits = limits or IngestLimits()
    if len(data) > limits.max_bytes:
        raise DocumentTooLarge(f"{filename!r} is {len(data)} bytes; the limit is {limits.max_bytes}")
    kind = detect_kind(filename, content_type)
    if kind == "pdf":
        return _parse_pdf(data, filename, limits)
    text = _decode_text(data, filename)
    title = _first_line_title(text) if kind == "txt" else None
    if kind == "md":
        text, title = _strip_front_matter(text)
        title = title or _first_h1(text)
    if not text.strip():
        raise EmptyDocument(f"{filename!r} contains no text")
    return ParsedDocument(kind=kind, text=text, title=title)


def _decode_text(data: bytes, filename: str) -> str:
    if data.startswith(b"%PDF-"):
        raise UnsupportedDocumentType(f"{filename!r} is a PDF, not text: upload it with a .pdf name")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise UnreadableDocument(f"{filename!r}: invalid UTF-16 text ({exc.reason})") from exc
    else:
        if b"\x00" in data:
            raise UnsupportedDocumentType(f"{filename!r} is binary, not text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UnreadableDocument(
                f"{filename!r} is not UTF-8 text (byte {exc.start}); convert it to UTF-8 and upload again"
            ) from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


_FRONT_MATTER_RE = re.compile(r"\A---\n(.*?)\n(?:---|\.\.\.)\n", re.DOTALL)
_FRONT_TITLE_RE = re.compile(r"^title:\s*(.+?)\s*$", re.MULTILINE)
_ATX_RE = re.compile(r"^(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_FENCE_RE = re.compile(r"^[ \t]{0,3}(```|~~~)")
_RULE_RE = re.compile(r"^[ \t]{0,3}([-*_])([ \t]*\1){2,}[ \t]*$")


def _strip_front_matter(text: str) -> tuple[str, str | None]:
    match = _FRONT_MATTER_RE.match(text)
    if not match:
        return text, None
    title_match = _FRONT_TITLE_RE.search(match.group(1))
    title = title_match.group(1).strip("'\"") if title_match else None
    return text[match.end() :], title or None


def _first_line_title(text: str) -> str | None:
    """A plain-text document's title: a short first line followed by a blank line."""
    lines = text.lstrip("\n").split("\n", 2)
    if len(lines) >= 2 and not lines[1].strip() and 0 < len(lines[0].strip()) <= 120:
        return lines[0].strip()
    return None


def _first_h1(text: str) -> str | None:
    for block in _blocks(text, markdown=True):
        if block.level == 1:
            return block.text
    return None


def _parse_pdf(data: bytes, filename: str, limits: IngestLimits) -> ParsedDocument:
    if not data.lstrip()[:5] == b"%PDF-":
        raise UnsupportedDocumentType(f"{filename!r} is not a PDF (no %PDF- header)")
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument(f"{filename!r} is an encrypted PDF; upload it without a password")
        pages = len(reader.pages)
        if pages > limits.max_pages:
            raise DocumentTooLarge(f"{filename!r} has {pages} pages; the limit is {limits.max_pages}")
        texts = [(page.extract_text() or "").strip() for page in reader.pages]
        meta_title = reader.metadata.title if reader.metadata is not None else None
    except IngestError:
        raise
    except Exception as exc:
        raise UnreadableDocument(f"{filename!r} is not a readable PDF: {type(exc).__name__}: {exc}") from exc
    text = "\n\n".join(t for t in texts if t)
    if not text.strip():
        raise EmptyDocument(f"{filename!r} has no text layer (a scanned PDF?); OCR is not supported")
    title = str(meta_title).strip() if meta_title and str(meta_title).strip() else None
    return ParsedDocument(kind="pdf", text=text, title=title, pages=pages)


# -- chunking ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    level: int  # 1..6 for a heading, 0 for a paragraph
    text: str


def _blocks(text: str, *, markdown: bool) -> list[_Block]:
    """Headings and paragraphs. Blank lines separate paragraphs; fenced code blocks stay whole."""
    out: list[_Block] = []
    para: list[str] = []
    fence: str | None = None

    def flush() -> None:
        body = "\n".join(line.rstrip() for line in para).strip("\n")
        if body.strip():
            out.append(_Block(0, body))
        para.clear()

    for line in text.split("\n"):
        if markdown:
            fence_match = _FENCE_RE.match(line)
            if fence is not None:
                para.append(line)
                if fence_match and fence_match.group(1) == fence:
                    fence = None
                continue
            if fence_match:
                fence = fence_match.group(1)
                para.append(line)
                continue
            heading = _ATX_RE.match(line)
            if heading and heading.group(2).strip():
                flush()
                out.append(_Block(len(heading.group(1)), heading.group(2).strip()))
                continue
            stripped = line.strip()
            if len(para) == 1 and stripped and set(stripped) in ({"="}, {"-"}) and para[0].strip():
                title = para[0].strip()  # a setext heading: the underlined line above
                para.clear()
                out.append(_Block(1 if stripped[0] == "=" else 2, title))
                continue
            if _RULE_RE.match(line):
                flush()  # a thematic break separates, it is not content
                continue
        if not line.strip():
            flush()
        else:
            para.append(line)
    flush()
    return out


_SENTENCE_END_RE = re.compile(r"(?<=[.!?…;:])\s+|\n+")


def normalize_text(text: str) -> str:
    """What identity is computed on: NFKC, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _split_long(paragraph: str, config: ChunkingConfig) -> list[str]:
    """Windows of at most ~target chars at sentence boundaries, each starting with the tail of the one
    before (the overlap)."""
    target, overlap = config.target_chars, config.overlap_chars
    pieces: list[str] = []
    for sentence in (s.strip() for s in _SENTENCE_END_RE.split(paragraph)):
        while len(sentence) > target:  # one huge "sentence": cut at the last space before the target
            cut = sentence.rfind(" ", target // 2, target)
            cut = cut if cut > 0 else target
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    windows: list[str] = []
    current: list[str] = []
    for piece in pieces:
        if current and len(" ".join([*current, piece])) > target:
            windows.append(" ".join(current))
            current = _overlap(current, overlap)
            if current and len(" ".join([*current, piece])) > target:
                current = []
        current.append(piece)
    if current:
        windows.append(" ".join(current))
    return windows


def _overlap(pieces: list[str], limit: int) -> list[str]:
    """The last whole sentences of a window that fit in `limit` chars, else the tail of the last one."""
    kept: list[str] = []
    for piece in reversed(pieces):
        if len(" ".join([piece, *kept])) > limit:
            break
        kept.insert(0, piece)
    if kept:
        return kept
    tail = _tail(pieces[-1], limit)
    return [tail] if tail else []


def _tail(text: str, limit: int) -> str:
    """The end of `text`, at most `limit` chars, starting at a word boundary."""
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    cut = text.find(" ", len(text) - limit)
    return text[cut + 1 :] if cut >= 0 else ""


def _is_cut(unit: str) -> bool:
    return hashlib.sha256(normalize_text(unit).encode()).digest()[0] % 2 == 0


def chunk_text(text: str, *, markdown: bool, config: ChunkingConfig | None = None) -> list[str]:
    """Chunk texts in document order (see the module docstring for the rules)."""
    config = config or ChunkingConfig()
    chunks: list[str] = []
    path: list[tuple[int, str]] = []
    units: list[str] = []

    def breadcrumb() -> str:
        crumb = " > ".join(title for _, title in path)
        return crumb if len(crumb) <= 200 else crumb[:199] + "…"

    def emit_section() -> None:
        prefix = breadcrumb()
        current: list[str] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if current:
                body = "\n\n".join(current)
                chunks.append(f"{prefix}\n\n{body}" if prefix else body)
            current.clear()
            size = 0

        # Runs start at cut paragraphs (chosen by content alone), so an edit cannot move the runs
        # around it; a run longer than the target is packed greedily from its own start.
        runs: list[list[str]] = []
        for unit in units:
            if not runs or (len(unit) >= config.min_cut_chars and _is_cut(unit)):
                runs.append([])
            runs[-1].append(unit)
        for run in runs:
            for unit in run:
                if current and size + 2 + len(unit) > config.target_chars:
                    flush()
                current.append(unit)
                size += len(unit) + (2 if size else 0)
            flush()
        flush()
        units.clear()

    for block in _blocks(text, markdown=markdown):
        if block.level:
            emit_section()
            path[:] = [(lvl, t) for lvl, t in path if lvl < block.level]
            path.append((block.level, block.text))
            continue
        if len(block.text) > config.target_chars:
            units.extend(_split_long(block.text, config))
        else:
            units.append(block.text)
    emit_section()
    return chunks


# -- identity -------------------------------------------------------------------------------------------


def chunk_id(department: str, doc_id: str, text: str, occurrence: int = 0) -> str:
    material = "\x1f".join((department, doc_id, normalize_text(text), str(occurrence)))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def chunk_ids(department: str, doc_id: str, texts: Iterable[str]) -> list[str]:
    """Ids for a document's chunks; identical texts get distinct ids by their occurrence count."""
    seen: dict[str, int] = {}
    ids = []
    for text in texts:
        norm = normalize_text(text)
        occurrence = seen.get(norm, 0)
        seen[norm] = occurrence + 1
        ids.append(chunk_id(department, doc_id, text, occurrence))
    return ids


def document_hash(title: str, texts: Iterable[str]) -> str:
    digest = hashlib.sha256(normalize_text(title).encode())
    for text in texts:
        digest.update(b"\x1e" + normalize_text(text).encode())
    return digest.hexdigest()


_IDENTIFIER_RE = re.compile(r"(?<![\w-])[A-Za-z0-9]+(?:[-_/][A-Za-z0-9]+)+(?![\w-])")


def identifiers(text: str) -> list[str]:
    """Codes like "VX-55", "MCC-3", "PO_2024/117" (segments joined by - _ /, with a digit somewhere),
    fused and lower-cased: "vx55", "mcc3", "po2024117". In order, without repeats."""
    seen: dict[str, None] = {}
    for match in _IDENTIFIER_RE.finditer(text):
        token = match.group(0)
        if any(c.isdigit() for c in token):
            seen.setdefault(re.sub(r"[-_/]", "", token).lower(), None)
    return list(seen)


def lexical_form(text: str) -> str:
    """The text BM25 indexes (and the query it is searched with): the text plus its identifiers fused.

    Milvus's standard analyzer splits "VX-55" into "vx" and "55", so BM25 alone cannot tell VX-55 from
    VX-56 next to PG-55; the fused token "vx55" is rare and matches only the exact identifier."""
    fused = identifiers(text)
    return f"{text}\n{' '.join(fused)}" if fused else text


def valid_doc_id(doc_id: str) -> bool:
    return bool(_DOC_ID_RE.fullmatch(doc_id))


def doc_id_from_filename(filename: str) -> str:
    """A doc id from an upload's file name: the stem, lower-cased, reduced to [a-z0-9._-]."""
    stem = PurePath(filename or "").stem.lower()
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._")[:128].rstrip("-._")
    return slug or "document"


def _title_from_filename(filename: str) -> str:
    stem = PurePath(filename or "").stem
    return re.sub(r"[_-]+", " ", stem).strip() or "Untitled"


def prepare_document(
    data: bytes,
    *,
    filename: str,
    department: str,
    doc_id: str | None = None,
    title: str | None = None,
    content_type: str | None = None,
    limits: IngestLimits | None = None,
    chunking: ChunkingConfig | None = None,
) -> PreparedDocument:
    """Parse, chunk and identify one upload."""
    limits = limits or IngestLimits()
    doc_id = doc_id or doc_id_from_filename(filename)
    if not valid_doc_id(doc_id):
        raise IngestError(f"invalid doc_id {doc_id!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    parsed = parse_document(data, filename, content_type, limits)
    texts = chunk_text(parsed.text, markdown=parsed.kind == "md", config=chunking)
    if not texts:
        raise EmptyDocument(f"{filename!r} contains no text")
    if len(texts) > limits.max_chunks:
        raise DocumentTooLarge(f"{filename!r} makes {len(texts)} chunks; the limit is {limits.max_chunks}")
    final_title = normalize_text(title or parsed.title or _title_from_filename(filename))[:500] or "Untitled"
    return PreparedDocument(
        doc_id=doc_id,
        department=department,
        title=final_title,
        kind=parsed.kind,
        source_name=PurePath(filename or "").name[:255],
        pages=parsed.pages,
        texts=tuple(texts),
        chunk_ids=tuple(chunk_ids(department, doc_id, texts)),
        doc_hash=document_hash(final_title, texts),
    )
