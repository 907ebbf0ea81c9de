"""The core stack's graph: VaultPki, then one CoreNode per core node, each after the one before (rolling)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pulumi

from appliance.core.apply import bundle_id, check_tags
from appliance.core.inventory import core_state_dir
from appliance.iac.content_hash import core_node_hash
from appliance.site import Site
from stacks.components.config import StackSettings
from stacks.components.core_node import CoreNode, CoreNodeArgs
from stacks.components.vault_pki import VaultPki
from stacks.components.vault_provider import vault_provider


def build(
    settings: StackSettings,
    site: Site,
    *,
    vars_file: Path | None = None,
    bundle: Path | None = None,
    tags: list[str] | None = None,
    vault_secret_id: pulumi.Input[str] | None = None,
) -> dict[str, pulumi.Output[Any]]:
    provider = vault_provider(settings, site, secret_id=vault_secret_id)
    pki = VaultPki("pki", site, pulumi.ResourceOptions(provider=provider))
    roles = check_tags(tags)  # an unknown role fails the preview, not the provider later
    # The site's relative paths resolve against the checkout, as `core apply` run from there resolves them.
    with contextlib.chdir(settings.workdir):
        state_dir = core_state_dir(site, settings.state_dir)
        bundle_key = bundle_id(bundle) if bundle is not None else None
        hashes = {
            node.name: core_node_hash(
                site, node.name, site_file=settings.site_file, vars_file=vars_file, bundle_id=bundle_key, tags=roles
            )
            for node in site.core_nodes
        }
    nodes: dict[str, CoreNode] = {}
    previous: CoreNode | None = None
    for node in site.core_nodes:
        args = CoreNodeArgs(
            site_file=str(settings.site_file),
            workdir=str(settings.workdir),
            node=node.name,
            state_dir=str(state_dir),
            content_hash=hashes[node.name],
            vars_file=str(vars_file) if vars_file is not None else None,
            bundle=str(bundle) if bundle is not None else None,
            tags=roles,
        )
        # One node at a time: the runs share the inventory and runner directory, and a keepalived pair is
        # safest rolled.
        after: list[pulumi.Resource] = [pki] if previous is None else [pki, previous]
        previous = nodes[node.name] = CoreNode(node.name, args, pulumi.ResourceOptions(depends_on=after))
    return {
        "ca_chain_pem": pki.ca_chain_pem,
        "approle_role_ids": pulumi.Output.from_input(pki.approle_role_ids),
        "nodes": pulumi.Output.from_input(
            {name: {"recap": res.recap, "changes": res.changes} for name, res in nodes.items()}
        ),
    }


def _tags(config: pulumi.Config) -> list[str] | None:
    """`membria:tags` as a list (`[base, monitoring]` in the stack file) or a comma-separated string."""
    raw = config.get("tags")
    if not raw:
        return None
    if raw.lstrip().startswith("["):
        return [str(tag) for tag in config.require_object("tags")]
    return [raw]


def main() -> None:
    config = pulumi.Config("membria")
    settings = StackSettings.from_config(config)
    vars_file, bundle = config.get("varsFile"), config.get("bundle")
    exports = build(
        settings,
        settings.load_site(),
        vars_file=(settings.workdir / vars_file).resolve() if vars_file else None,
        bundle=(settings.workdir / bundle).resolve() if bundle else None,
        tags=_tags(config),
        vault_secret_id=config.get_secret("vaultSecretId"),
    )
    for key, value in exports.items():
        pulumi.export(key, value)
