"""The lab's process control: pid files that survive the CLI, group kills, stray sweeps."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest

from appliance.lab import process
from appliance.lab.state import LabState

pytestmark = pytest.mark.unit


@pytest.fixture
def state(tmp_path: Path) -> LabState:
    return LabState.at(tmp_path / "state")


def test_spawn_records_and_stop_kills_the_whole_group(state: LabState) -> None:
    # A parent with a child: stopping the parent must not orphan the child.
    record = process.spawn(state, "svc", ["bash", "-c", "sleep 300 & echo child $!; wait"])
    assert process.wait_until(lambda: "child" in Path(record.log).read_text(), timeout=10)
    child_pid = int(Path(record.log).read_text().split("child ")[1].split()[0])
    assert process.running(state, "svc") == record
    assert psutil.pid_exists(child_pid)

    assert process.stop(state, "svc") is True
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    assert process.running(state, "svc") is None
    assert not (state.run_dir / "svc.json").exists()
    assert process.stop(state, "svc") is False


def test_pid_file_of_a_recycled_pid_is_not_trusted(state: LabState) -> None:
    # Our own pid is alive, but with another create time it is not the process we started.
    fake = {"name": "svc", "pid": psutil.Process().pid, "create_time": 1.0, "argv": ["x"], "log": "x"}
    (state.run_dir / "svc.json").write_text(json.dumps(fake))
    assert process.running(state, "svc") is None
    assert not (state.run_dir / "svc.json").exists(), "a stale record is cleared"


def test_torn_pid_file_is_treated_as_absent(state: LabState) -> None:
    (state.run_dir / "svc.json").write_text('{"name": "svc", "pid": ')
    assert process.read_record(state, "svc") is None


def test_strays_are_found_by_marker_without_pid_file(state: LabState, tmp_path: Path) -> None:
    record = process.spawn(state, "svc", [sys.executable, "-c", "import time; time.sleep(300)"])
    (state.run_dir / "svc.json").unlink()  # as if the CLI died before writing it
    other = LabState.at(tmp_path / "other")
    assert [p.pid for p in process.strays(state)] == [record.pid]
    assert process.strays(other) == []
    assert process.kill_strays(state) == 1
    assert process.strays(state) == []
    assert not psutil.pid_exists(record.pid) or psutil.Process(record.pid).status() == psutil.STATUS_ZOMBIE


def test_stop_escalates_to_sigkill(state: LabState) -> None:
    record = process.spawn(state, "stubborn", ["bash", "-c", "trap '' TERM; echo ready; sleep 300 & wait; sleep 300"])
    assert process.wait_until(lambda: "ready" in Path(record.log).read_text(), timeout=10)
    assert process.stop(state, "stubborn", timeout=1)
    assert not record.alive()


def test_spawned_process_is_detached_from_our_session(state: LabState) -> None:
    record = process.spawn(state, "svc", ["sleep", "300"])
    try:
        assert os.getpgid(record.pid) == record.pid  # leads its own group
    finally:
        process.stop(state, "svc")
