"""A core node's identity in Vault/OpenBao: the controller's side of the `vault_agent` role.

`node_credentials(site, node)` makes sure Vault has what the node's Vault agent logs in with and may read,
then returns the AppRole role id and a fresh secret id. Every step creates or corrects only what differs:

- the `approle` auth method;
- the PKI roles the node's services need (`llm` and `node-exporter` join `gateway` and `core`);
- the service-token public key at `membria/service-token-public`, derived from the signing key: the gateway
  verifies tokens and must never hold the signing key, so the node can read only the public half;
- the edge wipe list at `membria/edge/wipe-list`, written empty when there is none yet: the agent renders it
  for the gateway, and a template whose secret does not exist never renders (the agent retries it instead);
- the policy `membria-core-<node>`: deny by default; it allows issuing the node's own certificates (common
  name, alt names and IP SANs pinned, so one node cannot get a certificate in another node's name), reading
  the CA chain and CRL and the KV secrets the node's services use, and the token's own lookup/renew/revoke.
  Nothing else: no default policy either;
- the AppRole `core-<node>`: tokens live 1 h, renewed up to 24 h; a secret id lives 1 h for a few logins.

The secret id is a delivery credential: `core apply` mints one per run and hands it to the play through the
runner's environment; the role writes it to the node only when the agent holds no valid token (see
roles/vault_agent/README.md for the rotation story).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Protocol

import hvac
import hvac.exceptions
import requests

from appliance.backends import Backends, s3_credentials_path
from appliance.edge.wipe import WIPE_LIST_PATH, CasConflict, write_list
from appliance.errors import BadInput, ServiceError
from appliance.lab.bootstrap import AUDIT_HMAC_PATH, SERVICE_TOKEN_KEY_PATH, ed25519_from_vault, public_pem
from appliance.lab.state import LabState
from appliance.pki import ROLES, Pki, RoleSpec, ttl_seconds
from appliance.site import CoreNode, EmbeddedS3, ExternalS3, Site

SERVICE_TOKEN_PUBLIC_PATH = "membria/service-token-public"  # noqa: S105 - a Vault path, not a secret
APPROLE_MOUNT = "approle"
APPROLE_DESCRIPTION = "Membria core nodes' Vault agents"
# Renewable, so the agent renews it up to token_max_ttl.
NODE_TOKEN_TYPE = "service"  # noqa: S105 - a token kind, not a secret
APPROLE_TTL_FIELDS = ("token_ttl", "token_max_ttl", "secret_id_ttl")

# Server certificates of the node's other services (the PKI module's table lists gateway and core).
NODE_PKI_ROLES: tuple[RoleSpec, ...] = (
    RoleSpec("llm", kind="service", server=True, client=False, ttl="24h", max_ttl="72h", any_name=False),
    RoleSpec("node-exporter", kind="service", server=True, client=False, ttl="24h", max_ttl="72h", any_name=False),
)


@dataclass(frozen=True)
class AppRoleLimits:
    # Durations, not secrets (ruff's S105 reads "token" in the names).
    token_ttl: str = "1h"  # noqa: S105
    token_max_ttl: str = "24h"  # noqa: S105
    secret_id_ttl: str = "1h"  # noqa: S105
    # The agent logs in with the secret id at its start and after each restart within the secret id's hour.
    secret_id_num_uses: int = 3


class PkiMountNames(Protocol):
    """Where the PKI lives: a `Pki`, or `appliance.pki.PkiMounts` where there is no Vault client (the stacks)."""

    @property
    def root_mount(self) -> str: ...

    @property
    def int_mount(self) -> str: ...


@dataclass(frozen=True)
class NodeCertificate:
    """A certificate the node's agent renders: /etc/membria/tls/<name>.pem (and <name>-key.pem)."""

    name: str
    role: str
    common_name: str
    alt_names: tuple[str, ...]
    ip_sans: tuple[str, ...]

    # The request parameters exactly as the agent's template sends them (the policy pins the strings).
    @property
    def alt_names_param(self) -> str:
        return ",".join(self.alt_names)

    @property
    def ip_sans_param(self) -> str:
        return ",".join(self.ip_sans)


def policy_name(node: str) -> str:
    return f"membria-core-{node}"


def approle_name(node: str) -> str:
    return f"core-{node}"


def approle_settings(node: str, limits: AppRoleLimits | None = None) -> dict[str, Any]:
    """The AppRole `core-<node>`'s fields as written to `auth/approle/role/<name>` (TTLs as Vault durations)."""
    limits = limits or AppRoleLimits()
    return {
        "token_policies": [policy_name(node)],
        "token_no_default_policy": True,
        "token_type": NODE_TOKEN_TYPE,
        "token_ttl": limits.token_ttl,
        "token_max_ttl": limits.token_max_ttl,
        "secret_id_ttl": limits.secret_id_ttl,
        "secret_id_num_uses": limits.secret_id_num_uses,
    }


def approle_settings_seconds(node: str, limits: AppRoleLimits | None = None) -> dict[str, Any]:
    """`approle_settings` with its TTLs in seconds, as Vault reads them back (and pulumi-vault declares them)."""
    settings = approle_settings(node, limits)
    for key in APPROLE_TTL_FIELDS:
        settings[key] = ttl_seconds(settings[key])
    return settings


def node_certificates(site: Site, node: CoreNode) -> list[NodeCertificate]:
    """The node's certificates: a name of its own, plus the site-wide name a service is scraped or called by
    (the same on every node, like the gateway's). The `vault_agent` role derives the same list in its defaults
    (`vault_agent_certificates`): the two must agree, because the policy pins these names."""
    domain, name = site.site.domain, node.name
    ips = ((node.address,) if _is_ip(node.address) else ()) + ("127.0.0.1",)
    return [
        NodeCertificate("core", "core", f"{name}.{domain}", (f"core.{domain}",), ips),
        NodeCertificate("gateway", "gateway", f"gateway.{domain}", (), ips),
        NodeCertificate("llm", "llm", f"llm.{name}.{domain}", (), ips),
        NodeCertificate(
            "node-exporter", "node-exporter", f"node-exporter.{name}.{domain}", (f"node-exporter.{domain}",), ips
        ),
    ]


def node_secret_paths(site: Site) -> list[str]:
    """KV paths (under the site's KV mount) that services on a core node read through the agent."""
    services = site.services
    # The wipe list: the gateway answers GET /v1/device/commands from it (edge_image/DESIGN.md, "Wipe").
    paths = [AUDIT_HMAC_PATH, SERVICE_TOKEN_PUBLIC_PATH, WIPE_LIST_PATH, site.dr.encryption_key_vault_path]
    for target, spec in (("primary", services.s3.primary), ("replica", services.s3.replica)):
        if isinstance(spec, EmbeddedS3):
            paths.append(s3_credentials_path(target))
        elif isinstance(spec, ExternalS3):
            paths.append(spec.credentials_vault_path)
    if services.llm.backend == "external" and services.llm.api_key_vault_path:
        paths.append(services.llm.api_key_vault_path)
    if services.vectors.backend == "external":
        paths.append(services.vectors.token_vault_path)
    if services.audit_db.backend == "external":
        paths.append(services.audit_db.password_vault_path)
    return list(dict.fromkeys(paths))


def node_policy(site: Site, node: CoreNode, *, kv_mount: str, pki: PkiMountNames) -> str:
    """The HCL of `membria-core-<node>`. Paths not named here are denied (Vault's default)."""
    lines = [f"# {policy_name(node.name)}: what the Vault agent on {node.name} may do; everything else is denied."]
    for cert in node_certificates(site, node):
        # Only these parameters, with these values: no other node's name or address.
        alt_names = [f'    "alt_names" = ["{cert.alt_names_param}"]'] if cert.alt_names else []
        lines += [
            f'path "{pki.int_mount}/issue/{cert.role}" {{',
            '  capabilities = ["create", "update"]',
            "  allowed_parameters = {",
            f'    "common_name" = ["{cert.common_name}"]',
            *alt_names,
            f'    "ip_sans" = ["{cert.ip_sans_param}"]',
            '    "ttl" = []',
            "  }",
            "}",
        ]
    for path in (f"{pki.int_mount}/cert/ca_chain", f"{pki.int_mount}/cert/crl", f"{pki.root_mount}/cert/ca"):
        lines += [f'path "{path}" {{', '  capabilities = ["read"]', "}"]
    for path in node_secret_paths(site):
        lines += [f'path "{kv_mount}/data/{path}" {{', '  capabilities = ["read"]', "}"]
    # The agent's own token (the default policy is not attached, so these are spelled out).
    lines += [
        'path "auth/token/lookup-self" {',
        '  capabilities = ["read"]',
        "}",
        'path "auth/token/renew-self" {',
        '  capabilities = ["update"]',
        "}",
        'path "auth/token/revoke-self" {',
        '  capabilities = ["update"]',
        "}",
    ]
    return "\n".join(lines) + "\n"


def node_credentials(
    site: Site, node_name: str, backends: Backends | None = None, *, limits: AppRoleLimits | None = None
) -> tuple[str, str]:
    """Ensure the node's policy, AppRole and PKI roles; return (role_id, a fresh secret_id)."""
    node = next((n for n in site.core_nodes if n.name == node_name), None)
    if node is None:
        known = ", ".join(n.name for n in site.core_nodes)
        raise BadInput(f"no core node {node_name!r} in site {site.site.name}; core nodes: {known}")
    if backends is None:
        state = LabState.at(site.lab.state_dir) if site.embedded["vault"] else None
        backends = Backends(site, state)
    limits = limits or AppRoleLimits()
    client = backends.vault()
    pki = Pki.for_site(site, client)
    role = approle_name(node.name)
    try:
        ensure_node_pki_roles(pki)
        publish_service_token_public_key(backends)
        ensure_wipe_list(backends)
        _ensure_approle_mount(client)
        _write_policy_if_changed(
            client, policy_name(node.name), node_policy(site, node, kv_mount=backends.kv_mount, pki=pki)
        )
        client.auth.approle.create_or_update_approle(
            role, **approle_settings(node.name, limits), mount_point=APPROLE_MOUNT
        )
        role_id = str(client.auth.approle.read_role_id(role, mount_point=APPROLE_MOUNT)["data"]["role_id"])
        secret_id = str(
            client.auth.approle.generate_secret_id(role, metadata={"node": node.name}, mount_point=APPROLE_MOUNT)[
                "data"
            ]["secret_id"]
        )
    except hvac.exceptions.VaultError as exc:
        raise ServiceError(f"setting up the Vault identity of {node.name} failed: {_first_line(exc)}") from exc
    except requests.exceptions.RequestException as exc:
        raise ServiceError(f"Vault is unreachable while setting up {node.name}: {_first_line(exc)}") from exc
    return role_id, secret_id


def ensure_node_pki_roles(pki: Pki) -> list[str]:
    """Create or correct the node-only PKI roles; returns the names written."""
    written = []
    for spec in NODE_PKI_ROLES:
        if spec.name in ROLES:
            continue  # the PKI module took it over: its own bootstrap keeps it
        # Same parameters as the PKI module's own roles (key type, organization, names under the domain).
        if pki._write_role_if_changed(spec.name, pki._role_params(spec)):
            written.append(spec.name)
    return written


def publish_service_token_public_key(backends: Backends) -> bool:
    """Write the service-token public key where nodes may read it; True if it was missing or stale."""
    try:
        private = ed25519_from_vault(backends, SERVICE_TOKEN_KEY_PATH)
    except ServiceError as exc:
        raise ServiceError(
            f"no service-token signing key in Vault at {SERVICE_TOKEN_KEY_PATH}: the gateway could not verify tokens",
            hint="`appliance lab up` creates it in the lab; a site's Vault needs it before `core apply`",
        ) from exc
    wanted = public_pem(private).decode()
    try:
        current = backends.read_secret(SERVICE_TOKEN_PUBLIC_PATH).get("public_pem")
    except ServiceError:
        current = None
    if current == wanted:
        return False
    backends.write_secret(SERVICE_TOKEN_PUBLIC_PATH, {"public_pem": wanted})
    return True


def ensure_wipe_list(backends: Backends) -> bool:
    """Write an empty wipe list (`{"devices": {}}`) when the KV secret does not exist or its latest version is
    deleted; True if written. The agent's template reads it with `secret`, which waits and retries on a missing
    secret rather than rendering nothing, so the gateway's file must have a secret to come from before the first
    `edge wipe`. Check-and-set: a list `edge wipe` writes meanwhile is kept."""
    client = backends.vault()
    try:
        current = client.secrets.kv.v2.read_secret_version(
            path=WIPE_LIST_PATH, mount_point=backends.kv_mount, raise_on_deleted_version=False
        )
    except hvac.exceptions.InvalidPath:
        version = 0
    else:
        if current["data"].get("data") is not None:
            return False
        version = int(current["data"]["metadata"]["version"])
    try:
        write_list(client, backends.kv_mount, {"devices": {}}, version)
    except CasConflict:
        return False
    return True


def _ensure_approle_mount(client: hvac.Client) -> None:
    if f"{APPROLE_MOUNT}/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle", path=APPROLE_MOUNT, description=APPROLE_DESCRIPTION)


def _write_policy_if_changed(client: hvac.Client, name: str, text: str) -> None:
    try:
        current = client.sys.read_policy(name)["data"]["rules"]
    except hvac.exceptions.InvalidPath:
        current = None
    if current != text:
        client.sys.create_or_update_policy(name, text)


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
