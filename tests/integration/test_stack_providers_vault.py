"""VaultPki's declaration equals what the appliance makes (stacks/DESIGN.md §5, "3 real work").

The lab's real OpenBao is bootstrapped by the lab's own bootstrap and `node_credentials` runs for every core node,
as `core apply` does. The VaultPki program then runs under the mocks for the same site, and every declared input
is compared, mapped back to Vault's field names, with what OpenBao returns: PKI roles, policies, AppRoles, mounts
and the two CAs. A stack that declared anything else would rewrite the appliance's objects on every `pulumi up`
(and `core apply` would rewrite them back)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.backends import Backends
from appliance.core.vault_access import APPROLE_MOUNT, NODE_PKI_ROLES, approle_name, node_credentials, policy_name
from appliance.pki import ROLES, mounts_for_site, role_params, ttl_seconds
from stacks.components.vault_pki import VaultPki
from tests.integration.vault_support import bootstrapped_vault
from tests.unit.pulumi_harness import RecordingMonitor, run_program

pytestmark = pytest.mark.integration

ROLE = "vault:pkiSecret/secretBackendRole:SecretBackendRole"
POLICY = "vault:index/policy:Policy"
APPROLE = "vault:appRole/authBackendRole:AuthBackendRole"
AUTH = "vault:index/authBackend:AuthBackend"
MOUNT = "vault:index/mount:Mount"
ROOT_CERT = "vault:pkiSecret/secretBackendRootCert:SecretBackendRootCert"
CSR = "vault:pkiSecret/secretBackendIntermediateCertRequest:SecretBackendIntermediateCertRequest"

# pulumi-vault argument -> Vault field, where they differ (written here, not imported: this test checks the table).
VAULT_FIELD = {"organizations": "organization", "organization_unit": "ou"}
TTL_FIELDS = {"ttl", "max_ttl", "token_ttl", "token_max_ttl", "secret_id_ttl"}
# Arguments that name the object rather than set a field of it.
ADDRESSING = {"backend", "name", "role_name"}


def snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m[1].lower(), name)


def normalise(field: str, value: Any) -> Any:
    """One field's value in one form, whichever side it came from: TTLs in seconds, lists sorted, whole numbers
    as int (the engine's wire format carries every number as a float)."""
    if value is None:
        return None
    if field in TTL_FIELDS:
        return ttl_seconds(value) if isinstance(value, str) else int(value)
    if isinstance(value, list):
        return sorted(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def as_vault_fields(inputs: dict[str, Any]) -> dict[str, Any]:
    """Declared inputs (camelCase pulumi-vault names) as Vault fields, normalised; addressing arguments dropped."""
    fields = {}
    for key, value in inputs.items():
        name = snake(key)
        if name not in ADDRESSING:
            field = VAULT_FIELD.get(name, name)
            fields[field] = normalise(field, value)
    return fields


def differences(
    declared: dict[str, Any], actual: dict[str, Any], must_have: set[str] | frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Fields where the declaration and Vault disagree, as {field: (declared, actual)}. Compared over every
    declared field plus `must_have` (what the appliance writes), so a field the stack left out counts too."""
    fields = set(declared) | set(must_have)
    return {
        f: (declared.get(f), normalise(f, actual.get(f)))
        for f in sorted(fields)
        if declared.get(f) != normalise(f, actual.get(f))
    }


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    with bootstrapped_vault(tmp_path_factory.mktemp("stack-vault")) as backends:
        for node in backends.site.core_nodes:  # what `core apply` does before it runs the play
            node_credentials(backends.site, node.name, backends)
        yield backends


@pytest.fixture(scope="module")
def client(vault: Backends) -> hvac.Client:
    return vault.vault()


@pytest.fixture(scope="module")
def declared(vault: Backends) -> RecordingMonitor:
    site = vault.site

    def build() -> dict[str, Any]:
        pki = VaultPki("pki", site)
        return {"role_names": pki.role_names}

    _, monitor = run_program(build)
    return monitor


def declared_role(monitor: RecordingMonitor, name: str) -> dict[str, Any]:
    return as_vault_fields(monitor.one(ROLE, f"pki-role-{name}").inputs)


def role_fields(vault: Backends, name: str) -> set[str]:
    """The fields the appliance writes for a role."""
    spec = ROLES.get(name) or next(s for s in NODE_PKI_ROLES if s.name == name)
    return set(role_params(spec, vault.site.site.domain))


def test_every_pki_role_matches_openbao(vault: Backends, client: hvac.Client, declared: RecordingMonitor) -> None:
    int_mount = mounts_for_site(vault.site).int_mount
    names = [r.inputs["name"] for r in declared.of_type(ROLE)]
    # Every role the appliance made (per-department `<role>--<ou>` roles stay appliance-managed) is declared.
    listed = client.secrets.pki.list_roles(mount_point=int_mount)["data"]["keys"]
    assert sorted(names) == sorted(r for r in listed if "--" not in r)
    for name in names:
        assert declared.one(ROLE, f"pki-role-{name}").inputs["backend"] == int_mount
        actual = client.secrets.pki.read_role(name, mount_point=int_mount)["data"]
        assert differences(declared_role(declared, name), actual, role_fields(vault, name)) == {}, name


def test_a_deliberate_mismatch_is_caught(vault: Backends, client: hvac.Client, declared: RecordingMonitor) -> None:
    """The comparison is not vacuous: a changed, a dropped and an added field each show."""
    int_mount = mounts_for_site(vault.site).int_mount
    actual = client.secrets.pki.read_role("edge-device", mount_point=int_mount)["data"]
    must_have = role_fields(vault, "edge-device")
    good = declared_role(declared, "edge-device")
    assert set(good) == must_have
    assert differences({**good, "max_ttl": normalise("max_ttl", "721h")}, actual, must_have) == {
        "max_ttl": (721 * 3600, 720 * 3600)
    }
    dropped = {k: v for k, v in good.items() if k != "use_csr_sans"}
    assert differences(dropped, actual, must_have) == {"use_csr_sans": (None, False)}
    assert differences({**good, "organization": ["membria-service"]}, actual, must_have) == {
        "organization": (["membria-service"], ["membria-device"])
    }
    assert differences({**good, "allow_glob_domains": True}, actual, must_have) == {"allow_glob_domains": (True, False)}


def test_policies_and_approles_match_openbao(vault: Backends, client: hvac.Client, declared: RecordingMonitor) -> None:
    auth = declared.one(AUTH).inputs
    methods = client.sys.list_auth_methods()["data"]
    assert auth["path"] == APPROLE_MOUNT
    assert {"type": auth["type"], "description": auth["description"]} == {
        "type": methods[f"{APPROLE_MOUNT}/"]["type"],
        "description": methods[f"{APPROLE_MOUNT}/"]["description"],
    }
    for node in vault.site.core_nodes:
        policy = declared.one(POLICY, f"pki-policy-{node.name}").inputs
        assert policy["name"] == policy_name(node.name)
        assert policy["policy"] == client.sys.read_policy(policy_name(node.name))["data"]["rules"]

        role = declared.one(APPROLE, f"pki-approle-{node.name}").inputs
        assert (role["backend"], role["roleName"]) == (APPROLE_MOUNT, approle_name(node.name))
        actual = client.auth.approle.read_role(approle_name(node.name), mount_point=APPROLE_MOUNT)["data"]
        wanted = as_vault_fields(role)
        assert set(wanted) == {
            "token_policies",
            "token_no_default_policy",
            "token_type",
            "token_ttl",
            "token_max_ttl",
            "secret_id_ttl",
            "secret_id_num_uses",
        }
        assert differences(wanted, actual) == {}
        assert wanted["token_ttl"] == 3600 and wanted["secret_id_num_uses"] == 3


def test_mounts_match_their_tune(vault: Backends, client: hvac.Client, declared: RecordingMonitor) -> None:
    engines = client.sys.list_mounted_secrets_engines()["data"]
    mounts = {r.inputs["path"]: r.inputs for r in declared.of_type(MOUNT)}
    assert set(mounts) == set(mounts_for_site(vault.site))
    for path, inputs in mounts.items():
        assert engines[f"{path}/"]["type"] == inputs["type"] == "pki"
        tune = client.sys.read_mount_configuration(path)["data"]
        assert tune["max_lease_ttl"] == inputs["maxLeaseTtlSeconds"], path


def _ca(client: hvac.Client, mount: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(client.secrets.pki.read_ca_certificate(mount_point=mount).encode())


def _identity(cert: x509.Certificate) -> tuple[Any, str, int]:
    """(common name, key type, key bits) in the terms the declaration uses."""
    key = cert.public_key()
    kind, bits = ("ec", key.curve.key_size) if isinstance(key, ec.EllipticCurvePublicKey) else (type(key).__name__, 0)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, kind, bits


def _declared_identity(inputs: dict[str, Any]) -> tuple[Any, str, int]:
    return inputs["commonName"], inputs["keyType"], int(inputs["keyBits"])


def test_the_cas_match(vault: Backends, client: hvac.Client, declared: RecordingMonitor) -> None:
    root_mount, int_mount = mounts_for_site(vault.site)
    root = declared.one(ROOT_CERT).inputs
    assert root["backend"] == root_mount
    assert _identity(_ca(client, root_mount)) == _declared_identity(root)
    assert client.read(f"{root_mount}/issuer/default")["data"]["issuer_name"] == root["issuerName"]
    csr = declared.one(CSR).inputs
    assert csr["backend"] == int_mount
    assert _identity(_ca(client, int_mount)) == _declared_identity(csr)


def test_no_secret_is_declared(vault: Backends, declared: RecordingMonitor) -> None:
    """Nothing the appliance keeps secret (the root token, a secret id) is in what the stack would record."""
    token = vault.vault().token
    assert token and token not in str([r.raw for r in declared.registered])
    assert not declared.of_type("vault:appRole/authBackendRoleSecretId:AuthBackendRoleSecretId")
