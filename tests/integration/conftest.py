"""Fixtures shared by integration tests: real embedded services started once per session.

`lab` is the whole lab (used by the gateway, edge outbox, idempotency and sync tests); `ExtraGateway` runs
more gateway processes next to the lab's, pointed at the same core server, with their own port, state and
audit database (chDB admits one process at a time).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.backends import Backends
from appliance.lab import bootstrap, lifecycle, process
from appliance.lab.runtime_services import AUDIT_KEY_ENV, admin_tls
from appliance.lab.services import LlamaServer
from appliance.lab.state import LabState
from appliance.pki import IssuedCertificate, Pki
from appliance.site import Site
from runtime.common import service_tokens
from runtime.common.tls import TlsFiles, client_context
from tests.conftest import REPO, free_port, lab_site_data, write_site


@pytest.fixture(scope="session")
def llm_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real llama.cpp server on the packaged Gemma 3 270M, on a free port; its OpenAI root URL
    (`http://127.0.0.1:PORT/v1`). The served model id is `appliance.lab.model.MODEL_ALIAS`."""
    root: Path = tmp_path_factory.mktemp("llm")
    site = Site.model_validate(lab_site_data(root / "state"))
    state = LabState.at(site.lab.state_dir)
    server = LlamaServer(site, state)
    server.prepare()
    record = process.spawn(state, server.name, server.argv(), env=server.env())
    try:
        process.wait_until(lambda: not record.alive() or server.check().ok, timeout=server.start_timeout, interval=0.5)
        health = server.check()
        if not health.ok:
            log = Path(record.log).read_text(errors="replace")[-2000:]
            pytest.fail(f"llama.cpp server did not start: {health.detail}\n{log}")
        yield server.endpoint
    finally:
        process.stop(state, server.name)


# --- the lab, shared by the gateway-level tests ----------------------------------------------------------

# Who calls, as (PKI role, CN, OU). Bindings in examples/rbac.yaml: every user/device is an employee of its
# OU; alice/bob/carol edit engineering/sales/hr; dana audits; nobody names erin or gus.
IDENTITIES: dict[str, tuple[str, str, str | None]] = {
    "alice": ("admin", "alice", "engineering"),
    "bob": ("admin", "bob", "sales"),
    "carol": ("admin", "carol", "hr"),
    "dana": ("admin", "dana", None),  # auditor; no OU, so no employee scope either
    "erin": ("admin", "erin", "engineering"),  # an engineering employee without an editor role
    "gus": ("admin", "gus", None),  # a site certificate with no OU and no named binding
    "sales-laptop": ("edge-device", "laptop-sales-1", "sales"),
    "eng-laptop": ("edge-device", "laptop-eng-1", "engineering"),
    # A device certificate whose CN is an administrator's name must not inherit her role.
    "device-named-ops-admin": ("edge-device", "ops-admin", "engineering"),
}


@dataclass
class GatewayLab:
    site: Site
    state: LabState
    site_file: Path
    certs: Path
    backends: Backends
    pki: Pki
    model: str
    _issued: dict[str, TlsFiles] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.site.lab.ports.gateway

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return bootstrap.ca_chain_path(self.state)

    @property
    def config(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state.root / "config" / "gateway.json").read_text())
        return data

    def audit_key(self) -> bytes:
        return bytes.fromhex(self.backends.read_secret(bootstrap.AUDIT_HMAC_PATH)["key_hex"])

    def issue(self, role: str, cn: str, ou: str | None = None, *, ttl: str | None = None) -> IssuedCertificate:
        return self.pki.issue(role, cn, ou=ou, ttl=ttl)

    def files(self, cert: IssuedCertificate, name: str) -> TlsFiles:
        paths = cert.write(self.certs / name, "client")
        return TlsFiles(cert=paths["certificate"], key=paths["private_key"], ca=self.ca)

    def who(self, name: str) -> TlsFiles:
        """The certificate of a named identity (issued once per session)."""
        if name == "ops-admin":
            return admin_tls(self.state)
        if name not in self._issued:
            role, cn, ou = IDENTITIES[name]
            self._issued[name] = self.files(self.issue(role, cn, ou), name)
        return self._issued[name]

    def client(self, who: str | TlsFiles | None, *, url: str | None = None, **kwargs: Any) -> httpx.Client:
        if who is None:  # no client certificate at all; still verifies the gateway against the site CA
            verify: ssl.SSLContext = ssl.create_default_context(cafile=str(self.ca))
        else:
            verify = client_context(self.who(who) if isinstance(who, str) else who)
        return httpx.Client(base_url=url or self.url, verify=verify, timeout=120, **kwargs)

    def metrics(self, url: str | None = None) -> str:
        """The /metrics text of a gateway (the lab's by default), as the operator. The operator is rate limited
        like everyone: a 429 is waited out (its Retry-After) rather than read as an empty exposition."""
        deadline = time.monotonic() + 60
        with self.client("ops-admin", url=url) as client:
            while True:
                response = client.get("/metrics")
                if response.status_code != 429 or time.monotonic() > deadline:
                    assert response.status_code == 200, response.text
                    return response.text
                time.sleep(int(response.headers.get("Retry-After", "1")))

    def token(self, service: str, departments: list[str]) -> str:
        key = bootstrap.ed25519_from_vault(self.backends, bootstrap.SERVICE_TOKEN_KEY_PATH)
        return service_tokens.issue(key, service, departments)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayLab]:
    """The whole lab (OpenBao PKI, llama.cpp, the core server, the gateway over mTLS), once per session:
    the gateway, edge outbox and sync tests share it."""
    root = tmp_path_factory.mktemp("gateway-lab")
    data = lab_site_data(root / "state")
    # No edge agent of the lab's own: these tests play the devices themselves, with their own certificates,
    # and the lab's edge smoke (which stops the gateway for its offline period) has its test in test_lab.py.
    data["edge_profiles"] = []
    data["lab"]["edge_profile"] = None
    # No DR shipper process either: it would take chDB every 30 s; the DR tests run `dr ship` themselves.
    data["lab"]["dr_shipper"] = False
    site_file = write_site(root / "site.yaml", data)
    site = Site.model_validate(data)
    state = LabState.at(site.lab.state_dir)
    try:
        lifecycle.up(site, state)
        backends = Backends(site, state)
        yield GatewayLab(
            site=site,
            state=state,
            site_file=site_file,
            certs=root / "certs",
            backends=backends,
            pki=Pki.for_site(site, backends.vault()),
            model=backends.llm().model,
        )
    finally:
        lifecycle.down(site, state)


def gateway_env(lab: GatewayLab) -> dict[str, str]:
    return {**os.environ, AUDIT_KEY_ENV: lab.audit_key().hex()}


_AUDIT_QUERY = textwrap.dedent(
    """
    import json, sys, time
    from ruamel.yaml import YAML
    from appliance.backends import Backends
    from appliance.lab.state import LabState
    from appliance.site import Site
    from runtime.common.audit import AuditDbBusy, is_engine_lock_error

    site = Site.model_validate(YAML(typ="safe").load(open(sys.argv[1])))
    backends = Backends(site, LabState.at(site.lab.state_dir))
    deadline = time.monotonic() + 60
    while True:
        try:
            client = backends.audit_db()
            break
        except AuditDbBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        except Exception as exc:
            # The gateway took the engine between the free-check and the open; a failed open may leave
            # this process's chDB unusable, so the caller starts a fresh one.
            if is_engine_lock_error(exc):
                sys.exit(75)
            raise
    try:
        result = client.query("SELECT * FROM audit_log ORDER BY seq")
        rows = [dict(zip(result.column_names, row)) for row in result.result_rows]
    finally:
        client.close()
    json.dump(rows, sys.stdout, default=str)
    """
)


def audit_rows(lab: GatewayLab) -> list[dict[str, Any]]:
    for _ in range(20):
        done = subprocess.run(
            [sys.executable, "-c", _AUDIT_QUERY, str(lab.site_file)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 75:  # 75: lost the race for the engine to the gateway's writer; try again
            break
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def audit_rows_until(
    lab: GatewayLab, wanted: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30
) -> list[dict[str, Any]]:
    """The audit rows once `wanted(rows)` holds, or as they are after `timeout_s` (the caller's assertion then
    says what is missing): the gateway's audit writer inserts in batches, up to half a second after a request."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = audit_rows(lab)
        if wanted(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


# --- more gateways next to the lab's ---------------------------------------------------------------------------


@dataclass
class ExtraGateway:
    """A gateway process of our own (`python -m runtime.gateway`), supervised like the lab's (a lab-down
    kills it if a test did not). `overrides` replace keys of the lab gateway's configuration."""

    lab: GatewayLab
    name: str
    root: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        return Path(self.config["state_dir"])

    @property
    def idempotency_db(self) -> Path:
        configured = self.config.get("idempotency", {}).get("path")
        return Path(configured) if configured else self.state_dir / "idempotency.sqlite"

    @property
    def config(self) -> dict[str, Any]:
        return {
            **self.lab.config,
            "port": self.port,
            "state_dir": str(self.root / "state"),
            "audit": {"dsn": f"chdb://{self.root / 'chdb'}", "hmac_key_env": AUDIT_KEY_ENV},
            "rate_limit": {"rate_per_second": 1000, "burst": 1000},
            **self.overrides,
        }

    def start(self) -> ExtraGateway:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "gateway.json").write_text(json.dumps(self.config))
        argv = [sys.executable, "-m", "runtime.gateway", "--config", str(self.root / "gateway.json")]
        record = process.spawn(self.lab.state, self.name, argv, env=gateway_env(self.lab), cwd=REPO)
        deadline = time.monotonic() + 60
        while True:
            assert record.alive(), Path(record.log).read_text(errors="replace")[-3000:]
            try:
                with self.lab.client("ops-admin", url=self.url) as client:
                    if client.get("/healthz").status_code == 200:
                        return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"gateway {self.name} did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        process.stop(self.lab.state, self.name)

    def running(self) -> bool:
        return process.running(self.lab.state, self.name) is not None

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the gateway's /metrics (0 when the series does not exist yet)."""
        return metric_value(self.lab.metrics(self.url), name, **labels)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of `name{labels}` in a Prometheus exposition (0 when the series is absent)."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if found == labels:
            return float(match.group(2))
    return 0.0
