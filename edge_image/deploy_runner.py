"""Running the edge deploy (`deploy/edge.py`) over a root tree with the pyinfra CLI.

The CLI, not pyinfra's Python API: it is the documented, stable surface, its gevent stays out of our process, and
a failed deploy can be rerun by hand with the command shown in the error. `--json` makes its stdout one JSON
document with every operation's result (success = changed, no_change, error), so nothing is parsed from its log;
its log (stderr) streams to `on_line`. A failed run prints no JSON: the failing operation is the last one its log
started. The tree gets the chroot mounts and the wheelhouse read-only at `WHEELHOUSE_IN_CHROOT`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_image import chroot
from edge_image.deploy import EDGE_DEPLOY
from edge_image.errors import ImageBadInput, ImageError
from edge_image.spec import ImageSpec

WHEELHOUSE_IN_CHROOT = "/run/membria-wheelhouse"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STARTING = re.compile(r"^--> Starting operation: (.*?)\s*$")
_HOST_PREFIX = re.compile(r"^\s*\[@chroot/[^\]]*\]\s*")  # one host: its name on every line says nothing
_TAIL_LINES = 15
# The environment of pyinfra and so of every command in the chroot: nothing of the build machine's venv,
# proxies or pip settings leaks into the image.
_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "PYINFRA_PROGRESS": "off",
}


@dataclass(frozen=True)
class DeployResult:
    operations: int
    changed: int
    seconds: float


def run_deploy(
    tree: Path, spec: ImageSpec, wheelhouse: Path, *, on_line: Callable[[str], None] = lambda _l: None
) -> DeployResult:
    """Run the edge deploy over tree; ImageError naming the failed operation, with the log's last lines."""
    if not (wheelhouse / spec.wheel_requirements).is_file():
        raise ImageBadInput(f"the wheelhouse {wheelhouse} has no {spec.wheel_requirements}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="membria-deploy-") as tmp:
        spec_file = spec.to_json_file(Path(tmp) / "spec.json")
        with chroot.prepared(tree, {wheelhouse.resolve(): WHEELHOUSE_IN_CHROOT}) as root:
            argv = [
                sys.executable, "-m", "pyinfra", "-y", "--json",
                "--data", f"spec_file={spec_file}",
                "--data", f"wheelhouse={WHEELHOUSE_IN_CHROOT}",
                f"@chroot/{root}", str(EDGE_DEPLOY),
            ]  # fmt: skip
            returncode, stdout, log = _run(argv, on_line)
    seconds = time.monotonic() - started
    results = _results(stdout)
    if returncode != 0 or results is None or results["failed_hosts"] or results["totals"]["error"]:
        raise ImageError(
            f"the edge deploy failed at operation {_failed_operation(results, log)!r} (pyinfra exit {returncode}): "
            + " / ".join(_failed_tail(log)),
            hint=f"to rerun by hand, on the tree with edge_image.chroot's mounts and a spec JSON: {' '.join(argv)}",
        )
    operations = results["operations"]
    changed = sum(1 for op in operations if op["success"])
    return DeployResult(operations=len(operations), changed=changed, seconds=seconds)


def _run(argv: list[str], on_line: Callable[[str], None]) -> tuple[int, str, list[str]]:
    """Run pyinfra: stdout collected (the JSON), stderr streamed line by line; the log's last 200 lines kept."""
    log: deque[str] = deque(maxlen=200)
    out: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", env=_ENV, cwd="/"
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        stdout = proc.stdout
        # A thread drains stdout so that neither pipe can fill while the other is read.
        reader = threading.Thread(target=lambda: out.append(stdout.read()), daemon=True)
        reader.start()
        for raw in proc.stderr:
            line = _HOST_PREFIX.sub("    ", _ANSI.sub("", raw.rstrip()))
            if line.strip():
                log.append(line)
                on_line(line)
        reader.join()
        returncode = proc.wait()
    return returncode, "".join(out), list(log)


def _results(stdout: str) -> dict[str, Any] | None:
    """The run's results from pyinfra's JSON document: its last stdout line (a deploy's own prints come before)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                document = json.loads(line)
            except ValueError:
                return None
            results = document.get("results") if isinstance(document, dict) else None
            return results if isinstance(results, dict) else None
    return None


def _failed_tail(log: list[str]) -> list[str]:
    """What the log says from the last operation's start on (its commands' output), at most _TAIL_LINES lines."""
    starts = [i for i, line in enumerate(log) if _STARTING.match(line)]
    return [line.strip() for line in log[starts[-1] if starts else 0 :]][-_TAIL_LINES:]


def _failed_operation(results: dict[str, Any] | None, log: list[str]) -> str:
    if results is not None:
        failed = [op["name"] for op in results["operations"] if op["error"]]
        if failed:
            return str(failed[0])
    started = [m.group(1) for m in map(_STARTING.match, log) if m]
    return started[-1] if started else "(before any operation: loading or connecting)"
