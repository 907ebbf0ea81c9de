"""The DR stack's graph: a Vault provider (the S3 credentials are read from Vault's KV) and DrBuckets.

Run `appliance dr init` after `pulumi up`: it creates the data key (never in Pulumi state) and finds every
bucket step already as wanted.
"""

from __future__ import annotations

import os
from typing import Any

import pulumi
import pulumi_vault as vault

from appliance.errors import MissingEnvironment
from appliance.lab.state import LabState
from appliance.site import ExternalVault, Site, VaultAppRole
from stacks.components.config import StackSettings
from stacks.components.dr_buckets import DrBuckets

# OpenBao answers the 1.14 API; terraform-provider-vault's version probe is skipped (stacks/DESIGN.md §4).
OPENBAO_API_VERSION = "1.14.0"


def vault_provider(
    settings: StackSettings, site: Site, *, secret_id: pulumi.Input[str] | None = None
) -> vault.Provider:
    """The lab's OpenBao (token from its state directory, as a secret), or the site's Vault: its token from
    VAULT_TOKEN (the provider reads the environment itself), or an AppRole login whose secret id comes from
    `secret_id` (a secret config value) or the site's `secret_id_env`."""
    spec = site.services.vault
    if not isinstance(spec, ExternalVault):
        from appliance.lab.services import OpenBao

        bao = OpenBao(site, LabState(settings.resolved_state_dir(site)))  # no prepare(): reading only
        if not bao.token_file.is_file() or not bao.ca_file.is_file():
            raise MissingEnvironment("the embedded OpenBao is not running", hint="run `appliance lab up`")
        return vault.Provider(
            "vault",
            address=bao.endpoint,
            ca_cert_file=str(bao.ca_file),
            token=pulumi.Output.secret(bao.root_token()),
            skip_child_token=True,
            vault_version_override=OPENBAO_API_VERSION,
        )
    args: dict[str, Any] = {"address": str(spec.url).rstrip("/")}
    if spec.ca_file is not None:
        args["ca_cert_file"] = str((settings.workdir / spec.ca_file).resolve())
    if spec.tls_server_name:
        args["tls_server_name"] = spec.tls_server_name
    auth = spec.auth
    if isinstance(auth, VaultAppRole):
        chosen = secret_id if secret_id is not None else os.environ.get(auth.secret_id_env)
        if not chosen:
            raise MissingEnvironment(
                f"the AppRole secret id is expected in {auth.secret_id_env} or the secret config membria:vaultSecretId"
            )
        args["auth_login"] = vault.ProviderAuthLoginArgs(
            path=f"auth/{auth.mount}/login",
            parameters={"role_id": auth.role_id, "secret_id": pulumi.Output.secret(chosen)},
        )
    elif auth.token_env != "VAULT_TOKEN":  # noqa: S105 - the variable the provider reads by itself
        token = os.environ.get(auth.token_env)
        if not token:
            raise MissingEnvironment(f"the Vault token is expected in {auth.token_env}, which is not set")
        args["token"] = pulumi.Output.secret(token)
    return vault.Provider("vault", **args)


def build(
    settings: StackSettings,
    site: Site,
    *,
    replication: str = "app",
    agent_user: str | None = None,
    agent_principal: str | None = None,
    replication_role_arn: str | None = None,
    vault_secret_id: pulumi.Input[str] | None = None,
) -> dict[str, pulumi.Output[Any]]:
    buckets = DrBuckets(
        "dr",
        site,
        state_dir=settings.resolved_state_dir(site),
        replication=replication,
        agent_user=agent_user,
        agent_principal=agent_principal,
        replication_role_arn=replication_role_arn,
        vault_provider=vault_provider(settings, site, secret_id=vault_secret_id),
    )
    return {
        "buckets": buckets.buckets,
        "agent_policy_json": buckets.agent_policy_json,
        "replication_mode": buckets.replication_mode,
    }


def main() -> None:
    config = pulumi.Config("membria")
    settings = StackSettings.from_config(config)
    exports = build(
        settings,
        settings.load_site(),
        replication=config.get("drReplication") or "app",
        agent_user=config.get("agentUser"),
        agent_principal=config.get("agentPrincipal"),
        replication_role_arn=config.get("replicationRoleArn"),
        vault_secret_id=config.get_secret("vaultSecretId"),
    )
    for key, value in exports.items():
        pulumi.export(key, value)
