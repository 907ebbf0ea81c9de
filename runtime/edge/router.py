"""The routing decision: answer on the device or escalate to the core, with the reasons.

A pure function of its inputs (the question, the local draft, retrieval coverage, the taxonomy and the labels
of the retrieved chunks), so that every decision can be replayed and tested.

- Confidence is a weighted blend of the draft's per-token probability, exp(mean token log-probability) (the
  geometric mean of the probabilities of the tokens it sampled), and retrieval coverage, both in [0, 1].
  Below θ: escalate ("low-confidence").
- A question that mentions terms of departments outside the device's: escalate ("cross-department").
- A sensitive question (PII, secrets, local-only material, see `sensitivity`): local, always. The reasons that
  would have escalated it are still listed, marked overridden, so the log shows what was given up.
- Otherwise local ("confident").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.edge.sensitivity import DEFAULT_LOCAL_ONLY_LABELS, Finding, check
from runtime.edge.taxonomy import Taxonomy

Route = Literal["local", "escalate"]
ReasonCode = Literal["sensitive", "low-confidence", "cross-department", "no-draft", "confident"]


class DraftLike(Protocol):
    """What the router reads from a draft (runtime.edge.local_model.Draft has it)."""

    @property
    def text(self) -> str: ...

    @property
    def mean_logprob(self) -> float: ...


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    theta: float = Field(default=0.45, gt=0, lt=1, description="escalate when confidence < theta")
    logprob_weight: float = Field(default=0.5, ge=0, description="weight of exp(mean token log-probability)")
    coverage_weight: float = Field(default=0.5, ge=0, description="weight of retrieval coverage")
    local_only_labels: tuple[str, ...] = Field(
        default=DEFAULT_LOCAL_ONLY_LABELS, description="chunk labels (and #tags in a question) that keep it local"
    )
    local_only_keywords: tuple[str, ...] = Field(
        default=(), description="phrases that mark a question local-only, e.g. 'internal only'"
    )

    @model_validator(mode="after")
    def _some_weight(self) -> RouterConfig:
        if self.logprob_weight + self.coverage_weight <= 0:
            raise ValueError("logprob_weight and coverage_weight cannot both be 0")
        return self


@dataclass(frozen=True)
class Reason:
    code: ReasonCode
    detail: str
    overridden: bool = False  # it argued for escalation, but the question is sensitive

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "detail": self.detail, "overridden": self.overridden}


@dataclass(frozen=True)
class Decision:
    route: Route
    confidence: float
    sensitive: bool
    reasons: list[Reason]
    departments_needed: list[str]  # every department the taxonomy recognised in the question
    departments_outside: list[str] = field(default_factory=list)  # those the device does not hold
    token_probability: float | None = None  # exp(mean logprob); None without a usable draft
    coverage: float = 0.0
    theta: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def codes(self) -> list[str]:
        return [r.code for r in self.reasons]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only: logged and stored with every answer. Findings carry no matched text."""
        return {
            "route": self.route,
            "confidence": self.confidence,
            "sensitive": self.sensitive,
            "theta": self.theta,
            "token_probability": self.token_probability,
            "coverage": self.coverage,
            "departments_needed": list(self.departments_needed),
            "departments_outside": list(self.departments_outside),
            "reasons": [r.to_json() for r in self.reasons],
            "findings": [{"kind": f.kind, "category": f.category, "description": f.description} for f in self.findings],
        }


def confidence(config: RouterConfig, token_probability: float | None, coverage: float) -> float:
    """The weighted blend, in [0, 1]; a missing draft counts as probability 0."""
    p = token_probability or 0.0
    total = config.logprob_weight + config.coverage_weight
    return (config.logprob_weight * p + config.coverage_weight * coverage) / total


def route(
    question: str,
    *,
    device_departments: Iterable[str],
    draft: DraftLike | None,
    coverage: float,
    config: RouterConfig | None = None,
    taxonomy: Taxonomy | None = None,
    chunk_labels: Iterable[Sequence[str]] = (),
    local_only_labels: Iterable[str] | None = None,
) -> Decision:
    """Decide where `question` is answered. `coverage` in [0, 1] says how well retrieval covered the question;
    `chunk_labels` are the labels of the chunks retrieved for it; `local_only_labels` overrides the config's."""
    config = config or RouterConfig()
    if not (isinstance(coverage, int | float) and 0.0 <= coverage <= 1.0):  # NaN fails both comparisons
        raise ValueError(f"coverage must be a number in [0, 1], not {coverage!r}")
    own = list(dict.fromkeys(device_departments))
    if not own:
        raise ValueError("the device has no departments")

    probability: float | None = None
    no_draft: Reason | None = None
    if draft is None:
        no_draft = Reason("no-draft", "no local draft (the model was not run)")
    elif not draft.text.strip():
        no_draft = Reason("no-draft", f"the local draft is empty (mean token log-probability {draft.mean_logprob:.3f})")
    elif not math.isfinite(draft.mean_logprob):
        no_draft = Reason("no-draft", "the local draft has no token log-probabilities")
    else:
        probability = math.exp(min(0.0, draft.mean_logprob))
    score = confidence(config, probability, coverage)
    numbers = _numbers(config, draft, probability, coverage)

    escalations: list[Reason] = []
    if no_draft is not None:
        escalations.append(no_draft)
    if score < config.theta:
        escalations.append(Reason("low-confidence", f"confidence {score:.3f} < θ {config.theta:.3f}: {numbers}"))

    matched = taxonomy.departments_for(question) if taxonomy is not None else {}
    needed = sorted(matched)
    outside = [d for d in needed if d not in own]
    if outside:
        named = "; ".join(f"{d} ({', '.join(matched[d])})" for d in outside)
        detail = f"the question needs departments outside this device's ({', '.join(own)}): {named}"
        escalations.append(Reason("cross-department", detail))

    labels = config.local_only_labels if local_only_labels is None else tuple(local_only_labels)
    findings = check(question, chunk_labels, local_only_labels=labels, local_only_keywords=config.local_only_keywords)
    confident = Reason("confident", f"confidence {score:.3f} ≥ θ {config.theta:.3f}: {numbers}")

    if findings:
        kinds = list(dict.fromkeys(f.kind for f in findings))
        detail = f"never leaves the device: {', '.join(kinds)} ({'; '.join(f.description for f in findings)})"
        others = [Reason(r.code, r.detail, overridden=True) for r in escalations] or [confident]
        reasons = [Reason("sensitive", detail), *others]
        chosen: Route = "local"
    elif escalations:
        reasons, chosen = escalations, "escalate"
    else:
        reasons, chosen = [confident], "local"
    return Decision(
        route=chosen,
        confidence=score,
        sensitive=bool(findings),
        reasons=reasons,
        departments_needed=needed,
        departments_outside=outside,
        token_probability=probability,
        coverage=float(coverage),
        theta=config.theta,
        findings=findings,
    )


def _numbers(config: RouterConfig, draft: DraftLike | None, probability: float | None, coverage: float) -> str:
    total = config.logprob_weight + config.coverage_weight
    if probability is not None and draft is not None:
        part = f"token probability {probability:.3f} = exp(mean logprob {draft.mean_logprob:.3f})"
    else:
        part = "token probability 0 (no usable draft)"
    return (
        f"{part} × {config.logprob_weight / total:.2f} + retrieval coverage {coverage:.3f} × "
        f"{config.coverage_weight / total:.2f}"
    )
