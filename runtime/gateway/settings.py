"""The gateway's configuration file (JSON, written by the lab or the `gateway` role; never holds secrets).

Secrets reach the gateway the way a Vault agent delivers them: the audit HMAC key in an environment
variable (or a file on tmpfs) named here, certificates and keys as files rendered from the PKI.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from runtime.common.tls import TlsFiles


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(Frozen):
    cert: Path
    key: Path
    ca: Path = Field(description="site CA chain: client certificates must chain to it")
    crl: Path | None = Field(default=None, description="PEM CRL from the PKI; re-read when it changes")

    def files(self) -> TlsFiles:
        return TlsFiles(cert=self.cert, key=self.key, ca=self.ca)


class RateLimitSettings(Frozen):
    rate_per_second: float = Field(default=5.0, gt=0)
    burst: int = Field(default=20, ge=1)


class AuditSettings(Frozen):
    dsn: str = Field(description="chdb:///path (lab) or clickhouse(s)://host:port/db (production)")
    table: str = "audit_log"
    hmac_key_env: str = Field(default="MEMBRIA_AUDIT_HMAC_KEY", description="env var with the hex HMAC key")
    password_env: str | None = Field(default=None, description="env var with the ClickHouse password, if any")


class IdempotencySettings(Frozen):
    path: Path | None = Field(
        default=None,
        description="SQLite file of answered Idempotency-Keys (default: state_dir/idempotency.sqlite); gateways "
        "that share it deduplicate across each other",
    )
    ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60, description="how long an answer is kept for replays")
    wait_seconds: float = Field(
        default=15.0, ge=0, le=600, description="how long a request waits for a concurrent one with the same key"
    )


class EnrollmentSettings(Frozen):
    """POST /v1/enroll (edge_image/DESIGN.md, "Enrollment protocol"): the gateway calls Vault with the laptop's
    own one-time token, never with a credential of its own, so only where Vault is and how it names things."""

    vault_url: str = Field(pattern=r"^https?://", description="Vault/OpenBao API address")
    vault_ca: Path | None = Field(default=None, description="CA file for Vault's TLS (default: the system's)")
    vault_tls_server_name: str | None = Field(
        default=None, description="the name Vault's certificate carries when vault_url's host is not in it (a relay)"
    )
    kv_mount: str = Field(default="secret", min_length=1)
    pki_int_mount: str = Field(default="pki_int", min_length=1)
    domain: str = Field(min_length=1, description="the site domain: a laptop's certificate is <device>.<domain>")
    cert_ttl: str = Field(default="168h", pattern=r"^[0-9]+[smh]$")
    vault_timeout_seconds: float = Field(default=10.0, gt=0, le=120)


class DeviceCommandSettings(Frozen):
    """GET /v1/device/commands and its ack (edge_image/DESIGN.md, "Wipe"): laptops poll for commands with their
    certificate; a laptop on the wipe list is answered there even when its certificate is revoked."""

    domain: str = Field(min_length=1, description="the site domain: a laptop's certificate is <device>.<domain>")
    wipe_list: Path | None = Field(
        default=None,
        description="JSON rendered by the Vault agent from KV membria/edge/wipe-list ({devices: {name: entry}}); "
        "re-read when it changes; absent = no device is to be wiped",
    )


class GatewaySettings(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=1, le=65535)
    tls: TlsSettings
    core_url: str = Field(description="https URL of the core server (reached with the gateway's certificate)")
    rbac_policy: Path
    license_file: Path
    license_public_key: Path
    service_token_public_key: Path | None = None
    state_dir: Path = Field(description="seat ledger and other small gateway state (SQLite)")
    audit: AuditSettings
    models: list[str] = Field(min_length=1, description="model names the gateway serves")
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    core_timeout_seconds: float = Field(default=120.0, gt=0)
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)
    enrollment: EnrollmentSettings | None = Field(
        default=None, description="serve POST /v1/enroll (the listener then accepts TLS without a client certificate)"
    )
    device_commands: DeviceCommandSettings | None = Field(
        default=None, description="serve GET /v1/device/commands and its ack (remote wipe of laptops)"
    )

    @property
    def idempotency_path(self) -> Path:
        return self.idempotency.path or self.state_dir / "idempotency.sqlite"
