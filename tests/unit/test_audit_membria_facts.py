"""The membria controls' catalog entries, the site facts they read, and their pure helpers (LUKS, units, PCRs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit.catalog import CHECKS_DIR, CONTROLS_DIR, ControlFile, check_functions
from appliance.audit.checks import membria_support as mem
from appliance.audit.facts import node_files, site_facts
from appliance.site import Site, load_site
from edge_image.device import firstboot
from runtime.common.yamldoc import load_model
from tests.conftest import EXAMPLES, lab_site_data
from tests.role_templates import render

pytestmark = pytest.mark.unit

KINDS = {
    "MEM-IMAGE-LUKS2": ["image"],
    "MEM-IMAGE-TPM2": ["image"],
    "MEM-EDGE-LUKS2": ["edge"],
    "MEM-EDGE-TPM2": ["edge"],
    "MEM-EDGE-MTLS": ["edge"],
    "MEM-MTLS": ["core"],
    "MEM-RBAC-DENY": ["core"],
    "MEM-AUDITLOG-CHAIN": ["core"],
    "MEM-DR-RPO": ["core"],
    "MEM-DR-RTO": ["core"],
    "MEM-LICENSE": ["core"],
}


def test_membria_controls_name_their_checks_and_fixes() -> None:
    controls = load_model(CONTROLS_DIR / "controls-membria.yaml", ControlFile).controls
    assert {c.id: c.applies_to for c in controls} == KINDS
    functions = check_functions(CHECKS_DIR)
    for control in controls:
        assert control.check in functions, control.check
        assert [(r.framework, r.id) for r in control.frameworks] == [("membria", control.id)]
        fix = control.remediation
        if "image" in control.applies_to or "edge" in control.applies_to:
            assert fix.image_step and fix.image_step.startswith("edge_image/"), control.id
        else:
            assert fix.role, control.id
    mine = {f for f in functions if f.startswith("test_mem_")}
    assert mine == {c.check for c in controls}, "every membria check serves exactly one control"


def test_rack_site_facts_are_node_paths_and_carry_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    site = load_site(EXAMPLES / "rack.yaml")
    monkeypatch.setenv("MEMBRIA_AUDIT_TEST_SECRET", "s3cr3t-value")
    facts = site_facts(site, EXAMPLES / "rack.yaml", None)
    text = json.dumps(facts)  # JSON-serialisable, as the target spec carries it
    assert "s3cr3t-value" not in text and "PRIVATE KEY" not in text
    assert facts["node_files"]["gateway_config"] == "/etc/membria/gateway.json"  # roles/gateway/defaults
    assert facts["node_files"]["dr_heartbeat"] == "/var/lib/membria/dr/shipper.json"
    assert facts["audit_log"]["verify_on"] == ("node" if site.services.audit_db.backend == "embedded" else "controller")
    assert facts["dr"]["heartbeat_on"] == "node"
    node = site.core_nodes[0]
    assert facts["nodes"][node.name]["address"] == node.address
    assert facts["nodes"][node.name]["ports"]["gateway"] == 8443
    assert facts["dr"]["rpo_seconds"] == site.dr.rpo_seconds.model_dump()
    assert facts["tls"] == {"ca_file": None, "client_cert": None, "client_key": None}
    assert facts["license_public_key"].endswith(str(site.licensing.public_key_path))


def test_lab_site_facts_follow_the_process_mode(tmp_path: Path) -> None:
    data = lab_site_data(tmp_path / "state")
    site = Site.model_validate(data)
    processes = site_facts(site, tmp_path / "site.yaml", None)
    assert processes["node_files"]["gateway_config"] == str(tmp_path / "state" / "config" / "gateway.json")
    assert processes["node_files"]["dr_heartbeat"] == str(tmp_path / "state" / "data" / "dr" / "shipper.json")
    assert processes["audit_log"]["verify_on"] == "controller" and processes["dr"]["heartbeat_on"] == "controller"
    assert {n["address"] for n in processes["nodes"].values()} == {site.lab.host}
    assert processes["edge_profiles"]["engineering-laptop"] == {"tpm2_pcrs": [7], "tpm2_pin": False}
    data["lab"]["core"] = "host"
    host_mode = Site.model_validate(data)
    files = node_files(host_mode, tmp_path / "state")
    # The node's DR agent runs `appliance dr --state-dir /var/lib/membria/dr/state` (roles/dr_agent).
    assert files["dr_heartbeat"] == "/var/lib/membria/dr/state/data/dr/shipper.json"
    assert files["gateway_config"] == "/etc/membria/gateway.json"
    facts = site_facts(host_mode, tmp_path / "site.yaml", None)
    assert facts["audit_log"]["verify_on"] == "node"
    assert facts["nodes"][host_mode.core_nodes[0].name]["address"] == host_mode.core_nodes[0].address


def _meta(**slots: tuple[int, str]) -> dict[str, object]:
    return {
        "segments": {
            "0": {"type": "crypt", "encryption": "aes-xts-plain64", "sector_size": 4096, "offset": "16777216"}
        },
        "keyslots": {k: {"type": "luks2", "key_size": size, "kdf": {"type": kdf}} for k, (size, kdf) in slots.items()},
        "tokens": {},
        "config": {"requirements": {"mandatory": []}},
    }


def test_luks_problems() -> None:
    good = mem.luks_summary(_meta(**{"0": (64, "argon2id")}))
    assert mem.luks_problems(good, tpm2_slots_exempt_from_kdf=False) == []
    weak = _meta(**{"0": (32, "pbkdf2")})
    weak["segments"]["0"]["encryption"] = "aes-cbc-essiv:sha256"  # type: ignore[index]
    problems = mem.luks_problems(mem.luks_summary(weak), tpm2_slots_exempt_from_kdf=False)
    assert any("aes-cbc-essiv" in p for p in problems) and any("256-bit" in p for p in problems)
    assert any("pbkdf2" in p for p in problems)
    # A laptop: the TPM2 token's slot keeps systemd's PBKDF2, a typed recovery key may not.
    laptop = _meta(**{"1": (64, "pbkdf2"), "2": (64, "argon2id")})
    laptop["tokens"] = {"0": {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-pcrs": [7]}}
    assert mem.luks_problems(mem.luks_summary(laptop), tpm2_slots_exempt_from_kdf=True) == []
    assert mem.luks_problems(mem.luks_summary(laptop), tpm2_slots_exempt_from_kdf=False) == [
        "keyslot 1 uses pbkdf2, not argon2id"
    ]
    pending = _meta(**{"0": (64, "argon2id")})
    pending["config"] = {"requirements": {"mandatory": ["online-reencrypt-v2"]}}
    assert any(
        "re-encryption" in p for p in mem.luks_problems(mem.luks_summary(pending), tpm2_slots_exempt_from_kdf=False)
    )


def test_unit_and_pcr_helpers() -> None:
    text = firstboot.UNITS["membria-reencrypt.service"]
    assert mem.unit_wanted_by(text) == ["sysinit.target"]
    assert mem.exec_start(text)[-3:] == ["-m", "edge_image.device.firstboot", "reencrypt"]
    assert mem.pcr_list("7+11") == [7, 11] and mem.pcr_list([11, 7]) == [7, 11] and mem.pcr_list(None) == []
    command = mem.header_dump_command("/dev/nvme0n1p2; rm -rf /")
    assert "'/dev/nvme0n1p2; rm -rf /'" in command and "--dump-json-metadata" in command


def test_what_the_checks_read_is_what_the_gateway_role_renders(tmp_path: Path) -> None:
    """The rack node's gateway settings and unit, rendered by Ansible from the roles: the keys and lines the
    membria checks read are there, and the node-side audit-log verification runs as the gateway's user."""
    from appliance.audit.checks.test_mem_auditlog import node_command
    from tests.unit.test_role_templates import node_vars, rack

    data = rack(tmp_path, "audit")
    rendered = render(
        tmp_path,
        {"node": node_vars(data, tmp_path)},
        {
            "gateway.json": "gateway/gateway.json.j2",
            "gateway.service": "gateway/membria-gateway.service.j2",
        },
    )["node"]
    facts = site_facts(Site.model_validate(data), EXAMPLES / "rack.yaml", None)
    config = json.loads(rendered["gateway.json"])
    assert facts["node_files"]["gateway_config"] in rendered["gateway.service"]  # --config <that file>
    for key in ("rbac_policy", "license_file", "license_public_key"):
        assert config[key].startswith("/etc/membria/"), key
    assert config["audit"]["dsn"].startswith(("chdb:///var/lib/membria/", "clickhouse"))
    unit = rendered["gateway.service"]
    python = mem.exec_start(unit)[0]
    assert mem.unit_value(unit, "User") == "membria"
    command = node_command(unit, python, config["audit"]["dsn"], "audit_log")
    assert command.startswith("cd / && runuser -u membria -- env HOME=/var/lib/membria/gateway ")
