"""The edge agent's configuration file (JSON, rendered from the site's edge profile; never holds secrets).

On a laptop the first-boot enrollment writes it; in the lab `appliance lab up` does. The device key is a
file readable by the agent only; the file here names it, it does not contain it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.common.tls import TlsFiles


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceTls(Frozen):
    cert: Path = Field(description="the device certificate (O=device, OU=departments)")
    key: Path
    ca: Path = Field(description="site CA chain: the gateway's certificate must chain to it")

    def files(self) -> TlsFiles:
        return TlsFiles(cert=self.cert, key=self.key, ca=self.ca)


class ModelSettings(Frozen):
    name: str = "gemma-3-270m-q4_k_m"
    path: Path
    context_tokens: int = Field(default=2048, ge=256)
    threads: int | None = None
    temperature: float = Field(default=0.2, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_tokens: int = Field(default=128, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)


class RoutingSettings(Frozen):
    theta: float = Field(default=0.45, gt=0, lt=1)
    logprob_weight: float = Field(default=0.5, ge=0, le=1)
    taxonomy_file: Path
    local_only_labels: list[str] = Field(default_factory=lambda: ["local-only"])


class SyncSettings(Frozen):
    interval_seconds: float = Field(default=30, gt=0)
    max_patch_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    topics: list[str] = Field(default_factory=list)


class EscalationSettings(Frozen):
    retries: int = Field(default=3, ge=0)
    backoff_seconds: float = Field(default=1.0, gt=0)
    backoff_max_seconds: float = Field(default=30.0, gt=0)
    timeout_seconds: float = Field(default=120.0, gt=0, description="one escalated answer may take this long")
    wait_seconds: float = Field(
        default=30.0, ge=0, description="how long `ask` waits for the core before answering locally"
    )


class EdgeSettings(Frozen):
    device: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{0,62}$", description="device name = its sync replica id")
    profile: str
    departments: list[str] = Field(min_length=1)
    data_dir: Path = Field(description="edge.sqlite (knowledge, memory, outbox, sync) and the CAG state")
    host: str = Field(default="127.0.0.1", description="the local API listens on loopback only")
    port: int | None = Field(default=8450, ge=1, le=65535)
    unix_socket: Path | None = Field(default=None, description="listen on this socket instead of host:port")
    gateways: list[str] = Field(min_length=1, description="https URLs, primary first")
    core_model: str = Field(min_length=1, description="the model the gateway serves, named in escalations")
    tls: DeviceTls
    model: ModelSettings
    routing: RoutingSettings
    sync: SyncSettings = Field(default_factory=SyncSettings)
    escalation: EscalationSettings = Field(default_factory=EscalationSettings)
    pinned_knowledge_chars: int = Field(default=2000, ge=0)
    background: bool = Field(default=True, description="run the outbox and sync loops (off in some tests)")

    @model_validator(mode="after")
    def _loopback_only(self) -> EdgeSettings:
        # The local API has no authentication of its own: it must never be reachable from the network.
        if self.unix_socket is None and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the local API listens on loopback only, not {self.host}")
        if self.unix_socket is None and self.port is None:
            raise ValueError("give a port or a unix_socket for the local API")
        return self

    @property
    def db_path(self) -> Path:
        return self.data_dir / "edge.sqlite"

    @property
    def pinned_state_path(self) -> Path:
        return self.data_dir / "pinned.llstate"
