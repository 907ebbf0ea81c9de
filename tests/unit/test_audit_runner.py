"""The audit runner and its pytest plugin on this machine (local backend) with a catalog of checks made here:
every status a check can end in, the evidence recorded for it, redaction, waivers (valid, expired, scoped),
and a target that cannot be reached."""

from __future__ import annotations

import textwrap
from datetime import date
from pathlib import Path

import pytest

from appliance.audit import catalog as catalog_mod
from appliance.audit import runner
from appliance.audit import waivers as waivers_mod
from appliance.audit.targets import local_target, ssh_target
from runtime.common.yamldoc import InvalidFile

pytestmark = pytest.mark.unit

CHECKS = """
import pytest

def test_passes(host):
    assert host.run("echo ok").stdout.strip() == "ok"

def test_fails(host):
    out = host.run("printf 'root:$6$salt$hashhashhash:19000\\\\n'")
    assert out.stdout.startswith("nobody"), "root has a password hash"

def test_errors(host):
    host.run("true")
    raise RuntimeError("the check itself broke")

def test_not_applicable(host, target):
    pytest.skip(f"no running system on {target.name}")

def test_silent():
    '''Runs nothing on the target: a pass without evidence must come out as an error.'''

def test_controller_side(evidence):
    evidence.add("handshake with gateway:8443", "TLSv1.3 accepted; token=abc123")
"""


def _control(cid: str, check: str) -> str:
    return textwrap.dedent(f"""\
          - id: {cid}
            title: {check}
            rationale: test
            severity: low
            applies_to: [core]
            frameworks: [{{framework: membria, id: {cid}}}]
            check: test_demo.py::{check}
            remediation: {{role: base, text: fix it}}
        """)


@pytest.fixture
def demo(tmp_path: Path) -> tuple[catalog_mod.Catalog, Path]:
    controls = tmp_path / "controls"
    checks = tmp_path / "checks"
    controls.mkdir()
    checks.mkdir()
    (checks / "test_demo.py").write_text(CHECKS)
    names = ["passes", "fails", "errors", "not_applicable", "silent", "controller_side"]
    body = "controls:\n" + "".join(
        "  " + _control(f"MEM-{n.upper().replace('_', '-')}", f"test_{n}").replace("\n", "\n  ").rstrip() + "\n"
        for n in names
    )
    (controls / "controls-demo.yaml").write_text(body)
    (controls / "cis-debian12-l1.yaml").write_text("benchmark: t\nrecommendations: [{id: '1.1', title: t}]\n")
    return catalog_mod.load(controls, checks), checks


def test_every_status_with_its_evidence(demo: tuple[catalog_mod.Catalog, Path]) -> None:
    catalog, checks = demo
    report = runner.run("t", catalog, [local_target("here", "core")], checks_dir=checks)
    got = {r.control: r for r in report.results}
    assert got["MEM-PASSES"].status == "pass"
    assert got["MEM-PASSES"].evidence[0].command == "echo ok"
    assert got["MEM-PASSES"].evidence[0].exit_status == 0
    assert got["MEM-PASSES"].evidence[0].host == "here"
    assert got["MEM-FAILS"].status == "fail"
    assert "root has a password hash" in got["MEM-FAILS"].message
    assert "hashhash" not in got["MEM-FAILS"].evidence[0].output  # redacted
    assert got["MEM-ERRORS"].status == "error"
    assert "the check itself broke" in got["MEM-ERRORS"].message
    assert got["MEM-NOT-APPLICABLE"].status == "not_applicable"
    assert got["MEM-NOT-APPLICABLE"].message == "no running system on here"
    assert got["MEM-SILENT"].status == "error"
    assert got["MEM-SILENT"].message == "the check recorded no evidence"
    side = got["MEM-CONTROLLER-SIDE"]
    assert side.status == "pass" and side.evidence[0].exit_status is None
    assert "abc123" not in side.evidence[0].output
    assert not report.ok
    score = next(s for s in report.scores if s.framework == "membria")
    assert (score.passed, score.failed, score.errors, score.not_applicable) == (2, 1, 2, 1)
    assert score.percent == 40.0


def test_waivers_turn_failures_into_waived_until_they_expire(
    demo: tuple[catalog_mod.Catalog, Path], tmp_path: Path
) -> None:
    catalog, checks = demo
    file = tmp_path / "waivers.yaml"
    file.write_text(
        textwrap.dedent("""\
        waivers:
          - control: MEM-FAILS
            justification: the root password is needed for the console until the KVM arrives
            approver: ciso@example.com
            expires: 2030-01-31
          - control: MEM-ERRORS
            justification: accepted for another host only
            approver: ciso@example.com
            expires: "2030-01-31"
            hosts: [elsewhere]
          - control: MEM-SILENT
            justification: this one ran out last year
            approver: ciso@example.com
            expires: 2020-01-31
        """)
    )
    waivers = waivers_mod.load(file, catalog)
    report = runner.run(
        "t", catalog, [local_target("here", "core")], waivers=waivers, today=date(2026, 11, 22), checks_dir=checks
    )
    got = {r.control: r for r in report.results}
    assert got["MEM-FAILS"].status == "waived"
    assert got["MEM-FAILS"].waiver is not None and got["MEM-FAILS"].waiver.approver == "ciso@example.com"
    assert got["MEM-ERRORS"].status == "error"  # scoped to another host
    assert got["MEM-SILENT"].status == "error"  # expired: waives nothing
    assert [w.control for w in report.expired_waivers] == ["MEM-SILENT"]
    # the same file on the day after the first waiver's expiry
    later = runner.run(
        "t", catalog, [local_target("here", "core")], waivers=waivers, today=date(2030, 2, 1), checks_dir=checks
    )
    assert {r.control: r.status for r in later.results}["MEM-FAILS"] == "fail"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("waivers:\n  - control: MEM-FAILS\n    approver: a\n    expires: 2030-01-01\n", "justification"),
        (
            "waivers:\n  - control: MEM-FAILS\n    justification: long enough reason\n    approver: a\n"
            "    expires: 31/01/2030\n",
            "not a date",
        ),
        (
            "waivers:\n  - control: MEM-NOPE\n    justification: long enough reason\n    approver: a\n"
            "    expires: 2030-01-01\n",
            "no control MEM-NOPE",
        ),
        ("waivers: [\n", "line"),
    ],
)
def test_a_malformed_waiver_file_is_refused_with_its_place(
    demo: tuple[catalog_mod.Catalog, Path], tmp_path: Path, text: str, expected: str
) -> None:
    file = tmp_path / "waivers.yaml"
    file.write_text(text)
    with pytest.raises(InvalidFile) as err:
        waivers_mod.load(file, demo[0])
    assert expected in err.value.message
    assert str(file) in err.value.message


def test_an_unreachable_host_is_an_error_of_its_own_results_not_a_crash(
    demo: tuple[catalog_mod.Catalog, Path], tmp_path: Path
) -> None:
    catalog, checks = demo
    key = tmp_path / "id"
    key.write_text("not a key")
    unreachable = ssh_target("gone", "127.0.0.1", "root", key, port=1, known_hosts=tmp_path / "kh")
    report = runner.run("t", catalog, [unreachable, local_target("here", "core")], checks_dir=checks)
    gone = [r for r in report.results if r.target == "gone"]
    assert len(gone) == 6
    assert all(r.status == "error" and r.message.startswith("cannot reach root@127.0.0.1:1") for r in gone), [
        (r.status, r.message) for r in gone
    ]
    here = {r.control: r.status for r in report.results if r.target == "here"}
    assert here["MEM-PASSES"] == "pass"
