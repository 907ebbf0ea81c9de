"""Retrieval-augmented answers: question + allowed departments → chunks → cache or model → answer.

The departments come from the gateway (the caller's RBAC scope); nothing here widens them. The prompt
is built for the configured style: the lab's Gemma 3 270M is a base model and gets a completion
prompt (a short instruction, numbered context passages, "Question: ...\\nAnswer:"), a chat model gets the
instruction as the system message and the rest as the user message (`LlmClient.generate`).

A cached answer is reused only when the same normalised question retrieved the very same chunk
versions (see `cache.py`); `cached` in the answer says which happened.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.common.llm_client import LlmClient, LlmClientError
from runtime.core.cache import ResponseCache, cache_key
from runtime.core.retrieval import Retriever, SearchHit

INSTRUCTION = (
    "You are a company assistant. Answer the question using only the numbered context passages. "
    "Be brief and factual. If the passages do not contain the answer, say that you do not know."
)
# A base model keeps writing after its answer; these end it where the prompt's pattern would repeat.
STOP = ["\nQuestion:", "\nContext:", "\n\n[", "\n\n\n"]
NO_CONTEXT = "(no passages matched in the departments you can access)"


@dataclass(frozen=True)
class Generation:
    max_tokens: int = 256
    temperature: float = 0.2
    top_p: float = 0.95

    def as_params(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": round(self.temperature, 4), "top_p": round(self.top_p, 4)}


@dataclass(frozen=True)
class RagAnswer:
    answer: str
    sources: list[SearchHit]
    cached: bool
    model: str
    finish_reason: str | None = None
    prompt_tokens: int = 0  # 0 for a cached answer: the model did no work
    completion_tokens: int = 0


def select_context(hits: Sequence[SearchHit], max_chars: int) -> list[SearchHit]:
    """The best hits that fit in `max_chars` of passage text (at least the first one)."""
    chosen: list[SearchHit] = []
    used = 0
    for hit in hits:
        if chosen and used + len(hit.text) > max_chars:
            break
        chosen.append(hit)
        used += len(hit.text)
    return chosen


def build_prompt(question: str, hits: Sequence[SearchHit], *, max_passage_chars: int = 4000) -> str:
    """The user part of the prompt: numbered passages, then the question and the answer cue."""
    if hits:
        passages = []
        for number, hit in enumerate(hits, start=1):
            text = hit.text if len(hit.text) <= max_passage_chars else hit.text[:max_passage_chars] + "…"
            passages.append(f"[{number}] {hit.title} ({hit.department})\n{text.strip()}")
        context = "\n\n".join(passages)
    else:
        context = NO_CONTEXT
    return f"Context:\n{context}\n\nQuestion: {question}\nAnswer:"


def _clean(answer: str) -> str:
    return answer.strip()


class RagService:
    def __init__(
        self,
        retriever: Retriever,
        llm: LlmClient,
        cache: ResponseCache,
        *,
        top_k: int = 4,
        max_context_chars: int = 4000,
    ) -> None:
        self.retriever = retriever
        self.llm = llm
        self.cache = cache
        self.top_k = top_k
        self.max_context_chars = max_context_chars

    @property
    def model(self) -> str:
        return self.llm.config.model

    def _prepare(
        self, question: str, departments: Sequence[str], generation: Generation, top_k: int | None
    ) -> tuple[str, list[SearchHit], str]:
        question = " ".join(question.split())
        hits = self.retriever.search(question, departments, top_k=top_k or self.top_k)
        context = select_context(hits, self.max_context_chars)
        key = cache_key(question, self.model, [(h.chunk_id, h.version) for h in context], generation.as_params())
        return question, context, key

    def _remember(self, key: str, answer: str, sources: list[SearchHit]) -> None:
        if not answer:
            return  # an empty answer is not worth repeating
        self.cache.put(
            key,
            model=self.model,
            answer=answer,
            sources=[s.to_dict() for s in sources],
            documents=[(s.department, s.doc_id) for s in sources],
        )

    def answer(
        self,
        question: str,
        departments: Sequence[str],
        generation: Generation | None = None,
        *,
        top_k: int | None = None,
    ) -> RagAnswer:
        generation = generation or Generation()
        question, context, key = self._prepare(question, departments, generation, top_k)
        cached = self.cache.get(key)
        if cached is not None:
            return RagAnswer(cached.answer, context, True, cached.model)
        completion = self.llm.generate(
            build_prompt(question, context),
            system=INSTRUCTION,
            max_tokens=generation.max_tokens,
            temperature=generation.temperature,
            top_p=generation.top_p,
            stop=STOP,
        )
        answer = _clean(completion.text)
        self._remember(key, answer, context)
        return RagAnswer(
            answer,
            context,
            False,
            self.model,
            completion.finish_reason,
            completion.prompt_tokens or 0,
            completion.completion_tokens or 0,
        )

    def stream(
        self,
        question: str,
        departments: Sequence[str],
        generation: Generation | None = None,
        *,
        top_k: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Events (dicts with a `type`): `sources` (`sources`, `cached`, `model`), `delta` (`delta`: the
        text), then `done` (`answer`: all of it, `cached`) or `error` (`status`, `message`).

        Retrieval, the cache lookup and the model's first token happen before this returns, so a
        failure there raises (and becomes an HTTP error) instead of breaking a started stream."""
        generation = generation or Generation()
        question, context, key = self._prepare(question, departments, generation, top_k)
        head = {"type": "sources", "sources": [h.to_dict() for h in context], "model": self.model}
        cached = self.cache.get(key)
        if cached is not None:
            return iter(
                [
                    {**head, "cached": True},
                    {"type": "delta", "delta": cached.answer},
                    {"type": "done", "answer": cached.answer, "cached": True},
                ]
            )
        deltas = self.llm.stream_generate(
            build_prompt(question, context),
            system=INSTRUCTION,
            max_tokens=generation.max_tokens,
            temperature=generation.temperature,
            top_p=generation.top_p,
            stop=STOP,
        )
        first = next(deltas, None)
        return self._events({**head, "cached": False}, first, deltas, key, context)

    def _events(
        self,
        head: dict[str, Any],
        first: str | None,
        deltas: Iterator[str],
        key: str,
        context: list[SearchHit],
    ) -> Iterator[dict[str, Any]]:
        yield head
        parts: list[str] = []
        if first is not None:
            parts.append(first)
            yield {"type": "delta", "delta": first}
        try:
            for delta in deltas:
                parts.append(delta)
                yield {"type": "delta", "delta": delta}
        except LlmClientError as exc:
            yield {"type": "error", "status": exc.status, "message": exc.message}
            return
        answer = _clean("".join(parts))
        self._remember(key, answer, context)
        yield {"type": "done", "answer": answer, "cached": False}
