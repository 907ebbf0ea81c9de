"""The edge's local model: llama.cpp in-process, drafts with token log-probabilities, cache-augmented generation.

One `Llama` per `LocalModel`, loaded lazily on first use; a lock lets one generation (or pinning) use the
llama.cpp context at a time, since it holds one KV cache.

Cache-augmented generation (CAG): the knowledge pinned for a profile is evaluated once and the KV cache of
that prefix is kept as a llama.cpp sequence state (`pin`), in memory and optionally in a file next to the
database (`save_pinned` / `load_pinned`; the file carries a fingerprint of the model, the context size and the
text, so a stale file is refused, never used). A draft whose prompt starts with the pinned text restores that
state and evaluates only the rest of the prompt, so time-to-first-token no longer grows with the pinned text.

The mean log-probability of a draft is computed here from llama.cpp's logits (log-softmax of the raw logits
for each sampled token), so it is a property of the model, not of the sampling settings.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.common import atomic

log = logging.getLogger("membria.edge.model")

FinishReason = Literal["stop", "length"]

_GGUF_MAGIC = b"GGUF"
_STATE_MAGIC = b"MEMBRIA-CAG 1\n"
_MAX_HEADER_BYTES = 16 << 20  # token ids of a 100k-token prefix as JSON stay well below this
_SEQ = 0  # the one llama.cpp sequence we use

DEFAULT_STOP = ("\n",)  # a base model answers on the line after "Answer:"; what follows is it writing on
HEADER = "Answer the question briefly, using the context.\n\n"


class LocalModelError(Exception):
    """The local model cannot be used as asked: missing or corrupt model file, a prompt too long, a bad state."""


class PromptTooLong(LocalModelError):
    """The prompt (or the pinned knowledge) does not fit in the model's context."""


class StalePinnedPrefix(LocalModelError):
    """A pinned-state file made for another model, context size, key or text: it must be recomputed."""


class LocalModelConfig(BaseModel):
    """How the model is loaded and, by default, sampled (per-draft arguments override the sampling values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: Path
    n_ctx: int = Field(default=2048, ge=64, le=131072)
    n_threads: int | None = Field(default=None, ge=1, le=256, description="None = llama.cpp's default")
    n_batch: int = Field(default=256, ge=8, le=8192)
    temperature: float = Field(default=0.2, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0, le=1)
    max_tokens: int = Field(default=128, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    repeat_penalty: float = Field(default=1.0, gt=0, le=4)
    # 0 would make llama-cpp-python pick a random seed; a fixed one makes drafts reproducible.
    seed: int = Field(default=1234, ge=1, lt=2**32 - 1)
    stop: tuple[str, ...] = Field(default=DEFAULT_STOP, description="the draft ends before any of these")

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stops: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class _Sampling(BaseModel):
    """Per-draft sampling values, validated with the same bounds as the config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(ge=0, le=2)
    top_p: float = Field(gt=0, le=1)
    max_tokens: int = Field(ge=1)
    presence_penalty: float = Field(ge=-2, le=2)


@dataclass(frozen=True, eq=False)
class PinnedPrefix:
    """Knowledge evaluated once: its tokens and the llama.cpp KV-cache state of sequence 0 after them."""

    key: str
    text: str
    token_ids: tuple[int, ...]
    fingerprint: Mapping[str, Any] = field(repr=False)
    state: ctypes.Array[ctypes.c_uint8] = field(repr=False, compare=False)
    from_file: bool = False

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def state_bytes(self) -> int:
        return len(self.state)


@dataclass(frozen=True)
class Draft:
    """One completion. `token_ids` / `token_logprobs` cover every sampled token, an end-of-generation token
    included (its probability says something about the answer too); `text` excludes stop sequences."""

    text: str
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    mean_logprob: float
    prompt_tokens: int
    prompt_tokens_evaluated: int  # what llama.cpp had to evaluate: all of the prompt, or only what follows the pin
    ttft_seconds: float  # from the call (model loaded) to the first sampled token: prompt evaluation included
    total_seconds: float
    tokens_per_second: float  # generation only: tokens after the first, over the time after the first
    finish_reason: FinishReason
    cag_used: bool

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens"] = self.tokens
        return data


# --- prompts ---------------------------------------------------------------------------------------------


def pinned_text(chunks: Iterable[str]) -> str:
    """The pinned knowledge as the start of a prompt. `prompt_for(..., prefix=...)` continues it, so a draft's
    prompt begins with exactly this text (the shared prefix CAG reuses)."""
    parts = [_clean(c) for c in chunks]
    parts = [p for p in parts if p]
    if not parts:
        return ""
    return HEADER + "Context:\n" + "".join(f"{p}\n\n" for p in parts)


def prompt_for(
    question: str,
    context_chunks: Iterable[str] = (),
    history: Iterable[tuple[str, str]] = (),
    *,
    prefix: PinnedPrefix | str | None = None,
) -> str:
    """A completion prompt for a base model: [pinned knowledge] [more context] [earlier turns] question.

    `history` holds (role, text) turns, oldest first; role "user" / "question" or "assistant" / "answer".
    """
    question = " ".join(question.split())
    if not question:
        raise ValueError("the question is empty")
    start = prefix.text if isinstance(prefix, PinnedPrefix) else (prefix or "")
    chunks = [c for c in (_clean(c) for c in context_chunks) if c]
    if start:
        text = start + "".join(f"{c}\n\n" for c in chunks)
    else:
        text = pinned_text(chunks) or HEADER
    for role, said in history:
        label = _ROLES.get(role.lower())
        if label is None:
            raise ValueError(f"unknown conversation role {role!r} (use 'user' or 'assistant')")
        said = " ".join(said.split())
        text += f"{label}: {said}\n" if label == "Question" else f"{label}: {said}\n\n"
    return text + f"Question: {question}\nAnswer:"


_ROLES = {"user": "Question", "question": "Question", "assistant": "Answer", "answer": "Answer"}


def _clean(chunk: str) -> str:
    # A blank line separates chunks and turns in the prompt; inside a chunk it would blur where one ends.
    lines = [line.rstrip() for line in chunk.strip().splitlines()]
    return "\n".join(line for line in lines if line)


# --- the model -------------------------------------------------------------------------------------------


class LocalModel:
    """llama.cpp in this process. Thread-safe: one generation at a time."""

    def __init__(self, config: LocalModelConfig) -> None:
        self.config = config
        self._llama: Any = None
        self._vocab: Any = None
        self._lock = threading.Lock()

    # --- loading ---------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    def ensure_loaded(self) -> None:
        """Load the model now (otherwise the first draft does); LocalModelError if the file is unusable."""
        with self._lock:
            self._load()

    def _load(self) -> Any:
        if self._llama is not None:
            return self._llama
        path = self.config.model_path
        try:
            with path.open("rb") as fh:
                magic = fh.read(4)
        except FileNotFoundError:
            raise LocalModelError(f"model file {path} does not exist") from None
        except IsADirectoryError:
            raise LocalModelError(f"model path {path} is a directory, not a GGUF file") from None
        except OSError as exc:
            raise LocalModelError(f"cannot read model file {path}: {exc.strerror or exc}") from None
        if magic != _GGUF_MAGIC:
            raise LocalModelError(f"model file {path} is not a GGUF file")
        llama_cpp = _llama_cpp()
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self.config.n_ctx,
                n_batch=self.config.n_batch,
                n_ubatch=self.config.n_batch,
                n_threads=self.config.n_threads,
                seed=self.config.seed,
                logits_all=False,  # we read only the last position's logits; all of them would be n_ctx x vocab
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise LocalModelError(f"llama.cpp could not load {path} (corrupt or unsupported GGUF?): {exc}") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        return self._llama

    def close(self) -> None:
        with self._lock:
            if self._llama is not None:
                self._llama.close()
                self._llama = None

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes as the start of a prompt (BOS included): for budgeting the context."""
        with self._lock:
            return len(self._tokenize(self._load(), text, bos=True))

    @staticmethod
    def _tokenize(llama: Any, text: str, *, bos: bool) -> list[int]:
        if not text:
            return [llama.token_bos()] if bos else []
        # special=False: text that looks like a control token ("<eos>") stays text.
        return list(llama.tokenize(text.encode("utf-8"), add_bos=bos, special=False))

    # --- prompts (methods too, so the agent needs only the model) ---------------------------------------

    def pinned_text(self, chunks: Iterable[str]) -> str:
        return pinned_text(chunks)

    def prompt_for(
        self,
        question: str,
        context_chunks: Iterable[str] = (),
        history: Iterable[tuple[str, str]] = (),
        *,
        prefix: PinnedPrefix | str | None = None,
    ) -> str:
        return prompt_for(question, context_chunks, history, prefix=prefix)

    # --- cache-augmented generation --------------------------------------------------------------------

    def fingerprint(self, key: str, text: str) -> dict[str, Any]:
        """What a pinned state depends on; any difference makes a saved state stale."""
        path = self.config.model_path.resolve()
        try:
            st = path.stat()
        except OSError as exc:
            raise LocalModelError(f"cannot read model file {path}: {exc.strerror or exc}") from None
        return {
            "key": key,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "model_path": str(path),
            "model_size": st.st_size,
            "model_mtime_ns": st.st_mtime_ns,
            "n_ctx": self.config.n_ctx,
            "n_batch": self.config.n_batch,
            "llama_cpp": str(getattr(_llama_cpp(), "__version__", "?")),
        }

    def pin(self, text: str, key: str) -> PinnedPrefix:
        """Evaluate `text` (the start of future prompts, see `pinned_text`) once and keep the KV-cache state."""
        if not text:
            raise ValueError("nothing to pin: the text is empty")
        if not key:
            raise ValueError("a pinned prefix needs a key")
        with self._lock:
            llama = self._load()
            tokens = self._tokenize(llama, text, bos=True)
            if len(tokens) >= self.config.n_ctx - 1:
                raise PromptTooLong(
                    f"the pinned knowledge is {len(tokens)} tokens; the context holds {self.config.n_ctx} "
                    "and the question needs room too: pin less"
                )
            self._clear(llama)
            llama.eval(tokens)
            state = self._save_seq_state(llama)
        return PinnedPrefix(key, text, tuple(tokens), self.fingerprint(key, text), state)

    def save_pinned(self, prefix: PinnedPrefix, path: Path) -> None:
        """Write the state with its fingerprint, atomically (temp file + rename), readable by the owner only."""
        blob = bytes(prefix.state)
        header = {
            "fingerprint": dict(prefix.fingerprint),
            "token_ids": list(prefix.token_ids),
            "state_size": len(blob),
            "state_sha256": hashlib.sha256(blob).hexdigest(),
        }
        data = _STATE_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + blob
        atomic.write_bytes(Path(path), data, mode=0o600)  # the KV cache encodes the pinned knowledge

    def load_pinned(self, path: Path, key: str, text: str) -> PinnedPrefix:
        """A pinned prefix from `path`; StalePinnedPrefix unless it was made by this model and context size, for
        this key and this very text; LocalModelError if the file is unreadable or damaged."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise LocalModelError(f"pinned state {path} does not exist") from None
        except OSError as exc:
            raise LocalModelError(f"cannot read pinned state {path}: {exc.strerror or exc}") from None
        header, blob = _parse_state_file(path, raw)
        expected = self.fingerprint(key, text)
        found = header.get("fingerprint")
        if not isinstance(found, dict) or found != expected:
            changed = sorted(k for k in expected if not isinstance(found, dict) or found.get(k) != expected[k])
            raise StalePinnedPrefix(f"pinned state {path} is stale ({', '.join(changed)} changed); pin it again")
        with self._lock:
            llama = self._load()
            tokens = self._tokenize(llama, text, bos=True)
            if header.get("token_ids") != tokens:
                raise StalePinnedPrefix(f"pinned state {path} was made with another tokenization; pin it again")
            state = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
            # Apply it once now, so a state llama.cpp refuses is reported here and not in the middle of a draft.
            self._restore(llama, tokens, state, path)
        return PinnedPrefix(key, text, tuple(tokens), expected, state, from_file=True)

    def load_or_pin(self, text: str, key: str, path: Path | None) -> PinnedPrefix:
        """The saved state when it is fresh, otherwise pin anew and save (a save that fails only costs the reuse
        across restarts; the returned prefix works either way)."""
        if path is not None and Path(path).exists():
            try:
                return self.load_pinned(path, key, text)
            except LocalModelError as exc:  # stale or damaged: recompute below and overwrite
                log.info("pinning again: %s", exc)
        prefix = self.pin(text, key)
        if path is not None:
            try:
                self.save_pinned(prefix, path)
            except OSError as exc:
                log.warning("could not save the pinned state to %s: %s", path, exc.strerror or exc)
        return prefix

    # --- drafting --------------------------------------------------------------------------------------

    def draft(
        self,
        prompt: str,
        *,
        prefix: PinnedPrefix | None = None,
        cag: bool = True,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        presence_penalty: float | None = None,
        on_token: Callable[[str], None] | None = None,
    ) -> Draft:
        """Complete `prompt`. With `prefix` the prompt must start with `prefix.text`; then only the rest is
        evaluated (CAG), unless `cag=False`: the same tokens evaluated from an empty context, with the same batch
        boundaries, the baseline that CAG's output and time-to-first-token are compared against.

        `on_token` receives the text as it is generated (never any part of a stop sequence).
        """
        cfg = self.config
        try:
            sampling = _Sampling(
                temperature=cfg.temperature if temperature is None else temperature,
                top_p=cfg.top_p if top_p is None else top_p,
                max_tokens=cfg.max_tokens if max_tokens is None else max_tokens,
                presence_penalty=cfg.presence_penalty if presence_penalty is None else presence_penalty,
            )
        except ValidationError as exc:
            problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors(include_url=False))
            raise ValueError(f"bad sampling values: {problems}") from None
        if prefix is not None:
            if not prompt.startswith(prefix.text):
                raise LocalModelError(f"the prompt does not start with the pinned knowledge {prefix.key!r}")
            self._check_prefix(prefix)

        with self._lock:
            llama = self._load()
            started = time.perf_counter()
            if prefix is not None:
                head = list(prefix.token_ids)
                tail = self._tokenize(llama, prompt[len(prefix.text) :], bos=False)
            else:
                head, tail = [], self._tokenize(llama, prompt, bos=True)
            tokens = head + tail
            room = cfg.n_ctx - len(tokens)
            if room < 1:
                raise PromptTooLong(f"the prompt is {len(tokens)} tokens; the context holds {cfg.n_ctx}")
            cag_used = prefix is not None and cag
            limit = min(sampling.max_tokens, room)
            try:
                evaluated = self._evaluate(llama, prefix if cag_used else None, head, tail)
                return self._generate(llama, tokens, sampling, limit, started, evaluated, on_token, cag_used=cag_used)
            except RuntimeError as exc:  # a failed llama_decode; the next draft clears or restores the context anyway
                raise LocalModelError(f"llama.cpp failed during the draft: {exc}") from exc

    def _check_prefix(self, prefix: PinnedPrefix) -> None:
        mine = self.fingerprint(prefix.key, prefix.text)
        if dict(prefix.fingerprint) != mine:
            raise StalePinnedPrefix(f"the pinned knowledge {prefix.key!r} was made for another model or context size")

    def _evaluate(self, llama: Any, prefix: PinnedPrefix | None, head: list[int], tail: list[int]) -> int:
        """Bring the context to the end of the prompt; the number of prompt tokens llama.cpp had to evaluate."""
        if prefix is not None:
            self._restore(llama, head, prefix.state, None)
            if tail:
                llama.eval(tail)
                return len(tail)
            # Nothing after the pin: the saved state holds no logits, so evaluate the last pinned token again.
            llama.n_tokens = len(head) - 1
            llama.eval(head[-1:])
            return 1
        # No reuse of any kind: llama-cpp-python's own `generate` keeps the previous prompt's KV cache and skips
        # the longest common prefix, which would make a run "without CAG" silently reuse the pinned knowledge
        # (or the last question). Clearing the context first makes it evaluate every token of this prompt.
        self._clear(llama)
        # The pinned part and the rest as separate evals: the same batch boundaries as pin() + a CAG draft, so
        # the two compute the same numbers and their outputs can be compared token for token.
        if head:
            llama.eval(head)
        llama.eval(tail)
        return len(head) + len(tail)

    def _generate(
        self,
        llama: Any,
        prompt: list[int],
        sampling: _Sampling,
        limit: int,
        started: float,
        evaluated: int,
        on_token: Callable[[str], None] | None,
        *,
        cag_used: bool,
    ) -> Draft:
        llama_cpp = _llama_cpp()
        cfg = self.config
        ids: list[int] = []
        logprobs: list[float] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        emitted = 0
        first: float | None = None
        finish: FinishReason = "length"
        cut: int | None = None
        # The prompt is already evaluated and the context holds exactly it: `generate` samples at once
        # (its "full prompt already cached" path) with llama.cpp's sampler chain, seeded per draft.
        stream = llama.generate(
            prompt,
            top_k=cfg.top_k,
            top_p=sampling.top_p,
            min_p=cfg.min_p,
            temp=sampling.temperature,
            repeat_penalty=cfg.repeat_penalty,
            presence_penalty=sampling.presence_penalty,
        )
        try:
            for token in stream:
                if first is None:
                    first = time.perf_counter()
                ids.append(int(token))
                logprobs.append(self._logprob(llama, int(token)))
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                text += decoder.decode(llama.detokenize([token]))
                cut = _first_stop(text, cfg.stop)
                if cut is not None:
                    finish = "stop"
                    break
                if on_token is not None:
                    safe = len(text) - _held_back(text, cfg.stop)
                    if safe > emitted:
                        on_token(text[emitted:safe])
                        emitted = safe
                if len(ids) >= limit:
                    break
        finally:
            stream.close()
        text += decoder.decode(b"", final=True)
        if cut is None:
            cut = _first_stop(text, cfg.stop)
        text = text if cut is None else text[:cut]
        if on_token is not None and len(text) > emitted:
            on_token(text[emitted:])
        ended = time.perf_counter()
        first = first if first is not None else ended
        rate = (len(ids) - 1) / (ended - first) if len(ids) > 1 and ended > first else 0.0
        return Draft(
            text=text,
            token_ids=tuple(ids),
            token_logprobs=tuple(logprobs),
            mean_logprob=math.fsum(logprobs) / len(logprobs) if logprobs else float("-inf"),
            prompt_tokens=len(prompt),
            prompt_tokens_evaluated=evaluated,
            ttft_seconds=first - started,
            total_seconds=ended - started,
            tokens_per_second=rate,
            finish_reason=finish,
            cag_used=cag_used,
        )

    def _logprob(self, llama: Any, token: int) -> float:
        """log p(token) under the model: log-softmax of the logits the token was sampled from (the last decode's)."""
        llama_cpp = _llama_cpp()
        pointer = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(llama.n_vocab(),)).astype(np.float64)
        top = float(logits.max())
        return float(logits[token] - top - math.log(float(np.exp(logits - top).sum())))

    # --- llama.cpp state -------------------------------------------------------------------------------
    # Llama.save_state()/load_state() would also copy llama-cpp-python's logits buffer (n_batch x vocab floats:
    # 268 MB for Gemma's 262k vocabulary) each time, slower than evaluating the prefix again. The sequence
    # state of the KV cache is all a continuation needs; it is a few MB.

    @staticmethod
    def _clear(llama: Any) -> None:
        llama_cpp = _llama_cpp()
        llama.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llama.ctx), True)

    @staticmethod
    def _save_seq_state(llama: Any) -> ctypes.Array[ctypes.c_uint8]:
        llama_cpp = _llama_cpp()
        size = int(llama_cpp.llama_state_seq_get_size(llama.ctx, _SEQ))
        buffer = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(llama.ctx, buffer, size, _SEQ))
        if written <= 0 or written > size:
            raise LocalModelError("llama.cpp could not save the pinned state")
        if written == size:
            return buffer
        compact = (ctypes.c_uint8 * written)()
        ctypes.memmove(compact, buffer, written)
        return compact

    @staticmethod
    def _restore(llama: Any, tokens: Sequence[int], state: ctypes.Array[ctypes.c_uint8], path: Path | None) -> None:
        llama_cpp = _llama_cpp()
        LocalModel._clear(llama)
        if int(llama_cpp.llama_state_seq_set_data(llama.ctx, state, len(state), _SEQ)) != len(state):
            LocalModel._clear(llama)
            where = f" from {path}" if path is not None else ""
            raise LocalModelError(f"llama.cpp refused the pinned state{where} (damaged?); pin it again")
        # llama-cpp-python's view of the context must match what llama.cpp now holds.
        llama.input_ids[: len(tokens)] = tokens
        llama.n_tokens = len(tokens)


# --- helpers ---------------------------------------------------------------------------------------------


def _llama_cpp() -> Any:
    """llama_cpp, imported on first use: the prompt helpers and the router's users need no native library."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise LocalModelError("llama-cpp-python is not installed (pip install llama-cpp-python)") from exc
    return llama_cpp


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop sequence (not to be streamed yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _parse_state_file(path: Path, raw: bytes) -> tuple[dict[str, Any], bytes]:
    if not raw.startswith(_STATE_MAGIC):
        raise LocalModelError(f"{path} is not a pinned-state file")
    end = raw.find(b"\n", len(_STATE_MAGIC), len(_STATE_MAGIC) + _MAX_HEADER_BYTES)
    if end < 0:
        raise LocalModelError(f"pinned state {path} is damaged (no header)")
    try:
        header = json.loads(raw[len(_STATE_MAGIC) : end])
    except ValueError:
        raise LocalModelError(f"pinned state {path} is damaged (bad header)") from None
    if not isinstance(header, dict):
        raise LocalModelError(f"pinned state {path} is damaged (bad header)")
    blob = raw[end + 1 :]
    if len(blob) != header.get("state_size") or hashlib.sha256(blob).hexdigest() != header.get("state_sha256"):
        raise LocalModelError(f"pinned state {path} is damaged (truncated or altered)")
    return header, blob
