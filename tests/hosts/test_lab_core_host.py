"""`appliance lab up` with `lab.core: host` (the example lab's setting): core-1 is a systemd-nspawn test host
that `appliance core apply` provisions with the roles, as on a rack, instead of the core services running as
local processes. The lab's smoke, the edge agent and DR shipping then all go through the node.

One module fixture runs `lab up` on a fresh state directory, a free private subnet and free ports (it never
meets `make lab`), then `lab up` again; the tests read what happened; `lab down` runs last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import catalog
from appliance.backends import Backends
from appliance.core.runner import read_events, summarize
from appliance.hosts.nspawn import free_network
from appliance.lab import process
from appliance.lab.core_node import LabCoreNode
from appliance.lab.state import LabState
from appliance.site import Site
from tests.audit_breaks_access import BREAKS as ACCESS_BREAKS
from tests.audit_breaks_membria import BREAKS as MEMBRIA_BREAKS
from tests.audit_breaks_system import BREAKS as SYSTEM_BREAKS
from tests.conftest import lab_site_data, write_site

pytestmark = [pytest.mark.hosts, pytest.mark.timeout(2400)]

APPLIANCE = [sys.executable, "-m", "appliance"]


@dataclass
class HostLab:
    site: Site
    site_file: Path
    state: LabState
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    applied_at: tuple[int, int]  # the apply's event log (mtime) after the first and the second `up`

    @property
    def node(self) -> LabCoreNode:
        return LabCoreNode(self.site, self.state)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _cli(*args, "--site", str(self.site_file))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*APPLIANCE, *args], capture_output=True, text=True, timeout=1500, env=env)


def _ok(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-6000:]}\n{run.stderr[-4000:]}"


@pytest.fixture(scope="module")
def host_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostLab]:
    root = tmp_path_factory.mktemp("host-lab")
    network = free_network("mbp")  # a /24 no interface here uses; the lab raises its own bridge on it
    address = network.address(11)
    network.down()
    data = lab_site_data(root / "state")
    data["lab"]["core"] = "host"
    data["core_nodes"][0]["address"] = address
    site_file = write_site(root / "site.yaml", data)
    site = Site.model_validate(data)
    state = LabState.at(site.lab.state_dir)
    events = state.log_dir / "core-apply-events.jsonl"

    def applied_at() -> int:
        return events.stat().st_mtime_ns if events.exists() else 0

    try:
        first = _cli("lab", "up", "--site", str(site_file))
        after_first = applied_at()
        second = _cli("lab", "up", "--site", str(site_file))
        yield HostLab(site, site_file, state, first, second, (after_first, applied_at()))
    finally:
        _cli("lab", "down", "--site", str(site_file))
        LabCoreNode(site, state).host.destroy()


def test_lab_up_provisions_core_1_and_passes_its_smoke(host_lab: HostLab) -> None:
    _ok(host_lab.first)
    out = host_lab.first.stdout
    assert "started core-1" in out
    for step in ("answered from engineering", "cross-department refused", "audit rows visible", "edge: delivered"):
        assert f"smoke: {step}" in out, out[-4000:]


def test_core_1_is_provisioned_by_core_apply(host_lab: HostLab) -> None:
    """The same code path as a rack: the CLI's event log, every role, no failure."""
    _ok(host_lab.first)
    events = host_lab.state.log_dir / "core-apply-events.jsonl"
    summary = summarize(read_events(events))
    recap = summary.recap["core-1"]
    assert recap.failed == 0 and recap.unreachable == 0 and recap.changed > 0
    roles = {e.get("event_data", {}).get("role") for e in read_events(events)}
    assert {"base", "vault_agent", "llm", "core_server", "gateway", "monitoring", "dr_agent"} <= roles


def test_no_core_service_runs_as_a_local_process(host_lab: HostLab) -> None:
    _ok(host_lab.first)
    for name in ("llm", "core", "gateway", "dr-shipper"):
        assert process.running(host_lab.state, name) is None, name
    remote = host_lab.node.host.testinfra_host()
    for unit in ("membria-llm", "membria-core", "membria-gateway", "membria-vault-agent", "membria-dr-ship.timer"):
        assert remote.service(unit).is_running, unit


def test_lab_status_checks_the_node(host_lab: HostLab) -> None:
    _ok(host_lab.first)
    status = host_lab.cli("lab", "status")
    _ok(status)
    address = host_lab.site.core_nodes[0].address
    assert f"https://{address}:{host_lab.site.lab.ports.gateway}" in status.stdout
    for name in ("core-1", "openbao-relay", "s3-relay", "dr-shipping", "audit_db", "vectors"):
        assert name in status.stdout, status.stdout


def test_the_node_ships_dr_to_the_labs_s3(host_lab: HostLab) -> None:
    _ok(host_lab.first)
    backends = Backends(host_lab.site, host_lab.state)
    target = backends.s3("primary")
    pages = target.client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    for store in ("audit_db", "vectors"):
        assert any(f"/ship/{store}/" in k for k in keys), (store, keys[:20])


def test_a_second_up_leaves_the_node_alone(host_lab: HostLab) -> None:
    _ok(host_lab.second)
    assert "already up; nothing changed" in host_lab.second.stdout, host_lab.second.stdout[-3000:]
    assert "started core-1" not in host_lab.second.stdout
    first, second = host_lab.applied_at
    assert first and second == first  # no second `core apply`


def _audit(host_lab: HostLab, out: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    run = _cli("audit", str(host_lab.site_file), "--host", "core-1", "-o", str(out))
    report_file = out / "audit-report.json"
    assert report_file.exists(), f"exit {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return run, json.loads(report_file.read_text())


@dataclass
class DrEvidence:
    """The DR evidence a site makes over time, made now: the node's own backup and drill (its timers' units, started
    by hand), and the operator's backup and drill of Vault from the controller."""

    node_backup: subprocess.CompletedProcess[str]
    node_drill: subprocess.CompletedProcess[str]
    node_journal: str
    vault_backup: subprocess.CompletedProcess[str]
    vault_drill: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def dr_evidence(host_lab: HostLab, tmp_path_factory: pytest.TempPathFactory) -> DrEvidence:
    _ok(host_lab.first)
    node = host_lab.node.host
    node_backup = node.ssh("systemctl start membria-dr-backup.service", check=False, timeout=1200)
    vault_backup = host_lab.cli("dr", "backup", "--store", "vault")
    node_drill = node.ssh("systemctl start membria-dr-drill.service", check=False, timeout=1200)
    out = tmp_path_factory.mktemp("vault-drill")
    vault_drill = host_lab.cli("dr", "drill", "--store", "vault", "--out", str(out))
    journal = node.ssh(
        "journalctl -u membria-dr-backup.service -u membria-dr-drill.service -n 60 --no-pager", check=False
    )
    return DrEvidence(node_backup, node_drill, journal.stdout, vault_backup, vault_drill)


def test_the_nodes_backup_and_drill_cover_its_own_stores(host_lab: HostLab, dr_evidence: DrEvidence) -> None:
    """The node's DR agent backs up and drills audit_db, vectors and state with its deny-by-default token; Vault's
    snapshot, which that token may not take, is the operator's from the controller."""
    assert dr_evidence.node_backup.returncode == 0, dr_evidence.node_journal[-4000:]
    assert dr_evidence.node_drill.returncode == 0, dr_evidence.node_journal[-4000:]
    _ok(dr_evidence.vault_backup)
    _ok(dr_evidence.vault_drill)
    reports = host_lab.node.host.ssh("cat /var/lib/membria/dr/drills/drill-*.json", check=False)
    assert reports.returncode == 0, reports.stderr
    drilled = json.loads(reports.stdout)
    assert drilled["ok"] is True
    assert sorted(s["store"] for s in drilled["stores"]) == ["audit_db", "state", "vectors"]


@pytest.fixture(scope="module")
def audited(
    host_lab: HostLab, dr_evidence: DrEvidence, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], int]:
    """The closed loop's first half: core-1 as `lab up` provisioned it, with the DR evidence a site keeps, audited
    through the CLI an auditor runs."""
    _ok(host_lab.first)
    root = tmp_path_factory.mktemp("audit")
    _ok(_cli("audit", "keygen", str(host_lab.site_file)))
    run, report = _audit(host_lab, root / "good")
    assert run.returncode in (0, 1), run.stderr[-3000:]
    return root / "good", report, run.returncode


def test_the_audit_confirms_what_the_roles_set_up(audited: tuple[Path, dict[str, Any], int]) -> None:
    """Closed loop: every core control passes on the node the roles provisioned, or does not apply and says why;
    none fails or errors, and the audit exits 0."""
    _, report, exit_code = audited
    results = report["results"]
    bad = [(r["control"], r["status"], r["message"]) for r in results if r["status"] not in ("pass", "not_applicable")]
    assert not bad, bad
    assert exit_code == 0
    assert {r["control"] for r in results} == {c.id for c in catalog.shipped().for_kind("core")}
    assert {r["target"] for r in results} == {"core-1"}
    # what does not apply says why, and every result carries evidence from the node or the controller
    assert all(r["message"] for r in results if r["status"] == "not_applicable")
    assert all(r["evidence"] and r["evidence"][0]["host"] == "core-1" for r in results)
    assert sum(r["status"] == "pass" for r in results) >= len(results) - 5
    passed = {r["control"] for r in results if r["status"] == "pass"}
    assert {"MEM-DR-RPO", "MEM-DR-RTO", "MEM-MTLS", "MEM-RBAC-DENY", "MEM-AUDITLOG-CHAIN", "MEM-LICENSE"} <= passed


def test_the_signed_report_verifies_and_an_edit_is_caught(
    host_lab: HostLab, audited: tuple[Path, dict[str, Any], int], tmp_path: Path
) -> None:
    out, _, _ = audited
    _ok(_cli("audit", "verify-report", str(out), "--site", str(host_lab.site_file)))
    edited = tmp_path / "edited"
    subprocess.run(["cp", "-a", str(out), str(edited)], check=True)
    page = edited / "audit-report.html"
    page.write_text(page.read_text().replace("core-1", "core-9", 1))
    verify = _cli("audit", "verify-report", str(edited), "--site", str(host_lab.site_file))
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert "audit-report.html" in verify.stdout + verify.stderr


def test_every_broken_control_fails_the_audit(
    host_lab: HostLab, audited: tuple[Path, dict[str, Any], int], tmp_path: Path
) -> None:
    """The closed loop's second half: each control's known-bad state, made on the same node, fails its check.
    (The DR controls' evidence lives in the lab's S3, which the node cannot break: tests/audit_breaks_membria.py.)"""
    node = host_lab.node.host
    breaks = {**MEMBRIA_BREAKS, **SYSTEM_BREAKS, **ACCESS_BREAKS}  # the gateway's edits first: it must still start
    for control, command in breaks.items():
        done = node.ssh(command, check=False, timeout=300)
        assert done.returncode == 0, (control, command, done.stdout[-2000:], done.stderr[-2000:])
    run, report = _audit(host_lab, tmp_path / "bad")
    assert run.returncode == 1
    status = {r["control"]: (r["status"], r["message"]) for r in report["results"]}
    not_failed = {c: status[c] for c in breaks if status[c][0] != "fail"}
    assert not not_failed, not_failed


def test_lab_down_stops_the_node_and_its_bridge(host_lab: HostLab) -> None:
    _ok(host_lab.first)
    down = host_lab.cli("lab", "down")
    _ok(down)
    assert "stopped core-1" in down.stdout
    node = host_lab.node
    assert not node.host.running()
    assert not node.network.exists()
    assert node.host.root.exists()  # its stores stay for the next `up`
    status = host_lab.cli("lab", "status")
    assert status.returncode == 1
