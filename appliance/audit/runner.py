"""Run the catalog's checks against targets, in parallel, and assemble the report.

Each target gets its own `pytest` process (the plugin in plugin.py), so one unreachable host or one
hanging check costs only that target. Results come back as JSON lines; waivers are applied here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from appliance import __version__
from appliance.audit import evidence as ev
from appliance.audit import waivers as waiver_file
from appliance.audit.catalog import CHECKS_DIR, Catalog, Control
from appliance.audit.report import AppliedWaiver, ExpiredWaiver, Report, Result, TargetInfo, scores
from appliance.audit.targets import TargetSpec

TARGET_TIMEOUT_S = 900.0
Progress = Callable[[str, int, int], None]  # (target, results so far, checks in all)


@dataclass
class TargetRun:
    spec: TargetSpec
    lines: list[dict[str, object]] = field(default_factory=list)
    error: str | None = None


def _quiet(_target: str, _done: int, _total: int) -> None:
    pass


def run_target(
    spec: TargetSpec,
    controls: Sequence[Control],
    *,
    progress: Progress = _quiet,
    timeout: float = TARGET_TIMEOUT_S,
    checks_dir: Path = CHECKS_DIR,
) -> TargetRun:
    """The checks of `controls` against one target; an unreachable target is an error on the run, not a crash."""
    run = TargetRun(spec)
    if not controls:
        return run
    with tempfile.TemporaryDirectory(prefix="membria-audit-") as tmp:
        spec_file = Path(tmp) / "target.json"
        spec_file.write_text(spec.model_copy(update={"control_dir": tmp}).model_dump_json())
        results = Path(tmp) / "results.jsonl"
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(CHECKS_DIR / "pytest.ini"),
            "--rootdir",
            str(checks_dir),
            "--confcutdir",
            str(checks_dir),
            "-p",
            "appliance.audit.plugin",
            "--audit-target",
            str(spec_file),
            "--audit-results",
            str(results),
            *[str(checks_dir / c.check) for c in controls],
        ]
        with subprocess.Popen(
            argv, cwd=checks_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
                run.error = f"the checks did not finish within {timeout:.0f} s"
        if results.exists():
            run.lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        progress(spec.name, len(run.lines), len(controls))
        # pytest's own exit codes: 0 all passed, 1 some failed; anything else means the run itself broke.
        if run.error is None and proc.returncode not in (0, 1):
            tail = "\n".join(output.strip().splitlines()[-15:])
            run.error = f"the check run exited {proc.returncode}: {ev.redact(tail)}"
    return run


def run(
    site_name: str,
    catalog: Catalog,
    targets: Sequence[TargetSpec],
    *,
    waivers: Sequence[waiver_file.Waiver] = (),
    parallel: int = 5,
    today: date | None = None,
    progress: Progress = _quiet,
    checks_dir: Path = CHECKS_DIR,
) -> Report:
    today = today or datetime.now(UTC).date()
    jobs = [(spec, catalog.for_kind(spec.kind)) for spec in targets]
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(jobs)))) as pool:
        runs = list(pool.map(lambda job: run_target(job[0], job[1], progress=progress, checks_dir=checks_dir), jobs))
    results: list[Result] = []
    infos: list[TargetInfo] = []
    for target_run, (spec, controls) in zip(runs, jobs, strict=True):
        infos.append(TargetInfo(name=spec.name, kind=spec.kind, connection=spec.describe(), error=target_run.error))
        by_check = {str(line["check"]): line for line in target_run.lines}
        for control in controls:
            line = by_check.get(control.check)
            results.append(_result(control, spec, line, target_run.error, list(waivers), today))
    expired = [
        ExpiredWaiver(control=w.control, approver=w.approver, expired=w.expires) for w in waivers if not w.active(today)
    ]
    return Report(
        site=site_name,
        generated_at=datetime.now(UTC),
        appliance_version=__version__,
        catalog_digest=catalog.digest(),
        targets=infos,
        results=results,
        scores=scores(results),
        expired_waivers=expired,
        cis_not_covered=catalog.cis_not_covered(),
    )


def _result(
    control: Control,
    spec: TargetSpec,
    line: dict[str, object] | None,
    target_error: str | None,
    waivers: list[waiver_file.Waiver],
    today: date,
) -> Result:
    if line is None:
        status, message, evidence, duration = "error", target_error or "the check did not report", [], 0.0
    else:
        status = str(line["status"])
        message = str(line["message"])
        evidence = [ev.Evidence.model_validate(e) for e in line["evidence"]]  # type: ignore[attr-defined]
        duration = float(line["duration_s"])  # type: ignore[arg-type]
    applied = None
    if status in ("fail", "error"):
        waiver = waiver_file.find(waivers, control.id, spec.name, today)
        if waiver is not None:
            applied = AppliedWaiver(
                justification=waiver.justification, approver=waiver.approver, expires=waiver.expires
            )
            status = "waived"
    fix = control.remediation
    where = ", ".join(
        ([f"role {fix.role}"] if fix.role else []) + ([f"image step {fix.image_step}"] if fix.image_step else [])
    )
    return Result(
        control=control.id,
        title=control.title,
        severity=control.severity,
        frameworks=control.frameworks,
        target=spec.name,
        status=status,
        message=message,
        evidence=evidence,
        waiver=applied,
        remediation=f"{where}: {control.remediation.text}",
        duration_s=duration,
    )
