"""The lab's core node (`lab.core: host`): the site's first core node as a systemd-nspawn test host on a
private bridge, provisioned by `appliance core apply` with the roles: the path a rack node takes.

The admin machine keeps what a site's infrastructure would be: OpenBao, the S3 endpoint and the laptop (the
edge agent). Relays put OpenBao and S3 on the bridge's admin-side address, the only address the node can
reach (the bridge has no route off it). The node runs the appliance from this checkout, bound read-only at
the same path (a rack node gets it from the bundle).

Names derive from the lab's state directory, so a second lab (the tests') never meets `make lab`'s: the
machine is `lab-<6 hex>` under `<state>/hosts/`, the bridge `mbl<6 hex>`. `lab down` stops the machine
and keeps its tree (its stores, as the process lab keeps its data files); the next `up` boots it and
applies the roles again (OpenBao starts empty, so the node needs a new Vault identity).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from appliance.errors import BadInput, MissingEnvironment, ServiceError
from appliance.hosts.nspawn import Bind, HostNetwork, TestHost, require_tools
from appliance.lab.services import EmbeddedService, Health, OpenBao, S3Server
from appliance.lab.state import LabState
from appliance.site import Site
from runtime.common import atomic

Progress = Callable[[str], None]

CHECKOUT = Path(__file__).resolve().parents[2]
# Where the dr_agent role puts the site as the node reads it, and the state directory its DR runs use
# (links there point at the node's embedded stores).
NODE_SITE_FILE = "/etc/membria/site.yaml"
NODE_STATE_DIR = "/var/lib/membria/dr/state"
NODE_UNITS = ("membria-vault-agent", "membria-llm", "membria-core", "membria-gateway")
# What the vault_agent role's agent renders from Vault (certificates, CA chain, CRL, gateway secrets).
# The certificate bundles are the agent's own record, which its pkiCert reads back before asking for a new one.
RENDERED_BY_AGENT = (
    "/etc/membria/tls/*.pem",
    "/var/lib/membria/vault-agent/*.bundle.pem",
    "/etc/membria/secrets/*.env",
    "/etc/membria/gateway/service-token.pub",
    "/etc/membria/gateway/wipe-list.json",
)
READY_TIMEOUT_S = 300.0  # the core server loads the embedding model, then llama.cpp its model


def is_host_lab(site: Site) -> bool:
    return site.lab.core == "host"


class LabCoreNode:
    """core-1 of a lab site: its machine, its bridge, and the `core apply` that provisions it."""

    def __init__(self, site: Site, state: LabState) -> None:
        if not site.core_nodes:
            raise BadInput("the site has no core_nodes: `lab.core: host` provisions the first one")
        self.site = site
        self.state = state
        self.node = site.core_nodes[0]
        try:
            address = ipaddress.IPv4Address(self.node.address)
        except ValueError:
            raise BadInput(
                f"core_nodes[0].address '{self.node.address}': `lab.core: host` needs an IPv4 address, the "
                "node's address on the lab's private bridge",
                hint="e.g. 10.77.0.11, or `lab.core: processes` to run the core services as local processes",
            ) from None
        subnet = ipaddress.IPv4Network(f"{address}/24", strict=False)
        gateway = subnet.network_address + 1
        if address in (subnet.network_address, gateway, subnet.broadcast_address):
            raise BadInput(
                f"core_nodes[0].address {address}: .0, .1 and .255 of {subnet} are taken (.1 is the admin "
                "machine's side of the lab bridge)",
                hint="pick a host number from 2 to 254, e.g. 10.77.0.11",
            )
        self.subnet = subnet
        tag = hashlib.sha256(str(state.root).encode()).hexdigest()[:6]
        self.network = HostNetwork(f"mbl{tag}", f"{gateway}/{subnet.prefixlen}")
        binds = [Bind(CHECKOUT, CHECKOUT)]
        venv = Path(sys.prefix)
        if not venv.is_relative_to(CHECKOUT):
            binds.append(Bind(venv, venv))
        self.host = TestHost(f"lab-{tag}", str(address), self.network, binds=binds, machines_dir=state.root / "hosts")

    @property
    def label(self) -> str:
        return self.node.name

    @property
    def admin_address(self) -> str:
        """The admin machine's address on the lab bridge: what the node dials for OpenBao and S3."""
        return self.network.gateway

    # ---- bringing it up ------------------------------------------------------------------------------

    def check_subnet(self) -> None:
        """The node's /24 must be the lab bridge's alone: an interface here in it would take its traffic."""
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 4 or fields[1] == self.network.bridge:
                continue
            if ipaddress.IPv4Interface(fields[3]).network.overlaps(self.subnet):
                raise MissingEnvironment(
                    f"{self.subnet} (core_nodes[0].address {self.node.address}) is already used by {fields[1]} "
                    "on this machine",
                    hint="move the lab's core node to a free /24 in the site file",
                )

    def up(self, progress: Progress) -> None:
        """Create (once), boot, apply every role, and wait until the gateway answers ready."""
        require_tools()
        self.check_subnet()
        existed = self.host.root.exists()
        if not existed:
            progress(f"{self.label}: creating test host {self.host.name} (the rootfs is built once, cached)")
            self.host.create(progress)
        if not self.host.running():
            self.host.start(progress=progress)
        if existed:
            self.forget_vault(progress)
        self.apply(progress)
        self.wait_ready(progress)

    def forget_vault(self, progress: Progress) -> None:
        """The lab's OpenBao starts empty: a new PKI, new secrets. What the Vault agent rendered from the last
        one goes, so the apply waits for files from this one (the agent would keep a certificate of the old
        CA until its renewal time)."""
        progress(f"{self.label}: dropping what the Vault agent rendered from the previous lab OpenBao")
        self.host.ssh(
            "systemctl stop membria-vault-agent 2>/dev/null; "
            f"rm -f {' '.join(RENDERED_BY_AGENT)} /etc/membria/vault-agent/token",
            timeout=60,
        )

    def stop(self) -> bool:
        running = self.host.running()
        self.host.stop()
        return running

    def apply(self, progress: Progress) -> None:
        """`appliance core apply` for this node, the command IT runs on a rack; its log under logs/."""
        config = self.state.root / "config"
        site_file = config / "core-site.json"
        data = self.site.model_dump(mode="json")
        data["core_nodes"][0]["ssh"] = {**data["core_nodes"][0]["ssh"], "user": "root", "key": str(self.host.key_path)}
        # JSON is YAML: the CLI reads the lab's site as the lab has it, never the caller's file.
        atomic.write_text(site_file, json.dumps(data, indent=1))
        vars_file = config / "core-vars.yaml"
        with vars_file.open("w") as fh:
            YAML().dump({self.node.name: self.role_vars()}, fh)
        log = self.state.log_dir / "core-apply.log"
        events = self.state.log_dir / "core-apply-events.jsonl"
        argv = [
            sys.executable,
            "-m",
            "appliance",
            "core",
            "apply",
            "--site",
            str(site_file),
            "--state-dir",
            str(self.state.root),
            "--limit",
            self.node.name,
            "--vars",
            str(vars_file),
            "--events",
            str(events),
        ]
        progress(f"{self.label}: core apply (every role; log {log})")
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "160"}
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if line.strip():
                    progress(f"{self.label}: {line.strip()[:120]}")
            code = proc.wait()
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise ServiceError(
                f"core apply on {self.label} failed (exit {code}):\n{tail}", hint=f"the whole run: {log}, {events}"
            )

    def role_vars(self) -> dict[str, Any]:
        """What differs from a rack: the test host's pinned key, no mirror, and the admin side's relays."""
        bao = OpenBao(self.site, self.state)
        s3 = S3Server(self.site, self.state)
        return {
            "ansible_ssh_common_args": self.host.ansible_vars()["ansible_ssh_common_args"],
            "base_apt_update_cache": False,  # no route to a mirror: the rootfs carries the packages
            "membria_vault_addr": f"https://{self.admin_address}:{bao.port}",
            "membria_vault_tls_server_name": "localhost",  # OpenBao's dev certificate names loopback only
            "membria_s3_url": f"http://{self.admin_address}:{s3.port}",
            "membria_runtime_python": sys.executable,
            "membria_runtime_root": str(CHECKOUT),
        }

    def wait_ready(self, progress: Progress, timeout: float = READY_TIMEOUT_S) -> None:
        from appliance.lab.runtime_services import Gateway

        gateway = Gateway(self.site, self.state)
        progress(f"{self.label}: waiting for the gateway at {gateway.endpoint} (the core loads its models)")
        deadline = time.monotonic() + timeout
        health = gateway.check()
        while not health.ok and time.monotonic() < deadline:
            time.sleep(2)
            health = gateway.check()
        if not health.ok:
            raise ServiceError(
                f"{self.label}: the gateway is not ready after {timeout:.0f} s: {health.detail}",
                hint=f"on the node: {self.ssh_hint('journalctl -u membria-gateway -u membria-core')}",
            )

    # ---- using it ------------------------------------------------------------------------------------

    def ssh(self, command: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`command` on the node; an answer that does not come in `timeout` is a failed command (exit 255)."""
        try:
            return self.host.ssh(command, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, 255, "", f"no answer from {self.label} in {timeout:.0f} s")

    def ssh_hint(self, command: str) -> str:
        return f"ssh {' '.join(shlex.quote(o) for o in self.host.ssh_options())} root@{self.host.address} {command!r}"

    def health(self) -> Health:
        """The machine runs and its appliance units are active."""
        where = f"{self.host.name} {self.host.address}"
        if not self.host.running():
            return Health(self.label, False, "test host not running", where)
        result = self.ssh("systemctl is-active " + " ".join(NODE_UNITS), timeout=20)
        if result.returncode == 255:
            return Health(self.label, False, f"no SSH answer: {result.stderr.strip()[:200]}", where)
        states = dict(zip(NODE_UNITS, result.stdout.split(), strict=False))
        down = [f"{unit} {states.get(unit, 'unknown')}" for unit in NODE_UNITS if states.get(unit) != "active"]
        if down:
            return Health(self.label, False, "; ".join(down), where)
        return Health(self.label, True, f"nspawn test host, {len(NODE_UNITS)} units active (roles applied)", where)

    def audit_probe(self, request_ids: list[str]) -> dict[str, Any]:
        """The node's audit log (chDB inside its gateway's data) asked on the node, as its service user."""
        python = shlex.quote(sys.executable)
        ids = " ".join(shlex.quote(i) for i in request_ids)
        command = (
            f"cd / && runuser -u membria -- {python} -m appliance.lab.audit_rows "
            f"--site {NODE_SITE_FILE} --state-dir {NODE_STATE_DIR} {ids}"
        )
        result = self.ssh(command, timeout=60)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise ServiceError(f"audit log on {self.label}: {lines[-1] if lines else f'exit {result.returncode}'}")
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def dr_heartbeat(self) -> dict[str, Any] | None:
        result = self.ssh(f"cat {NODE_STATE_DIR}/data/dr/shipper.json", timeout=20)
        if result.returncode != 0:
            return None
        try:
            beats: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            return None
        return beats

    def stop_gateway(self) -> None:
        self.ssh("systemctl stop membria-gateway")

    def start_gateway(self, progress: Progress) -> None:
        self.ssh("systemctl start membria-gateway")
        self.wait_ready(progress)


class BridgeRelay(EmbeddedService):
    """A lab service put on the lab bridge's admin-side address (`python -m appliance.hosts.relay`), so the
    core node reaches it; TLS stays end to end."""

    start_timeout = 15.0

    def __init__(self, site: Site, state: LabState, upstream: EmbeddedService, node: LabCoreNode) -> None:
        super().__init__(site, state)
        self.upstream = upstream
        self.node = node
        self.name = f"{upstream.name}-relay"

    @property
    def host(self) -> str:
        return self.node.admin_address

    @property
    def port(self) -> int:
        return self.upstream.port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port} -> {self.upstream.host}:{self.upstream.port}"

    def prepare(self) -> None:
        self.node.check_subnet()
        self.node.network.up()  # the address to listen on

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "appliance.hosts.relay",
            f"{self.host}:{self.port}",
            f"{self.upstream.host}:{self.upstream.port}",
        ]

    def check(self) -> Health:
        if not self.port_taken():
            return Health(self.name, False, "not listening", self.endpoint)
        return Health(self.name, True, f"{self.upstream.name} on the lab bridge for {self.node.label}", self.endpoint)


def bridge_relays(site: Site, state: LabState) -> list[EmbeddedService]:
    """What the core node must reach on the admin machine: OpenBao, and the S3 endpoint (DR shipping)."""
    if not is_host_lab(site):
        return []
    node = LabCoreNode(site, state)
    relays: list[EmbeddedService] = []
    if site.embedded["vault"]:
        relays.append(BridgeRelay(site, state, OpenBao(site, state), node))
    s3 = site.services.s3
    if s3.primary.backend == "embedded" or (s3.replica is not None and s3.replica.backend == "embedded"):
        relays.append(BridgeRelay(site, state, S3Server(site, state), node))
    return relays
