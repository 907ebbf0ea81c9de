"""The DR stack's graph: a Vault provider (the S3 credentials are read from Vault's KV) and DrBuckets.

Run `appliance dr init` after `pulumi up`: it creates the data key (never in Pulumi state) and finds every
bucket step already as wanted.
"""

from __future__ import annotations

from typing import Any

import pulumi

from appliance.site import Site
from stacks.components.config import StackSettings
from stacks.components.dr_buckets import DrBuckets
from stacks.components.vault_provider import vault_provider


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
