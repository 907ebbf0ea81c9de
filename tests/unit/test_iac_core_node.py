"""The CoreNode provider's logic without a node (stacks/DESIGN.md §2): check, diff, the refusal of an `up` whose
inputs changed after its preview, what apply returns and raises, and the provider's pickle."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.core import apply as core_apply
from appliance.core.runner import Failure, HostRecap, RunResult
from appliance.errors import CheckFailed
from appliance.iac import core_node
from stacks.components.core_node import CoreNodeProvider

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _props(**changes: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "site_file": str(REPO / "examples" / "lab.yaml"),
        "workdir": str(REPO),
        "node": "core-1",
        "state_dir": "/tmp/membria-state",
        "content_hash": "",
        "vars_file": None,
        "bundle": None,
        "tags": ["base"],
        "__provider": "pickled",
    }
    props.update(changes)
    if not props["content_hash"]:
        props["content_hash"] = core_node.node_hash(props)
    return props


# --- check -----------------------------------------------------------------------------------------------------


def test_check_accepts_the_lab_node() -> None:
    assert core_node.check(_props()) == []


@pytest.mark.parametrize(
    ("changes", "prop", "reason"),
    [
        ({"node": "core-9"}, "node", "unknown core node core-9; the site has core-1"),
        ({"site_file": "/nonexistent/site.yaml"}, "site_file", "/nonexistent/site.yaml"),
        ({"site_file": "examples/lab.yaml"}, "site_file", "must be an absolute path"),
        ({"tags": ["nosuchrole"]}, "tags", "unknown role tag(s): nosuchrole"),
        ({"vars_file": "/nonexistent/vars.yaml"}, "vars_file", "/nonexistent/vars.yaml"),
        ({"bundle": "/tmp"}, "bundle", "no manifest.json"),
        ({"workdir": "/nonexistent"}, "workdir", "not a directory"),
        ({"state_dir": ""}, "state_dir", "required"),
    ],
)
def test_check_names_the_property(changes: dict[str, Any], prop: str, reason: str) -> None:
    failures = core_node.check(_props(content_hash="sha256:x", **changes))
    assert [p for p, _ in failures] == [prop]
    assert reason in failures[0][1]


def test_check_reports_a_bad_site_file_with_its_line(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text((REPO / "examples" / "lab.yaml").read_text().replace("ram_gb: 24", "ram_gb: lots"))
    [(prop, reason)] = core_node.check(_props(site_file=str(site), content_hash="sha256:x"))
    assert prop == "site_file" and str(site) in reason and "ram_gb" in reason


def test_check_leaves_values_unknown_at_preview_alone() -> None:
    assert core_node.check(_props(content_hash="sha256:x", node=core_node.UNKNOWN, tags=core_node.UNKNOWN)) == []


# --- diff ------------------------------------------------------------------------------------------------------


def _outputs(props: dict[str, Any]) -> dict[str, Any]:
    """What the engine keeps after an apply: the inputs echoed plus the outputs (olds are outputs)."""
    return {**core_node.inputs(props), "recap": {"changed": 3}, "changes": 3, "events_path": "/x", "__provider": "p"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, (False, [])),
        ({"__provider": "another pickle"}, (False, [])),
        ({"workdir": "/elsewhere"}, (False, [])),
        ({"tags": ["base"], "vars_file": ""}, (False, [])),  # "" and None both mean no vars file
        ({"content_hash": "sha256:other"}, (True, [])),
        ({"site_file": "/other/site.yaml"}, (True, [])),
        ({"state_dir": "/other/state"}, (True, [])),
        ({"vars_file": "/vars.yaml"}, (True, [])),
        ({"bundle": "/media/bundle"}, (True, [])),
        ({"tags": ["base", "gateway"]}, (True, [])),
        ({"tags": None}, (True, [])),
        ({"content_hash": core_node.UNKNOWN}, (True, [])),
        ({"node": "core-2"}, (True, ["node"])),
    ],
)
def test_diff_truth_table(changes: dict[str, Any], expected: tuple[bool, list[str]]) -> None:
    olds = _outputs(_props(content_hash="sha256:a"))
    news = {**_props(content_hash="sha256:a"), "recap": None, "changes": None, "events_path": None, **changes}
    assert core_node.diff(olds, news) == expected


# --- apply -----------------------------------------------------------------------------------------------------


class FakePrepared:
    def __init__(self, result: RunResult) -> None:
        self.result = result
        self.calls: list[dict[str, Any]] = []  # prepare()'s
        self.runs: list[dict[str, Any]] = []

    def run(self, **kwargs: Any) -> RunResult:
        self.runs.append(kwargs)
        return self.result


def _result(tmp_path: Path, *, failed: int = 0, rc: int = 0) -> RunResult:
    failures = [Failure("core-1", "base", "Install packages", "no route to the mirror")] if failed else []
    recap = {"core-1": HostRecap(ok=10, changed=4, failed=failed)}
    events = tmp_path / "events.jsonl"
    return RunResult(rc, "failed" if failed else "successful", recap, [], failures, [], [], events, tmp_path)


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakePrepared:
    fake = FakePrepared(_result(tmp_path))

    def prepare(site_file: Path, state_dir: Path | None, limit: str | None, **kwargs: Any) -> FakePrepared:
        fake.calls.append({"cwd": Path.cwd(), "limit": limit, **kwargs})
        return fake

    monkeypatch.setattr(core_apply, "prepare", prepare)
    return fake


def test_apply_runs_the_node_only_and_echoes_its_inputs(prepared: FakePrepared) -> None:
    cwd = Path.cwd()
    props = _props()
    outs = core_node.apply(props)
    [call] = prepared.calls
    assert call["cwd"] == REPO and call["limit"] == "core-1" and call["mint_secrets"] is True
    assert prepared.runs == [{"check": False, "limit": "core-1", "tags": ["base"], "on_event": None}]
    assert Path.cwd() == cwd  # the provider host's cwd is restored
    assert {k: outs[k] for k in core_node.INPUTS} == core_node.inputs(props)
    assert "__provider" not in outs
    assert outs["recap"]["changed"] == 4 and outs["changes"] == 0 and outs["events_path"].endswith("events.jsonl")
    assert outs["appliance_version"] and outs["applied_at"]


def test_apply_refuses_inputs_changed_since_the_preview(prepared: FakePrepared) -> None:
    with pytest.raises(CheckFailed, match=core_node.CHANGED):
        core_node.apply(_props(content_hash="sha256:" + "0" * 64))
    assert prepared.calls == []  # nothing prepared, no secret id minted


def test_apply_raises_with_the_first_failure_and_the_events(prepared: FakePrepared, tmp_path: Path) -> None:
    prepared.result = _result(tmp_path, failed=1, rc=2)
    with pytest.raises(CheckFailed) as caught:
        core_node.apply(_props())
    assert "core-1 base: Install packages: no route to the mirror" in caught.value.message
    assert str(tmp_path / "events.jsonl") in caught.value.message


def test_the_provider_is_created_through_apply(prepared: FakePrepared) -> None:
    created = CoreNodeProvider().create(_props())
    assert created.id == "lab/core-1" and created.outs is not None and created.outs["recap"]["changed"] == 4


# --- the pickle --------------------------------------------------------------------------------------------------


def test_the_provider_pickles_by_reference_and_loads_where_only_the_venv_is() -> None:
    from pulumi.dynamic.dynamic import serialize_provider

    provider = CoreNodeProvider()
    assert vars(provider) == {}  # nothing, so no client and no token, can be in the state
    pickled = serialize_provider(provider)
    assert b"stacks.components.core_node" in base64.b64decode(pickled)
    script = (
        "import base64, sys, dill\n"
        "p = dill.loads(base64.b64decode(sys.stdin.read()))\n"
        "print(type(p).__module__, type(p).__name__, vars(p), p.diff('x', {'node': 'a'}, {'node': 'b'}).replaces)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], input=pickled, capture_output=True, text=True, cwd="/", env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["stacks.components.core_node", "CoreNodeProvider", "{}", "['node']"]
