"""GET /v1/device/commands and POST /v1/device/commands/{id}/ack: commands for laptops, today only `wipe`
(edge_image/DESIGN.md, "Wipe").

`appliance edge wipe` puts a device on the KV secret `membria/edge/wipe-list` and revokes its certificate; the
Vault agent renders the secret's data to `settings.wipe_list` (`{"devices": {name: {id, reason, requested_at,
requested_by, ...}}}`), re-read here whenever its mtime changes, like the CRL (revocation.py). The laptop's
guard polls with its device certificate (CN `<device>.<domain>`, O=device):

- a device on the list gets `{commands: [{id, action: "wipe", reason}]}`, **even with a revoked certificate**:
  these two routes are the only place a revoked certificate is accepted, and only for a device on the list;
  every other route still refuses it (app.authenticate);
- an entry applies to certificates issued before it was requested (`not_valid_before <= requested_at`): a
  laptop re-imaged and enrolled again under the same name after the wipe is not wiped by the old entry (and a
  fresh certificate of that name gets no pass on revocation either);
- any other device gets an empty list; users, services and service tokens are refused (deny by default).

The ack is what the guard sends just before it wipes: one audit row naming the device and the command. The
gateway keeps no other state (it holds no Vault credential): the audit log is the record that the laptop
picked the command up. These routes take no license seat: a wipe must reach a laptop whatever the seat count.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from runtime.common.identity import Identity, NotAnIdentity, identity_from_certificate
from runtime.common.tls import peer_certificate
from runtime.gateway import enrollment
from runtime.gateway.app import GatewayDeps, GatewayError, _ctx
from runtime.gateway.ratelimit import RateLimiter, retry_after_header
from runtime.gateway.revocation import RevocationList
from runtime.gateway.settings import DeviceCommandSettings

log = logging.getLogger("membria.gateway.device_commands")

COMMAND_ID = r"^[A-Za-z0-9_.-]{1,100}$"
DEVICE_PATTERN = re.compile(enrollment.DEVICE_PATTERN)  # the names enrollment issues certificates for


class WipeEntry(BaseModel):
    # Extra fields are ignored: a field added by a newer `edge wipe` must never make a gateway drop a wipe.
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(pattern=COMMAND_ID)
    reason: str = Field(default="", max_length=1000)
    requested_at: datetime | None = None
    requested_by: str = ""

    def covers(self, not_valid_before: datetime) -> bool:
        """Whether this entry applies to a certificate issued at `not_valid_before`."""
        if self.requested_at is None:
            return True
        at = self.requested_at if self.requested_at.tzinfo else self.requested_at.replace(tzinfo=UTC)
        return not_valid_before <= at


class WipeListDocument(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    devices: dict[str, WipeEntry] = Field(default_factory=dict)


def parse_wipe_list(raw: bytes | str) -> dict[str, WipeEntry]:
    """The rendered file's devices (ValueError when it is not a wipe list); bad device names are dropped."""
    document = WipeListDocument.model_validate_json(raw)
    return {name: entry for name, entry in document.devices.items() if DEVICE_PATTERN.fullmatch(name)}


class WipeList:
    """The rendered wipe list, re-read when the file's mtime changes. A file that does not parse keeps the last
    good list (and is logged): a half-rendered file must not cancel a wipe. No file: nobody is on the list."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, WipeEntry] = {}
        self._mtime_ns: int | None = None
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            with self._lock:
                self._entries, self._mtime_ns = {}, None
            return
        if mtime == self._mtime_ns:
            return
        with self._lock:
            try:
                self._entries = parse_wipe_list(self.path.read_bytes())
            except (OSError, ValueError) as exc:
                log.error("wipe list %s unreadable, keeping the previous one: %s", self.path, exc)
            self._mtime_ns = mtime

    def entry(self, device: str) -> WipeEntry | None:
        self._refresh()
        return self._entries.get(device)


def device_name(ident: Identity, domain: str) -> str | None:
    """`lt-0042` for a device certificate `lt-0042.<domain>`; None for a name outside the site's domain."""
    suffix = f".{domain}"
    if not ident.subject.endswith(suffix):
        return None
    name = ident.subject[: -len(suffix)]
    return name if DEVICE_PATTERN.fullmatch(name) else None


def register(app: FastAPI, deps: GatewayDeps, conf: DeviceCommandSettings) -> None:
    settings = deps.settings
    revoked = RevocationList(settings.tls.crl)
    wipe_list = WipeList(conf.wipe_list)
    limiter = RateLimiter(settings.rate_limit.rate_per_second, settings.rate_limit.burst)

    def caller(request: Request) -> tuple[Identity, str | None, WipeEntry | None]:
        """The calling device, its name, and its wipe entry (if one covers this certificate)."""
        ctx = _ctx(request)
        cert = peer_certificate(request.scope)
        if cert is None:
            ctx.reason = "device commands need a device certificate"
            raise GatewayError(401, "unauthenticated", "a device client certificate is required")
        try:
            ident = identity_from_certificate(cert)
        except NotAnIdentity as exc:
            ctx.reason = str(exc)
            raise GatewayError(403, "not_an_identity", str(exc)) from exc
        ctx.identity = ident
        ctx.departments = ident.departments
        if ident.kind != "device":
            ctx.reason = f"device commands are for devices, not a {ident.kind}"
            raise GatewayError(403, "forbidden", "device commands are for device certificates only")
        name = device_name(ident, conf.domain)
        entry = wipe_list.entry(name) if name else None
        if entry is not None and not entry.covers(cert.not_valid_before_utc):
            entry = None  # a certificate issued after the wipe was requested: a re-enrolled laptop
        if revoked.is_revoked(ident.cert_serial):
            if entry is None:
                ctx.reason = "certificate revoked"
                raise GatewayError(401, "certificate_revoked", "the client certificate has been revoked")
            ctx.reason = "revoked certificate accepted: the device is on the wipe list"
        wait = limiter.take(ident.key)
        if wait > 0:
            ctx.decision, ctx.reason = "rate_limited", "rate limit"
            raise GatewayError(
                429, "rate_limited", "too many requests", headers={"Retry-After": retry_after_header(wait)}
            )
        return ident, name, entry

    @app.get("/v1/device/commands", tags=["edge"])
    async def device_commands(request: Request) -> JSONResponse:
        """Commands for the calling laptop (its device certificate says which): `{commands: [{id, action,
        reason}]}`, empty unless the device is on the site's wipe list. A device on the wipe list is answered
        even with a revoked certificate; users and services are refused."""
        ctx = _ctx(request)
        _, name, entry = caller(request)
        ctx.decision = "allow"
        if entry is None:
            ctx.reason = ctx.reason or "no commands"
            return JSONResponse({"commands": []})
        ctx.reason = f"wipe command {entry.id} delivered to device {name}"
        return JSONResponse({"commands": [{"id": entry.id, "action": "wipe", "reason": entry.reason}]})

    @app.post("/v1/device/commands/{command_id}/ack", tags=["edge"])
    async def ack(command_id: str, request: Request) -> JSONResponse:
        """The laptop acknowledges a command just before carrying it out (audited). 404 for a command that is
        not this device's (or no longer on the list)."""
        ctx = _ctx(request)
        if not re.fullmatch(COMMAND_ID, command_id):
            raise GatewayError(404, "no_such_command", "no such command")
        _, name, entry = caller(request)
        status = ""
        body = await request.body()
        if body:
            try:
                status = str(json.loads(body).get("status", ""))[:40]
            except (ValueError, AttributeError):
                status = ""
        if entry is None or entry.id != command_id:
            ctx.decision = "deny"
            ctx.reason = f"ack of unknown command {command_id}"
            raise GatewayError(404, "no_such_command", f"no command {command_id} for this device")
        ctx.decision = "allow"
        ctx.reason = f"wipe command {command_id} acknowledged by device {name}" + (f" ({status})" if status else "")
        log.warning("device %s acknowledged wipe command %s", name, command_id)
        return JSONResponse({"id": command_id, "acknowledged": True})
