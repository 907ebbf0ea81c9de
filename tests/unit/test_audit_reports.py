"""The audit report's outputs: JUnit XML, the HTML page, the JSON schema, the signature; and the site's `audit:`.

The report is built by hand with a result of every status, evidence that needs escaping, a waiver and an
expired waiver; every way of tampering with the signed files must be caught.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import UTC, date, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import signing_keys
from appliance.audit import keys, signing
from appliance.audit.catalog import CisRecommendation, FrameworkRef
from appliance.audit.evidence import Evidence
from appliance.audit.render import html_page, junit_xml
from appliance.audit.report import (
    SCHEMA_FILE,
    AppliedWaiver,
    ExpiredWaiver,
    Report,
    Result,
    TargetInfo,
    json_schema,
    scores,
)
from appliance.errors import BadInput, CheckFailed, ExitCode
from appliance.site import AuditReportSigning, load_site
from runtime.common.license import canonical_json, key_id
from runtime.common.yamldoc import InvalidFile

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
AT = datetime(2026, 3, 2, 9, 30, 0, tzinfo=UTC)
NASTY = "<script>alert('x')</script> & ]]> \"quoted\" \x1b[31mred\x1b[0m \x00nul"
STEM = "audit-report"


def _ev(command: str, output: str, host: str, exit_status: int | None = 0) -> Evidence:
    return Evidence(command=command, exit_status=exit_status, output=output, at=AT, host=host)


def _result(control: str, status: str, target: str = "core-1", **extra: Any) -> Result:
    fields: dict[str, Any] = {
        "control": control,
        "title": f"title of {control}",
        "severity": "high",
        "frameworks": [FrameworkRef(framework="cis-debian12-l1", id=control.removeprefix("CIS-"))]
        if control.startswith("CIS-")
        else [FrameworkRef(framework="membria", id=control)],
        "target": target,
        "status": status,
        "message": "",
        "evidence": [_ev("stat -c %a /etc/passwd", "644\n", target)],
        "remediation": "roles/base_hardening: tasks/files.yml sets the mode",
        "duration_s": 0.25,
    }
    fields.update(extra)
    return Result(**fields)


def make_report() -> Report:
    results = [
        _result("CIS-7.1.1", "pass"),
        _result("CIS-7.1.2", "pass", target="laptop.img"),
        _result(
            "CIS-5.1.20",
            "fail",
            severity="critical",
            message="PermitRootLogin is yes, not no",
            evidence=[
                _ev("sshd -T | grep -i permitrootlogin", f"permitrootlogin yes\n{NASTY}\n", "core-1", 0),
                _ev("cat /etc/ssh/sshd_config.d/*.conf", "PermitRootLogin yes & more", "core-1", 1),
            ],
        ),
        _result("CIS-5.1.21", "fail", target="laptop.img", severity="medium", message=f"bad: {NASTY}"),
        _result(
            "MEM-TLS-1",
            "error",
            target="core-2",
            message="the host could not be reached",
            evidence=[],
            duration_s=0.0,
        ),
        _result("CIS-1.1.1.1", "not_applicable", target="laptop.img", message="needs a running system"),
        _result(
            "CIS-5.2.1",
            "waived",
            severity="medium",
            message="sudo has no use_pty",
            waiver=AppliedWaiver(
                justification="vendor tool breaks under a pty <b>until</b> v2 & later",
                approver="ciso@example.com",
                expires=date(2026, 3, 20),
            ),
        ),
    ]
    return Report(
        site="lab",
        generated_at=AT,
        appliance_version="0.1.0",
        catalog_digest="ab" * 32,
        targets=[
            TargetInfo(name="core-1", kind="core", connection="ssh root@10.77.0.11:22"),
            TargetInfo(name="core-2", kind="core", connection="ssh root@10.77.0.12:22", error="ssh: timed out"),
            TargetInfo(name="laptop.img", kind="image", connection="chroot /mnt/root (read-only)"),
        ],
        results=results,
        scores=scores(results),
        expired_waivers=[ExpiredWaiver(control="CIS-6.1.1", approver="old@example.com", expired=date(2026, 1, 1))],
        cis_not_covered=[
            CisRecommendation(id="1.1.1.1", title="cramfs not available"),
            CisRecommendation(id="4.2.1", title="ufw installed"),
        ],
    )


def write_reports(directory: Path, report: Report) -> list[Path]:
    """The three files the CLI writes, then their signature."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        f"{STEM}.json": report.model_dump_json(indent=2).encode() + b"\n",
        f"{STEM}.xml": junit_xml(report),
        f"{STEM}.html": html_page(report),
    }
    paths = []
    for name, data in files.items():
        (directory / name).write_bytes(data)
        paths.append(directory / name)
    return paths


# --- JUnit ---------------------------------------------------------------------------------------------------


def test_junit_parses_with_counts_per_status() -> None:
    report = make_report()
    root = ET.fromstring(junit_xml(report))
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("7", "2", "1", "2")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["core-1", "core-2", "laptop.img"]
    total = Counter[str]()
    for name, suite in suites.items():
        cases = suite.findall("testcase")
        mine = [r for r in report.results if r.target == name]
        assert int(suite.get("tests", "-1")) == len(cases) == len(mine)
        kinds = Counter(child.tag for case in cases for child in case if child.tag != "system-out")
        assert int(suite.get("failures", "-1")) == kinds["failure"]
        assert int(suite.get("errors", "-1")) == kinds["error"]
        assert int(suite.get("skipped", "-1")) == kinds["skipped"]
        total.update(kinds)
        props = {p.get("name"): p.get("value") for p in suite.iter("property")}
        assert props["site"] == "lab"
        assert props["catalog_digest"] == "ab" * 32
        assert props["generated_at"] == "2026-03-02T09:30:00Z"
    assert total == Counter({"failure": 2, "error": 1, "skipped": 2})
    assert suites["core-2"].findtext("system-err", "").startswith("the target could not be audited: ssh: timed out")
    props = {p.get("name"): p.get("value") for p in suites["core-2"].iter("property")}
    assert props["target.error"] == "ssh: timed out"


def test_junit_failure_carries_message_and_evidence() -> None:
    root = ET.fromstring(junit_xml(make_report()))
    case = next(c for c in root.iter("testcase") if c.get("name", "").startswith("CIS-5.1.20 "))
    assert case.get("name") == "CIS-5.1.20 title of CIS-5.1.20"
    assert case.get("classname") == "cis-debian12-l1.core-1"
    failure = case.find("failure")
    assert failure is not None
    assert failure.get("message") == "PermitRootLogin is yes, not no"
    body = failure.text or ""
    assert "$ sshd -T | grep -i permitrootlogin" in body
    assert "<script>alert('x')</script> & ]]>" in body  # escaped on the way out, the same text on the way in
    assert "\\x1b[31mred" in body and "\\x00nul" in body  # XML cannot carry them: shown, not dropped
    assert "Remediation: roles/base_hardening" in body
    assert "exit 1, 2026-03-02T09:30:00Z, on core-1" in body
    dotted = next(c for c in root.iter("testcase") if c.get("name", "").startswith("CIS-5.1.21 "))
    assert dotted.get("classname") == "cis-debian12-l1.laptop_img"


def test_junit_waived_and_not_applicable_are_skipped() -> None:
    root = ET.fromstring(junit_xml(make_report()))
    cases = {c.get("name", "").split()[0]: c for c in root.iter("testcase")}
    waived = cases["CIS-5.2.1"].find("skipped")
    assert waived is not None
    message = waived.get("message", "")
    assert message.startswith("waived: vendor tool breaks under a pty <b>until</b> v2 & later")
    assert "approved by ciso@example.com" in message and "expires 2026-03-20" in message
    na = cases["CIS-1.1.1.1"].find("skipped")
    assert na is not None and na.get("message") == "needs a running system"
    assert cases["MEM-TLS-1"].find("error") is not None
    assert cases["MEM-TLS-1"].get("classname") == "membria.core-2"
    passed = cases["CIS-7.1.1"]
    assert [child.tag for child in passed] == ["system-out"]
    assert "$ stat -c %a /etc/passwd" in (passed.findtext("system-out") or "")


# --- HTML ----------------------------------------------------------------------------------------------------


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))


def _elements(page: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Elements()
    parser.feed(page)
    parser.close()
    return parser.elements


def test_html_is_autoescaped_and_self_contained() -> None:
    page = html_page(make_report()).decode("utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()  # the evidence's <script> is text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; ]]&gt;" in page
    assert "<b>until</b>" not in page and "&lt;b&gt;until&lt;/b&gt;" in page
    assert "\x1b" not in page and "\x00" not in page and "\\x1b[31mred" in page
    # nothing fetched: no external stylesheet, font, image, frame or link, and no script at all
    for pattern in (r"<link\b", r"<img\b", r"<iframe\b", r"@import", r"url\(", r"\bsrc=", r"\bhref=", r"https?://"):
        assert not re.search(pattern, page, re.IGNORECASE), pattern
    tags = {tag for tag, _ in _elements(page)}
    assert "style" in tags and "script" not in tags


def test_html_sections_and_controls() -> None:
    report = make_report()
    page = html_page(report).decode("utf-8")
    elements = _elements(page)
    ids = [attrs["id"] for _, attrs in elements if "id" in attrs]
    for section in (
        "summary",
        "targets",
        "scores",
        "failures",
        "waived",
        "expired-waivers",
        "passed",
        "cis-not-covered",
    ):
        assert section in ids
    assert len(ids) == len(set(ids))
    failing = [a for _, a in elements if a.get("class") in ("control fail", "control error")]
    assert sorted((a["data-control"], a["data-target"]) for a in failing) == sorted(
        (r.control, r.target) for r in report.failures
    )
    assert failing[0]["data-control"] == "CIS-5.1.20"  # critical first
    waived = [a for _, a in elements if a.get("class") == "control waived"]
    assert [a["data-control"] for a in waived] == ["CIS-5.2.1"]
    rest = [a["data-status"] for _, a in elements if a.get("class") in ("control pass", "control not_applicable")]
    assert sorted(rest) == ["not_applicable", "pass", "pass"]
    scores_rows = [a["data-framework"] for _, a in elements if a.get("class") == "score"]
    assert scores_rows == [s.framework for s in report.scores]
    cis = [a["data-recommendation"] for _, a in elements if "data-recommendation" in a]
    assert cis == ["1.1.1.1", "4.2.1"]
    for text in (
        "ciso@example.com",
        "2026-03-20",
        "in 18 days",
        "old@example.com",
        "CIS-6.1.1",
        "not audited: ssh: timed out",
        "ssh root@10.77.0.11:22",
        "ab" * 32,
        "roles/base_hardening: tasks/files.yml sets the mode",
        "exit 1",
        "2026-03-02 09:30:00 UTC",
    ):
        assert text in page, text


def test_html_score_figures() -> None:
    report = make_report()
    cis = next(s for s in report.scores if s.framework == "cis-debian12-l1")
    # pass 2, fail 2, error 0 (the error is a membria control): 2 / 4
    assert (cis.passed, cis.failed, cis.errors, cis.waived, cis.not_applicable, cis.percent) == (2, 2, 0, 1, 1, 50.0)
    page = html_page(report).decode("utf-8")
    row = re.search(r'<tr class="score" data-framework="cis-debian12-l1">(.*?)</tr>', page, re.S)
    assert row is not None and "50.0%" in row.group(1)


def test_html_of_an_empty_clean_report() -> None:
    report = Report(
        site="lab",
        generated_at=AT,
        appliance_version="0.1.0",
        catalog_digest="0" * 64,
        targets=[],
        results=[],
        scores=scores([]),
        expired_waivers=[],
        cis_not_covered=[],
    )
    page = html_page(report).decode("utf-8")
    assert "No control failed." in page and 'class="verdict ok"' in page
    root = ET.fromstring(junit_xml(report))
    assert root.get("tests") == "0" and root.findall("testsuite") == []


# --- JSON and its schema -------------------------------------------------------------------------------------


def test_schema_file_matches_the_model() -> None:
    assert SCHEMA_FILE.read_text() == json_schema(), (
        "appliance/audit/report.schema.json is stale: regenerate it with `.venv/bin/python -c "
        '"from appliance.audit import report; report.SCHEMA_FILE.write_text(report.json_schema())"`'
    )


def test_json_report_round_trips_and_meets_its_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    report = make_report()
    data = json.loads(report.model_dump_json())
    jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))
    assert Report.model_validate(data) == report
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "results": [{**data["results"][0], "status": "maybe"}]}, json.loads(json_schema()))


# --- the signature -------------------------------------------------------------------------------------------


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    out = tmp_path / "report"
    files = write_reports(out, make_report())
    assert signing.sign(files, key, out / f"{STEM}.sig.json") == out / f"{STEM}.sig.json"
    return out, key


def test_sign_and_verify(signed: tuple[Path, Ed25519PrivateKey]) -> None:
    out, key = signed
    sig = out / f"{STEM}.sig.json"
    names = [f"{STEM}.html", f"{STEM}.json", f"{STEM}.xml"]
    assert signing.verify(sig, key.public_key()) == names
    document = json.loads(sig.read_text())
    assert set(document) == {"algorithm", "manifest", "signature"}
    manifest = document["manifest"]
    assert sorted(manifest["files"]) == names
    assert manifest["key_id"] == key_id(key.public_key())
    assert manifest["schema"] == signing.SCHEMA
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["signed_at"])
    assert (sig.stat().st_mode & 0o777) == 0o644
    # the directory, or one report file (only that one is checked)
    assert signing.verify(out, key.public_key()) == names
    assert signing.verify(out / f"{STEM}.html", key.public_key()) == [f"{STEM}.html"]
    (out / f"{STEM}.json").write_text("{}")  # another file changed: the html alone still verifies
    assert signing.verify(out / f"{STEM}.html", key.public_key()) == [f"{STEM}.html"]
    with pytest.raises(CheckFailed):
        signing.verify(out / f"{STEM}.json", key.public_key())


def test_reindented_signature_file_still_verifies(signed: tuple[Path, Ed25519PrivateKey]) -> None:
    out, key = signed
    sig = out / f"{STEM}.sig.json"
    sig.write_text(json.dumps(json.loads(sig.read_text()), indent=7))
    assert len(signing.verify(sig, key.public_key())) == 3


@pytest.mark.parametrize("name", [f"{STEM}.json", f"{STEM}.html", f"{STEM}.xml"])
def test_one_changed_byte_is_caught(signed: tuple[Path, Ed25519PrivateKey], name: str) -> None:
    out, key = signed
    path = out / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckFailed) as caught:
        signing.verify(out / f"{STEM}.sig.json", key.public_key())
    assert caught.value.exit_code == ExitCode.CHECK_FAILED
    assert f"{name}: sha256 differs" in caught.value.message
    others = {f"{STEM}.json", f"{STEM}.html", f"{STEM}.xml"} - {name}
    assert not any(other in caught.value.message for other in others)


def test_removed_file_is_caught(signed: tuple[Path, Ed25519PrivateKey]) -> None:
    out, key = signed
    (out / f"{STEM}.xml").unlink()
    with pytest.raises(CheckFailed, match=rf"{STEM}\.xml: missing"):
        signing.verify(out / f"{STEM}.sig.json", key.public_key())


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m["files"].update({f"{STEM}.xml": "0" * 64}), id="file-hash"),
        pytest.param(lambda m: m["files"].pop(f"{STEM}.xml"), id="file-dropped"),
        pytest.param(lambda m: m.update(signed_at="2020-01-01T00:00:00Z"), id="signed-at"),
        pytest.param(lambda m: m.update(extra="x"), id="key-added"),
    ],
)
def test_edited_manifest_is_caught(signed: tuple[Path, Ed25519PrivateKey], edit: Any) -> None:
    out, key = signed
    sig = out / f"{STEM}.sig.json"
    document = json.loads(sig.read_text())
    edit(document["manifest"])
    sig.write_text(json.dumps(document, indent=2))
    with pytest.raises(CheckFailed, match="the signature does not match its manifest"):
        signing.verify(sig, key.public_key())


def test_a_different_key_is_caught(signed: tuple[Path, Ed25519PrivateKey]) -> None:
    out, key = signed
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(CheckFailed) as caught:
        signing.verify(out / f"{STEM}.sig.json", other)
    assert f"signed by key {key_id(key.public_key())}, but the trusted key is {key_id(other)}" in caught.value.message
    # a manifest re-signed with another key but claiming the real key id: still refused
    sig = out / f"{STEM}.sig.json"
    document = json.loads(sig.read_text())
    forger = Ed25519PrivateKey.generate()
    document["signature"] = base64.b64encode(forger.sign(canonical_json(document["manifest"]))).decode()
    sig.write_text(json.dumps(document))
    with pytest.raises(CheckFailed, match="does not match"):
        signing.verify(sig, key.public_key())


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"\xff\xfe not utf-8", id="binary"),
        pytest.param(lambda b: b"[1, 2]", id="a-list"),
        pytest.param(lambda b: b.replace(b'"signature": "', b'"signature": "!!'), id="not-base64"),
        pytest.param(lambda b: b.replace(b'"algorithm": "ed25519"', b'"algorithm": "rsa"'), id="algorithm"),
        pytest.param(lambda b: b.replace(b'"key_id": "', b'"nan": NaN, "key_id": "'), id="nan"),
    ],
)
def test_malformed_signature_file_is_bad_input(signed: tuple[Path, Ed25519PrivateKey], damage: Any) -> None:
    out, key = signed
    sig = out / f"{STEM}.sig.json"
    sig.write_bytes(damage(sig.read_bytes()))
    with pytest.raises(BadInput) as caught:
        signing.verify(sig, key.public_key())
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    assert str(sig) in caught.value.message


def test_short_signature_is_bad_input(signed: tuple[Path, Ed25519PrivateKey]) -> None:
    out, key = signed
    sig = out / f"{STEM}.sig.json"
    document = json.loads(sig.read_text())
    document["signature"] = document["signature"][:40]
    sig.write_text(json.dumps(document))
    with pytest.raises(BadInput, match="not an Ed25519 signature"):
        signing.verify(sig, key.public_key())


def test_missing_or_absent_signature(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(BadInput, match="no such signature file"):
        signing.verify(tmp_path / f"{STEM}.sig.json", key.public_key())
    (tmp_path / f"{STEM}.html").write_text("<html></html>")
    with pytest.raises(CheckFailed, match="no signature file beside it lists it"):
        signing.verify(tmp_path / f"{STEM}.html", key.public_key())
    with pytest.raises(CheckFailed, match="no signature file"):
        signing.verify(tmp_path, key.public_key())
    with pytest.raises(BadInput, match="no such file"):
        signing.verify(tmp_path / "nothing.html", key.public_key())


def test_sign_refuses_files_elsewhere(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "elsewhere.json").write_text("{}")
    with pytest.raises(BadInput, match="not in"):
        signing.sign([tmp_path / "elsewhere.json"], key, tmp_path / "out" / f"{STEM}.sig.json")
    with pytest.raises(BadInput, match="no such file"):
        signing.sign([tmp_path / "gone.json"], key, tmp_path / f"{STEM}.sig.json")


# --- the site's audit: section and the keys ------------------------------------------------------------------


LAB = (ROOT / "examples" / "lab.yaml").read_text()
AUDIT_BLOCK = (
    "audit:                            # compliance reports (`appliance audit`): their own key, auditors get the .pub\n"
    "  signing:\n"
    "    signing_key_vault_path: membria/audit-report-signing\n"
    "    public_key_file: .lab/audit/report-signing.pub\n"
)


def _site(tmp_path: Path, text: str) -> Path:
    assert LAB.count(AUDIT_BLOCK) == 1
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["lab.yaml", "rack.yaml"])
def test_examples_carry_an_audit_section(name: str) -> None:
    site = load_site(ROOT / "examples" / name)
    assert site.audit is not None
    assert site.audit.signing.signing_key_vault_path == "membria/audit-report-signing"
    assert keys.settings(site) == site.audit.signing


def test_audit_section_defaults_the_vault_path(tmp_path: Path) -> None:
    text = LAB.replace(AUDIT_BLOCK, "audit: {signing: {public_key_file: /etc/membria/audit.pub}}\n")
    site = load_site(_site(tmp_path, text))
    assert site.audit is not None
    assert site.audit.signing == AuditReportSigning(public_key_file=Path("/etc/membria/audit.pub"))
    assert site.audit.signing.signing_key_vault_path == "membria/audit-report-signing"


@pytest.mark.parametrize(
    ("replacement", "message"),
    [
        ("audit: {signing: {public_key_file: a.pub, colour: red}}\n", "unknown key 'colour'"),
        ("audit: {signing: {public_key_file: a.pub}, sign: true}\n", "unknown key 'sign'"),
        ("audit: {signing: {signing_key_vault_path: membria/x}}\n", "public_key_file"),
        ("audit: {}\n", "signing"),
        ("audit: {signing: {public_key_file: a.pub, signing_key_vault_path: ''}}\n", "at least 1 character"),
    ],
)
def test_audit_section_refuses_bad_settings(tmp_path: Path, replacement: str, message: str) -> None:
    with pytest.raises(InvalidFile) as caught:
        load_site(_site(tmp_path, LAB.replace(AUDIT_BLOCK, replacement)))
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    text = "\n".join(f"{issue.path}: {issue.message}" for issue in caught.value.issues)
    assert text.startswith("audit") and message in text, text


def test_keys_without_an_audit_section(tmp_path: Path) -> None:
    site = load_site(_site(tmp_path, LAB.replace(AUDIT_BLOCK, "")))
    assert site.audit is None
    with pytest.raises(BadInput, match="has no `audit:` section") as caught:
        keys.settings(site)
    assert caught.value.hint and "audit:" in caught.value.hint
    with pytest.raises(BadInput, match="which key signs the report"):
        keys.trusted_key(None, None)


def test_trusted_key_from_the_site_or_the_option(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "report-signing.pub"
    signing_keys.write_public(key, pub)
    site = load_site(_site(tmp_path, LAB.replace(".lab/audit/report-signing.pub", str(pub))))
    assert key_id(keys.trusted_key(site, None)) == key_id(key.public_key())
    assert key_id(keys.trusted_key(None, pub)) == key_id(key.public_key())
    with pytest.raises(BadInput, match="no such public key file"):
        keys.trusted_key(site, tmp_path / "missing.pub")
