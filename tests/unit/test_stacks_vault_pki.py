"""VaultPki under Pulumi's mocks: it declares exactly the mounts, CA chain, PKI roles, policies and AppRoles the
appliance makes, every value taken from appliance/pki.py and appliance/core/vault_access.py, all of them
children of the component, and nothing secret."""

from __future__ import annotations

import re
from typing import Any

import hvac
import pulumi
import pulumi_vault as vault
import pytest

from appliance.backends import Backends
from appliance.core.vault_access import (
    APPROLE_MOUNT,
    NODE_PKI_ROLES,
    AppRoleLimits,
    approle_name,
    node_policy,
    policy_name,
)
from appliance.pki import INTERMEDIATE_TTL, ROLES, ROOT_TTL, Pki, _same, mounts_for_site, role_params, ttl_seconds
from appliance.site import Site, load_site
from stacks.components.vault_pki import VaultPki
from tests.conftest import EXAMPLES
from tests.unit.pulumi_harness import (
    CANARY_VAULT_TOKEN,
    Export,
    MembriaMocks,
    RecordingMonitor,
    leaks,
    recorded,
    run_program,
)

pytestmark = pytest.mark.unit

COMPONENT = "membria:vault:VaultPki"
MOUNT = "vault:index/mount:Mount"
ROOT_CERT = "vault:pkiSecret/secretBackendRootCert:SecretBackendRootCert"
CSR = "vault:pkiSecret/secretBackendIntermediateCertRequest:SecretBackendIntermediateCertRequest"
SIGN = "vault:pkiSecret/secretBackendRootSignIntermediate:SecretBackendRootSignIntermediate"
SET_SIGNED = "vault:pkiSecret/secretBackendIntermediateSetSigned:SecretBackendIntermediateSetSigned"
ROLE = "vault:pkiSecret/secretBackendRole:SecretBackendRole"
AUTH = "vault:index/authBackend:AuthBackend"
POLICY = "vault:index/policy:Policy"
APPROLE = "vault:appRole/authBackendRole:AuthBackendRole"

ROOT_PEM = "-----BEGIN CERTIFICATE-----\nUk9PVA==\n-----END CERTIFICATE-----"
INT_PEM = "-----BEGIN CERTIFICATE-----\nSU5U\n-----END CERTIFICATE-----"
CSR_PEM = "-----BEGIN CERTIFICATE REQUEST-----\nQ1NS\n-----END CERTIFICATE REQUEST-----"

# What the provider would compute: the CSR, certificates (the pem_bundle of the signed intermediate ends with the
# root) and role ids. Everything else echoes the inputs (the mocks answer at preview too).
OUTPUTS = {
    ROOT_CERT: lambda name, inputs: {"certificate": ROOT_PEM},
    CSR: lambda name, inputs: {"csr": CSR_PEM},
    SIGN: lambda name, inputs: {"certificate": f"{INT_PEM}\n{ROOT_PEM}"},
    APPROLE: lambda name, inputs: {"roleId": f"role-id-{inputs['roleName']}"},
}

# Both example sites: the lab (embedded OpenBao, default mounts) and the rack (external Vault, its own mounts).
SITES = ["lab.yaml", "rack.yaml"]


Program = tuple[Site, dict[str, Export], RecordingMonitor]


def camel(name: str) -> str:
    """A pulumi-vault argument name as the engine receives it."""
    return re.sub(r"_([a-z])", lambda m: m[1].upper(), name)


def expected_role_inputs(site: Site, spec_name: str) -> dict[str, Any]:
    """role_params mapped by hand: two Vault field names differ, and TTLs are declared in seconds."""
    spec = ROLES.get(spec_name) or next(s for s in NODE_PKI_ROLES if s.name == spec_name)
    renamed = {"organization": "organizations", "ou": "organization_unit"}
    wanted: dict[str, Any] = {"backend": mounts_for_site(site).int_mount, "name": spec_name}
    for key, value in role_params(spec, site.site.domain).items():
        wanted[camel(renamed.get(key, key))] = str(ttl_seconds(value)) if key in ("ttl", "max_ttl") else value
    return wanted


def run(site: Site, *, preview: bool = False, provider: bool = False) -> tuple[dict[str, Export], RecordingMonitor]:
    def build() -> dict[str, Any]:
        opts = None
        if provider:
            token = pulumi.Output.secret(CANARY_VAULT_TOKEN)
            explicit = vault.Provider("vault", address="https://vault.example:8200", token=token, skip_child_token=True)
            opts = pulumi.ResourceOptions(provider=explicit)
        pki = VaultPki("pki", site, opts)
        return {
            "root_ca_pem": pki.root_ca_pem,
            "ca_chain_pem": pki.ca_chain_pem,
            "role_names": pki.role_names,
            "approle_role_ids": pki.approle_role_ids,
        }

    return run_program(build, mocks=MembriaMocks(OUTPUTS), preview=preview)


@pytest.fixture(scope="module", params=SITES)
def site(request: pytest.FixtureRequest) -> Site:
    return load_site(EXAMPLES / request.param)


@pytest.fixture(scope="module", params=[False, True], ids=["up", "preview"])
def program(request: pytest.FixtureRequest, site: Site) -> Program:
    exports, monitor = run(site, preview=request.param)
    return site, exports, monitor


def test_the_graph_has_every_resource_once(program: Program) -> None:
    site, _, monitor = program
    nodes = len(site.core_nodes)
    roles = len(ROLES) + len([s for s in NODE_PKI_ROLES if s.name not in ROLES])
    counts = {t: monitor.types().count(t) for t in set(monitor.types())}
    assert counts == {
        COMPONENT: 1,
        MOUNT: 2,
        ROOT_CERT: 1,
        CSR: 1,
        SIGN: 1,
        SET_SIGNED: 1,
        ROLE: roles,
        AUTH: 1,
        POLICY: nodes,
        APPROLE: nodes,
    }
    assert roles == 6


def test_every_child_is_parented_to_the_component(
    program: Program,
) -> None:
    _, _, monitor = program
    component = monitor.one(COMPONENT, "pki")
    children = [r for r in monitor.registered if r is not component]
    assert children and all(r.parent == component.urn for r in children)


def test_mounts_and_the_ca_chain(program: Program) -> None:
    site, _, monitor = program
    root_mount, int_mount = mounts_for_site(site)
    domain = site.site.domain
    assert monitor.one(MOUNT, "pki-root").inputs == {
        "path": root_mount,
        "type": "pki",
        "maxLeaseTtlSeconds": ttl_seconds(ROOT_TTL),
    }
    assert monitor.one(MOUNT, "pki-int").inputs == {
        "path": int_mount,
        "type": "pki",
        "maxLeaseTtlSeconds": ttl_seconds(INTERMEDIATE_TTL),
    }
    assert monitor.one(ROOT_CERT).inputs == {
        "backend": root_mount,
        "type": "internal",
        "commonName": f"Membria Root CA ({domain})",
        "ttl": ROOT_TTL,
        "keyType": "ec",
        "keyBits": 384,
        "issuerName": "root",
    }
    intermediate = f"Membria Intermediate CA ({domain})"
    assert monitor.one(CSR).inputs == {
        "backend": int_mount,
        "type": "internal",
        "commonName": intermediate,
        "keyType": "ec",
        "keyBits": 256,
    }
    sign = monitor.one(SIGN)
    csr = monitor.one(CSR)
    assert sign.inputs == {
        "backend": root_mount,
        "csr": CSR_PEM,
        "commonName": intermediate,
        "ttl": INTERMEDIATE_TTL,
        "format": "pem_bundle",
    }
    assert csr.urn in sign.property_dependencies["csr"]
    assert monitor.one(ROOT_CERT).urn in sign.dependencies
    set_signed = monitor.one(SET_SIGNED)
    assert sign.urn in set_signed.property_dependencies["certificate"]
    assert set_signed.inputs == {"backend": int_mount, "certificate": f"{INT_PEM}\n{ROOT_PEM}"}


def test_roles_are_role_params(program: Program) -> None:
    site, exports, monitor = program
    set_signed = monitor.one(SET_SIGNED)
    names = [*ROLES, *(s.name for s in NODE_PKI_ROLES if s.name not in ROLES)]
    for name in names:
        role = monitor.one(ROLE, f"pki-role-{name}")
        assert role.inputs == expected_role_inputs(site, name), name
        assert set_signed.urn in role.dependencies  # roles after the intermediate, as Pki.bootstrap orders them
    assert exports["role_names"].value == names


def test_a_policy_and_an_approle_per_core_node(program: Program) -> None:
    site, exports, monitor = program
    auth = monitor.one(AUTH)
    assert auth.inputs == {"type": "approle", "path": APPROLE_MOUNT, "description": "Membria core nodes' Vault agents"}
    kv_mount = Backends(site).kv_mount
    limits = AppRoleLimits()
    for node in site.core_nodes:
        policy = monitor.one(POLICY, f"pki-policy-{node.name}")
        text = node_policy(site, node, kv_mount=kv_mount, pki=mounts_for_site(site))
        assert policy.inputs == {"name": policy_name(node.name), "policy": text}
        role = monitor.one(APPROLE, f"pki-approle-{node.name}")
        assert role.inputs == {
            "backend": APPROLE_MOUNT,
            "roleName": approle_name(node.name),
            "tokenPolicies": [policy_name(node.name)],
            "tokenNoDefaultPolicy": True,
            "tokenType": "service",
            "tokenTtl": 3600,
            "tokenMaxTtl": 86400,
            "secretIdTtl": 3600,
            "secretIdNumUses": limits.secret_id_num_uses,
        }
        assert policy.urn in role.property_dependencies["tokenPolicies"]
        assert auth.urn in role.property_dependencies["backend"]
    assert exports["approle_role_ids"].value == {n.name: f"role-id-{approle_name(n.name)}" for n in site.core_nodes}


def test_the_outputs(program: Program) -> None:
    _, exports, monitor = program
    component = monitor.one(COMPONENT, "pki")
    registered = monitor.component_outputs[component.urn]
    assert set(registered) == {"root_ca_pem", "ca_chain_pem", "role_names", "approle_role_ids"}
    assert exports["root_ca_pem"].value == ROOT_PEM
    # The intermediate then the root, once each (the signed bundle already ends with the root).
    assert exports["ca_chain_pem"].value == f"{INT_PEM}\n{ROOT_PEM}\n"
    assert registered["ca_chain_pem"] == exports["ca_chain_pem"].value
    assert not any(e.secret for e in exports.values())  # all public


def test_an_explicit_provider_reaches_every_child_and_no_secret_is_recorded() -> None:
    site = load_site(EXAMPLES / "rack.yaml")
    _, monitor = run(site, provider=True)
    provider = monitor.one("pulumi:providers:vault")
    children = [r for r in monitor.registered if r.custom and r.type != provider.type]
    assert children and all(r.provider.startswith(provider.urn + "::") for r in children)
    assert leaks(recorded(monitor), [CANARY_VAULT_TOKEN]) == []
    # Nothing secret is declared at all: no secret id resource, no private key material, no envelope.
    assert not monitor.of_type("vault:appRole/authBackendRoleSecretId:AuthBackendRoleSecretId")
    for r in monitor.registered:
        if r.type == provider.type:
            continue
        assert "PRIVATE KEY" not in str(r.raw)
        assert "4dabf18193072939515e22adb298388d" not in str(r.raw), r.urn


# --- the appliance functions the component stands on ---------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("24h", 86400), ("30m", 1800), ("45s", 45), ("86400", 86400)])
def test_ttl_seconds(text: str, seconds: int) -> None:
    assert ttl_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "1d", "h", "24 hours", "-1h"])
def test_ttl_seconds_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        ttl_seconds(text)


def test_role_field_comparison_reads_vault_seconds() -> None:
    assert _same(86400, "24h") and _same(1800, "30m") and _same(60, "60") and not _same(3600, "24h")
    assert _same("ec", "ec") and not _same(256, "ec")


@pytest.mark.parametrize("name", SITES)
def test_mounts_and_role_params_without_a_client_are_the_pki_modules(name: str) -> None:
    site = load_site(EXAMPLES / name)
    pki = Pki.for_site(site, hvac.Client(url="https://vault.invalid"))
    assert mounts_for_site(site) == (pki.root_mount, pki.int_mount)
    for spec in [*ROLES.values(), *NODE_PKI_ROLES]:
        assert pki._role_params(spec) == role_params(spec, site.site.domain)
        assert pki._role_params(spec, "sales") == {**role_params(spec, site.site.domain), "ou": ["sales"]}
