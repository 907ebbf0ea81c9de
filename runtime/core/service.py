"""The core server's work, independent of HTTP: ingest, list, delete, search, answer, embed.

`CoreService` wires the parts (Milvus store, embedder, retriever, response cache, LLM client, RAG);
the FastAPI app in `app.py` is a thin layer over it, and the lab can use it directly (for example to
load `examples/corpus/` with `ingest_corpus(directory, core.ingest_file)`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.common import atomic
from runtime.common.embeddings import Embedder, EmbeddingError
from runtime.common.ingest import ChunkingConfig, IngestLimits, prepare_document
from runtime.common.llm_client import LlmClient, LlmClientError
from runtime.core.cache import ResponseCache
from runtime.core.rag import RagService
from runtime.core.retrieval import Retriever, SearchHit, SearchMode
from runtime.core.settings import CoreSettings
from runtime.core.store import (
    DepartmentStore,
    DocumentNotFound,
    StoredDocument,
    StoreError,
    UpsertResult,
    _quiet_lite_iterator_warning,
    lite_uri_file,
    validate_department,
)
from runtime.core.sync_hub import SyncHub


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


class CoreService:
    def __init__(
        self,
        settings: CoreSettings,
        *,
        milvus_client: Any = None,
        embedder: Embedder | None = None,
        llm: LlmClient | None = None,
    ) -> None:
        self.settings = settings
        self._lite_path: Path | None = None
        milvus_uri = settings.milvus_uri
        if milvus_client is None and settings.milvus_is_lite:
            milvus_uri = self._start_milvus_lite(Path(settings.milvus_uri).expanduser())
        token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
        self.store = DepartmentStore(
            milvus_client if milvus_client is not None else milvus_uri,
            token=token,
            db_name=settings.milvus_db,
            prefix=settings.collection_prefix,
        )
        self.embedder = embedder or Embedder.shared(settings.embedding_model_path)
        self.retriever = Retriever(self.store, self.embedder)
        self.cache = ResponseCache(settings.cache_path, max_entries=settings.cache_max_entries)
        self.llm = llm or LlmClient(settings.llm)
        self.rag = RagService(
            self.retriever,
            self.llm,
            self.cache,
            top_k=settings.rag_top_k,
            max_context_chars=settings.rag_max_context_chars,
        )
        self.limits = IngestLimits(
            max_bytes=settings.max_upload_bytes,
            max_pages=settings.max_pdf_pages,
            max_chunks=settings.max_chunks_per_document,
        )
        self.chunking = ChunkingConfig(target_chars=settings.chunk_chars, overlap_chars=settings.chunk_overlap_chars)
        # The replica devices sync with; ingest below keeps it in step with Milvus.
        self.sync_hub = SyncHub(settings.sync_hub_file, max_patch_bytes=settings.sync_max_patch_bytes)
        self._closed = threading.Event()

    def _start_milvus_lite(self, path: Path) -> str:
        """Start Milvus Lite's gRPC server for `path` and publish its URI in `<path>.uri` (0600): Milvus Lite
        admits one process per file, so DR (`Backends.vectors()`) reaches the data through this server."""
        from milvus_lite.server_manager import server_manager_instance

        path.parent.mkdir(parents=True, exist_ok=True)
        uri = server_manager_instance.start_and_get_uri(str(path))
        if uri is None:
            raise StoreError(f"Milvus Lite: could not open {path} (is another process using it?)")
        _quiet_lite_iterator_warning()
        atomic.write_text(lite_uri_file(path), f"{uri}\n", mode=0o600)
        self._lite_path = path
        return str(uri)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._lite_path is not None:
            lite_uri_file(self._lite_path).unlink(missing_ok=True)  # first, so nobody new connects
        self.llm.close()
        self.cache.close()
        self.sync_hub.close()
        self.store.close()
        if self._lite_path is not None:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(self._lite_path))

    # -- documents --------------------------------------------------------------------------------------

    def ingest_file(
        self,
        department: str,
        filename: str,
        data: bytes,
        *,
        doc_id: str | None = None,
        title: str | None = None,
        content_type: str | None = None,
    ) -> UpsertResult:
        """Parse, chunk, embed and store one document; answers built on its old version are dropped."""
        validate_department(department)
        prepared = prepare_document(
            data,
            filename=filename,
            department=department,
            doc_id=doc_id,
            title=title,
            content_type=content_type,
            limits=self.limits,
            chunking=self.chunking,
        )
        with self.sync_hub.document_lock(department, prepared.doc_id):
            result = self.store.upsert_document(prepared, self.embedder.embed)
            self.sync_hub.document_replaced(prepared)  # also when unchanged: a cheap no-op, or a backfill
        if result.changed:
            self.cache.invalidate_document(department, result.doc_id)
        return result

    def delete_document(self, department: str, doc_id: str) -> tuple[int, int]:
        """(chunks deleted, cached answers dropped)."""
        validate_department(department)
        with self.sync_hub.document_lock(department, doc_id):
            try:
                deleted = self.store.delete_document(department, doc_id)
            except DocumentNotFound:
                self.sync_hub.document_deleted(department, doc_id)  # devices must not keep what Milvus lacks
                raise
            self.sync_hub.document_deleted(department, doc_id)
        return deleted, self.cache.invalidate_document(department, doc_id)

    def list_documents(self, department: str) -> list[StoredDocument]:
        return self.store.list_documents(validate_department(department))

    # -- search -----------------------------------------------------------------------------------------

    def search(
        self, query: str, departments: Sequence[str], *, top_k: int | None = None, mode: SearchMode = "hybrid"
    ) -> list[SearchHit]:
        return self.retriever.search(query, departments, top_k=top_k or self.settings.default_top_k, mode=mode)

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Vectors and the token count (for OpenAI-shaped usage)."""
        return self.embedder.embed(texts), self.embedder.count_tokens(texts)

    # -- health -----------------------------------------------------------------------------------------

    def readiness(self) -> dict[str, Check]:
        checks: dict[str, Check] = {}
        try:
            count = self.store.ping()
            checks["milvus"] = Check(True, f"{count} department collection(s)")
        except StoreError as exc:
            checks["milvus"] = Check(False, str(exc))
        try:
            vector = self.embedder.embed_one("readiness probe")
            checks["embeddings"] = Check(True, f"{self.embedder.model_name}, {len(vector)} dims")
        except EmbeddingError as exc:
            checks["embeddings"] = Check(False, str(exc))
        try:
            served = self.llm.models()
            model = self.settings.llm.model
            ok = model in served
            checks["llm"] = Check(ok, f"serves {model}" if ok else f"{model} not served (serves {served})")
        except LlmClientError as exc:
            checks["llm"] = Check(False, str(exc))
        try:
            self.cache.ping()
            checks["cache"] = Check(True, str(self.settings.cache_path))
        except Exception as exc:  # noqa: BLE001 - any failure of the cache database is a failed check
            checks["cache"] = Check(False, f"{type(exc).__name__}: {exc}")
        return checks
