"""A core node's Vault identity (appliance/core/vault_access.py) against the lab's real OpenBao: what the node's
AppRole may do, what it may not (403), and that setting it up again changes nothing but the secret id."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from ruamel.yaml import YAML

from appliance.backends import Backends
from appliance.core import vault_access
from appliance.core.vault_access import AppRoleLimits, node_certificates, node_credentials, node_policy, policy_name
from appliance.edge import wipe
from appliance.edge.wipe import WIPE_LIST_PATH
from appliance.errors import BadInput
from appliance.lab import bootstrap
from appliance.lab.services import OpenBao
from appliance.pki import Pki
from appliance.site import Site
from tests.conftest import EXAMPLES
from tests.integration.vault_support import bootstrapped_vault

pytestmark = pytest.mark.integration

NODE = "core-1"


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    with bootstrapped_vault(tmp_path_factory.mktemp("vault-access")) as backends:
        yield backends


@pytest.fixture(scope="module")
def credentials(vault: Backends) -> tuple[str, str]:
    return node_credentials(vault.site, NODE, vault)


def login(vault: Backends, role_id: str, secret_id: str) -> hvac.Client:
    assert vault.state is not None
    bao = OpenBao(vault.site, vault.state)
    client = hvac.Client(url=bao.endpoint, verify=str(bao.ca_file), timeout=10)
    client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    return client


@pytest.fixture(scope="module")
def node(vault: Backends, credentials: tuple[str, str]) -> hvac.Client:
    """Logged in as the node's agent would be."""
    return login(vault, *credentials)


def read(client: hvac.Client, path: str) -> dict[str, Any]:
    data: dict[str, Any] = client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)["data"][
        "data"
    ]
    return data


def issue(client: hvac.Client, role: str, **params: str) -> dict[str, Any]:
    data: dict[str, Any] = client.write(f"pki_int/issue/{role}", **params)["data"]
    return data


def cert_for(vault: Backends, name: str) -> vault_access.NodeCertificate:
    site_node = vault.site.core_nodes[0]
    return next(c for c in node_certificates(vault.site, site_node) if c.name == name)


# --- what the node may do ------------------------------------------------------------------------------------


def test_the_token_carries_only_the_node_policy(vault: Backends, node: hvac.Client) -> None:
    me = node.auth.token.lookup_self()["data"]
    assert me["policies"] == [policy_name(NODE)]  # no `default` policy either
    assert me["renewable"] is True
    assert me["ttl"] <= 3600
    assert me["meta"]["role_name"] == f"core-{NODE}"
    renewed = node.auth.token.renew_self()["auth"]
    assert renewed["lease_duration"] <= 3600


@pytest.mark.parametrize("name", ["core", "gateway", "llm", "node-exporter"])
def test_the_node_may_issue_its_own_certificates(vault: Backends, node: hvac.Client, name: str, tmp_path: Path) -> None:
    spec = cert_for(vault, name)
    params = {"common_name": spec.common_name, "ip_sans": spec.ip_sans_param, "ttl": "72h"}
    if spec.alt_names:
        params["alt_names"] = spec.alt_names_param
    data = issue(node, spec.role, **params)
    cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == spec.common_name
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted([spec.common_name, *spec.alt_names])
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == list(spec.ip_sans)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(hours=71) < lifetime <= dt.timedelta(hours=72, minutes=1)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    # llm and node-exporter only serve; gateway and core also call other services with their certificate.
    assert (ExtendedKeyUsageOID.CLIENT_AUTH in usages) == (name in ("core", "gateway"))
    cert_file = tmp_path / f"{name}.pem"
    cert_file.write_text(data["certificate"])
    assert bootstrap.chains_to(cert_file, Pki.for_site(vault.site, vault.vault()).ca_chain_pem(), dt.timedelta(hours=1))


def test_the_node_reads_the_secrets_its_services_use(vault: Backends, node: hvac.Client) -> None:
    assert read(node, bootstrap.AUDIT_HMAC_PATH) == vault.read_secret(bootstrap.AUDIT_HMAC_PATH)
    signing = bootstrap.ed25519_from_vault(vault, bootstrap.SERVICE_TOKEN_KEY_PATH)
    assert read(node, vault_access.SERVICE_TOKEN_PUBLIC_PATH) == {"public_pem": bootstrap.public_pem(signing).decode()}
    assert "key_b64" in read(node, vault.site.dr.encryption_key_vault_path)
    assert "devices" in read(node, WIPE_LIST_PATH)  # written empty by node_credentials when there was none
    for target in ("primary", "replica"):
        assert set(read(node, f"membria/s3-{target}")) == {"access_key", "secret_key"}
    chain = node.read("pki_int/cert/ca_chain")["data"]["certificate"]
    assert chain.count("BEGIN CERTIFICATE") == 2
    assert "BEGIN X509 CRL" in node.read("pki_int/cert/crl")["data"]["certificate"]


# --- what it may not do ----------------------------------------------------------------------------------------

DENIED: dict[str, Callable[[hvac.Client], object]] = {
    "read the lab license signing key": lambda c: read(c, bootstrap.LAB_LICENSE_KEY_PATH),
    "read the service-token signing key": lambda c: read(c, bootstrap.SERVICE_TOKEN_KEY_PATH),
    "write the audit key": lambda c: c.secrets.kv.v2.create_or_update_secret(
        path=bootstrap.AUDIT_HMAC_PATH, secret={"key_hex": "00"}
    ),
    "list the KV secrets": lambda c: c.secrets.kv.v2.list_secrets(path="membria"),
    "write the wipe list": lambda c: c.secrets.kv.v2.create_or_update_secret(
        path=WIPE_LIST_PATH, secret={"devices": {}}
    ),
    "read an escrowed recovery key": lambda c: read(c, "membria/edge/recovery/lt-0001"),
    "issue an admin certificate": lambda c: issue(c, "admin", common_name="ops-admin"),
    "issue an edge-device certificate": lambda c: issue(c, "edge-device", common_name="laptop-1"),
    "issue a core certificate in another node's name": lambda c: issue(
        c, "core", common_name="core-2.lab.membria.internal"
    ),
    "add an alt name to its own certificate": lambda c: issue(
        c, "core", common_name="core-1.lab.membria.internal", alt_names="gateway.lab.membria.internal"
    ),
    "add any alt name to the gateway's": lambda c: issue(
        c, "gateway", common_name="gateway.lab.membria.internal", alt_names="gateway.lab.membria.internal"
    ),
    "claim another address": lambda c: issue(c, "core", common_name="core-1.lab.membria.internal", ip_sans="10.0.0.9"),
    "sign a CSR": lambda c: c.write("pki_int/sign/core", csr="x", common_name="core-1.lab.membria.internal"),
    "read its own policy": lambda c: c.sys.read_policy(policy_name(NODE)),
    "mint another secret id": lambda c: c.auth.approle.generate_secret_id(f"core-{NODE}"),
    "take a raft snapshot": lambda c: c.read("sys/storage/raft/configuration"),
    "create a token": lambda c: c.auth.token.create(policies=[policy_name(NODE)]),
}


@pytest.mark.parametrize("what", sorted(DENIED))
def test_everything_else_is_denied(node: hvac.Client, what: str) -> None:
    with pytest.raises(hvac.exceptions.Forbidden):
        DENIED[what](node)


# --- set-up again, limits ------------------------------------------------------------------------------------


def test_setting_up_again_changes_only_the_secret_id(vault: Backends, credentials: tuple[str, str]) -> None:
    client = vault.vault()
    policy_before = client.sys.read_policy(policy_name(NODE))["data"]["rules"]
    role_before = client.auth.approle.read_role(f"core-{NODE}")["data"]
    role_id, secret_id = node_credentials(vault.site, NODE, vault)
    assert role_id == credentials[0]
    assert secret_id != credentials[1]
    assert client.sys.read_policy(policy_name(NODE))["data"]["rules"] == policy_before
    assert client.auth.approle.read_role(f"core-{NODE}")["data"] == role_before
    assert list(client.sys.list_auth_methods()["data"]).count("approle/") == 1
    assert vault_access.ensure_node_pki_roles(Pki.for_site(vault.site, client)) == []
    assert not vault_access.publish_service_token_public_key(vault)
    assert not vault_access.ensure_wipe_list(vault)


def test_the_approle_limits(vault: Backends) -> None:
    role = vault.vault().auth.approle.read_role(f"core-{NODE}")["data"]
    limits = AppRoleLimits()
    assert (role["token_ttl"], role["token_max_ttl"], role["secret_id_ttl"]) == (3600, 86400, 3600)
    assert role["secret_id_num_uses"] == limits.secret_id_num_uses
    assert role["token_no_default_policy"] is True
    assert role["token_policies"] == [policy_name(NODE)]


def test_a_secret_id_allows_a_few_logins_only(vault: Backends) -> None:
    role_id, secret_id = node_credentials(vault.site, NODE, vault)
    for _ in range(AppRoleLimits().secret_id_num_uses):
        login(vault, role_id, secret_id)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        login(vault, role_id, secret_id)


def test_a_stale_public_key_is_replaced(vault: Backends) -> None:
    vault.write_secret(vault_access.SERVICE_TOKEN_PUBLIC_PATH, {"public_pem": "stale"})
    assert vault_access.publish_service_token_public_key(vault)
    signing = bootstrap.ed25519_from_vault(vault, bootstrap.SERVICE_TOKEN_KEY_PATH)
    assert (
        vault.read_secret(vault_access.SERVICE_TOKEN_PUBLIC_PATH)["public_pem"]
        == bootstrap.public_pem(signing).decode()
    )


def test_a_deleted_wipe_list_is_written_again_and_a_list_with_entries_kept(vault: Backends) -> None:
    client = vault.vault()
    client.secrets.kv.v2.delete_latest_version_of_secret(path=WIPE_LIST_PATH)
    assert vault_access.ensure_wipe_list(vault)
    data, version = wipe.read_list(client, vault.kv_mount)
    assert data == {"devices": {}} and version > 1
    entry = {"id": "wipe-" + "0" * 32, "reason": "test"}
    wipe.update_list(client, vault.kv_mount, lambda d: wipe.with_entry(d, "lt-0001", entry))
    assert not vault_access.ensure_wipe_list(vault)
    assert wipe.read_list(client, vault.kv_mount)[0]["devices"] == {"lt-0001": entry}
    wipe.update_list(client, vault.kv_mount, lambda d: wipe.without_entry(d, "lt-0001"))


def test_an_unknown_node_is_refused(vault: Backends) -> None:
    with pytest.raises(BadInput, match=r"no core node 'core-9'.*core-1"):
        node_credentials(vault.site, "core-9", vault)


def test_the_policy_of_a_site_with_external_services() -> None:
    """Pure: a rack site's node reads its external services' credentials, named by the site file; no Vault here."""
    site = Site.model_validate(YAML(typ="safe").load((EXAMPLES / "rack.yaml").read_text()))
    pki = Pki(hvac.Client(url="https://vault.invalid"), site.site.domain)
    text = node_policy(site, site.core_nodes[0], kv_mount="kv", pki=pki)
    read_paths = [line.split('"')[1] for line in text.splitlines() if line.startswith('path "kv/')]
    assert read_paths == [
        "kv/data/membria/audit-hmac",
        "kv/data/membria/service-token-public",
        "kv/data/membria/edge/wipe-list",
        "kv/data/membria/dr-encryption-key",
        "kv/data/membria/s3-primary",
        "kv/data/membria/s3-replica",
        "kv/data/membria/milvus",
        "kv/data/membria/clickhouse",
    ]
    assert '"common_name" = ["core-1.ai.acme.example"]' in text
    assert '"alt_names" = ["core.ai.acme.example"]' in text
    assert '"ip_sans" = ["10.20.0.11,127.0.0.1"]' in text
    assert "service-token-signing-key" not in text and "lab-license" not in text
