"""VaultPki: the site PKI and the core nodes' Vault identities, declared (stacks/DESIGN.md §2).

It declares what `Pki.bootstrap` and `node_credentials` make, with their own values: every argument comes from
`appliance.pki` and `appliance.core.vault_access`, so the two cannot drift apart unnoticed (the parity test in
tests/integration/test_stack_providers_vault.py compares both with a real OpenBao). Nothing secret is created:
the CA keys are internal to Vault and AppRole secret ids stay with `core apply`.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_vault as vault

from appliance.backends import Backends
from appliance.core import vault_access
from appliance.pki import INTERMEDIATE_TTL, ROLES, ROOT_TTL, chain_pem, mounts_for_site, role_params, ttl_seconds
from appliance.site import Site

# Vault's role field name -> pulumi-vault's argument name, where they differ.
ROLE_FIELD_NAMES = {"organization": "organizations", "ou": "organization_unit"}
# pulumi-vault reads role TTLs back in seconds: a duration string ("24h") would show a diff on every run
# (terraform-provider-vault#1524), so they are declared in seconds.
ROLE_TTL_FIELDS = ("ttl", "max_ttl")


def role_args(params: dict[str, Any]) -> dict[str, Any]:
    """`appliance.pki.role_params(...)` as `SecretBackendRoleArgs` keywords."""
    args: dict[str, Any] = {}
    for key, value in params.items():
        args[ROLE_FIELD_NAMES.get(key, key)] = str(ttl_seconds(value)) if key in ROLE_TTL_FIELDS else value
    return args


class VaultPki(pulumi.ComponentResource):
    root_ca_pem: pulumi.Output[str]
    ca_chain_pem: pulumi.Output[str]
    role_names: list[str]
    approle_role_ids: dict[str, pulumi.Output[str]]

    def __init__(self, name: str, site: Site, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("membria:vault:VaultPki", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)  # children inherit opts.provider from the component
        domain = site.site.domain
        mounts = mounts_for_site(site)

        root_mount = vault.Mount(
            f"{name}-root",
            vault.MountArgs(path=mounts.root_mount, type="pki", max_lease_ttl_seconds=ttl_seconds(ROOT_TTL)),
            opts=child,
        )
        root = vault.pkisecret.SecretBackendRootCert(
            f"{name}-root-ca",
            vault.pkisecret.SecretBackendRootCertArgs(
                backend=root_mount.path,
                type="internal",  # the key never leaves Vault, so it is in no state
                common_name=f"Membria Root CA ({domain})",
                ttl=ROOT_TTL,
                key_type="ec",
                key_bits=384,
                issuer_name="root",
            ),
            opts=child,
        )
        int_mount = vault.Mount(
            f"{name}-int",
            vault.MountArgs(path=mounts.int_mount, type="pki", max_lease_ttl_seconds=ttl_seconds(INTERMEDIATE_TTL)),
            opts=child,
        )
        intermediate_name = f"Membria Intermediate CA ({domain})"
        csr = vault.pkisecret.SecretBackendIntermediateCertRequest(
            f"{name}-int-csr",
            vault.pkisecret.SecretBackendIntermediateCertRequestArgs(
                backend=int_mount.path, type="internal", common_name=intermediate_name, key_type="ec", key_bits=256
            ),
            opts=child,
        )
        signed = vault.pkisecret.SecretBackendRootSignIntermediate(
            f"{name}-int-sign",
            vault.pkisecret.SecretBackendRootSignIntermediateArgs(
                backend=root_mount.path,
                csr=csr.csr,
                common_name=intermediate_name,
                ttl=INTERMEDIATE_TTL,
                format="pem_bundle",
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[root]),
        )
        set_signed = vault.pkisecret.SecretBackendIntermediateSetSigned(
            f"{name}-int-set-signed",
            vault.pkisecret.SecretBackendIntermediateSetSignedArgs(
                backend=int_mount.path, certificate=signed.certificate
            ),
            opts=child,
        )

        # Roles after the intermediate, in the order `Pki.bootstrap` and `node_credentials` write them.
        specs = [*ROLES.values(), *(s for s in vault_access.NODE_PKI_ROLES if s.name not in ROLES)]
        for spec in specs:
            vault.pkisecret.SecretBackendRole(
                f"{name}-role-{spec.name}",
                vault.pkisecret.SecretBackendRoleArgs(
                    backend=int_mount.path, name=spec.name, **role_args(role_params(spec, domain))
                ),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[set_signed]),
            )

        approle = vault.AuthBackend(
            f"{name}-approle",
            vault.AuthBackendArgs(
                type="approle", path=vault_access.APPROLE_MOUNT, description=vault_access.APPROLE_DESCRIPTION
            ),
            opts=child,
        )
        kv_mount = Backends(site).kv_mount  # a property of the site file: no client is opened
        role_ids: dict[str, pulumi.Output[str]] = {}
        for node in site.core_nodes:
            policy = vault.Policy(
                f"{name}-policy-{node.name}",
                vault.PolicyArgs(
                    name=vault_access.policy_name(node.name),
                    policy=vault_access.node_policy(site, node, kv_mount=kv_mount, pki=mounts),
                ),
                opts=child,
            )
            settings = vault_access.approle_settings_seconds(node.name)
            role = vault.approle.AuthBackendRole(
                f"{name}-approle-{node.name}",
                vault.approle.AuthBackendRoleArgs(
                    backend=approle.path,
                    role_name=vault_access.approle_name(node.name),
                    # The policy's name as an output, so the role waits for the policy.
                    token_policies=[policy.name],
                    **{k: v for k, v in settings.items() if k != "token_policies"},
                ),
                opts=child,
            )
            role_ids[node.name] = role.role_id

        self.root_ca_pem = root.certificate
        self.ca_chain_pem = pulumi.Output.all(signed.certificate, root.certificate).apply(
            lambda pems: chain_pem(*pems) if all(pems) else ""
        )
        self.role_names = [spec.name for spec in specs]
        self.approle_role_ids = role_ids
        self.register_outputs(
            {
                "root_ca_pem": self.root_ca_pem,
                "ca_chain_pem": self.ca_chain_pem,
                "role_names": self.role_names,
                "approle_role_ids": self.approle_role_ids,
            }
        )
