"""Background processes that outlive the CLI call that started them, and never outlive `lab down`.

Each process runs in its own session (so a Ctrl-C of the CLI does not reach it), logs to the state
directory, and is recorded in a pid file written atomically right after the spawn. Every child also
carries the environment variable MARKER_ENV set to the state directory, so `down` finds strays even
when a crash lost a pid file between the spawn and the write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from appliance.lab.state import LabState
from runtime.common import atomic

MARKER_ENV = "MEMBRIA_LAB_STATE"


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    create_time: float
    argv: list[str]
    log: str

    def alive(self) -> bool:
        """True only for the very process we started: a recycled pid has another create time."""
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def _pidfile(state: LabState, name: str) -> Path:
    return state.run_dir / f"{name}.json"


def read_record(state: LabState, name: str) -> ProcessRecord | None:
    path = _pidfile(state, name)
    try:
        return ProcessRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        # A torn or foreign file cannot describe a process we own; treat it as absent.
        path.unlink(missing_ok=True)
        return None


def running(state: LabState, name: str) -> ProcessRecord | None:
    """The live process recorded under `name`, clearing the record if the process is gone."""
    record = read_record(state, name)
    if record is None:
        return None
    if record.alive():
        return record
    _pidfile(state, name).unlink(missing_ok=True)
    return None


def spawn(
    state: LabState,
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcessRecord:
    """Start `argv` detached from the CLI; its output goes to logs/<name>.log."""
    log_path = state.log_dir / f"{name}.log"
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env[MARKER_ENV] = str(state.root)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    record = ProcessRecord(
        name=name,
        pid=proc.pid,
        create_time=psutil.Process(proc.pid).create_time(),
        argv=list(argv),
        log=str(log_path),
    )
    atomic.write_text(_pidfile(state, name), json.dumps(asdict(record)), mode=0o600)
    return record


def _terminate_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group, wait, then SIGKILL whatever is left of it."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    try:
        members = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    except psutil.Error:
        members = []
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    _, alive = psutil.wait_procs(members, timeout=timeout)
    if alive:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        psutil.wait_procs(alive, timeout=5)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None


def stop(state: LabState, name: str, *, timeout: float = 10.0) -> bool:
    """Stop the process recorded as `name`. True if one was running."""
    record = running(state, name)
    if record is None:
        return False
    _terminate_group(record.pid, timeout)
    _pidfile(state, name).unlink(missing_ok=True)
    return True


def strays(state: LabState) -> list[psutil.Process]:
    """Processes started for this state directory, found by their environment marker."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(MARKER_ENV) == str(state.root):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_strays(state: LabState, *, timeout: float = 10.0) -> int:
    procs = strays(state)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def wait_until(predicate: Callable[[], object], *, timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate()` until it is truthy or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
