"""Site file -> core inventory: hosts, connection and contract variables, no secrets, refusals."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.core.inventory import (
    GROUP,
    build_inventory,
    core_state_dir,
    inventory_path,
    secret_id_env,
    write_inventory,
)
from appliance.core.serving_plan import PlanRefused
from appliance.errors import BadInput, CheckFailed, ExitCode, MissingEnvironment
from appliance.lab.services import OpenBao
from appliance.lab.state import LabState
from appliance.site import Site
from tests.conftest import example_data, lab_site_data, write_site

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = {
    "membria_site",
    "membria_domain",
    "membria_node",
    "membria_node_index",
    "membria_core_nodes",
    "membria_vip",
    "membria_hardware",
    "membria_backends",
    "membria_ports",
    "membria_llm_plan",
    "membria_vault_addr",
    "membria_vault_ca_pem",
    "membria_vault_mounts",
    "membria_vault_role_id",
    "membria_edge_profiles",
    "membria_vault_secret_id_env",
    "membria_admin_users",
    "membria_runtime_python",
    "membria_license_file",
    "membria_license_public_key_file",
    "membria_rbac_policy_file",
    "membria_site_file",
    "membria_bao_binary",
    "membria_bundle",
}
SECRET = "s.9f2c1e7a-membria-test-secret-4b1d"


def ca_pem() -> str:
    """A real self-signed CA certificate (public material, as the lab's OpenBao writes it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "membria test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def hosts_of(inventory: dict[str, Any]) -> dict[str, dict[str, Any]]:
    hosts: dict[str, dict[str, Any]] = inventory["all"]["children"][GROUP]["hosts"]
    return hosts


@pytest.fixture
def lab(tmp_path: Path) -> Site:
    """examples/lab.yaml on its own state directory, whose OpenBao has written its CA (as `lab up` does)."""
    site = Site.model_validate(lab_site_data(tmp_path / "state"))
    ca_file = OpenBao(site, LabState(site.lab.state_dir)).ca_file
    ca_file.parent.mkdir(parents=True)
    ca_file.write_text(ca_pem())
    return site


def rack_data(tmp_path: Path) -> dict[str, Any]:
    """examples/rack.yaml with its Vault CA file in tmp_path (the example names /etc/membria/site-ca.pem)."""
    data = example_data("rack.yaml")
    (tmp_path / "site-ca.pem").write_text(ca_pem())
    data["services"]["vault"]["ca_file"] = str(tmp_path / "site-ca.pem")
    return data


def test_lab_inventory(lab: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # site paths are relative to the working directory (site.py)
    inventory = build_inventory(lab, site_file=Path("lab.yaml"))
    hosts = hosts_of(inventory)
    assert list(hosts) == ["core-1"]
    core = hosts["core-1"]
    assert core["ansible_host"] == "10.77.0.11"
    assert core["ansible_user"] == "root"
    assert core["ansible_port"] == 22
    assert core["ansible_become"] is False
    assert core["ansible_ssh_private_key_file"] == str(tmp_path / ".lab" / "ssh" / "id_ed25519")
    assert core["ansible_python_interpreter"] == "/usr/bin/python3"
    assert CONTRACT <= set(core)
    assert {k for k in core if not k.startswith("ansible_")} == CONTRACT
    ports = lab.lab.ports
    assert core["membria_ports"] == {
        "gateway": ports.gateway,
        "core": ports.core,
        "llm": ports.llm,
        "node_exporter": 9100,
        "ssh": 22,
    }
    assert core["membria_backends"] == dict.fromkeys(("llm", "vectors", "audit_db", "vault"), "embedded")
    assert core["membria_llm_plan"]["kind"] == "llama.cpp"
    assert core["membria_llm_plan"]["port"] == ports.llm
    assert core["membria_vault_addr"] == f"https://127.0.0.1:{ports.openbao}"
    assert core["membria_vault_ca_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert core["membria_vault_mounts"] == {"kv": "secret", "pki": "pki", "pki_int": "pki_int"}
    assert core["membria_edge_profiles"] == [p.name for p in lab.edge_profiles] and core["membria_edge_profiles"]
    assert core["membria_node"] == "core-1" and core["membria_node_index"] == 0
    assert core["membria_core_nodes"] == [{"name": "core-1", "address": "10.77.0.11"}]
    assert core["membria_vip"] is None
    assert core["membria_hardware"]["ram_gb"] == 24 and core["membria_hardware"]["gpus"] == []
    assert core["membria_site_file"] == str(tmp_path / "lab.yaml")
    assert core["membria_runtime_python"] == sys.executable
    assert Path(core["membria_bao_binary"]).name == "bao" and os.access(core["membria_bao_binary"], os.X_OK)
    assert core["membria_vault_secret_id_env"] == "MEMBRIA_VAULT_SECRET_ID_CORE_1"
    # The lab's state directory holds the core's state too; known hosts are kept there (trust on first use).
    state = lab.lab.state_dir
    assert core_state_dir(lab) == state
    assert f"UserKnownHostsFile={state}/core/known_hosts" in core["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=accept-new" in core["ansible_ssh_common_args"]


def test_rack_inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    site = Site.model_validate(rack_data(tmp_path))
    inventory = build_inventory(
        site, site_file=ROOT / "examples" / "rack.yaml", runtime_python="/opt/membria/bin/python"
    )
    core = hosts_of(inventory)["core-1"]
    assert core["ansible_user"] == "membria-admin"
    assert core["ansible_become"] is True  # not root: the roles need sudo
    assert core["ansible_ssh_private_key_file"] == str(tmp_path / "home" / ".ssh" / "membria_ed25519")
    assert core["membria_ports"] == {"gateway": 8443, "core": 8444, "llm": 8000, "node_exporter": 9100, "ssh": 22}
    assert core["membria_backends"] == dict.fromkeys(("llm", "vectors", "audit_db", "vault"), "external")
    plan = core["membria_llm_plan"]
    assert plan["kind"] == "vllm" and plan["fits"] is True and plan["tensor_parallel_size"] == 4
    assert core["membria_vault_addr"] == "https://vault.ai.acme.example:8200"
    assert core["membria_vault_ca_pem"] == (tmp_path / "site-ca.pem").read_text()
    assert core["membria_vault_mounts"] == {"kv": "secret", "pki": "pki", "pki_int": "pki_int"}
    assert core["membria_edge_profiles"] == ["engineering-laptop", "field-service-laptop", "sales-laptop"]
    assert core["membria_license_file"] == "/etc/membria/license.json"
    assert core["membria_license_public_key_file"] == "/etc/membria/license-signing.pub"
    assert core["membria_rbac_policy_file"] == "/etc/membria/rbac.yaml"
    assert core["membria_runtime_python"] == "/opt/membria/bin/python"
    assert core["membria_hardware"]["gpus"] == [{"model": "RTX 5090", "memory_gb": 32, "count": 4}]
    # No embedded service: the core's state lives in .membria/<site> under the working directory.
    assert core_state_dir(site) == tmp_path / ".membria" / "acme-plant"


def test_llm_port_defaults_to_8000_without_one_in_the_url(tmp_path: Path) -> None:
    data = rack_data(tmp_path)
    data["services"]["llm"]["url"] = "https://core-1.ai.acme.example/v1"
    core = hosts_of(build_inventory(Site.model_validate(data), state_dir=tmp_path))["core-1"]
    assert core["membria_ports"]["llm"] == 8000


def test_two_core_nodes(tmp_path: Path) -> None:
    data = rack_data(tmp_path)
    second = json.loads(json.dumps(data["core_nodes"][0]))
    second.update(name="core-2", address="10.20.0.12")
    second["ssh"]["port"] = 2222
    data["core_nodes"].append(second)
    hosts = hosts_of(build_inventory(Site.model_validate(data), state_dir=tmp_path))
    assert list(hosts) == ["core-1", "core-2"]
    peers = [{"name": "core-1", "address": "10.20.0.11"}, {"name": "core-2", "address": "10.20.0.12"}]
    for index, name in enumerate(("core-1", "core-2")):
        assert hosts[name]["membria_node_index"] == index
        assert hosts[name]["membria_core_nodes"] == peers
        # site.py has no VIP field yet: None, and the gateway role refuses keepalived without one.
        assert hosts[name]["membria_vip"] is None
    assert hosts["core-2"]["ansible_port"] == 2222 and hosts["core-2"]["membria_ports"]["ssh"] == 2222
    assert hosts["core-2"]["membria_vault_secret_id_env"] == "MEMBRIA_VAULT_SECRET_ID_CORE_2"


def test_extra_hostvars_override_and_add(lab: Site) -> None:
    extra = {"core-1": {"base_apt_update_cache": False, "ansible_port": 2022, "membria_vault_role_id": "r-1"}}
    core = hosts_of(build_inventory(lab, extra_hostvars=extra))["core-1"]
    assert core["base_apt_update_cache"] is False
    assert core["ansible_port"] == 2022
    assert core["membria_vault_role_id"] == "r-1"
    with pytest.raises(BadInput, match=r"unknown core node.*core-9"):
        build_inventory(lab, extra_hostvars={"core-9": {"x": 1}})


@pytest.mark.parametrize("key", ["ansible_password", "ansible_become_pass", "membria_vault_secret_id", "vault_token"])
def test_secret_looking_variables_are_refused(lab: Site, key: str) -> None:
    with pytest.raises(BadInput, match=f"{key} of core-1 looks like a secret"):
        build_inventory(lab, extra_hostvars={"core-1": {key: "x"}})


def test_no_secret_from_the_environment_reaches_the_inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The rack's Vault login secret (secret_id_env) and a node's delivery secret id are both set.
    monkeypatch.setenv("MEMBRIA_VAULT_SECRET_ID", SECRET)
    monkeypatch.setenv(secret_id_env("core-1"), SECRET + "-node")
    site = Site.model_validate(rack_data(tmp_path))
    path = write_inventory(build_inventory(site, state_dir=tmp_path / "state"), tmp_path / "state")
    assert path == inventory_path(tmp_path / "state") == tmp_path / "state" / "core" / "inventory" / "hosts.json"
    text = path.read_text()
    assert json.loads(text)["all"]["children"][GROUP]["hosts"]["core-1"]["membria_site"] == "acme-plant"
    assert SECRET not in text
    # The guard itself: a caller slipping the secret in (under any name) is stopped before anything is written.
    with pytest.raises(CheckFailed, match="membria_note carries the value of a secret"):
        build_inventory(site, state_dir=tmp_path / "state", extra_hostvars={"core-1": {"membria_note": SECRET}})


def test_embedded_vault_must_be_up(tmp_path: Path) -> None:
    site = Site.model_validate(lab_site_data(tmp_path / "state"))  # no CA: OpenBao never started
    with pytest.raises(MissingEnvironment, match="embedded OpenBao has no CA"):
        build_inventory(site)


def refused_site(tmp_path: Path) -> dict[str, Any]:
    """The rack asking for a 124 GB model on 4x 32 GB cards: 31 GB of weights per card > 28.8 GB usable."""
    data = rack_data(tmp_path)
    data["services"]["llm"]["model"] = "qwen3-235b-a22b-awq"
    return data


def test_refuses_a_site_whose_plan_cannot_fit(tmp_path: Path) -> None:
    site = Site.model_validate(refused_site(tmp_path))
    with pytest.raises(PlanRefused, match="cannot be served on core-1") as refused:
        build_inventory(site, state_dir=tmp_path / "state")
    assert "usable" in refused.value.message  # the arithmetic is in the message
    assert not (tmp_path / "state").exists()


def test_core_plan_refuses_before_anything_runs(tmp_path: Path) -> None:
    """The CLI: exit 2 with the arithmetic, and no inventory, Vault call or run."""
    site_file = write_site(tmp_path / "site.yaml", refused_site(tmp_path))
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "core", "plan", "--site", str(site_file), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr
    assert "cannot be served on core-1" in done.stderr
    assert "> 28.80 GB usable" in done.stderr
    assert not state.exists()


def test_a_bundle_overrides_the_runtime_and_is_shared(
    lab: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --bundle the runtime runs from the venv the runtime role builds, whatever --vars said."""
    monkeypatch.chdir(tmp_path)
    bundle = {"id": "0123456789abcdef", "apt_repo": "/b/debs", "wheelhouse": "/b/wheels"}
    extra = {"core-1": {"membria_runtime_python": "/srv/checkout/.venv/bin/python", "membria_runtime_root": "/srv"}}
    core = hosts_of(build_inventory(lab, extra_hostvars=extra, bundle=bundle))["core-1"]
    assert core["membria_bundle"] == bundle
    assert core["membria_runtime_python"] == "/opt/membria/runtime/bin/python"
    assert "membria_runtime_root" not in core
    online = hosts_of(build_inventory(lab, extra_hostvars=extra))["core-1"]
    assert online["membria_bundle"] is None
    assert online["membria_runtime_python"] == "/srv/checkout/.venv/bin/python"
