"""The runner, for real: ansible-runner runs a tiny playbook on localhost (`ansible_connection=local`) that
writes only under tmp_path. Idempotence, check mode, the event log, the recap, masking and rotation."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from appliance.core.runner import (
    HostRecap,
    RunResult,
    read_events,
    run_playbook,
    status_lines,
    summarize,
)
from appliance.core.summary import plan_summary, render_plan
from appliance.core.view import RunView, recap_table

pytestmark = pytest.mark.unit

SECRET = "sid-3f9a77c2-membria-runner-test"  # what a node's AppRole secret id looks like to the runner
LITERAL = "literal-in-a-no-log-task-51e0"  # a secret that is in the play itself, not in the environment
ENV = "MEMBRIA_VAULT_SECRET_ID_LOCALHOST"

# A role (so events carry a role name) with: a templated file, a file from a secret, a tagged task.
ROLE_TASKS = """
- name: Greeting file
  ansible.builtin.copy:
    dest: "{{ target }}/greeting.txt"
    content: "hello from {{ inventory_hostname }}\\n"
    mode: "0644"
- name: Config directory
  ansible.builtin.file:
    path: "{{ target }}/conf.d"
    state: directory
    mode: "0755"
- name: Credential file
  ansible.builtin.copy:
    dest: "{{ target }}/credential"
    content: "{{ lookup('env', secret_env) }} {{ literal_secret }}\\n"
    mode: "0600"
  no_log: true
- name: A task that shows the secret (no no_log; the runner masks it)
  ansible.builtin.debug:
    msg: "the secret id is {{ lookup('env', secret_env) }}"
- name: Tagged file
  ansible.builtin.copy:
    dest: "{{ target }}/tagged.txt"
    content: "tagged\\n"
    mode: "0644"
  tags: [extra]
"""
PLAYBOOK = """
- name: Demo
  hosts: demo_nodes
  gather_facts: false
  vars:
    literal_secret: "{{ 'literal-in-a-no-log-task-' ~ '51e0' }}"
  roles:
    - role: demo
      tags: [demo]
"""


@pytest.fixture
def play(tmp_path: Path) -> Callable[..., RunResult]:
    """run(check=..., ...) on a playbook whose every write goes to tmp_path/target."""
    target = tmp_path / "target"
    target.mkdir()
    role = tmp_path / "book" / "roles" / "demo" / "tasks"
    role.mkdir(parents=True)
    (role / "main.yml").write_text(ROLE_TASKS)
    playbook = tmp_path / "book" / "play.yml"
    playbook.write_text(PLAYBOOK)
    inventory = tmp_path / "hosts.json"
    hostvars = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_remote_tmp": str(tmp_path / "ansible-tmp"),  # module files too stay under tmp_path
        "target": str(target),
        "secret_env": ENV,
    }
    inventory.write_text(json.dumps({"all": {"children": {"demo_nodes": {"hosts": {"localhost": hostvars}}}}}))

    def run(*, check: bool = False, tags: list[str] | None = None, on_event: Any = None, **kwargs: Any) -> RunResult:
        return run_playbook(
            None,
            check=check,
            diff=check,
            limit=None,
            tags=tags,
            on_event=on_event,
            private_data_dir=tmp_path / "pdd",
            envvars={ENV: SECRET},
            inventory=inventory,
            playbook=playbook,
            **kwargs,
        )

    return run


def test_apply_then_idempotent(play: Callable[..., RunResult], tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    first = play(on_event=events.append)
    assert first.rc == 0 and first.status == "successful"
    assert first.recap == {"localhost": HostRecap(ok=5, changed=4)}
    assert (tmp_path / "target" / "greeting.txt").read_text() == "hello from localhost\n"
    assert (tmp_path / "target" / "credential").read_text() == f"{SECRET} {LITERAL}\n"
    assert {(c.role, c.task) for c in first.changes} == {
        ("demo", "Greeting file"),
        ("demo", "Config directory"),
        ("demo", "Credential file"),
        ("demo", "Tagged file"),
    }
    assert first.broken_hosts == [] and first.failures == [] and first.errors == []
    assert events and events[-1]["event"] == "playbook_on_stats"

    second = play()
    assert second.rc == 0
    assert second.recap["localhost"].changed == 0 and second.recap["localhost"].ok == 5
    assert second.changes == []


def test_check_mode_reports_without_changing(play: Callable[..., RunResult], tmp_path: Path) -> None:
    result = play(check=True)
    assert result.rc == 0
    assert result.recap["localhost"].changed == 4
    assert not (tmp_path / "target" / "greeting.txt").exists()
    assert not (tmp_path / "target" / "conf.d").exists()
    greeting = next(c for c in result.changes if c.task == "Greeting file")
    assert greeting.target == str(tmp_path / "target" / "greeting.txt")
    assert greeting.detail == "+1 -0"
    hidden = next(c for c in result.changes if c.task == "Credential file")
    assert hidden.target == "(hidden: no_log)"

    summary = plan_summary(result, site="demo")
    host = summary["hosts"]["localhost"]
    assert host["to_change"] == 4 and host["roles"]["demo"]["to_change"] == 4
    assert summary["completed"] is True and summary["broken_hosts"] == []
    out = Console(file=io.StringIO(), width=200, force_terminal=False)
    render_plan(result, out)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert "localhost  demo: 4 to change (" in text
    assert "greeting.txt" in text
    assert "localhost  total: 4 to change, 5 ok, 0 failed, 0 unreachable" in text


def test_event_log_is_the_recap_and_holds_no_secret(play: Callable[..., RunResult], tmp_path: Path) -> None:
    result = play(check=False)
    log = result.events_path
    assert log.parent == result.artifacts_dir and log.name == "events.jsonl"
    assert (log.stat().st_mode & 0o777) == 0o600
    events = list(read_events(log))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "playbook_on_start" and kinds[-1] == "playbook_on_stats"
    replay = summarize(events)
    assert replay.recap == result.recap
    assert replay.changes == result.changes
    text = log.read_text()
    assert SECRET not in text  # the env value: masked even where a task without no_log printed it
    assert LITERAL not in text  # no_log: censored by ansible
    assert "the secret id is ********" in text
    # Nothing ansible-runner leaves behind holds either: not the env record, not per-event files.
    for path in (tmp_path / "pdd").rglob("*"):
        if path.is_file():
            content = path.read_text(errors="replace")
            assert SECRET not in content, path
            assert LITERAL not in content, path
    command = json.loads((result.artifacts_dir / "command").read_text())
    assert ENV in command["env"] and isinstance(command["env"], list)  # names only


def test_tags_select_tasks(play: Callable[..., RunResult], tmp_path: Path) -> None:
    result = play(tags=["extra"])
    assert result.rc == 0
    assert [c.task for c in result.changes] == ["Tagged file"]
    assert not (tmp_path / "target" / "greeting.txt").exists()


def test_artifacts_are_rotated(play: Callable[..., RunResult], tmp_path: Path) -> None:
    results = [play(check=True, keep_runs=2) for _ in range(3)]
    kept = sorted(p.name for p in (tmp_path / "pdd" / "artifacts").iterdir())
    assert kept == sorted(r.artifacts_dir.name for r in results[1:])


def test_a_failing_host_is_a_result(tmp_path: Path) -> None:
    playbook = tmp_path / "fail.yml"
    playbook.write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: Refuse\n      ansible.builtin.fail:\n        msg: no vip for keepalived\n"
    )
    inventory = tmp_path / "hosts.json"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "hosts": {
                        "localhost": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                            "ansible_remote_tmp": str(tmp_path / "ansible-tmp"),
                        }
                    }
                }
            }
        )
    )
    result = run_playbook(
        None,
        check=False,
        diff=False,
        limit=None,
        tags=None,
        on_event=None,
        private_data_dir=tmp_path / "pdd",
        envvars={},
        inventory=inventory,
        playbook=playbook,
    )
    assert result.rc != 0
    assert result.broken_hosts == ["localhost"]
    assert result.recap["localhost"].failed == 1
    assert [(f.host, f.task, f.message) for f in result.failures] == [("localhost", "Refuse", "no vip for keepalived")]
    table = recap_table(result, "recap")
    assert table.row_count == 1


def test_plain_view_prints_one_line_per_result(play: Callable[..., RunResult]) -> None:
    out = Console(file=io.StringIO(), width=200, force_terminal=False)
    view = RunView(["localhost"], out, "demo")
    assert view.live_mode is False  # not a terminal: CI logs get lines, not a redrawn table
    with view:
        play(on_event=view)
    lines = out.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines[0] == "demo: 1 host(s)"
    results = [line.split(None, 3) for line in lines[1:]]
    assert [(r[1], r[2], r[3]) for r in results] == [
        ("localhost", "changed", "demo : Greeting file"),
        ("localhost", "changed", "demo : Config directory"),
        ("localhost", "changed", "demo : Credential file"),
        ("localhost", "ok", "demo : A task that shows the secret (no no_log; the runner masks it)"),
        ("localhost", "changed", "demo : Tagged file"),
    ]
    assert view.hosts["localhost"].counts == {
        "ok": 5,
        "changed": 4,
        "failed": 0,
        "skipped": 0,
        "unreachable": 0,
        "ignored": 0,
    }
    # The live table renders the same state.
    table = view.__rich__()
    rendered = Console(file=io.StringIO(), width=200)
    rendered.print(table)
    assert "localhost" in rendered.file.getvalue()  # type: ignore[attr-defined]


def test_status_file_lines() -> None:
    as_json = json.dumps(
        {"role": "base", "reason": None, "skipped_items": [{"item": "auditd service", "reason": "in a container"}]}
    )
    assert status_lines(as_json) == ["skipped auditd service: in a container"]
    assert status_lines("waiting for certificates: core\n") == ["waiting for certificates: core"]
    assert status_lines(json.dumps({"reason": "no GPU"})) == ["no GPU"]
