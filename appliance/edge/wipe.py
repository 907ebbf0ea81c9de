"""Remote wipe of an edge laptop (edge_image/DESIGN.md, "Wipe"): the operator's side.

`request` puts the device on the KV v2 secret `membria/edge/wipe-list` (check-and-set: two operators wiping at
once never lose each other's entry) and then revokes what the device could still use: every unexpired
certificate issued for `<device>.<domain>` by an edge-device role, and an outstanding enrollment token. The
list comes first: a device revoked but not yet listed could no longer reach the gateway to learn it is to be
wiped. The gateway answers a listed device's `GET /v1/device/commands` even with its revoked certificate; the
laptop's guard acks and erases its keyslots (edge_image/device/guard.py, wipe.py).

Finding the certificates: enrollment records no serial anywhere (the enrollment token's policy allows one KV
write, the escrow record, and that is written before the certificate is signed), so the PKI's own list of
stored certificates (`LIST <pki_int>/certs`, then each one read) is searched for the CN. Every certificate of
that name is found, including one the lab or an admin issued by hand, at the cost of one read per stored
certificate (about 1 ms each on a local Vault).

In production the Vault agent renders the list to the gateway's `device_commands.wipe_list` file and the CRL
to `tls.crl`. In the lab there is no agent: `request` and `cancel` render both at once (as `appliance pki
revoke` does for the CRL), and `lab up` renders the list when it writes the gateway's configuration.
"""

from __future__ import annotations

import getpass
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.edge.enrollment import _read_kv, _revoke_accessor, _vault_error, check_device, device_path
from appliance.errors import BadInput, ServiceError
from appliance.pki import Pki
from appliance.signing_keys import backends
from appliance.site import Site
from runtime.common import atomic
from runtime.common.file_lock import exclusive
from runtime.common.identity import ORG_FOR_KIND

WIPE_LIST_PATH = "membria/edge/wipe-list"
CAS_ATTEMPTS = 8
MAX_REASON = 500


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_reason(reason: str) -> str:
    text = reason.strip()
    if not text:
        raise BadInput("--reason is empty: say why the laptop is wiped (it goes to the audit log)")
    if len(text) > MAX_REASON or not re.fullmatch(r"[^\x00-\x1f\x7f]+", text):
        raise BadInput(f"--reason must be one line of at most {MAX_REASON} printable characters")
    return text


# --- the list (KV v2, check-and-set) -----------------------------------------------------------------------


class CasConflict(Exception):
    """Someone else wrote the list between our read and our write."""


def read_list(client: hvac.Client, kv_mount: str) -> tuple[dict[str, Any], int]:
    """The list's data (`{"devices": {...}}`) and its current KV version (0: never written)."""
    try:
        response = client.secrets.kv.v2.read_secret_version(
            path=WIPE_LIST_PATH, mount_point=kv_mount, raise_on_deleted_version=False
        )
    except hvac.exceptions.InvalidPath:
        return {"devices": {}}, 0
    data = response["data"].get("data") or {}  # None when the latest version was deleted
    version = int(response["data"]["metadata"]["version"])
    devices = data.get("devices")
    return {**data, "devices": dict(devices) if isinstance(devices, dict) else {}}, version


def with_entry(data: dict[str, Any], device: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    """`data` with the device listed; None when it already is (its first entry is kept: same command id)."""
    if device in data["devices"]:
        return None
    return {**data, "devices": {**data["devices"], device: entry}}


def without_entry(data: dict[str, Any], device: str) -> dict[str, Any] | None:
    if device not in data["devices"]:
        return None
    return {**data, "devices": {k: v for k, v in data["devices"].items() if k != device}}


def write_list(client: hvac.Client, kv_mount: str, data: dict[str, Any], cas: int) -> int:
    """One check-and-set write; CasConflict when the list is no longer at version `cas`."""
    try:
        written = client.secrets.kv.v2.create_or_update_secret(
            path=WIPE_LIST_PATH, secret=data, cas=cas, mount_point=kv_mount
        )
    except hvac.exceptions.InvalidRequest as exc:
        if "check-and-set" in str(exc):
            raise CasConflict(str(exc)) from None
        raise
    return int(written["data"]["version"])


def update_list(
    client: hvac.Client, kv_mount: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
) -> tuple[dict[str, Any], int, bool]:
    """Read, change, write with check-and-set; on a conflict read again and re-apply `change` to the other
    writer's version. Returns (data, version, changed)."""
    for _ in range(CAS_ATTEMPTS):
        data, version = read_list(client, kv_mount)
        changed = change(data)
        if changed is None:
            return data, version, False
        try:
            return changed, write_list(client, kv_mount, changed, version), True
        except CasConflict:
            continue
    raise ServiceError(f"the wipe list changed under us {CAS_ATTEMPTS} times in a row; try again")


# --- certificates ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCertificate:
    serial: str  # as Vault names it: colon-separated hex
    not_after: datetime
    revoked: bool

    @property
    def live(self) -> bool:
        return not self.revoked and self.not_after > datetime.now(UTC)


def device_certificates(client: hvac.Client, pki_int_mount: str, common_name: str) -> list[DeviceCertificate]:
    """Every stored certificate with CN `common_name` and O = device, oldest expiry first."""
    try:
        keys = client.secrets.pki.list_certificates(mount_point=pki_int_mount)["data"]["keys"]
    except hvac.exceptions.InvalidPath:
        return []
    found: list[DeviceCertificate] = []
    for serial in keys:
        try:
            data = client.secrets.pki.read_certificate(serial, mount_point=pki_int_mount)["data"]
            cert = x509.load_pem_x509_certificate(str(data["certificate"]).encode())
        except (hvac.exceptions.InvalidPath, ValueError, KeyError):
            continue
        cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        orgs = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        if cns != [common_name] or ORG_FOR_KIND["device"] not in orgs:
            continue
        revoked = int(data.get("revocation_time") or 0) > 0
        found.append(DeviceCertificate(str(serial), cert.not_valid_after_utc, revoked))
    return sorted(found, key=lambda c: c.not_after)


def _token_live(client: hvac.Client, accessor: str) -> bool:
    try:
        client.auth.token.lookup_accessor(accessor)
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath, hvac.exceptions.Forbidden):
        return False
    return True


def _requested_by(client: hvac.Client) -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    try:
        who = client.auth.token.lookup_self()["data"].get("display_name") or ""
    except (hvac.exceptions.VaultError, requests.exceptions.RequestException):
        who = ""
    return f"{user} (vault: {who})" if who else user


# --- the operator's commands ---------------------------------------------------------------------------------


@dataclass
class WipePlan:
    device: str
    common_name: str
    reason: str
    listed: dict[str, Any] | None  # the device's entry, when it is already on the list
    certificates: list[DeviceCertificate] = field(default_factory=list)
    token_accessor: str | None = None  # an enrollment token not yet revoked

    @property
    def to_revoke(self) -> list[DeviceCertificate]:
        return [c for c in self.certificates if c.live]

    @property
    def nothing_to_do(self) -> bool:
        return self.listed is not None and not self.to_revoke and self.token_accessor is None


@dataclass
class WipeDone:
    entry: dict[str, Any]
    added: bool
    revoked: list[str]
    token_revoked: bool
    list_version: int
    rendered: list[Path] = field(default_factory=list)


def plan(site: Site, *, device: str, reason: str, state_dir: Path | None = None) -> WipePlan:
    """What `request` would do, read from Vault; writes nothing."""
    check_device(device)
    reason = check_reason(reason)
    store = backends(site, state_dir)
    client = store.vault()
    pki = Pki.for_site(site, client)
    common_name = f"{device}.{site.site.domain}"
    try:
        data, _ = read_list(client, store.kv_mount)
        certificates = device_certificates(client, pki.int_mount, common_name)
        record = _read_kv(client, store.kv_mount, device_path(device)) or {}
        accessor = str(record["accessor"]) if record.get("accessor") and not record.get("revoked_at") else None
        if accessor is not None and not _token_live(client, accessor):
            accessor = None  # used up at enrollment (revoke-self), expired or revoked: nothing left to revoke
    except hvac.exceptions.VaultError as exc:
        raise _vault_error(f"read what is known about {device}", exc) from exc
    except requests.exceptions.RequestException as exc:
        raise ServiceError(f"Vault is unreachable: {type(exc).__name__}") from exc
    return WipePlan(device, common_name, reason, data["devices"].get(device), certificates, accessor)


def request(site: Site, wanted: WipePlan, *, state_dir: Path | None = None) -> WipeDone:
    """List the device (check-and-set), then revoke its certificates and enrollment token; idempotent."""
    store = backends(site, state_dir)
    client = store.vault()
    pki = Pki.for_site(site, client)
    entry = {
        "id": f"wipe-{uuid.uuid4().hex}",
        "device": wanted.device,
        "reason": wanted.reason,
        "requested_at": _now(),
        "requested_by": _requested_by(client),
    }
    try:
        data, version, added = update_list(client, store.kv_mount, lambda d: with_entry(d, wanted.device, entry))
        revoked: list[str] = []
        for cert in device_certificates(client, pki.int_mount, wanted.common_name):  # again: the plan may be old
            if cert.live:
                pki.revoke(cert.serial)
                revoked.append(cert.serial)
        token_revoked = False
        record = _read_kv(client, store.kv_mount, device_path(wanted.device))
        if record and record.get("accessor") and not record.get("revoked_at"):
            token_revoked = _revoke_accessor(client, str(record["accessor"]))  # False: it had lapsed already
            client.secrets.kv.v2.create_or_update_secret(
                path=device_path(wanted.device),
                secret={**record, "revoked_at": _now(), "revoked_for": "wipe"},
                mount_point=store.kv_mount,
            )
    except hvac.exceptions.VaultError as exc:
        raise _vault_error(f"put {wanted.device} on the wipe list and revoke its certificates", exc) from exc
    except requests.exceptions.RequestException as exc:
        raise ServiceError(f"Vault is unreachable: {type(exc).__name__}") from exc
    done = WipeDone(data["devices"][wanted.device], added, revoked, token_revoked, version)
    done.rendered = _lab_render(site, state_dir, client, store.kv_mount, pki)
    return done


def cancel(site: Site, *, device: str, dry_run: bool = False, state_dir: Path | None = None) -> dict[str, Any] | None:
    """Take the device off the list (its certificates stay revoked); returns the entry removed, or None."""
    check_device(device)
    store = backends(site, state_dir)
    client = store.vault()
    try:
        if dry_run:
            data, _ = read_list(client, store.kv_mount)
            removed: dict[str, Any] | None = data["devices"].get(device)
            return removed
        before: dict[str, Any] = {}

        def change(d: dict[str, Any]) -> dict[str, Any] | None:
            before.clear()
            before.update(d["devices"].get(device) or {})
            return without_entry(d, device)

        data, _, changed = update_list(client, store.kv_mount, change)
    except hvac.exceptions.VaultError as exc:
        raise _vault_error(f"take {device} off the wipe list", exc) from exc
    except requests.exceptions.RequestException as exc:
        raise ServiceError(f"Vault is unreachable: {type(exc).__name__}") from exc
    _lab_render(site, state_dir, client, store.kv_mount, Pki.for_site(site, client))
    return before if changed else None


def render(path: Path, data: dict[str, Any]) -> bool:
    """Write the list as the Vault agent would (the KV data as JSON); True when the file changed."""
    text = json.dumps({**data, "devices": data.get("devices") or {}}, indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() == text:
        return False
    atomic.write_text(path, text, mode=0o644)
    return True


def render_lock(list_path: Path) -> Path:
    """Held while reading the list from Vault and rendering it, by every renderer of one file."""
    return list_path.with_name(".wipe-render.lock")


def _lab_render(site: Site, state_dir: Path | None, client: hvac.Client, kv_mount: str, pki: Pki) -> list[Path]:
    """The lab has no Vault agent: render the wipe list, then the CRL, for its gateway (list first, so the
    gateway never sees the device revoked and not listed).

    Both are read from Vault again under a lock, not taken from this process's own write: two wipes at once
    would otherwise each render what they wrote, and the slower one would drop the other's device from the
    file (the agent, too, renders the newest version)."""
    if not site.embedded["vault"]:
        return []
    from appliance.lab.bootstrap import crl_path, write_crl
    from appliance.lab.runtime_services import wipe_list_path
    from appliance.lab.state import LabState

    state = LabState.at(state_dir or site.lab.state_dir)
    with exclusive(render_lock(wipe_list_path(state))):
        try:
            data, _ = read_list(client, kv_mount)
            render(wipe_list_path(state), data)
            write_crl(state, pki)
        except hvac.exceptions.VaultError as exc:
            raise _vault_error("render the wipe list and the CRL for the lab's gateway", exc) from exc
        except requests.exceptions.RequestException as exc:
            raise ServiceError(f"Vault is unreachable: {type(exc).__name__}") from exc
    return [wipe_list_path(state), crl_path(state)]
