"""The edge's local model on the real Gemma 3 270M: drafts with real token log-probabilities, cache-augmented
generation (fewer prompt tokens evaluated, the same output), pinned-state files that refuse to be stale, and
clear errors for unusable model files. Timing is not asserted here (bench/edge.py measures TTFT)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from appliance.lab.model import ensure_gemma
from runtime.edge.local_model import (
    Draft,
    LocalModel,
    LocalModelConfig,
    LocalModelError,
    PinnedPrefix,
    PromptTooLong,
    StalePinnedPrefix,
    pinned_text,
    prompt_for,
)
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.integration

CORPUS = EXAMPLES / "corpus" / "engineering"
IN_CONTEXT = "What is the alarm threshold for the P-12 bearing temperature?"
NONSENSE = "Who won the 1987 snooker world championship on Mars?"


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_gemma()


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[LocalModel]:
    m = LocalModel(LocalModelConfig(model_path=model_path, n_ctx=1024, temperature=0.0, max_tokens=24))
    yield m
    m.close()


@pytest.fixture(scope="module")
def knowledge() -> str:
    return pinned_text([(CORPUS / n).read_text() for n in ("safety-procedure-vx-55.md", "pump-p12-maintenance.md")])


@pytest.fixture(scope="module")
def pinned(model: LocalModel, knowledge: str) -> PinnedPrefix:
    return model.pin(knowledge, "engineering")


@pytest.fixture(scope="module")
def small_knowledge() -> str:
    """A short pin, for tests about the mechanics rather than the answers."""
    return pinned_text([(CORPUS / "incident-reporting.txt").read_text()])


def _prompt_evals(model: LocalModel) -> int:
    """llama.cpp's own count of prompt tokens decoded (batches of more than one token) since the last reset."""
    return int(llama_cpp.llama_perf_context(model._llama.ctx).n_p_eval)


def _reset_perf(model: LocalModel) -> None:
    llama_cpp.llama_perf_context_reset(model._llama.ctx)


# --- drafts and their log-probabilities ------------------------------------------------------------------


def test_draft_has_text_and_real_per_token_logprobs(model: LocalModel, pinned: PinnedPrefix) -> None:
    known = model.draft(prompt_for(IN_CONTEXT, prefix=pinned), prefix=pinned)
    unknown = model.draft(prompt_for(NONSENSE, prefix=pinned), prefix=pinned)
    assert "85" in known.text  # the bearing alarm threshold is 85 °C in the pinned maintenance schedule
    assert known.finish_reason == "stop" and "\n" not in known.text
    for d in (known, unknown):
        assert d.tokens == len(d.token_logprobs) >= 1
        assert all(math.isfinite(lp) and lp <= 0 for lp in d.token_logprobs)
        assert d.mean_logprob == pytest.approx(sum(d.token_logprobs) / d.tokens)
        assert math.isfinite(d.mean_logprob) and d.mean_logprob < 0
    assert len(set(known.token_logprobs)) > 1  # a value per token, not a constant
    # The model is surer of an answer that stands in its context than of one about nothing it knows.
    assert known.mean_logprob > unknown.mean_logprob + 0.5


def test_logprobs_match_an_independent_scoring(model: LocalModel, model_path: Path) -> None:
    """Re-score the draft with a second llama.cpp context that keeps the logits of every position."""
    prompt = "Question: What is the capital of France?\nAnswer:"
    d = model.draft(prompt, max_tokens=8)
    scorer = llama_cpp.Llama(model_path=str(model_path), n_ctx=128, logits_all=True, verbose=False)
    try:
        tokens = scorer.tokenize(prompt.encode(), add_bos=True, special=False)
        scorer.eval(tokens + list(d.token_ids))
        logprobs = llama_cpp.Llama.logits_to_logprobs(scorer.scores[: scorer.n_tokens])
        expected = [float(logprobs[len(tokens) - 1 + i][t]) for i, t in enumerate(d.token_ids)]
    finally:
        scorer.close()
    # Batched vs one-token-at-a-time evaluation differs in the last bits only.
    assert np.allclose(d.token_logprobs, expected, atol=0.05), (d.token_logprobs, expected)


def test_streaming_stops_and_length(model: LocalModel, pinned: PinnedPrefix) -> None:
    prompt = prompt_for(IN_CONTEXT, prefix=pinned)
    pieces: list[str] = []
    streamed = model.draft(prompt, prefix=pinned, on_token=pieces.append)
    assert "".join(pieces) == streamed.text and len(pieces) > 1
    short = model.draft(prompt, prefix=pinned, max_tokens=3)
    assert short.finish_reason == "length" and short.tokens == 3
    assert streamed.text.startswith(short.text)


def test_sampling_arguments_are_validated(model: LocalModel) -> None:
    with pytest.raises(ValueError, match="temperature"):
        model.draft("Question: x\nAnswer:", temperature=5)
    with pytest.raises(ValueError, match="max_tokens"):
        model.draft("Question: x\nAnswer:", max_tokens=0)


# --- cache-augmented generation --------------------------------------------------------------------------


def test_cag_evaluates_only_the_question_and_answers_the_same(model: LocalModel, pinned: PinnedPrefix) -> None:
    history = [("user", "Which pump feeds boiler B?"), ("assistant", "P-12.")]
    prompt = prompt_for(IN_CONTEXT, ["Feed pump P-12 supplies boiler B."], history, prefix=pinned)

    _reset_perf(model)
    with_cag = model.draft(prompt, prefix=pinned)
    cag_evals = _prompt_evals(model)
    _reset_perf(model)
    baseline = model.draft(prompt, prefix=pinned, cag=False)
    baseline_evals = _prompt_evals(model)
    plain = model.draft(prompt)  # no prefix at all: the prompt tokenized and evaluated in one go
    again = model.draft(prompt, prefix=pinned)  # the pinned state survives other drafts

    assert with_cag.cag_used and not baseline.cag_used and not plain.cag_used
    assert with_cag.prompt_tokens == baseline.prompt_tokens == plain.prompt_tokens  # a clean token boundary
    assert with_cag.prompt_tokens_evaluated == with_cag.prompt_tokens - pinned.tokens
    assert baseline.prompt_tokens_evaluated == plain.prompt_tokens_evaluated == baseline.prompt_tokens
    assert with_cag.prompt_tokens_evaluated < baseline.prompt_tokens_evaluated / 5
    # llama.cpp's own counters agree: the baseline really evaluated everything (no implicit prefix reuse).
    assert cag_evals == with_cag.prompt_tokens_evaluated
    assert baseline_evals == baseline.prompt_tokens

    # Same tokens, same batch boundaries: CAG computes the same numbers, so greedy output is identical.
    assert with_cag.token_ids == baseline.token_ids == again.token_ids
    assert with_cag.text == baseline.text and with_cag.text
    assert with_cag.token_logprobs == pytest.approx(baseline.token_logprobs, abs=1e-5)
    # Evaluated in other batches, the logits differ in the last bits: near-ties may later go another way,
    # so only the first token is asserted.
    assert plain.token_ids[0] == with_cag.token_ids[0]


def test_cag_after_a_prompt_that_is_only_the_pin(model: LocalModel, small_knowledge: str) -> None:
    small = model.pin(small_knowledge, "incidents")
    d = model.draft(small.text, prefix=small, max_tokens=4)
    assert d.cag_used and d.prompt_tokens == small.tokens and d.prompt_tokens_evaluated == 1 and d.tokens >= 1
    # The saved state holds no logits, so the last pinned token is evaluated again, alone: not the batch the
    # baseline computed it in, so the logits agree only closely and a near-tie may be sampled the other way.
    # The greedy token's log-probability (the maximum, continuous in the logits) must agree.
    baseline = model.draft(small.text, prefix=small, cag=False, max_tokens=4)
    assert baseline.prompt_tokens_evaluated == small.tokens
    assert d.token_logprobs[0] == pytest.approx(baseline.token_logprobs[0], abs=0.05)


def test_prefix_must_match_the_prompt_and_the_model(model: LocalModel, pinned: PinnedPrefix, model_path: Path) -> None:
    with pytest.raises(LocalModelError, match="does not start with the pinned knowledge 'engineering'"):
        model.draft(prompt_for(IN_CONTEXT), prefix=pinned)
    other = LocalModel(LocalModelConfig(model_path=model_path, n_ctx=512))
    with pytest.raises(StalePinnedPrefix, match="another model or context size"):
        other.draft(prompt_for(IN_CONTEXT, prefix=pinned), prefix=pinned)
    assert not other.loaded  # refused before loading anything


def test_pinned_state_file_round_trip(model: LocalModel, pinned: PinnedPrefix, knowledge: str, tmp_path: Path) -> None:
    path = tmp_path / "pinned.llstate"
    model.save_pinned(pinned, path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = model.load_pinned(path, "engineering", knowledge)
    assert loaded.from_file and loaded.token_ids == pinned.token_ids
    prompt = prompt_for(IN_CONTEXT, prefix=loaded)
    from_file, in_memory = model.draft(prompt, prefix=loaded), model.draft(prompt, prefix=pinned)
    assert from_file.cag_used and from_file.token_ids == in_memory.token_ids


def test_stale_or_damaged_pinned_files_are_refused(
    model: LocalModel, pinned: PinnedPrefix, knowledge: str, model_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "pinned.llstate"
    model.save_pinned(pinned, path)
    with pytest.raises(StalePinnedPrefix, match=r"stale \(text_sha256 changed\)"):
        model.load_pinned(path, "engineering", knowledge.replace("85 °C", "95 °C"))
    with pytest.raises(StalePinnedPrefix, match=r"\(key changed\)"):
        model.load_pinned(path, "sales", knowledge)
    bigger = LocalModel(LocalModelConfig(model_path=model_path, n_ctx=2048))
    with pytest.raises(StalePinnedPrefix, match=r"\(n_ctx changed\)"):
        bigger.load_pinned(path, "engineering", knowledge)
    assert not bigger.loaded

    raw = path.read_bytes()
    (tmp_path / "flipped").write_bytes(raw[:-100] + bytes([raw[-100] ^ 0xFF]) + raw[-99:])
    (tmp_path / "short").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "other").write_bytes(b"not a state file")
    for name in ("flipped", "short"):
        with pytest.raises(LocalModelError, match="damaged"):
            model.load_pinned(tmp_path / name, "engineering", knowledge)
    with pytest.raises(LocalModelError, match="not a pinned-state file"):
        model.load_pinned(tmp_path / "other", "engineering", knowledge)
    with pytest.raises(LocalModelError, match="does not exist"):
        model.load_pinned(tmp_path / "absent", "engineering", knowledge)


def test_load_or_pin_reuses_a_fresh_file_and_replaces_a_stale_one(
    model: LocalModel, small_knowledge: str, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "pinned.llstate"
    first = model.load_or_pin(small_knowledge, "incidents", path)
    assert not first.from_file and path.exists()
    assert model.load_or_pin(small_knowledge, "incidents", path).from_file
    changed = small_knowledge.replace("24 hours", "12 hours")
    assert changed != small_knowledge
    recomputed = model.load_or_pin(changed, "incidents", path)
    assert not recomputed.from_file
    assert model.load_pinned(path, "incidents", changed).from_file  # the file now holds the new text


def test_too_long_prompts_and_pins(model: LocalModel) -> None:
    long_text = "pump valve boiler " * 400  # ~1200 tokens > n_ctx 1024
    with pytest.raises(PromptTooLong, match="context holds 1024"):
        model.draft(long_text)
    with pytest.raises(PromptTooLong, match="pin less"):
        model.pin(long_text, "too-much")


def test_one_generation_at_a_time(model: LocalModel, pinned: PinnedPrefix) -> None:
    """Drafts with and without the pin from four threads: each gets what it gets alone (the lock keeps one
    draft's context from being restored or cleared under another)."""
    jobs: list[tuple[str, PinnedPrefix | None]] = [
        (prompt_for(IN_CONTEXT, prefix=pinned), pinned),
        ("Question: What is the capital of France?\nAnswer:", None),
        (prompt_for("How fast may the VX-55 handwheel be turned?", prefix=pinned), pinned),
        ("Question: How many legs does a spider have?\nAnswer:", None),
    ]
    expected = [model.draft(prompt, prefix=prefix, max_tokens=8).token_ids for prompt, prefix in jobs]
    results: dict[int, Draft] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = model.draft(jobs[i][0], prefix=jobs[i][1], max_tokens=8)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i].token_ids for i in range(len(jobs))] == expected


# --- prompts and model files -----------------------------------------------------------------------------


def test_prompt_layout() -> None:
    knowledge = pinned_text(["Valve VX-55 isolates the header.\n\n\nTwo people are required.", "  "])
    assert knowledge == (
        "Answer the question briefly, using the context.\n\n"
        "Context:\nValve VX-55 isolates the header.\nTwo people are required.\n\n"
    )
    prompt = prompt_for(
        "  How   do I close it? ",
        ["Turn the handwheel slowly."],
        [("user", "Which valve?"), ("assistant", "VX-55.")],
        prefix=knowledge,
    )
    assert prompt == (
        knowledge + "Turn the handwheel slowly.\n\n"
        "Question: Which valve?\nAnswer: VX-55.\n\n"
        "Question: How do I close it?\nAnswer:"
    )
    assert prompt_for("Why?") == "Answer the question briefly, using the context.\n\nQuestion: Why?\nAnswer:"
    assert prompt_for("Why?", ["A."]) == pinned_text(["A."]) + "Question: Why?\nAnswer:"
    with pytest.raises(ValueError, match="empty"):
        prompt_for("   ")
    with pytest.raises(ValueError, match="unknown conversation role 'system'"):
        prompt_for("Why?", history=[("system", "x")])


def test_unusable_model_files(model_path: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(LocalModelError, match=f"model file {missing} does not exist"):
        LocalModel(LocalModelConfig(model_path=missing)).draft("Question: x\nAnswer:")
    with pytest.raises(LocalModelError, match="is a directory"):
        LocalModel(LocalModelConfig(model_path=tmp_path)).ensure_loaded()
    text = tmp_path / "notes.gguf"
    text.write_text("these are notes, not weights")
    with pytest.raises(LocalModelError, match="is not a GGUF file"):
        LocalModel(LocalModelConfig(model_path=text)).ensure_loaded()
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as fh:
        truncated.write_bytes(fh.read(2_000_000))
    broken = LocalModel(LocalModelConfig(model_path=truncated))
    with pytest.raises(LocalModelError, match="could not load"):
        broken.ensure_loaded()
    assert not broken.loaded
