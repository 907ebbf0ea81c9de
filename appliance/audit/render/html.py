"""The report as one self-contained HTML page (report.html.j2): inline CSS, no script, nothing fetched.

Auditors read it offline, often in air-gapped sites, and hand it on; the JSON report stays the complete record.
Everything from the report is autoescaped: evidence is whatever a command printed on the audited host.
"""

from __future__ import annotations

from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from appliance.audit.catalog import FRAMEWORK_TITLES
from appliance.audit.render.junit import printable, utc, utc_text
from appliance.audit.report import Report, Result

TEMPLATE = "report.html.j2"
SEVERITY_RANK = {"critical": 0, "high": 1, "medium": 2, "low": 3}
STATUS_LABELS = (
    ("pass", "Passed"),
    ("fail", "Failed"),
    ("error", "Errors"),
    ("waived", "Waived"),
    ("not_applicable", "Not applicable"),
)
SOON_DAYS = 30  # a waiver this close to its expiry is shown in red


def _finalize(value: Any) -> Any:
    # Every `{{ }}` goes through here before it is escaped: characters no HTML parser should meet are made visible.
    if isinstance(value, str) and not isinstance(value, Markup):
        return printable(value)
    return value


def _readable(moment: datetime) -> str:
    return utc(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_finalize,
    )
    env.filters["ts"] = _readable
    env.filters["iso"] = utc_text
    return env


def _by_severity(result: Result) -> tuple[int, str, str]:
    return (SEVERITY_RANK.get(result.severity, 9), result.control, result.target)


def _by_control(result: Result) -> tuple[str, str]:
    return (result.control, result.target)


def context(report: Report) -> dict[str, Any]:
    """What the template shows, ordered: failures worst first, the rest by control."""
    today = utc(report.generated_at).date()

    def due(expires: date) -> tuple[str, bool]:
        left = (expires - today).days
        if left < 0:
            return f"expired {-left} day{'' if left == -1 else 's'} before this report", True
        if left == 0:
            return "expires on the day of this report", True
        return f"in {left} day{'' if left == 1 else 's'}", left <= SOON_DAYS

    per_target: dict[str, int] = {}
    for result in report.results:
        per_target[result.target] = per_target.get(result.target, 0) + 1
    return {
        "report": report,
        "counts": report.counts(),
        "status_labels": STATUS_LABELS,
        "per_target": per_target,
        "broken_targets": sum(1 for t in report.targets if t.error),
        "failures": sorted(report.failures, key=_by_severity),
        "waived": sorted((r for r in report.results if r.status == "waived"), key=_by_severity),
        "rest": sorted((r for r in report.results if r.status in ("pass", "not_applicable")), key=_by_control),
        "cis_not_covered": [(rec.id, rec.title) for rec in report.cis_not_covered],
        "titles": FRAMEWORK_TITLES,
        "due": due,
    }


def html_page(report: Report) -> bytes:
    """The report as one HTML page (UTF-8)."""
    return _environment().get_template(TEMPLATE).render(context(report)).encode("utf-8")
