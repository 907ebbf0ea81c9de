"""The appliance's own runtime in the lab: the core server and the gateway, as supervised processes.

They start after the embedded services and the bootstrap (they need certificates, the license and the
secrets). The lab plays the Vault agent: it reads the audit key from OpenBao and hands it to the gateway
through its environment, never through a file. Health is a real mTLS request with the lab's operator
certificate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx

from appliance.backends import Backends
from appliance.lab import bootstrap
from appliance.lab.services import EmbeddedService, Health, OpenBao
from appliance.lab.state import LabState
from appliance.site import ExternalVault, Site
from runtime.common import atomic
from runtime.common.file_lock import exclusive
from runtime.common.tls import TlsFiles, client_context

AUDIT_KEY_ENV = "MEMBRIA_AUDIT_HMAC_KEY"


def admin_tls(state: LabState) -> TlsFiles:
    cert, key = bootstrap.cert_paths(state, "lab-admin")
    return TlsFiles(cert=cert, key=key, ca=bootstrap.ca_chain_path(state))


def service_tls(state: LabState, name: str) -> TlsFiles:
    cert, key = bootstrap.cert_paths(state, name)
    return TlsFiles(cert=cert, key=key, ca=bootstrap.ca_chain_path(state))


def wipe_list_path(state: LabState) -> Path:
    """The gateway's wipe list, which the lab renders from KV as a Vault agent would (appliance/edge/wipe.py):
    at `lab up` and on every `appliance edge wipe`."""
    return state.root / "config" / "wipe-list.json"


class _RuntimeService(EmbeddedService):
    start_timeout = 180.0  # the core server loads the embedding model first

    @property
    def host(self) -> str:
        """Loopback as a lab process; the core node's address when the roles run it there (`lab.core: host`)."""
        if self.site.lab.core == "host" and self.site.core_nodes:
            return self.site.core_nodes[0].address
        return self.site.lab.host

    @property
    def config_file(self) -> Path:
        return self.state.root / "config" / f"{self.name}.json"

    @property
    def endpoint(self) -> str:
        return f"https://{self._url_host()}:{self.port}"

    def _write_config(self, config: dict[str, object]) -> None:
        atomic.write_text(self.config_file, json.dumps(config, indent=2, default=str) + "\n")

    def argv(self) -> list[str]:
        return [sys.executable, "-m", f"runtime.{self.name}", "--config", str(self.config_file)]

    health_path = "/healthz"

    def _describe(self, response: httpx.Response) -> str:
        return f"{self.name} (mTLS)"

    def _get(self, path: str, timeout: float = 5) -> httpx.Response:
        """A request with the lab operator's certificate."""
        with httpx.Client(verify=client_context(admin_tls(self.state)), timeout=timeout) as client:
            return client.get(f"{self.endpoint}{path}")

    def check(self) -> Health:
        try:
            response = self._get(self.health_path)
        except (httpx.HTTPError, OSError) as exc:
            return Health(self.name, False, f"no answer: {exc}", self.endpoint)
        if response.status_code != 200:
            return Health(self.name, False, f"HTTP {response.status_code}: {response.text[:200]}", self.endpoint)
        return Health(self.name, True, self._describe(response), self.endpoint)


class CoreServer(_RuntimeService):
    name = "core"

    @property
    def port(self) -> int:
        return self.site.lab.ports.core

    def prepare(self) -> None:
        backends = Backends(self.site, self.state)
        llm = backends.llm()
        tls = service_tls(self.state, "core")
        self._write_config(
            {
                "host": self.host,
                "port": self.port,
                "tls": {"cert": tls.cert, "key": tls.key, "ca": tls.ca},
                "milvus_uri": str(backends.milvus_lite_path()),
                "cache_path": str(self.state.data_dir / "core-cache.sqlite"),
                "llm": {"base_url": llm.base_url, "model": llm.model, "prompt_style": "completion"},
                "gateway_subject_prefix": f"gateway.{self.site.site.domain}",
            }
        )

    # The core server answers only the gateway; its liveness route is open to any site certificate.
    def _describe(self, response: httpx.Response) -> str:
        return "core server (mTLS)"

    def milvus_health(self, where: str) -> Health:
        """The vector store as the core server, which holds it, sees it (its readiness check queries it)."""
        try:
            check = self._get("/readyz", timeout=30).json()["checks"]["milvus"]
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            return Health("vectors", False, f"core server did not report Milvus: {exc}", where)
        return Health("vectors", bool(check.get("ok")), f"Milvus Lite via core: {check.get('detail')}", where)


class Gateway(_RuntimeService):
    name = "gateway"

    @property
    def port(self) -> int:
        return self.site.lab.ports.gateway

    def prepare(self) -> None:
        tls = service_tls(self.state, "gateway")
        licensing = self.site.licensing
        token_pub = self.state.pki_dir / "service-token.pub"
        backends = Backends(self.site, self.state)
        atomic.write_bytes(
            token_pub,
            bootstrap.public_pem(bootstrap.ed25519_from_vault(backends, bootstrap.SERVICE_TOKEN_KEY_PATH)),
        )
        self._write_config(
            {
                "host": self.host,
                "port": self.port,
                "tls": {"cert": tls.cert, "key": tls.key, "ca": tls.ca, "crl": bootstrap.crl_path(self.state)},
                "core_url": CoreServer(self.site, self.state).endpoint,
                "rbac_policy": self.site.rbac.policy_file,
                "license_file": licensing.license_file,
                "license_public_key": licensing.public_key_path,
                "service_token_public_key": token_pub,
                "state_dir": self.state.data_dir / "gateway",
                "audit": {"dsn": f"chdb://{backends.chdb_path()}", "hmac_key_env": AUDIT_KEY_ENV},
                "models": [backends.llm().model],
                "enrollment": self._enrollment(backends),
                "device_commands": {"domain": self.site.site.domain, "wipe_list": wipe_list_path(self.state)},
            }
        )
        self._render_wipe_list(backends)
        self._audit_key = backends.read_secret(bootstrap.AUDIT_HMAC_PATH)["key_hex"]

    def _enrollment(self, backends: Backends) -> dict[str, object]:
        """Where POST /v1/enroll finds Vault; the gateway calls it with each laptop's own token only."""
        vault = self.site.services.vault
        if isinstance(vault, ExternalVault):
            url, ca, pki_int = str(vault.url).rstrip("/"), vault.ca_file, vault.pki_int_mount
        else:
            bao = OpenBao(self.site, self.state)
            url, ca, pki_int = bao.endpoint, bao.ca_file, "pki_int"
        return {
            "vault_url": url,
            "vault_ca": ca,
            "kv_mount": backends.kv_mount,
            "pki_int_mount": pki_int,
            "domain": self.site.site.domain,
        }

    def _render_wipe_list(self, backends: Backends) -> None:
        """KV membria/edge/wipe-list -> the gateway's wipe list (what the Vault agent does on a rack)."""
        from appliance.edge import wipe

        with exclusive(wipe.render_lock(wipe_list_path(self.state))):  # a wipe may be rendering it too
            data, _ = wipe.read_list(backends.vault(), backends.kv_mount)
            wipe.render(wipe_list_path(self.state), data)

    def env(self) -> dict[str, str]:
        return {AUDIT_KEY_ENV: self._audit_key}

    health_path = "/readyz"  # ready = the core server and the model answer too

    def _describe(self, response: httpx.Response) -> str:
        return f"mTLS, TLS 1.3, license {response.json().get('license_days_left')} days left"


def runtime_services(site: Site, state: LabState) -> list[EmbeddedService]:
    return [CoreServer(site, state), Gateway(site, state)]
