"""The pytest plugin an audit run loads (`pytest -p appliance.audit.plugin`), one process per target.

It gives checks three fixtures: `host` (testinfra, built from the target spec), `target` (the spec:
name, kind, site facts) and `evidence` (for what a check learns without running a command). Every
command a check runs through `host` is recorded as evidence. Each result becomes one JSON line in the
file named by `--audit-results`; the runner reads them back.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra
import testinfra.host

from appliance.audit import evidence as ev
from appliance.audit.targets import TargetSpec

_current = threading.local()


def _recording_run(original: Any) -> Any:
    def run(self: testinfra.host.Host, command: str, *args: str, **kwargs: Any) -> Any:
        result = original(self, command, *args, **kwargs)
        sink: list[ev.Evidence] | None = getattr(_current, "sink", None)
        if sink is not None:
            text = command % tuple(shlex.quote(str(a)) for a in args) if args else command
            sink.append(
                ev.record(
                    text,
                    result.stdout + (("\n" + result.stderr) if result.stderr.strip() else ""),
                    host=_current.host_name,
                    exit_status=result.rc,
                )
            )
        return result

    return run


class EvidenceLog:
    """The `evidence` fixture: what a check adds by hand (a handshake, a file read on the controller)."""

    def __init__(self, sink: list[ev.Evidence], host_name: str) -> None:
        self._sink = sink
        self._host = host_name

    def add(self, what: str, output: str, exit_status: int | None = None) -> None:
        self._sink.append(ev.record(what, output, host=self._host, exit_status=exit_status))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("membria audit")
    group.addoption("--audit-target", required=True, help="the target spec (JSON file)")
    group.addoption("--audit-results", required=True, help="where to write one JSON line per result")


def pytest_configure(config: pytest.Config) -> None:
    spec = TargetSpec.model_validate_json(Path(config.getoption("--audit-target")).read_text())
    config.stash[_SPEC] = spec
    config.stash[_OUT] = Path(config.getoption("--audit-results")).open("a", encoding="utf-8")
    testinfra.host.Host.run = _recording_run(testinfra.host.Host.run)
    _current.host_name = spec.name


def pytest_unconfigure(config: pytest.Config) -> None:
    out = config.stash.get(_OUT, None)
    if out is not None:
        out.close()


_SPEC = pytest.StashKey[TargetSpec]()
_OUT = pytest.StashKey[Any]()
_SINK = pytest.StashKey[list[ev.Evidence]]()
_STARTED = pytest.StashKey[float]()


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> TargetSpec:
    return request.config.stash[_SPEC]


@pytest.fixture(scope="session")
def host(target: TargetSpec) -> testinfra.host.Host:
    built = target.testinfra_host()
    # testinfra probes the system (uname, os-release) once; that is not evidence for the first check.
    sink, _current.sink = getattr(_current, "sink", None), None
    try:
        # Reachable at all? testinfra's ssh backend raises on exit 255 and returns other failures: either way
        # the target was not audited, and every check must say so instead of failing on empty output.
        try:
            probe = built.run("true")
            problem = "" if probe.rc == 0 else (probe.stderr or probe.stdout or f"exit {probe.rc}")
        except Exception as exc:  # noqa: BLE001 - whatever the backend raises, the reason is in its text
            stderr = getattr(getattr(exc, "args", [None])[0], "stderr", None)
            problem = str(stderr) if stderr else str(exc)
        if problem:
            last = [line for line in problem.strip().splitlines() if line.strip()][-1:] or [problem]
            raise TargetUnreachable(f"cannot reach {target.describe()}: {ev.redact(last[0].strip())}")
        built.system_info.type  # noqa: B018 (the probe is the point)
    finally:
        _current.sink = sink
    return built


@pytest.fixture(autouse=True)
def _reachable(host: testinfra.host.Host) -> None:
    """Every check, even one that works from the controller, needs the target reachable: else all error."""


class TargetUnreachable(Exception):
    """The target did not run a trivial command: every check errors with this message, none fails."""


@pytest.fixture
def evidence(request: pytest.FixtureRequest, target: TargetSpec) -> EvidenceLog:
    return EvidenceLog(request.node.stash[_SINK], target.name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    sink: list[ev.Evidence] = []
    item.stash[_SINK] = sink
    item.stash[_STARTED] = time.monotonic()
    _current.sink = sink
    try:
        return (yield)
    finally:
        _current.sink = None


def _message(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).removeprefix(f"{TargetUnreachable.__module__}.{TargetUnreachable.__name__}: ")
    return str(longrepr or "")


def _status(report: pytest.TestReport, call: pytest.CallInfo[None]) -> str:
    if report.skipped:
        return "not_applicable"
    if report.passed:
        return "pass"
    if report.when == "call" and call.excinfo is not None and call.excinfo.errisinstance(AssertionError):
        return "fail"
    return "error"  # an exception, or a broken setup: the check could not decide


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """One line per check: the call's outcome, or the setup's when the call never ran."""
    report = yield
    if report.when == "call" or (report.when == "setup" and not report.passed):
        sink = item.stash.get(_SINK, [])
        status = _status(report, call)
        message = _message(report) if status != "pass" else ""
        if status == "fail":
            # The check's own one-line message, without pytest's assertion rewrite below it.
            message = message.removeprefix("AssertionError: ").splitlines()[0] if message.strip() else message
        if status in ("pass", "fail") and not sink:
            status, message = "error", "the check recorded no evidence"
        line = {
            "check": item.nodeid.split("/")[-1],
            "status": status,
            "message": ev.redact(message),
            "evidence": [e.model_dump(mode="json") for e in sink],
            "duration_s": round(time.monotonic() - item.stash.get(_STARTED, time.monotonic()), 3),
        }
        out = item.config.stash[_OUT]
        out.write(json.dumps(line) + "\n")
        out.flush()
    return report
