"""The audit report: every result with its evidence, the waivers that applied, and a score per framework.

This model is the JSON report's schema (`report.schema.json` is generated from it and checked in; a unit
test fails when the two drift). The JUnit and HTML renderings are made from it, never from raw results.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.audit.catalog import FRAMEWORK_TITLES, CisRecommendation, FrameworkRef, Kind, Severity
from appliance.audit.evidence import Evidence

SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")
Status = Literal["pass", "fail", "error", "not_applicable", "waived"]
STATUSES: tuple[Status, ...] = ("pass", "fail", "error", "not_applicable", "waived")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AppliedWaiver(_Model):
    justification: str
    approver: str
    expires: date


class Result(_Model):
    control: str = Field(description="the control id (catalog)")
    title: str
    severity: Severity
    frameworks: list[FrameworkRef]
    target: str = Field(description="the target's name")
    status: Status
    message: str = Field(description="why it failed, errored or does not apply; empty when it passed")
    evidence: list[Evidence] = Field(description="every command the check ran, with output excerpt and time")
    waiver: AppliedWaiver | None = Field(default=None, description="the waiver that turned a failure into waived")
    remediation: str = Field(description="the role or image step that fixes it, and how")
    duration_s: float


class TargetInfo(_Model):
    name: str
    kind: Kind
    connection: str = Field(description="how it was reached (ssh / chroot / local)")
    error: str | None = Field(default=None, description="set when the target could not be audited at all")


class Score(_Model):
    framework: str
    title: str
    passed: int
    failed: int
    errors: int
    waived: int
    not_applicable: int
    percent: float = Field(description="passed / (passed + failed + errors) x 100; 100 when nothing was scored")


class ExpiredWaiver(_Model):
    control: str
    approver: str
    expired: date


class Report(_Model):
    schema_version: Literal[1] = 1
    report: Literal["membria-audit"] = "membria-audit"
    site: str
    generated_at: datetime
    appliance_version: str
    catalog_digest: str = Field(description="sha256 over the catalog YAML and the check sources")
    targets: list[TargetInfo]
    results: list[Result]
    scores: list[Score]
    expired_waivers: list[ExpiredWaiver] = Field(description="waivers in the file that no longer waive anything")
    cis_not_covered: list[CisRecommendation] = Field(
        description="automated CIS Level 1 recommendations no control checks yet (id and title)"
    )

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status in ("fail", "error")]

    @property
    def ok(self) -> bool:
        return not self.failures and all(t.error is None for t in self.targets)

    def counts(self) -> dict[str, int]:
        return {status: sum(1 for r in self.results if r.status == status) for status in STATUSES}


def scores(results: list[Result]) -> list[Score]:
    out = []
    for framework, title in FRAMEWORK_TITLES.items():
        mine = [r for r in results if any(ref.framework == framework for ref in r.frameworks)]
        count = {status: sum(1 for r in mine if r.status == status) for status in STATUSES}
        scored = count["pass"] + count["fail"] + count["error"]
        out.append(
            Score(
                framework=framework,
                title=title,
                passed=count["pass"],
                failed=count["fail"],
                errors=count["error"],
                waived=count["waived"],
                not_applicable=count["not_applicable"],
                percent=round(100.0 * count["pass"] / scored, 1) if scored else 100.0,
            )
        )
    return out


def json_schema() -> str:
    return json.dumps(Report.model_json_schema(), indent=2, sort_keys=True) + "\n"
