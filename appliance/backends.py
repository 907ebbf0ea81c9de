"""One factory per backend: the embedded client or the external one, decided by the site file.

Callers never branch on embedded vs external themselves; the same code path runs in the lab and in
production, only endpoints and credentials differ. Credentials of external services always come from
Vault/OpenBao (the site file only names the KV path), never from the site file or the environment,
except the one credential that unlocks Vault itself (a token or an AppRole secret id in an env var).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvac
import hvac.exceptions
import requests

from appliance.errors import MissingEnvironment, ServiceError
from appliance.lab.state import LabState
from appliance.site import EmbeddedS3, ExternalVault, Site
from runtime.common.vault_session import server_name_session

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client as ClickHouseClient
    from pymilvus import MilvusClient

EMBEDDED_KV_MOUNT = "secret"


def s3_credentials_path(target: str) -> str:
    """KV path where the lab keeps the credentials of its embedded S3 target."""
    return f"membria/s3-{target}"


@dataclass(frozen=True)
class LlmEndpoint:
    base_url: str
    model: str
    api_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class S3Target:
    client: Any
    bucket: str
    endpoint: str


# The field names of an S3 target's credentials in Vault KV (the site file names only the path).
S3_ACCESS_KEY_FIELD = "access_key"
S3_SECRET_KEY_FIELD = "secret_key"  # noqa: S105 - a field name, not a secret


@dataclass(frozen=True)
class S3Spec:
    """Where one DR target is and where its credentials are, without reading them (no client, no Vault)."""

    endpoint: str
    region: str
    bucket: str
    credentials_path: str  # KV v2 path under kv_mount, with S3_ACCESS_KEY_FIELD and S3_SECRET_KEY_FIELD
    kv_mount: str
    target: str  # "primary" or "replica"


def kv_mount(site: Site) -> str:
    """The KV v2 mount the site's secrets live in."""
    vault = site.services.vault
    return vault.kv_mount if isinstance(vault, ExternalVault) else EMBEDDED_KV_MOUNT


def s3_target_spec(site: Site, target: str, state: LabState | None) -> S3Spec:
    """The S3 `target` of the site; `state` is needed for the embedded one (its endpoint is the lab's)."""
    targets = site.services.s3
    spec = targets.primary if target == "primary" else targets.replica if target == "replica" else None
    if spec is None:
        raise ServiceError(f"the site has no S3 {target} target")
    if isinstance(spec, EmbeddedS3):
        from appliance.lab.services import S3Server

        if state is None:
            raise MissingEnvironment("s3 is embedded but no lab state directory was given")
        endpoint, region, path = S3Server(site, state).endpoint, "us-east-1", s3_credentials_path(target)
    else:
        endpoint, region, path = str(spec.url).rstrip("/"), spec.region, spec.credentials_vault_path
    return S3Spec(endpoint, region, spec.bucket, path, kv_mount(site), target)


class Backends:
    """Clients for a site's services. `state` is the lab state directory, needed for embedded ones."""

    def __init__(self, site: Site, state: LabState | None = None) -> None:
        self.site = site
        self.state = state
        self._vault: hvac.Client | None = None

    # -- Vault / OpenBao -----------------------------------------------------------------------------

    def _lab_state(self, what: str) -> LabState:
        if self.state is None:
            raise MissingEnvironment(f"{what} is embedded but no lab state directory was given")
        return self.state

    @property
    def kv_mount(self) -> str:
        return kv_mount(self.site)

    def vault(self) -> hvac.Client:
        if self._vault is None:
            self._vault = self._open_vault()
        return self._vault

    def _open_vault(self) -> hvac.Client:
        vault = self.site.services.vault
        if not isinstance(vault, ExternalVault):
            from appliance.lab.services import OpenBao

            bao = OpenBao(self.site, self._lab_state("vault"))
            if not bao.token_file.exists() or not bao.ca_file.exists():
                raise MissingEnvironment("the embedded OpenBao is not running", hint="run `appliance lab up`")
            return hvac.Client(url=bao.endpoint, token=bao.root_token(), verify=str(bao.ca_file), timeout=10)
        verify: str | bool = str(vault.ca_file) if vault.ca_file else True
        session = server_name_session(vault.tls_server_name, verify) if vault.tls_server_name else None
        client = hvac.Client(url=str(vault.url).rstrip("/"), verify=verify, timeout=10, session=session)
        auth = vault.auth
        try:
            if auth.method == "token":
                client.token = _required_env(auth.token_env, "Vault token")
            else:
                secret_id = _required_env(auth.secret_id_env, "AppRole secret id")
                client.auth.approle.login(role_id=auth.role_id, secret_id=secret_id, mount_point=auth.mount)
            if not client.is_authenticated():
                raise ServiceError(f"Vault at {vault.url} refused the credentials")
        except hvac.exceptions.VaultError as exc:
            raise ServiceError(f"Vault at {vault.url} refused the login: {_first_line(exc)}") from exc
        except requests.exceptions.RequestException as exc:
            raise ServiceError(f"Vault at {vault.url} is unreachable: {_first_line(exc)}") from exc
        return client

    def read_secret(self, path: str) -> dict[str, Any]:
        try:
            response = self.vault().secrets.kv.v2.read_secret_version(
                path=path, mount_point=self.kv_mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath as exc:
            raise ServiceError(f"no secret at {self.kv_mount}/{path} in Vault") from exc
        except hvac.exceptions.VaultError as exc:
            raise ServiceError(f"Vault refused to read {self.kv_mount}/{path}: {_first_line(exc)}") from exc
        data: dict[str, Any] = response["data"]["data"]
        return data

    def write_secret(self, path: str, data: dict[str, Any]) -> None:
        self.vault().secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=self.kv_mount)

    # -- S3 --------------------------------------------------------------------------------------------

    def s3(self, target: str = "primary") -> S3Target:
        import boto3
        from botocore.config import Config

        spec = s3_target_spec(self.site, target, self.state)
        creds = self.read_secret(spec.credentials_path)
        missing = {S3_ACCESS_KEY_FIELD, S3_SECRET_KEY_FIELD} - creds.keys()
        if missing:
            raise ServiceError(f"the S3 {target} credentials in Vault lack {', '.join(sorted(missing))}")
        client = boto3.client(
            "s3",
            endpoint_url=spec.endpoint,
            region_name=spec.region,
            aws_access_key_id=creds[S3_ACCESS_KEY_FIELD],
            aws_secret_access_key=creds[S3_SECRET_KEY_FIELD],
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30),
        )
        return S3Target(client=client, bucket=spec.bucket, endpoint=spec.endpoint)

    # -- vectors (Milvus / Milvus Lite) ------------------------------------------------------------------

    def milvus_lite_path(self) -> Path:
        return self._lab_state("vectors").data_dir / "milvus.db"

    def vectors(self) -> MilvusClient:
        from pymilvus import MilvusClient

        spec = self.site.services.vectors
        if spec.backend == "embedded":
            from runtime.core.store import lite_uri_file

            path = self.milvus_lite_path()
            published = lite_uri_file(path)  # written by a running core server (CoreService)
            if published.is_file():
                from pymilvus.exceptions import MilvusException

                try:
                    client = MilvusClient(uri=published.read_text().strip(), timeout=5)
                    client.list_collections()  # a stale file (the core died) points at nothing
                    return client
                except (MilvusException, OSError):
                    pass  # not answering: open the file ourselves
            return MilvusClient(str(path))
        token = self.read_secret(spec.token_vault_path).get("token", "")
        return MilvusClient(uri=str(spec.url), token=token, db_name=spec.database)

    # -- audit database (ClickHouse / chDB) --------------------------------------------------------------

    def chdb_path(self) -> Path:
        return self._lab_state("audit_db").data_dir / "chdb"

    def audit_db_dsn(self) -> str:
        spec = self.site.services.audit_db
        return f"chdb://{self.chdb_path()}" if spec.backend == "embedded" else str(spec.dsn)

    def audit_db(self) -> ClickHouseClient:
        """A client of the audit DB. chDB admits one process at a time: raises AuditDbBusy when another holds
        it. Close the client when done so the engine is released."""
        from runtime.common.audit import client_factory

        spec = self.site.services.audit_db
        password = "" if spec.backend == "embedded" else self.read_secret(spec.password_vault_path).get("password", "")
        return client_factory(self.audit_db_dsn(), password=password)()

    # -- LLM ----------------------------------------------------------------------------------------------

    def llm(self) -> LlmEndpoint:
        spec = self.site.services.llm
        if spec.backend == "embedded":
            from appliance.lab.services import LlamaServer

            return LlmEndpoint(LlamaServer(self.site, self._lab_state("llm")).endpoint, spec.model)
        api_key = self.read_secret(spec.api_key_vault_path).get("api_key", "") if spec.api_key_vault_path else ""
        return LlmEndpoint(str(spec.url).rstrip("/"), spec.model, api_key)


def _required_env(name: str, what: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise MissingEnvironment(f"the {what} is expected in the environment variable {name}, which is not set")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
