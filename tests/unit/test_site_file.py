"""The site file loader: every bad input is reported with its YAML path, its line and a useful message."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.errors import ExitCode
from appliance.site import Site, load_site
from runtime.common.yamldoc import FileIssue, InvalidFile, load_model, validate_document

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LAB = (ROOT / "examples" / "lab.yaml").read_text()
RACK = (ROOT / "examples" / "rack.yaml").read_text()


def edit(text: str, *replacements: tuple[str, str]) -> str:
    """Apply string replacements, each of which must match exactly once (so a stale test fails loudly)."""
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    return text


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line of the n-th line containing `needle`."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) >= occurrence, f"{needle!r} found {len(hits)} times"
    return hits[occurrence - 1]


def issues_of(path: Path) -> list[FileIssue]:
    with pytest.raises(InvalidFile) as caught:
        load_site(path)
    assert caught.value.file == path
    return caught.value.issues


def write(tmp_path: Path, text: str, name: str = "site.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    path: str
    line: int
    message: str  # a part of the message that must be there


_NODE_2 = """  - name: core-1
    address: 10.77.0.12
    ssh: {user: root, key: .lab/ssh/id_ed25519}
    hardware: {cpu: {model: x86, cores: 2}, ram_gb: 8}
"""
_LAB_2_NODES = edit(LAB, ("\nservices:", _NODE_2 + "\nservices:"))
_LAB_NO_ADDRESS = edit(
    LAB, ("    address: 10.77.0.11          # an nspawn test host on the lab's private network\n", "")
)
_LAB_NO_SERVICES = re.sub(r"\nservices:\n.*?\n\n", "\n", LAB, flags=re.S)
_LAB_NO_USER = edit(LAB, ("      user: root\n", ""))
_LAB_DUP_PROFILE = edit(LAB, ("name: sales-laptop", "name: engineering-laptop"))
_RACK_TOKEN = edit(
    RACK,
    (
        "      method: approle\n      role_id: 6f1c3a8e-membria-provisioner\n"
        "      secret_id_env: MEMBRIA_VAULT_SECRET_ID\n",
        "      method: token\n      token_env: s.abc123\n",
    ),
)
_LONG_HOST = "h_" + "x" * 300

CASES = [
    Case(
        "wrong-type-cores",
        t := edit(LAB, ("cores: 2}", 'cores: "many"}')),
        "core_nodes[0].hardware.cpu.cores",
        line_of(t, "cores:"),
        "valid integer",
    ),
    Case(
        "bool-is-not-a-count",
        t := edit(RACK, ("count: 4}", "count: true}")),
        "core_nodes[0].hardware.gpus[0].count",
        line_of(t, "count: true"),
        "valid integer",
    ),
    Case(
        "quoted-number-is-not-a-number",
        t := edit(LAB, ("ram_gb: 24", 'ram_gb: "24"')),
        "core_nodes[0].hardware.ram_gb",
        line_of(t, "ram_gb"),
        "valid integer",
    ),
    Case(
        "unknown-key-top-level",
        t := LAB + "monitoring: {enabled: true}\n",
        "monitoring",
        line_of(t, "monitoring:"),
        "unknown key 'monitoring' (allowed: site, core_nodes, services, edge_profiles, licensing, rbac, bundle, "
        "edge, audit, dr, lab)",
    ),
    Case(
        "unknown-key-in-hardware",
        t := edit(LAB, ("      ram_gb: 24\n", "      ram_gb: 24\n      gpu: []\n")),
        "core_nodes[0].hardware.gpu",
        line_of(t, "gpu: []"),
        "unknown key 'gpu' (allowed: cpu, ram_gb, gpus, nics)",
    ),
    Case(
        "unknown-key-behind-two-union-tags",
        t := edit(RACK, ("      method: approle\n", "      method: approle\n      mount_path: approle2\n")),
        "services.vault.auth.mount_path",
        line_of(t, "mount_path:"),
        "unknown key 'mount_path' (allowed: method, role_id, secret_id_env, mount)",
    ),
    Case(
        "unknown-key-in-flow-mapping",
        t := edit(LAB, ("edge: 8450}", "edge: 8450, ssh: 2222}")),
        "lab.ports.ssh",
        line_of(t, "ports:"),
        "unknown key 'ssh' (allowed: openbao, s3, llm, core, gateway, edge)",
    ),
    Case(
        "core-node-without-address",
        _LAB_NO_ADDRESS,
        "core_nodes[0].address",
        line_of(_LAB_NO_ADDRESS, "- name: core-1"),
        "missing required field 'address'",
    ),
    Case(
        "no-services",
        _LAB_NO_SERVICES,
        "services",
        line_of(_LAB_NO_SERVICES, "site:"),
        "missing required field 'services'",
    ),
    Case(
        "ssh-without-user",
        _LAB_NO_USER,
        "core_nodes[0].ssh.user",
        line_of(_LAB_NO_USER, "ssh:"),
        "missing required field 'user'",
    ),
    Case(
        "service-without-backend",
        t := edit(LAB, ("vault: {backend: embedded}", "vault: {}")),
        "services.vault.backend",
        line_of(t, "vault: {}"),
        "missing required field 'backend'",
    ),
    Case(
        "unknown-backend",
        t := edit(LAB, ("vault: {backend: embedded}", "vault: {backend: builtin}")),
        "services.vault.backend",
        line_of(t, "builtin"),
        "expected tags: 'embedded', 'external'",
    ),
    Case(
        "duplicate-core-node-name",
        _LAB_2_NODES,
        "core_nodes[1].name",
        line_of(_LAB_2_NODES, "- name: core-1", occurrence=2),
        "name 'core-1' is used twice (items 0 and 1)",
    ),
    Case(
        "duplicate-edge-profile-name",
        _LAB_DUP_PROFILE,
        "edge_profiles[1].name",
        line_of(_LAB_DUP_PROFILE, "- name: engineering-laptop", occurrence=2),
        "name 'engineering-laptop' is used twice",
    ),
    Case(
        "llm-url-not-a-url",
        t := edit(RACK, ("url: https://core-1.ai.acme.example:8000/v1", "url: not a url")),
        "services.llm.url",
        line_of(t, "not a url"),
        "valid URL",
    ),
    Case(
        "vault-over-ftp",
        t := edit(RACK, ("url: https://vault.ai.acme.example:8200", "url: ftp://vault.ai.acme.example")),
        "services.vault.url",
        line_of(t, "ftp://"),
        "URL scheme should be 'http' or 'https'",
    ),
    Case(
        "gpu-impossible-memory",
        t := edit(RACK, ("memory_gb: 32", "memory_gb: 48")),
        "core_nodes[0].hardware.gpus[0].memory_gb",
        line_of(t, "memory_gb: 48"),
        "RTX 5090 has 32 GB of memory, not 48 GB",
    ),
    Case(
        "gpu-unknown-model",
        t := edit(RACK, ("model: RTX 5090", "model: RTX 9999")),
        "core_nodes[0].hardware.gpus[0].model",
        line_of(t, "RTX 9999"),
        "unknown GPU model 'RTX 9999'; known models: A100 80GB",
    ),
    Case(
        "site-name-uppercase",
        t := edit(RACK, ("name: acme-plant", "name: Acme-Plant")),
        "site.name",
        line_of(t, "Acme-Plant"),
        "lower-case name",
    ),
    Case(
        "bad-domain",
        t := edit(RACK, ("domain: ai.acme.example", "domain: ai..acme")),
        "site.domain",
        line_of(t, "domain:"),
        "should match pattern",
    ),
    Case(
        "password-in-clickhouse-dsn",
        t := edit(RACK, ("clickhouses://clickhouse", "clickhouses://membria:hunter2@clickhouse")),
        "services.audit_db.dsn",
        line_of(t, "dsn:"),
        "the DSN carries a password",
    ),
    Case(
        "secret-where-env-var-name-expected",
        _RACK_TOKEN,
        "services.vault.auth.token_env",
        line_of(_RACK_TOKEN, "token_env:"),
        "environment variable holding the Vault token",
    ),
    Case(
        "lab-port-clash",
        t := edit(LAB, ("s3: 9000", "s3: 8200")),
        "lab.ports.s3",
        line_of(t, "ports:"),
        "port 8200 is used by both openbao and s3",
    ),
    Case(
        "port-out-of-range",
        t := edit(LAB, ("llm: 8081,", "llm: 70000,")),
        "lab.ports.llm",
        line_of(t, "ports:"),
        "less than or equal to 65535",
    ),
    Case(
        "lab-not-on-loopback",
        t := edit(LAB, ("host: 127.0.0.1", "host: 0.0.0.0")),
        "lab.host",
        line_of(t, "host: 0.0.0.0"),
        "Input should be '127.0.0.1' or '::1'",
    ),
    Case(
        "address-neither-ip-nor-host",
        t := edit(LAB, ("address: 10.77.0.11", 'address: "10.0.0.1/24"')),
        "core_nodes[0].address",
        line_of(t, "address:"),
        "'10.0.0.1/24' is neither an IP address nor a host name",
    ),
    Case(
        "replica-same-as-primary",
        t := edit(LAB, ("bucket: membria-dr-replica", "bucket: membria-dr")),
        "services.s3.replica",
        line_of(t, "replica:"),
        "the replica is the same target as the primary",
    ),
    Case(
        "profile-without-departments",
        t := edit(LAB, ("departments: [sales]", "departments: []")),
        "edge_profiles[1].departments",
        line_of(t, "departments: []"),
        "at least 1 item",
    ),
    Case(
        "date-where-text-expected",
        t := edit(LAB, ("name: gemma-3-270m-q4_k_m    #", "name: 2025-01-01    #")),
        "edge_profiles[0].model.name",
        line_of(t, "2025-01-01"),
        "valid string",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_site_reports_path_line_and_message(tmp_path: Path, case: Case) -> None:
    issues = issues_of(write(tmp_path, case.text))
    matching = [i for i in issues if i.path == case.path]
    assert matching, f"no issue at {case.path}; got {issues}"
    assert any(i.line == case.line and case.message in i.message for i in matching), issues


def test_every_case_is_distinct() -> None:
    assert len({c.text for c in CASES}) == len(CASES) >= 20


def test_secrets_and_long_values_are_not_echoed(tmp_path: Path) -> None:
    dsn = edit(RACK, ("clickhouses://clickhouse", "clickhouses://membria:hunter2@clickhouse"))
    for text, secret in ((dsn, "hunter2"), (_RACK_TOKEN, "s.abc123")):
        with pytest.raises(InvalidFile) as caught:
            load_site(write(tmp_path, text))
        assert secret not in caught.value.message

    long_host = edit(LAB, ("address: 10.77.0.11", f"address: {_LONG_HOST}"))
    (issue,) = issues_of(write(tmp_path, long_host, "c.yaml"))
    assert issue.path == "core_nodes[0].address"
    assert _LONG_HOST not in issue.message and "..." in issue.message
    assert len(issue.message) < 150


def test_several_errors_are_reported_together(tmp_path: Path) -> None:
    text = edit(
        RACK,
        ("name: acme-plant", "name: ACME"),
        ("cores: 96}", "cores: many}"),
        ("memory_gb: 32", "memory_gb: 48"),
        ("url: https://vault.ai.acme.example:8200", "url: ftp://vault"),
        ("  - name: sales-laptop\n", "  - name: sales-laptop\n    color: blue\n"),
    )
    path = write(tmp_path, text)
    with pytest.raises(InvalidFile) as caught:
        load_site(path)
    issues = caught.value.issues
    assert [i.path for i in issues] == [
        "site.name",
        "core_nodes[0].hardware.cpu.cores",
        "core_nodes[0].hardware.gpus[0].memory_gb",
        "services.vault.url",
        "edge_profiles[2].color",
    ]
    assert [i.line for i in issues] == sorted(i.line or 0 for i in issues)
    assert caught.value.message.splitlines()[0] == f"{path}: 5 errors"
    assert caught.value.summary == f"{path}: 5 errors"
    assert caught.value.exit_code == ExitCode.BAD_INPUT


# --- the file itself ---------------------------------------------------------------------------------------


def only_issue(path: Path) -> FileIssue:
    issues = issues_of(path)
    assert len(issues) == 1, issues
    return issues[0]


def test_missing_file(tmp_path: Path) -> None:
    assert only_issue(tmp_path / "nope.yaml") == FileIssue("", None, "no such file")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert only_issue(tmp_path) == FileIssue("", None, "is a directory, not a file")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"site:\n  name: lab\n  description: caf\xe9\n")
    issue = only_issue(path)
    assert (issue.path, issue.line) == ("", 3)
    assert "not UTF-8" in issue.message and "0xe9" in issue.message


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + LAB.encode())
    assert load_site(path).site.name == "lab"


def test_invalid_yaml_syntax(tmp_path: Path) -> None:
    text = edit(LAB, ("departments: [sales]", "departments: [sales"))
    issue = only_issue(write(tmp_path, text))
    assert issue.path == ""
    assert issue.line == line_of(text, "extra_packages")  # where the parser noticed the unclosed '['
    assert issue.message.startswith("invalid YAML: ")
    assert f"line {line_of(text, 'departments: [sales')}" in issue.message  # and where the '[' opened


def test_tab_indentation(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, "site:\n\tname: lab\n"))
    assert (issue.path, issue.line) == ("", 2)
    assert "'\\t'" in issue.message


def test_duplicate_keys_all_reported_without_values(tmp_path: Path) -> None:
    text = edit(
        LAB,
        ("  name: lab\n", "  name: lab\n  name: lab2\n"),
        ("  state_dir: .lab\n", "  state_dir: .lab\n  host: ::1\n"),
    )
    issues = issues_of(write(tmp_path, text))
    assert issues == [
        FileIssue(
            "site.name",
            line_of(text, "name: lab2"),
            f"duplicate key 'name' (first defined on line {line_of(text, 'name: lab')})",
        ),
        FileIssue(
            "lab.host",
            line_of(text, "host: ::1"),
            f"duplicate key 'host' (first defined on line {line_of(text, 'host: 127')})",
        ),
    ]


def test_duplicate_key_in_flow_mapping_inside_list(tmp_path: Path) -> None:
    text = edit(LAB, ("{name: host0, speed_gbps: 10}", "{name: host0, name: eth0, speed_gbps: 10}"))
    issue = only_issue(write(tmp_path, text))
    assert (issue.path, issue.line) == ("core_nodes[0].hardware.nics[0].name", line_of(text, "eth0"))


def test_two_documents(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, LAB + "---\nsite: {name: other}\n"))
    assert issue.line == LAB.count("\n") + 1
    assert "single document" in issue.message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    assert only_issue(write(tmp_path, text)) == FileIssue("", None, "the file is empty")


def test_top_level_list(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, "# sites\n- name: lab\n- name: rack\n"))
    assert issue == FileIssue("", 2, "the top level must be a mapping (key: value), not a list")


def test_top_level_scalar(tmp_path: Path) -> None:
    issue = only_issue(write(tmp_path, "lab\n"))
    assert (issue.path, issue.line) == ("", 1)
    assert "not a single str value" in issue.message


# --- the examples and the API ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lab.yaml", "rack.yaml"])
def test_examples_load(name: str) -> None:
    site = load_site(ROOT / "examples" / name)
    assert isinstance(site, Site)
    assert site.core_nodes[0].name == "core-1"


def test_rack_example_values_kept_as_written() -> None:
    site = load_site(ROOT / "examples" / "rack.yaml")
    node = site.core_nodes[0]
    assert str(node.ssh.key) == "~/.ssh/membria_ed25519"  # not expanded, not resolved
    assert node.hardware.gpu_count == 4
    assert type(node.hardware.ram_gb) is int  # plain types, not ruamel's
    assert site.embedded == {"llm": False, "vectors": False, "audit_db": False, "vault": False, "s3": False}


def test_validate_document_on_plain_data() -> None:
    with pytest.raises(InvalidFile) as caught:
        validate_document({"site": {"name": "X", "domain": "x.example"}}, Site)
    assert {i.path for i in caught.value.issues} == {"site.name", "core_nodes", "services", "licensing", "rbac"}
    assert all(i.line is None for i in caught.value.issues)  # no ruamel data, no line numbers


def test_load_model_is_generic(tmp_path: Path) -> None:
    from appliance.site import LabPorts

    assert load_model(write(tmp_path, "openbao: 8300\n"), LabPorts).openbao == 8300
    with pytest.raises(InvalidFile) as caught:
        load_model(write(tmp_path, "openbao: 8300\ns3: 8300\n"), LabPorts)
    assert caught.value.issues == [FileIssue("s3", 2, "port 8300 is used by both openbao and s3")]


def test_invalid_file_is_bad_input(tmp_path: Path) -> None:
    error = InvalidFile(tmp_path / "x.yaml", [FileIssue("a.b[0]", 3, "boom"), FileIssue("", None, "empty")])
    assert isinstance(error, ValueError)  # runtime.common: no dependency on appliance.errors
    assert error.exit_code == ExitCode.BAD_INPUT
    assert error.summary == f"{tmp_path}/x.yaml: 2 errors"
    assert error.message.splitlines() == [
        f"{tmp_path}/x.yaml: 2 errors",
        f"{tmp_path}/x.yaml:3: a.b[0]: boom",
        f"{tmp_path}/x.yaml: empty",
    ]


# --- the CLI ------------------------------------------------------------------------------------------------


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", ["examples/lab.yaml", "examples/rack.yaml"])
def test_cli_validate_examples(name: str) -> None:
    result = appliance("site", "validate", name)
    assert result.returncode == 0, result.stderr
    assert f"{name} is valid" in result.stdout
    assert "core-1" in result.stdout


def test_cli_validate_summary_shows_hardware_and_services() -> None:
    out = appliance("site", "validate", "examples/rack.yaml").stdout
    for text in (
        "acme-plant",
        "ai.acme.example",
        "10.20.0.11",
        "96 cores",
        "512 GB",
        "4x RTX 5090 (128 GB)",
        "https://core-1.ai.acme.example:8000/v1",
        "field-service",
        "eu-central-1",
        "membria-dr-replica",
    ):
        assert text in out, text
    lab = appliance("site", "validate", "examples/lab.yaml").stdout
    assert "embedded" in lab and "http://127.0.0.1:9000" in lab


def test_cli_validate_bad_file(tmp_path: Path) -> None:
    text = edit(
        LAB,
        ("cores: 2}", "cores: many}"),
        ("      ram_gb: 24\n", "      ram_gb: 24\n      gpu: [x]\n"),
        ("s3: 9000", "s3: 8200"),
    )
    path = write(tmp_path, text)
    result = appliance("site", "validate", str(path))
    assert result.returncode == ExitCode.BAD_INPUT
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{path}: 3 errors" in result.stderr
    lines = result.stderr.splitlines()
    for expected in (
        f"{path}:{line_of(text, 'cores:')}: core_nodes[0].hardware.cpu.cores: Input should be a valid integer",
        f"{path}:{line_of(text, 'gpu: [x]')}: core_nodes[0].hardware.gpu: unknown key 'gpu' (allowed: cpu, ram_gb, "
        "gpus, nics)",
        f"{path}:{line_of(text, 'ports:')}: lab.ports.s3: port 8200 is used by both openbao and s3",
    ):
        assert expected in lines, result.stderr


@pytest.mark.parametrize("make", ["missing", "directory", "syntax"])
def test_cli_unreadable_or_broken_file(tmp_path: Path, make: str) -> None:
    path = {"missing": tmp_path / "nope.yaml", "directory": tmp_path, "syntax": write(tmp_path, "site: [\n")}[make]
    result = appliance("site", "validate", str(path))
    assert result.returncode == ExitCode.BAD_INPUT
    assert "Traceback" not in result.stdout + result.stderr
    assert str(path) in result.stderr


def test_cli_show_json() -> None:
    result = appliance("site", "show", "examples/rack.yaml", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == load_site(ROOT / "examples" / "rack.yaml").model_dump(mode="json")
    assert data["core_nodes"][0]["hardware"]["gpus"][0] == {"model": "RTX 5090", "memory_gb": 32, "count": 4}
    defaults = {"openbao": 8200, "s3": 9000, "llm": 8081, "core": 8444, "gateway": 8443, "edge": 8450}
    assert data["lab"]["ports"] == defaults  # filled in


def test_cli_usage_error_is_bad_input() -> None:
    result = appliance("site", "validate")
    assert result.returncode == ExitCode.BAD_INPUT
    assert "Traceback" not in result.stdout + result.stderr
    assert "Missing argument 'FILE'" in result.stderr
