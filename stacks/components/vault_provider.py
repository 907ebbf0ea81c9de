"""The Vault provider every stack declares its Vault resources and reads its KV secrets through.

The lab's OpenBao: address, CA and root token from the lab's state directory (the token as a Pulumi secret).
A site's own Vault: the address and CA from the site file, and its credential from where the site file says:
VAULT_TOKEN (the provider reads it itself: nothing in state), another token variable, or an AppRole login whose
secret id is a secret config value or the site's `secret_id_env`. Never a plain secret in config or state.
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
