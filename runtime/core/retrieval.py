"""Hybrid retrieval: dense vectors + BM25, fused with reciprocal rank fusion, inside Milvus.

Milvus Lite (milvus-lite 3.2.2, pymilvus 3.0.2: checked) supports the BM25 function: each department
collection has a `sparse` field that Milvus fills from the `lexical` text with `FunctionType.BM25`
and searches with the query text. Both go through `ingest.lexical_form`, which appends identifiers
fused into one token ("VX-55" → "vx55"): the standard analyzer splits "VX-55" into "vx" and "55",
which alone cannot tell VX-55 from VX-56 next to PG-55. A hybrid search sends two
`AnnSearchRequest`s (dense cosine on the query embedding, BM25 on the query text) to `hybrid_search`
with an `RRFRanker`, so the lexical side runs in the same store, with per-department term statistics,
and an exact identifier that the dense model blurs still ranks where it belongs. The same code runs
on a Milvus server (2.5+).

Isolation: a search runs requests against the department collections it is *given* (see `store.py`);
there is no code path that reads a collection outside that list. With one department (the common
case) Milvus does the fusion (`hybrid_search` + `RRFRanker`). With several, Milvus cannot fuse across
collections and fusing per collection would rank every department's best chunk equally, so the dense
and BM25 candidates of all the given departments are ranked globally and fused here with the same
RRF formula (`rrf_fuse`).

Scores: "hybrid" → the RRF score (higher is better); "dense" → cosine similarity; "lexical" → the
BM25 score (Milvus Lite reports BM25 as a negative distance, the server as a positive score; the
magnitude is returned either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from runtime.common.embeddings import Embedder
from runtime.common.ingest import lexical_form
from runtime.core.store import OUTPUT_FIELDS, DepartmentStore, milvus_call, validate_department

SearchMode = Literal["hybrid", "dense", "lexical"]


@dataclass(frozen=True)
class SearchHit:
    chunk_id: str
    doc_id: str
    version: int
    department: str
    title: str
    text: str
    score: float
    position: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Retriever:
    def __init__(self, store: DepartmentStore, embedder: Embedder, *, rrf_k: int = 60, candidates: int = 20) -> None:
        self.store = store
        self.embedder = embedder
        self.rrf_k = rrf_k
        self.candidates = candidates

    def search(
        self, query: str, departments: Sequence[str], *, top_k: int = 5, mode: SearchMode = "hybrid"
    ) -> list[SearchHit]:
        """The best `top_k` chunks for `query` from `departments` only. An empty list searches nothing."""
        wanted = sorted({validate_department(d) for d in departments})
        query = " ".join(query.split())
        if not wanted or not query or top_k <= 0:
            return []
        present = [d for d in wanted if self.store.has_department(d)]
        if not present:
            return []
        if mode == "lexical":
            hits = [h for d in present for h in self._search_one(d, query, None, top_k, "lexical")]
            return _best(hits, top_k)
        vector = self.embedder.embed_one(query)
        if mode == "dense":
            hits = [h for d in present for h in self._search_one(d, query, vector, top_k, "dense")]
            return _best(hits, top_k)
        if len(present) == 1:
            return self._hybrid_one(present[0], query, vector, top_k)
        # Several collections: Milvus fuses within one collection only, and per-collection RRF scores
        # would give every department's best chunk the same score. So take the dense and the BM25
        # candidates of every department, rank each list globally and fuse with the same RRF formula.
        pool = max(self.candidates, top_k)
        dense = _best([h for d in present for h in self._search_one(d, query, vector, pool, "dense")], None)
        lexical = _best([h for d in present for h in self._search_one(d, query, None, pool, "lexical")], None)
        return rrf_fuse([dense, lexical], k=self.rrf_k)[:top_k]

    def _hybrid_one(self, department: str, query: str, vector: list[float], top_k: int) -> list[SearchHit]:
        """Dense + BM25 fused by Milvus itself (`hybrid_search` with `RRFRanker`)."""
        from pymilvus import AnnSearchRequest, RRFRanker

        name = self.store.collection_name(department)
        pool = max(self.candidates, top_k)
        requests = [
            AnnSearchRequest(data=[vector], anns_field="dense", param={"metric_type": "COSINE"}, limit=pool),
            AnnSearchRequest(
                data=[lexical_form(query)], anns_field="sparse", param={"metric_type": "BM25"}, limit=pool
            ),
        ]
        with milvus_call(f"searching {name}"):
            result = self.store.client.hybrid_search(
                name, requests, RRFRanker(self.rrf_k), limit=top_k, output_fields=OUTPUT_FIELDS
            )
        return _best(_hits(result, department, lexical=False), top_k)

    def _search_one(
        self, department: str, query: str, vector: list[float] | None, limit: int, mode: SearchMode
    ) -> list[SearchHit]:
        name = self.store.collection_name(department)
        lexical = mode == "lexical"
        with milvus_call(f"searching {name}"):
            result = self.store.client.search(
                name,
                data=[lexical_form(query)] if lexical else [vector],
                anns_field="sparse" if lexical else "dense",
                search_params={"metric_type": "BM25" if lexical else "COSINE"},
                limit=limit,
                output_fields=OUTPUT_FIELDS,
            )
        return _hits(result, department, lexical=lexical)


def _hits(result: Any, department: str, *, lexical: bool) -> list[SearchHit]:
    rows = result[0] if result else []
    hits = []
    for row in rows:
        entity = row.get("entity", {})
        distance = float(row.get("distance", 0.0))
        hits.append(
            SearchHit(
                chunk_id=str(entity.get("chunk_id", row.get("id"))),
                doc_id=str(entity["doc_id"]),
                version=int(entity["version"]),
                department=department,
                title=str(entity["title"]),
                text=str(entity["text"]),
                score=abs(distance) if lexical else distance,
                position=int(entity["position"]),
            )
        )
    return hits


def _best(hits: list[SearchHit], top_k: int | None) -> list[SearchHit]:
    ordered = sorted(hits, key=lambda h: (-h.score, h.department, h.doc_id, h.position))
    return ordered if top_k is None else ordered[:top_k]


def rrf_fuse(rankings: Sequence[Sequence[SearchHit]], *, k: int = 60) -> list[SearchHit]:
    """Reciprocal rank fusion, as Milvus's RRFRanker computes it: score = sum of 1 / (k + rank), rank
    counted from 1 in each list. A chunk is identified by (department, chunk_id)."""
    scores: dict[tuple[str, str], float] = {}
    first: dict[tuple[str, str], SearchHit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            ident = (hit.department, hit.chunk_id)
            scores[ident] = scores.get(ident, 0.0) + 1.0 / (k + rank)
            first.setdefault(ident, hit)
    fused = [replace(first[ident], score=score) for ident, score in scores.items()]
    return _best(fused, None)
