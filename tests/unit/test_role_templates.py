"""The roles' templates rendered by Ansible itself from a rack site's inventory: the gateway's settings file is one
`GatewaySettings` accepts, with laptop enrollment and device commands when the site has edge profiles, and the
Vault agent renders the edge wipe list where those settings read it, from the KV path `edge wipe` writes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hvac
import pytest
import yaml

from appliance.core.inventory import GROUP, build_inventory
from appliance.core.vault_access import node_policy
from appliance.edge.wipe import WIPE_LIST_PATH
from appliance.pki import Pki
from appliance.site import Site
from runtime.gateway.settings import DeviceCommandSettings, EnrollmentSettings, GatewaySettings
from tests.conftest import EXAMPLES, example_data
from tests.role_templates import ROLES_DIR, render
from tests.unit.test_core_inventory import ca_pem

pytestmark = pytest.mark.unit

TEMPLATES = {
    "gateway.json": "gateway/gateway.json.j2",
    "agent.hcl": "vault_agent/agent.hcl.j2",
    "wipe-list.ctmpl": "vault_agent/wipe-list.ctmpl.j2",
}
DOMAIN = "ai.acme.example"  # examples/rack.yaml
WIPE_LIST_FILE = Path("/etc/membria/gateway/wipe-list.json")


def rack(tmp_path: Path, name: str) -> dict[str, Any]:
    """examples/rack.yaml (two edge profiles, an external Vault with its CA file)."""
    data = example_data("rack.yaml")
    (tmp_path / f"{name}-ca.pem").write_text(ca_pem())
    data["services"]["vault"]["ca_file"] = str(tmp_path / f"{name}-ca.pem")
    return data


def node_vars(data: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    site = Site.model_validate(data)
    inventory = build_inventory(site, site_file=EXAMPLES / "rack.yaml", state_dir=tmp_path / "state")
    hostvars: dict[str, Any] = inventory["all"]["children"][GROUP]["hosts"]["core-1"]
    return hostvars


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """One ansible-playbook run, three nodes: the rack as it is; its Vault with other mounts and no CA file
    (the system trust store); a site without laptops."""
    tmp = tmp_path_factory.mktemp("role-templates")
    other = rack(tmp, "other")
    other["services"]["vault"].pop("ca_file")
    other["services"]["vault"].update(kv_mount="kv", pki_int_mount="pki_site", tls_server_name="vault.internal")
    no_laptops = rack(tmp, "no-laptops")
    no_laptops["edge_profiles"] = []
    hosts = {
        "rack": node_vars(rack(tmp, "rack"), tmp),
        "other-mounts": node_vars(other, tmp),
        "no-laptops": node_vars(no_laptops, tmp),
    }
    return render(tmp, hosts, TEMPLATES)


def settings(rendered: dict[str, dict[str, str]], host: str) -> GatewaySettings:
    return GatewaySettings.model_validate_json(rendered[host]["gateway.json"])


def test_the_rack_gateway_serves_enrollment_and_device_commands(rendered: dict[str, dict[str, str]]) -> None:
    config = settings(rendered, "rack")
    assert config.enrollment == EnrollmentSettings(
        vault_url="https://vault.ai.acme.example:8200",
        vault_ca=Path("/etc/membria/gateway/vault-ca.pem"),  # the gateway role's copy of membria_vault_ca_pem
        kv_mount="secret",
        pki_int_mount="pki_int",
        domain=DOMAIN,
        cert_ttl="168h",
        vault_tls_server_name=None,
    )
    assert config.device_commands == DeviceCommandSettings(domain=DOMAIN, wipe_list=WIPE_LIST_FILE)
    assert config.tls.crl == Path("/etc/membria/tls/crl.pem")


def test_the_site_vault_mounts_reach_the_gateway(rendered: dict[str, dict[str, str]]) -> None:
    enrollment = settings(rendered, "other-mounts").enrollment
    assert enrollment is not None
    assert (enrollment.kv_mount, enrollment.pki_int_mount) == ("kv", "pki_site")
    assert enrollment.vault_ca is None  # no ca_file: Vault's certificate is checked against the system's CAs
    assert enrollment.vault_tls_server_name == "vault.internal"  # Vault reached by an address its certificate lacks


def test_a_site_without_laptops_serves_neither(rendered: dict[str, dict[str, str]]) -> None:
    config = settings(rendered, "no-laptops")
    assert config.enrollment is None and config.device_commands is None


def agent_templates(hcl: str) -> dict[str, dict[str, str]]:
    """destination -> the template block's settings, from the rendered agent.hcl."""
    blocks: dict[str, dict[str, str]] = {}
    for body in re.findall(r"^template \{\n(.*?)^\}", hcl, flags=re.S | re.M):
        fields = dict(re.findall(r'^\s+(\w+)\s+=\s+"([^"]*)"', body, flags=re.M))
        blocks[fields["destination"]] = fields
    return blocks


@pytest.mark.parametrize("host", ["rack", "other-mounts", "no-laptops"])
def test_the_agent_renders_the_wipe_list_where_the_gateway_reads_it(
    rendered: dict[str, dict[str, str]], host: str
) -> None:
    blocks = agent_templates(rendered[host]["agent.hcl"])
    wipe = blocks[str(WIPE_LIST_FILE)]
    assert wipe["source"] == "/etc/membria/vault-agent/templates/wipe-list.ctmpl"
    assert wipe["perms"] == "0644"  # the gateway's user reads it, like the CRL
    assert "command" not in wipe  # the gateway re-reads it when it changes: no restart
    assert blocks["/etc/membria/tls/crl.pem"]["perms"] == "0644"
    gateway = settings(rendered, "rack").device_commands
    assert gateway is not None and gateway.wipe_list == WIPE_LIST_FILE


@pytest.mark.parametrize(("host", "kv"), [("rack", "secret"), ("other-mounts", "kv")])
def test_the_wipe_list_template_reads_what_edge_wipe_writes(
    rendered: dict[str, dict[str, str]], host: str, kv: str
) -> None:
    source = rendered[host]["wipe-list.ctmpl"]
    assert "<<" not in source and "<%" not in source  # Ansible's delimiters all resolved
    assert f'{{{{- with secret "{kv}/data/{WIPE_LIST_PATH}" }}}}{{{{ .Data.data | toJSONPretty }}}}' in source
    # ... and the node's policy lets the agent read exactly that path.
    site = Site.model_validate(example_data("rack.yaml"))
    policy = node_policy(
        site, site.core_nodes[0], kv_mount=kv, pki=Pki(hvac.Client(url="https://vault.invalid"), DOMAIN)
    )
    assert f'path "{kv}/data/{WIPE_LIST_PATH}" {{\n  capabilities = ["read"]\n}}' in policy


def test_the_role_installs_and_waits_for_the_wipe_list() -> None:
    tasks = yaml.safe_load((ROLES_DIR / "vault_agent" / "tasks" / "main.yml").read_text())
    by_name = {task["name"]: task for task in tasks}
    assert "wipe-list" in by_name["Install the agent's templates"]["loop"]
    assert "vault_agent_wipe_list_file" in by_name["Wait for the files the agent renders"]["loop"]
    defaults = yaml.safe_load((ROLES_DIR / "vault_agent" / "defaults" / "main.yml").read_text())
    gateway = yaml.safe_load((ROLES_DIR / "gateway" / "defaults" / "main.yml").read_text())
    assert defaults["vault_agent_wipe_list_path"] == WIPE_LIST_PATH
    assert defaults["vault_agent_wipe_list_file"] == gateway["gateway_wipe_list"] == str(WIPE_LIST_FILE)
