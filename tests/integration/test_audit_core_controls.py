"""The appliance's own core controls (MEM-MTLS, MEM-RBAC-DENY, MEM-AUDITLOG-CHAIN, MEM-DR-*, MEM-LICENSE) through the
real audit runner, against the session lab: real OpenBao, chDB, gateway and core server over mTLS, moto S3.

- The lab as it is, audited with the facts `appliance audit` computes for it (`site_facts`: the lab's process mode,
  so the gateway's files are under its state directory and the audit log is verified from the controller).
- A "node" on this machine: a gateway process of our own whose files (configuration, license, RBAC policy, audit
  chDB, a unit file naming its interpreter) sit where the facts say, audited as a node is (the audit log verified
  by the node's interpreter); then broken with tests/audit_breaks_membria.py's commands (the hosts tier runs the
  same on a provisioned node), restarted, and audited again.
- DR: sites derived from the lab's with their own bucket prefix: one backed up and drilled as a node's site is
  (Vault's snapshot apart from the node's own stores, so the checks must combine each store's newest backup and
  drill), one with none, one whose targets the same drills miss, and one whose only backup and drill are of one
  store.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ruamel.yaml import YAML

from appliance.audit import runner
from appliance.audit.checks.test_mem_auditlog import _ON_NODE
from appliance.audit.facts import site_facts
from appliance.audit.report import Report
from appliance.audit.targets import TargetSpec, local_target
from appliance.backends import Backends
from appliance.lab import bootstrap, process
from appliance.lab.state import LabState
from appliance.license import sign_license
from appliance.site import load_site
from runtime.common.license import License
from tests.audit_breaks_membria import breaks
from tests.audit_membria import by_control, explain, membria_catalog, statuses
from tests.conftest import REPO, free_port, write_site
from tests.integration.conftest import GatewayLab, gateway_env

pytestmark = pytest.mark.integration

NODE = "core-1"
CORE_IDS = {"MEM-MTLS", "MEM-RBAC-DENY", "MEM-AUDITLOG-CHAIN", "MEM-DR-RPO", "MEM-DR-RTO", "MEM-LICENSE"}
STORES = ("vault", "state", "audit_db", "vectors")


def cli(lab: GatewayLab, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--state-dir", str(lab.state.root)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def audit(spec: TargetSpec, only: set[str] | None = None) -> Report:
    return runner.run("lab", membria_catalog(only), [spec])


# --- DR: derived sites with their own prefix in the lab's bucket ---------------------------------------------------


@dataclass(frozen=True)
class DrSites:
    good: Path  # fresh backups and passed drills, generous RPO targets (a loaded machine is slow)
    strict: Path  # the same bucket, targets of 1 s: the same copies are too old, the same drills too slow
    empty: Path  # a prefix nothing was ever written to
    partial: Path  # a prefix with a backup and a drill of the `state` store only
    backup_s: float
    drill_s: float


def _derived(lab: GatewayLab, root: Path, name: str, prefix: str, rpo: int | None, rto: int | None) -> Path:
    data = YAML(typ="safe").load(lab.site_file.read_text())
    dr = dict(data.get("dr") or {})
    dr["prefix"] = prefix
    if rpo is not None:
        dr["rpo_seconds"] = dict.fromkeys(STORES, rpo)
    if rto is not None:
        dr["rto_seconds"] = dict.fromkeys(STORES, rto)
    data["dr"] = dr
    return write_site(root / f"{name}.yaml", data)


@pytest.fixture(scope="module")
def dr_sites(lab: GatewayLab, tmp_path_factory: pytest.TempPathFactory) -> DrSites:
    root = tmp_path_factory.mktemp("audit-dr")
    tag = os.urandom(3).hex()
    good = _derived(lab, root, "good", f"audit-{tag}", 900, None)
    # As on a node's site: the node's DR agent backs up and drills the stores it owns, the operator Vault.
    split = (["--store", "vault"], ["--store", "state", "--store", "audit_db", "--store", "vectors"])
    started = time.monotonic()
    for stores in split:
        _ok(cli(lab, "dr", "backup", "--site", str(good), *stores))
    backup_s = time.monotonic() - started
    started = time.monotonic()
    for stores in split:
        _ok(cli(lab, "dr", "drill", "--site", str(good), "--out", str(root / "drills"), *stores))
    drill_s = time.monotonic() - started
    partial = _derived(lab, root, "partial", f"audit-partial-{tag}", 900, None)
    _ok(cli(lab, "dr", "backup", "--site", str(partial), "--store", "state"))
    _ok(cli(lab, "dr", "drill", "--site", str(partial), "--out", str(root / "drills"), "--store", "state"))
    return DrSites(
        good=good,
        strict=_derived(lab, root, "strict", f"audit-{tag}", 1, 1),
        empty=_derived(lab, root, "empty", f"audit-empty-{tag}", None, None),
        partial=partial,
        backup_s=backup_s,
        drill_s=drill_s,
    )


def _ok(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def facts_for(lab: GatewayLab, site_file: Path, no_heartbeat: Path) -> dict[str, Any]:
    """What `appliance audit` computes for the lab (process mode), with the DR shipper's heartbeat pointed at a file
    that does not exist: the lab's own heartbeat belongs to the lab's prefix (and to the DR tests), not to ours."""
    facts = site_facts(load_site(site_file), site_file, lab.state.root)
    facts["node_files"] = {**facts["node_files"], "dr_heartbeat": str(no_heartbeat)}
    return facts


# --- the lab as it is -------------------------------------------------------------------------------------------


def test_the_lab_passes_every_core_control(lab: GatewayLab, dr_sites: DrSites, tmp_path: Path) -> None:
    facts = facts_for(lab, dr_sites.good, tmp_path / "no-heartbeat.json")
    assert facts["audit_log"]["verify_on"] == "controller" and facts["dr"]["heartbeat_on"] == "controller"
    assert facts["tls"]["client_cert"] and facts["tls"]["ca_file"]
    started = time.monotonic()
    report = audit(local_target(NODE, "core", facts))
    took = time.monotonic() - started
    results = by_control(report)
    assert set(results) == CORE_IDS, explain(report)
    assert all(r.status == "pass" for r in results.values()), explain(report)
    mtls = [e.command for e in results["MEM-MTLS"].evidence]
    assert any("TLS 1.2" in c for c in mtls) and any("another CA" in c for c in mtls)
    assert '"ok": true' in results["MEM-AUDITLOG-CHAIN"].evidence[-1].output
    print(f"lab audited in {took:.1f} s (DR prep: backup {dr_sites.backup_s:.1f} s, drill {dr_sites.drill_s:.1f} s)")


# --- a node on this machine, broken by the hosts tier's commands ------------------------------------------------


@dataclass
class LocalNode:
    """A gateway of our own, with its files where a node's facts point; started from its configuration file."""

    lab: GatewayLab
    root: Path
    port: int

    @property
    def config(self) -> Path:
        return self.root / "gateway.json"

    @property
    def unit(self) -> Path:
        return self.root / "membria-gateway.service"

    @property
    def name(self) -> str:
        return f"audit-node-{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "runtime.gateway", "--config", str(self.config)]
        record = process.spawn(self.lab.state, self.name, argv, env=gateway_env(self.lab), cwd=REPO)
        deadline = time.monotonic() + 90
        while True:
            assert record.alive(), Path(record.log).read_text(errors="replace")[-3000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the node's gateway did not listen"
                time.sleep(0.3)

    def stop(self) -> None:
        process.stop(self.lab.state, self.name)

    def files(self) -> dict[str, str]:
        return {"gateway_config": str(self.config), "gateway_unit": str(self.unit)}


@pytest.fixture
def node(lab: GatewayLab, tmp_path: Path) -> Iterator[LocalNode]:
    root = tmp_path / "node"
    root.mkdir()
    licensing = lab.site.licensing
    shutil.copy(licensing.license_file, root / "license.json")
    shutil.copy(licensing.public_key_path, root / "license-signing.pub")
    shutil.copy(lab.site.rbac.policy_file, root / "rbac.yaml")
    port = free_port()
    config = {
        **lab.config,
        "port": port,
        "state_dir": str(root / "state"),
        "license_file": str(root / "license.json"),
        "license_public_key": str(root / "license-signing.pub"),
        "rbac_policy": str(root / "rbac.yaml"),
        "audit": {**lab.config["audit"], "dsn": f"chdb://{root / 'audit_db' / 'chdb'}"},
    }
    local = LocalNode(lab, root, port)
    local.config.write_text(json.dumps(config, indent=2))
    # As roles/gateway/templates/membria-gateway.service.j2 renders it: the interpreter is what the node runs.
    # User=root here (it is membria on a node): the checks and breaks that open chDB go through runuser all the same.
    local.unit.write_text(
        f"[Service]\nUser=root\nWorkingDirectory={root}\nExecStart={sys.executable} -m runtime.gateway --config "
        f"{local.config}\n"
    )
    local.start()
    try:
        yield local
    finally:
        local.stop()


def node_facts(lab: GatewayLab, node: LocalNode, site_file: Path, tmp_path: Path) -> dict[str, Any]:
    facts = facts_for(lab, site_file, tmp_path / "no-heartbeat.json")
    facts["node_files"] = {**facts["node_files"], **node.files()}
    facts["audit_log"] = {**facts["audit_log"], "verify_on": "node"}
    core_host, core_port = lab.config["core_url"].removeprefix("https://").rsplit(":", 1)
    facts["endpoints"] = {"gateway": f"127.0.0.1:{node.port}", "core": f"{core_host}:{core_port}"}
    return facts


def _chain(node: LocalNode) -> dict[str, Any]:
    """The node's audit log as the check's node route sees it (in a process of its own: chDB)."""
    dsn = json.loads(node.config.read_text())["audit"]["dsn"]
    done = subprocess.run(
        [sys.executable, "-c", _ON_NODE, dsn, "audit_log", "60"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _traffic(lab: GatewayLab, node: LocalNode) -> None:
    """A few audited requests, and their rows in the node's audit log (the writer flushes every 0.5 s)."""
    with lab.client("alice", url=f"https://127.0.0.1:{node.port}") as client:
        for _ in range(3):
            assert client.get("/v1/knowledge/documents").status_code < 500  # answered, so audited
    deadline = time.monotonic() + 60
    while _chain(node)["rows_checked"] < 3:
        assert time.monotonic() < deadline, "the node's gateway wrote no audit rows"
        time.sleep(0.5)


def test_a_node_passes_then_fails_once_broken(
    lab: GatewayLab, node: LocalNode, dr_sites: DrSites, tmp_path: Path
) -> None:
    _traffic(lab, node)
    good = audit(local_target(NODE, "core", node_facts(lab, node, dr_sites.good, tmp_path)))
    assert statuses(good) == dict.fromkeys(CORE_IDS, "pass"), explain(good)
    assert "(on the node)" in by_control(good)["MEM-AUDITLOG-CHAIN"].evidence[-1].command

    commands = breaks(node.files(), restart=False)
    for control, command in commands.items():  # in the order the hosts tier applies them
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{control}: {done.stderr[-2000:]}"
        if control == "MEM-MTLS":  # what the break's `systemctl restart` does on a node
            node.stop()
            node.start()

    bad = audit(local_target(NODE, "core", node_facts(lab, node, dr_sites.empty, tmp_path)))
    results = by_control(bad)
    assert statuses(bad) == dict.fromkeys(CORE_IDS, "fail"), explain(bad)
    assert "the signature does not match" in results["MEM-LICENSE"].message
    assert "may audit_read through role everyone" in results["MEM-RBAC-DENY"].message
    assert "edited" in results["MEM-AUDITLOG-CHAIN"].message
    assert "did not answer a site client certificate" in results["MEM-MTLS"].message
    assert "never backed up nor shipped" in results["MEM-DR-RPO"].message
    assert "no DR drill was ever recorded" in results["MEM-DR-RTO"].message
    for result in results.values():
        assert result.remediation and result.evidence


def test_expired_or_foreign_licenses_and_missed_dr_targets_fail(
    lab: GatewayLab, node: LocalNode, dr_sites: DrSites, tmp_path: Path
) -> None:
    key = bootstrap.ed25519_from_vault(lab.backends, bootstrap.LAB_LICENSE_KEY_PATH)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    expired = License(
        license_id="audit-expired",
        customer="lab (audit test)",
        seats=5,
        issued_at=now - dt.timedelta(days=400),
        expires_at=now - dt.timedelta(days=35),
    )
    (node.root / "license.json").write_text(json.dumps(sign_license(expired, key), indent=2))
    time.sleep(1.5)  # the strict site's RPO is 1 s
    facts = node_facts(lab, node, dr_sites.strict, tmp_path)
    report = audit(local_target(NODE, "core", facts), {"MEM-LICENSE", "MEM-DR-RPO", "MEM-DR-RTO"})
    results = by_control(report)
    assert statuses(report) == dict.fromkeys(results, "fail") and len(results) == 3, explain(report)
    assert "expired on" in results["MEM-LICENSE"].message
    assert "over its RPO of 1 s" in results["MEM-DR-RPO"].message
    assert "over its RTO of 1 s" in results["MEM-DR-RTO"].message

    # A license signed by the site's key, on a node that trusts another key (both replaced together): still refused.
    (node.root / "license.json").write_bytes(Path(lab.site.licensing.license_file).read_bytes())
    (node.root / "license-signing.pub").write_bytes(bootstrap.public_pem(Ed25519PrivateKey.generate()))
    report = audit(local_target(NODE, "core", facts), {"MEM-LICENSE"})
    assert statuses(report) == {"MEM-LICENSE": "fail"}, explain(report)
    assert "not the site's key" in by_control(report)["MEM-LICENSE"].message


def test_stores_no_backup_or_drill_covered_fail_dr(
    lab: GatewayLab, node: LocalNode, dr_sites: DrSites, tmp_path: Path
) -> None:
    """Backups and drills may cover some stores only; each store needs its own, and the message names those without."""
    report = audit(
        local_target(NODE, "core", node_facts(lab, node, dr_sites.partial, tmp_path)), {"MEM-DR-RPO", "MEM-DR-RTO"}
    )
    results = by_control(report)
    assert statuses(report) == {"MEM-DR-RPO": "fail", "MEM-DR-RTO": "fail"}, explain(report)
    rpo, rto = results["MEM-DR-RPO"].message, results["MEM-DR-RTO"].message
    for store in ("vault", "audit_db", "vectors"):
        assert f"{store}: never backed up nor shipped" in rpo
        assert f"restored {store}: run `appliance dr drill --store {store}`" in rto
    assert "state:" not in rpo and "restored state" not in rto  # the one store that was covered passes


def test_a_tampered_audit_log_fails_from_the_controller(
    lab: GatewayLab, node: LocalNode, dr_sites: DrSites, tmp_path: Path
) -> None:
    """The controller's route (`appliance audit-log verify` through Backends) on a chDB under another state dir."""
    _traffic(lab, node)
    commands = breaks(node.files(), restart=False)
    node.stop()  # the chDB is copied whole, so nobody may hold it
    done = subprocess.run(["sh", "-c", commands["MEM-AUDITLOG-CHAIN"]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    state = tmp_path / "state"
    shutil.copytree(node.root / "audit_db" / "chdb", Backends(lab.site, LabState(state)).chdb_path(), symlinks=True)
    facts = facts_for(lab, dr_sites.good, tmp_path / "no-heartbeat.json")
    facts["state_dir"] = str(state)
    report = audit(local_target(NODE, "core", facts), {"MEM-AUDITLOG-CHAIN"})
    result = by_control(report)["MEM-AUDITLOG-CHAIN"]
    assert result.status == "fail", explain(report)
    assert "edited" in result.message and "(on the controller)" in result.evidence[-1].command
