"""`membria-edge-guard`: polls the gateway for commands addressed to this laptop and carries out a wipe
(edge_image/DESIGN.md, "Wipe").

Runs as root (`python -m edge_image.device.guard`), every 60 s by default: `GET /v1/device/commands` over mTLS
with the device certificate from the agent's settings file (`/etc/membria/edge.json`: `gateways` and
`tls: {cert, key, ca}`), TLS 1.3 only, the gateway verified against the site CA baked into the image. The
gateways are tried in order; the first answer counts. A device on the site's wipe list is answered even though
its certificate has been revoked. For a `wipe` command the guard acks it (`POST
/v1/device/commands/{id}/ack`, audited by the gateway), then calls `edge_image.device.wipe.wipe(reason)`,
which erases every keyslot and powers off. An ack that no gateway takes is logged and the wipe goes ahead: the
command was authenticated by the gateway's certificate, and a thief can cut the network but not un-send it.

Imports stay within the laptop's wheelhouse (stdlib, httpx, pydantic).
"""

from __future__ import annotations

import argparse
import logging
import random
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_image.device import wipe as wiper

log = logging.getLogger("membria.edge.guard")

CONFIG = Path("/etc/membria/edge.json")
DEFAULT_INTERVAL = 60.0
PYTHON = "/opt/membria/runtime/bin/python"  # the image's venv (edge_image/DESIGN.md, "Build pipeline")

UNIT = "membria-edge-guard.service"
UNITS: dict[str, str] = {
    UNIT: f"""\
[Unit]
Description=Membria edge guard: remote wipe commands from the site's gateway
Wants=network-online.target
After=network-online.target membria-enroll.service
ConditionPathExists={CONFIG}

[Service]
Type=simple
# Root: a wipe runs cryptsetup on the root partition and powers off through /proc/sysrq-trigger.
ExecStart={PYTHON} -m edge_image.device.guard --config {CONFIG} --interval {DEFAULT_INTERVAL:g}
Restart=always
RestartSec=10
# Hardened as far as cryptsetup on the root partition and sysrq allow: no PrivateDevices (the partition),
# no ProtectKernelTunables (it makes /proc/sysrq-trigger read-only), no MemoryDenyWriteExecute (cryptsetup's
# argon2 and libcrypto), /run/cryptsetup writable for cryptsetup's locks.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=-/run/cryptsetup
ProtectHome=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
CapabilityBoundingSet=CAP_SYS_ADMIN CAP_IPC_LOCK CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_SYS_BOOT

[Install]
WantedBy=multi-user.target
""",
}
ENABLED: tuple[str, ...] = (UNIT,)


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class GuardTls(_Open):
    cert: Path
    key: Path
    ca: Path


class GuardConfig(_Open):
    """What the guard needs from the agent's settings file (the rest of edge.json is the agent's)."""

    gateways: list[str] = Field(min_length=1)
    tls: GuardTls


class Command(_Open):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    action: str
    reason: str = ""


class ConfigError(Exception):
    pass


def load_config(path: Path) -> GuardConfig:
    try:
        return GuardConfig.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def tls_context(conf: GuardConfig) -> ssl.SSLContext:
    """mTLS with the device certificate, TLS 1.3 only, the gateway checked against the site CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(conf.tls.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(conf.tls.cert), str(conf.tls.key))
    return context


@dataclass(frozen=True)
class PollResult:
    gateway: str | None  # the gateway that answered; None when none did
    commands: list[Command]
    acked: list[str]
    wiped: list[Any]


def _fetch(client: httpx.Client, gateways: list[str]) -> tuple[str | None, list[Command]]:
    for url in gateways:
        try:
            response = client.get(f"{url.rstrip('/')}/v1/device/commands")
        except httpx.HTTPError as exc:
            log.warning("gateway %s: %s", url, type(exc).__name__)
            continue
        if response.status_code != 200:
            log.warning("gateway %s: HTTP %d: %s", url, response.status_code, response.text[:200])
            continue
        try:
            raw = response.json().get("commands") or []
            return url, [Command.model_validate(c) for c in raw]
        except (ValueError, AttributeError, ValidationError) as exc:
            log.warning("gateway %s: unreadable commands: %s", url, exc)
            continue
    return None, []


def _ack(client: httpx.Client, gateways: list[str], command: Command) -> bool:
    for url in gateways:
        try:
            response = client.post(f"{url.rstrip('/')}/v1/device/commands/{command.id}/ack", json={"status": "wiping"})
        except httpx.HTTPError as exc:
            log.warning("ack of %s at %s: %s", command.id, url, type(exc).__name__)
            continue
        if response.status_code == 200:
            return True
        log.warning("ack of %s at %s: HTTP %d", command.id, url, response.status_code)
    return False


def poll_once(
    conf: GuardConfig,
    *,
    wipe: Callable[[str], Any] = wiper.wipe,
    timeout: float = 30.0,
) -> PollResult:
    """One poll: fetch this device's commands, ack each wipe, then wipe (which powers off on a laptop)."""
    with httpx.Client(verify=tls_context(conf), timeout=timeout) as client:
        gateway, commands = _fetch(client, conf.gateways)
        acked: list[str] = []
        wiped: list[Any] = []
        for command in commands:
            if command.action != "wipe":
                log.warning("ignoring command %s: unknown action %r", command.id, command.action)
                continue
            log.warning("wipe command %s from %s: %s", command.id, gateway, command.reason)
            ordered = [gateway, *(g for g in conf.gateways if g != gateway)] if gateway else conf.gateways
            if _ack(client, ordered, command):
                acked.append(command.id)
            else:
                log.error("no gateway took the ack of %s; wiping all the same", command.id)
            wiped.append(wipe(command.reason or "remote wipe"))
            break  # one wipe is all there is (and a laptop is off by now)
    return PollResult(gateway, commands, acked, wiped)


def run(conf: GuardConfig, interval: float) -> None:
    while True:
        try:
            poll_once(conf)
        except wiper.WipeError as exc:
            log.error("wipe failed: %s (retrying at the next poll)", exc)
        except (OSError, ssl.SSLError, httpx.HTTPError) as exc:
            log.warning("poll failed: %s", exc)
        time.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311 - jitter, not a secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="membria-edge-guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the agent's settings file (gateways, tls)")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between polls")
    parser.add_argument("--once", action="store_true", help="poll once and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not 1 <= args.interval <= 86400:
        print("membria-edge-guard: --interval must be between 1 and 86400 seconds", file=sys.stderr)
        return 2
    try:
        conf = load_config(args.config)
        tls_context(conf)  # unreadable certificate or key: say so now, not at every poll
    except ConfigError as exc:
        print(f"membria-edge-guard: {exc}", file=sys.stderr)
        return 2
    except (OSError, ssl.SSLError) as exc:
        print(f"membria-edge-guard: the device certificate, key or CA cannot be loaded: {exc}", file=sys.stderr)
        return 2
    if args.once:
        try:
            result = poll_once(conf)
        except wiper.WipeError as exc:
            print(f"membria-edge-guard: wipe failed: {exc}", file=sys.stderr)
            return exc.exit_code
        if result.gateway is None:
            print("membria-edge-guard: no gateway answered", file=sys.stderr)
            return 1
        return 0
    run(conf, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
