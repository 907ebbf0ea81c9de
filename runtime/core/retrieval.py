"""Hybrid retrieval: dense vectors + BM25, fused with reciprocal rank fusion, inside Milvus.

Milvus Lite (milvus-lite 3.2.2, pymilvus 3.0.2, checked) supports the BM25 function: each department
collection has a `sparse` field that Milvus fills from `text` with `FunctionType.BM25`, queried with the
raw query text. A hybrid search sends two `AnnSearchRequest`s (dense cosine on the query embedding,
BM25 on the query text) to `hybrid_search` with an `RRFRanker`, so the lexical side runs in the same
store, with its own per-department term statistics, and an exact identifier like "VX-55" (tokens
"vx", "55") that the dense model blurs still ranks where it belongs. The same code runs on a Milvus
server (2.5+).

Isolation: a search runs one request per department collection it is *given* (see `store.py`); there
is no code path that reads a collection outside that list. Per-department results are merged by
their RRF scores, which are rank based and therefore comparable across collections.

Scores: "hybrid" → the RRF score (higher is better); "dense" → cosine similarity; "lexical" → the
BM25 score (Milvus Lite reports BM25 as a negative distance, the server as a positive score; the
magnitude is returned either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from runtime.core.embeddings import Embedder
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
        vector = self.embedder.embed_one(query) if mode != "lexical" else None
        hits: list[SearchHit] = []
        for department in present:
            hits.extend(self._search_one(department, query, vector, top_k, mode))
        hits.sort(key=lambda h: (-h.score, h.department, h.doc_id, h.position))
        return hits[:top_k]

    def _search_one(
        self, department: str, query: str, vector: list[float] | None, top_k: int, mode: SearchMode
    ) -> list[SearchHit]:
        from pymilvus import AnnSearchRequest, RRFRanker

        name = self.store.collection_name(department)
        pool = max(self.candidates, top_k)
        with milvus_call(f"searching {name}"):
            if mode == "hybrid":
                assert vector is not None
                requests = [
                    AnnSearchRequest(data=[vector], anns_field="dense", param={"metric_type": "COSINE"}, limit=pool),
                    AnnSearchRequest(data=[query], anns_field="sparse", param={"metric_type": "BM25"}, limit=pool),
                ]
                result = self.store.client.hybrid_search(
                    name, requests, RRFRanker(self.rrf_k), limit=top_k, output_fields=OUTPUT_FIELDS
                )
            elif mode == "dense":
                assert vector is not None
                result = self.store.client.search(
                    name,
                    data=[vector],
                    anns_field="dense",
                    search_params={"metric_type": "COSINE"},
                    limit=top_k,
                    output_fields=OUTPUT_FIELDS,
                )
            else:
                result = self.store.client.search(
                    name,
                    data=[query],
                    anns_field="sparse",
                    search_params={"metric_type": "BM25"},
                    limit=top_k,
                    output_fields=OUTPUT_FIELDS,
                )
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
                    score=abs(distance) if mode == "lexical" else distance,
                    position=int(entity["position"]),
                )
            )
        return hits
