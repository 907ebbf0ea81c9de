"""Helpers for the tests of the appliance's own controls (framework `membria`) through the audit runner."""

from __future__ import annotations

from appliance.audit.catalog import CONTROLS_DIR, Catalog, CisRecommendation, CisReference, ControlFile
from appliance.audit.report import Report, Result
from runtime.common.yamldoc import load_model


def membria_catalog(only: set[str] | None = None) -> Catalog:
    """The membria controls (or some of them). The CIS controls live in other files and are not under test here;
    the CIS reference list only feeds the report's coverage, so a one-line stand-in list keeps it valid."""
    controls = load_model(CONTROLS_DIR / "controls-membria.yaml", ControlFile).controls
    if only is not None:
        controls = [c for c in controls if c.id in only]
        assert {c.id for c in controls} == only, f"unknown controls: {only - {c.id for c in controls}}"
    cis = CisReference(benchmark="not under test here", recommendations=[CisRecommendation(id="7.1.1", title="-")])
    return Catalog(controls=controls, cis=cis)


def by_control(report: Report) -> dict[str, Result]:
    return {r.control: r for r in report.results}


def explain(report: Report) -> str:
    lines = [f"{r.control} on {r.target}: {r.status}: {r.message}" for r in report.results]
    lines += [f"target {t.name}: {t.error}" for t in report.targets if t.error]
    return "\n".join(lines)


def statuses(report: Report) -> dict[str, str]:
    return {r.control: r.status for r in report.results}
