"""Enrollment tokens for edge laptops (edge_image/DESIGN.md, "Enrollment protocol"): the admin's side.

`mint` makes one Vault token per laptop: an orphan, 6 uses, not renewable, under a policy of its own that allows
exactly what `POST /v1/enroll` on the gateway does with it (escrow the recovery key at the device's KV path, sign
one CSR for `<device>.<domain>` with the department's edge-device role). Vault enforces expiry, uses, scope and
revocation; the gateway holds no Vault credential of its own. Only the token's accessor is kept (at
`membria/edge/devices/<device>`), never the token.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pydantic
import requests

from appliance.edge import spec
from appliance.errors import BadInput, CheckFailed, ServiceError
from appliance.pki import Pki
from appliance.signing_keys import backends
from appliance.site import Site
from edge_image import flash
from runtime.common import atomic

DEVICE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_TTL = "72h"
MAX_TTL_SECONDS = 30 * 24 * 3600
NUM_USES = 6  # the gateway spends 4 (lookup-self, escrow, sign, revoke-self); 2 spare for a retried step
FILE_FORMAT = 1
CERT_TTL = "168h"
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def recovery_path(device: str) -> str:
    return f"membria/edge/recovery/{device}"


def device_path(device: str) -> str:
    return f"membria/edge/devices/{device}"


def policy_name(device: str) -> str:
    return f"membria-edge-enroll-{device}"


def check_device(device: str) -> str:
    if not DEVICE_PATTERN.fullmatch(device):
        raise BadInput(
            f"invalid device name {device!r}: 1-63 characters, lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    return device


def parse_ttl(text: str) -> int:
    """'72h', '30m', '2s', '3d' -> seconds (at most 30 days)."""
    match = re.fullmatch(r"([0-9]{1,7})([smhd])", text.strip())
    if not match:
        raise BadInput(f"invalid --ttl {text!r}: a number and a unit (s, m, h, d), e.g. 72h")
    seconds = int(match.group(1)) * _TTL_UNITS[match.group(2)]
    if not 1 <= seconds <= MAX_TTL_SECONDS:
        raise BadInput(f"--ttl {text} is out of range (1s to 30d)")
    return seconds


def policy_document(*, device: str, domain: str, kv_mount: str, pki_int_mount: str, role: str) -> str:
    """The token's whole authority (JSON policy). KV v2 keeps every version and the policy grants no delete, so
    an escrowed key cannot be erased with the token; `allowed_parameters` pins the only name it can get signed."""
    policy = {
        "path": {
            f"{kv_mount}/data/{recovery_path(device)}": {"capabilities": ["create", "update"]},
            f"{pki_int_mount}/sign/{role}": {
                "capabilities": ["update"],
                "allowed_parameters": {"csr": [], "ttl": [], "common_name": [f"{device}.{domain}"]},
            },
        }
    }
    return json.dumps(policy, indent=2)


@dataclass(frozen=True)
class MintedToken:
    path: Path
    device: str
    policy: str
    role: str
    accessor: str
    expires_at: str
    gateways: list[str] = field(default_factory=list)
    resolve: dict[str, str] = field(default_factory=dict)


def _vault_error(what: str, exc: Exception) -> ServiceError:
    text = str(exc).strip().splitlines()
    return ServiceError(f"Vault refused to {what}: {text[0] if text else type(exc).__name__}")


def _read_kv(client: hvac.Client, kv_mount: str, path: str) -> dict[str, Any] | None:
    try:
        response = client.secrets.kv.v2.read_secret_version(
            path=path, mount_point=kv_mount, raise_on_deleted_version=True
        )
    except hvac.exceptions.InvalidPath:
        return None
    data: dict[str, Any] = response["data"]["data"]
    return data


def _revoke_accessor(client: hvac.Client, accessor: str) -> bool:
    """Revoke a token by its accessor; False when Vault no longer knows it (expired, used up, revoked)."""
    try:
        client.auth.token.revoke_accessor(accessor)
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
        return False
    return True


def mint(
    site: Site,
    *,
    profile: str,
    device: str,
    out: Path,
    ttl: str = DEFAULT_TTL,
    state_dir: Path | None = None,
    resolve: Mapping[str, str] | None = None,
) -> MintedToken:
    """Mint DEVICE's token and write FILE (0600). `resolve` (host name -> address) goes into FILE for the laptop's
    /etc/hosts, where its network cannot resolve the gateway's name (lab, boot test)."""
    check_device(device)
    seconds = parse_ttl(ttl)
    try:
        hosts = flash.check_resolve(resolve or {})
    except ValueError as exc:
        raise BadInput(f"--resolve: {exc}", hint="NAME=ADDR, e.g. gateway.lab.membria=10.0.0.5") from None
    prof = spec.profile(site, profile)
    department = prof.departments[0]  # the role's OU: a certificate names one department (appliance/pki.py)
    if out.exists() and out.is_dir():
        raise BadInput(f"{out} is a directory; -o names the token file to write")
    store = backends(site, state_dir)
    client = store.vault()
    pki = Pki.for_site(site, client)
    try:
        role = pki.ensure_role("edge-device", ou=department)
        name = policy_name(device)
        client.sys.create_or_update_policy(
            name,
            policy_document(
                device=device,
                domain=site.site.domain,
                kv_mount=store.kv_mount,
                pki_int_mount=pki.int_mount,
                role=role,
            ),
        )
        previous = _read_kv(client, store.kv_mount, device_path(device))
        if previous and previous.get("accessor") and not previous.get("revoked_at"):
            # A re-mint replaces the outstanding token: at most one can enroll the device.
            _revoke_accessor(client, str(previous["accessor"]))
        auth = client.auth.token.create_orphan(
            policies=[name],
            meta={"site": site.site.name, "device": device, "profile": prof.name, "department": department},
            ttl=f"{seconds}s",
            explicit_max_ttl=f"{seconds}s",
            renewable=False,
            num_uses=NUM_USES,
            display_name=f"edge-enroll-{device}",
        )["auth"]
        token, accessor = auth["client_token"], auth["accessor"]
        expires = datetime.fromtimestamp(time.time() + int(auth.get("lease_duration") or seconds), UTC)
        expires_at = expires.isoformat(timespec="seconds").replace("+00:00", "Z")
        client.secrets.kv.v2.create_or_update_secret(
            path=device_path(device),
            secret={
                "accessor": accessor,  # enough to revoke the token, not to use it
                "site": site.site.name,
                "profile": prof.name,
                "department": department,
                "policy": name,
                "minted_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "expires_at": expires_at,
            },
            mount_point=store.kv_mount,
        )
    except hvac.exceptions.VaultError as exc:
        raise _vault_error(f"mint the enrollment token for {device}", exc) from exc
    except requests.exceptions.RequestException as exc:
        raise ServiceError(f"Vault is unreachable: {type(exc).__name__}") from exc
    gateways = spec.gateways(site)
    document = {
        "format": FILE_FORMAT,
        "site": site.site.name,
        "device": device,
        "token": token,
        "expires_at": expires_at,
        "gateways": gateways,
    }
    if hosts:
        document["resolve"] = hosts
    try:  # FILE is what `edge flash --enrollment` accepts, or there is a bug here
        flash.EnrollmentFile.model_validate(document)
    except pydantic.ValidationError as exc:  # its text would quote the token: never chained, never logged
        where = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise CheckFailed(f"the token file for {device} would not pass `edge flash`: field {where}") from None
    atomic.write_text(out, json.dumps(document, indent=2) + "\n", mode=0o600)
    return MintedToken(out, device, name, role, accessor, expires_at, gateways, hosts)


def revoke(site: Site, *, device: str, state_dir: Path | None = None) -> bool:
    """Revoke the device's outstanding token; True if Vault still knew it, False if it had already lapsed."""
    check_device(device)
    store = backends(site, state_dir)
    client = store.vault()
    try:
        record = _read_kv(client, store.kv_mount, device_path(device))
        if not record or not record.get("accessor"):
            raise CheckFailed(f"no enrollment token was ever minted for {device}")
        live = _revoke_accessor(client, str(record["accessor"]))
        stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        client.secrets.kv.v2.create_or_update_secret(
            path=device_path(device), secret={**record, "revoked_at": stamp}, mount_point=store.kv_mount
        )
    except hvac.exceptions.VaultError as exc:
        raise _vault_error(f"revoke the enrollment token of {device}", exc) from exc
    except requests.exceptions.RequestException as exc:
        raise ServiceError(f"Vault is unreachable: {type(exc).__name__}") from exc
    return live


def recovery_key(site: Site, *, device: str, state_dir: Path | None = None) -> dict[str, Any]:
    """The latest escrowed record {recovery_key, luks_uuid, image_id, tpm2_pcrs, enrolled_at} and its version."""
    check_device(device)
    store = backends(site, state_dir)
    client = store.vault()
    try:
        response = client.secrets.kv.v2.read_secret_version(
            path=recovery_path(device), mount_point=store.kv_mount, raise_on_deleted_version=True
        )
    except hvac.exceptions.InvalidPath:
        raise CheckFailed(f"no recovery key escrowed for {device}", hint="has the laptop enrolled yet?") from None
    except hvac.exceptions.VaultError as exc:
        raise _vault_error(f"read the recovery key of {device}", exc) from exc
    data: dict[str, Any] = dict(response["data"]["data"])
    if not data.get("recovery_key"):
        raise CheckFailed(f"the escrow record of {device} holds no recovery key")
    data["version"] = response["data"]["metadata"]["version"]
    return data
