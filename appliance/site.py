"""The site file: one YAML document that describes a whole Membria installation.

Everything else (inventories, serving plans, image profiles, DR targets, the lab) is derived from it.
Every model forbids unknown keys: a typo must be an error, not a silently ignored setting.
Secrets never live here: the file names where to find them (an environment variable, a Vault path).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyUrl,
    BaseModel,
    ConfigDict,
    Field,
    UrlConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from appliance.hardware import KNOWN_GPUS, gpu_spec
from runtime.common.yamldoc import load_model

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
ENV_VAR_PATTERN = r"^[A-Z_][A-Z0-9_]*$"
# pydantic's default (Rust) regex engine has no look-around: the 253-character limit is a max_length instead.
DOMAIN_PATTERN = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lower-case name: letters, digits, '-'")]
EnvVarName = Annotated[str, Field(pattern=ENV_VAR_PATTERN, description="name of an environment variable")]
Port = Annotated[int, Field(ge=1, le=65535)]
# YAML has no path type, so paths are the one place a string is converted (models are strict otherwise).
Pathname = Annotated[Path, Field(strict=False)]
HOSTNAME_PATTERN = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*\.?"

HttpUrl = Annotated[AnyUrl, UrlConstraints(allowed_schemes=["http", "https"], host_required=True)]
MilvusUrl = Annotated[AnyUrl, UrlConstraints(allowed_schemes=["http", "https", "tcp"], host_required=True)]
ClickHouseDsn = Annotated[
    AnyUrl, UrlConstraints(allowed_schemes=["clickhouse", "clickhouses", "http", "https"], host_required=True)
]


class Strict(BaseModel):
    """Base for every site-file model: unknown keys are errors, values are not coerced across types."""

    # strict: `count: true` must not become 1 GPU, nor `ram_gb: "512"` pass as a number.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, str_strip_whitespace=True)


def _short(value: object, limit: int = 60) -> str:
    """Echo user input into a message without flooding it."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- identity --------------------------------------------------------------------------------------


class SiteInfo(Strict):
    name: Name
    domain: str = Field(
        pattern=DOMAIN_PATTERN, max_length=253, description="DNS domain the site's certificates are issued under"
    )
    description: str = ""


# --- core nodes ------------------------------------------------------------------------------------


class SshAccess(Strict):
    user: str = Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    key: Pathname = Field(description="path to the private key on the admin machine (the key itself never goes here)")
    port: Port = 22


class Cpu(Strict):
    model: str = Field(min_length=1)
    cores: int = Field(ge=1, le=1024)


class Gpu(Strict):
    model: str = Field(min_length=1, description=f"one of: {', '.join(sorted(KNOWN_GPUS))}")
    memory_gb: int = Field(gt=0, le=1024)
    count: int = Field(default=1, ge=1, le=16)

    @model_validator(mode="after")
    def _memory_matches_model(self) -> Gpu:
        spec = gpu_spec(self.model)
        if spec is None:
            raise PydanticCustomError(
                "unknown_gpu",
                "unknown GPU model '{model}'; known models: {known}",
                # `at` points the error at the offending key rather than the whole GPU entry.
                {"model": _short(self.model), "known": ", ".join(sorted(KNOWN_GPUS)), "at": ["model"]},
            )
        if self.memory_gb != spec.memory_gb:
            raise PydanticCustomError(
                "impossible_gpu_memory",
                "{model} has {expected} GB of memory, not {given} GB",
                {"model": spec.model, "expected": spec.memory_gb, "given": self.memory_gb, "at": ["memory_gb"]},
            )
        return self


class Nic(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9._-]{1,15}$")
    speed_gbps: float = Field(gt=0, le=800)


class Hardware(Strict):
    cpu: Cpu
    ram_gb: int = Field(ge=1, le=16384)
    gpus: list[Gpu] = Field(default_factory=list)
    nics: list[Nic] = Field(default_factory=list)

    @property
    def gpu_count(self) -> int:
        return sum(g.count for g in self.gpus)


class CoreNode(Strict):
    name: Name
    address: str = Field(description="IPv4/IPv6 address or DNS name the admin machine reaches it at")
    ssh: SshAccess
    hardware: Hardware

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            # Labels must be separated by dots: an optional dot would make the regex backtrack exponentially.
            if len(value) > 253 or not re.fullmatch(HOSTNAME_PATTERN, value):
                raise PydanticCustomError(
                    "invalid_address", "'{value}' is neither an IP address nor a host name", {"value": _short(value)}
                ) from None
        return value


# --- service backends ------------------------------------------------------------------------------


class Embedded(Strict):
    """Run the embedded stand-in for this service on the admin machine (lab, tests, small sites)."""

    backend: Literal["embedded"]


class VaultAppRole(Strict):
    method: Literal["approle"]
    role_id: str = Field(min_length=1, description="AppRole role id (not a secret)")
    secret_id_env: EnvVarName = Field(description="environment variable holding the AppRole secret id")
    mount: str = "approle"


class VaultToken(Strict):
    method: Literal["token"]
    token_env: EnvVarName = Field(description="environment variable holding the Vault token")


class ExternalVault(Strict):
    backend: Literal["external"]
    url: HttpUrl
    auth: Annotated[VaultAppRole | VaultToken, Field(discriminator="method")]
    ca_file: Pathname | None = None
    tls_server_name: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "the name to check Vault's certificate against when the URL's host is not in it (Vault reached "
            "through a relay or by an address its certificate does not carry)"
        ),
    )
    pki_mount: str = "pki"
    pki_int_mount: str = "pki_int"
    kv_mount: str = "secret"


class ExternalLlm(Strict):
    backend: Literal["external"]
    url: HttpUrl = Field(description="base URL of an OpenAI-compatible API, e.g. vLLM")
    model: str = Field(min_length=1)
    api_key_vault_path: str | None = Field(default=None, description="Vault KV path of the API key, if any")


class EmbeddedLlm(Strict):
    backend: Literal["embedded"]
    model: Literal["gemma-3-270m-q4_k_m"] = "gemma-3-270m-q4_k_m"
    context_tokens: int = Field(default=2048, ge=256, le=32768)


class ExternalVectors(Strict):
    backend: Literal["external"]
    url: MilvusUrl
    database: str = "default"
    token_vault_path: str = Field(min_length=1, description="Vault KV path of the Milvus user:password token")


class ExternalAuditDb(Strict):
    backend: Literal["external"]
    dsn: ClickHouseDsn = Field(description="clickhouse(s)://host:port/database, no password in it")
    password_vault_path: str = Field(min_length=1, description="Vault KV path of the ClickHouse password")

    @field_validator("dsn")
    @classmethod
    def _no_password(cls, value: AnyUrl) -> AnyUrl:
        if value.password:
            raise PydanticCustomError(
                "secret_in_site_file", "the DSN carries a password; put it in Vault and name it in password_vault_path"
            )
        return value


class ExternalS3(Strict):
    backend: Literal["external"]
    url: HttpUrl
    region: str = "us-east-1"
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    credentials_vault_path: str = Field(min_length=1, description="Vault KV path with access_key and secret_key")


class EmbeddedS3(Strict):
    backend: Literal["embedded"]
    bucket: str = Field(default="membria-dr", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


VaultBackend = Annotated[Embedded | ExternalVault, Field(discriminator="backend")]
LlmBackend = Annotated[EmbeddedLlm | ExternalLlm, Field(discriminator="backend")]
VectorsBackend = Annotated[Embedded | ExternalVectors, Field(discriminator="backend")]
AuditDbBackend = Annotated[Embedded | ExternalAuditDb, Field(discriminator="backend")]
S3Backend = Annotated[EmbeddedS3 | ExternalS3, Field(discriminator="backend")]


class S3Targets(Strict):
    primary: S3Backend
    replica: S3Backend | None = None

    @model_validator(mode="after")
    def _distinct(self) -> S3Targets:
        if self.replica is not None and self.replica == self.primary:
            raise PydanticCustomError(
                "replica_is_primary", "the replica is the same target as the primary", {"at": ["replica"]}
            )
        return self


class Services(Strict):
    llm: LlmBackend
    vectors: VectorsBackend
    audit_db: AuditDbBackend
    vault: VaultBackend
    s3: S3Targets


# --- edge, licensing, RBAC -------------------------------------------------------------------------


class EdgeModel(Strict):
    """The laptop's local model and how it is sampled (llama.cpp, in the edge agent's process)."""

    name: str = Field(default="gemma-3-270m-q4_k_m", min_length=1, description="shown to users; the packaged Gemma")
    path: Pathname | None = Field(
        default=None, description="GGUF file on the laptop; unset = the packaged Gemma 3 270M (lab, tests)"
    )
    context_tokens: int = Field(default=2048, ge=256, le=131072)
    threads: int | None = Field(default=None, ge=1, le=256, description="unset = llama.cpp's default")
    temperature: float = Field(default=0.2, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_tokens: int = Field(default=128, ge=1, le=8192)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)


class EdgeRouting(Strict):
    """When a question leaves the laptop (sensitive questions never do, whatever these say)."""

    theta: float = Field(default=0.45, gt=0, lt=1, description="escalate when confidence < theta")
    logprob_weight: float = Field(default=0.5, ge=0, le=1, description="the rest of the weight is retrieval coverage")
    taxonomy_file: Pathname = Field(
        default=Path("examples/taxonomy.yaml"), description="department vocabulary for cross-department detection"
    )
    local_only_labels: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=lambda: ["local-only"], description="chunk labels whose material never leaves the device"
    )


class EdgeSync(Strict):
    interval_seconds: int = Field(default=30, ge=5, le=86400)
    max_patch_mb: int = Field(default=20, ge=1, le=1024, description="a larger delta comes as a snapshot")
    topics: list[Name] = Field(default_factory=list, description="subscribed topics; empty = all of the departments")


class EdgeEscalation(Strict):
    retries: int = Field(default=3, ge=0, le=20, description="tries per gateway before the next one")
    backoff_seconds: float = Field(default=1.0, gt=0, le=60)
    backoff_max_seconds: float = Field(default=30.0, gt=0, le=3600)


class EdgeImageUser(Strict):
    """A login on the laptops of a profile: password locked, SSH public keys only."""

    name: str = Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    ssh_public_keys: list[str] = Field(default_factory=list)
    sudo: bool = False


class EdgeImageOptions(Strict):
    """The profile's disk image (`appliance edge build`): sizes and how the laptop's TPM guards its disk."""

    root_size_mb: int = Field(
        default=4096, ge=512, le=1_048_576, description="encrypted root as built; grows at first boot"
    )
    esp_size_mb: int = Field(default=512, ge=64, le=4096, description="EFI system partition (kernels and initrds)")
    tpm2_pcrs: list[Annotated[int, Field(ge=0, le=23)]] = Field(
        default_factory=lambda: [7], min_length=1, description="PCRs the disk key is sealed to (7: Secure Boot state)"
    )
    tpm2_pin: bool = Field(default=False, description="also ask for a PIN at every boot")
    users: list[EdgeImageUser] = Field(default_factory=list, description="logins on the laptop (SSH keys only)")
    firmware_packages: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]] = Field(
        default_factory=list, description="Debian firmware packages the laptop model needs (e.g. firmware-iwlwifi)"
    )


class EdgeProfile(Strict):
    name: Name
    departments: list[Name] = Field(min_length=1)
    model: EdgeModel = Field(default_factory=EdgeModel)
    routing: EdgeRouting = Field(default_factory=EdgeRouting)
    sync: EdgeSync = Field(default_factory=EdgeSync)
    escalation: EdgeEscalation = Field(default_factory=EdgeEscalation)
    pinned_knowledge_chars: int = Field(
        default=2000, ge=0, le=200_000, description="knowledge precomputed as llama.cpp state (0 = none)"
    )
    extra_packages: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]] = Field(default_factory=list)
    image: EdgeImageOptions = Field(default_factory=lambda: EdgeImageOptions())


class Licensing(Strict):
    license_file: Pathname
    public_key_file: Pathname | None = None

    @property
    def public_key_path(self) -> Path:
        """The vendor's public key: given, or `signing.pub` beside the license."""
        return self.public_key_file or self.license_file.with_name("signing.pub")


class Rbac(Strict):
    policy_file: Pathname


class SigningKey(Strict):
    """An Ed25519 signing key: the private key lives in Vault (KV), the public key file verifies."""

    signing_key_vault_path: str = Field(min_length=1, description="Vault KV path of the Ed25519 signing key")
    public_key_file: Pathname = Field(description="the public key that verification trusts")


class BundleSigning(SigningKey):
    """Air-gapped bundles (`appliance bundle`): `bundle verify` and `core apply --bundle` trust its public key."""

    signing_key_vault_path: str = Field(default="membria/bundle-signing", min_length=1)


class EdgeImageSigning(SigningKey):
    """Edge images (`appliance edge build`): `edge verify` and `edge flash` trust its public key."""

    signing_key_vault_path: str = Field(default="membria/edge-image-signing", min_length=1)


class EdgeImages(Strict):
    """Edge images: the key that signs them (not the bundle key: the two are rotated apart)."""

    signing: EdgeImageSigning
    gateways: list[Annotated[str, Field(pattern=r"^https://[^\s/]+(:[0-9]+)?/?$")]] = Field(
        default_factory=list,
        description="what laptops enroll and escalate through; empty = https://gateway.<domain>:8443",
    )


class AuditReportSigning(SigningKey):
    """Compliance audit reports (`appliance audit`): `audit verify-report` trusts its public key."""

    signing_key_vault_path: str = Field(default="membria/audit-report-signing", min_length=1)


class AuditSettings(Strict):
    """The compliance audit: the key that signs its reports (its own: auditors get only this public key)."""

    signing: AuditReportSigning


# --- disaster recovery -----------------------------------------------------------------------------


class DrTargets(Strict):
    """Recovery objectives per store, in seconds (the seed targets by default)."""

    vectors: int = Field(default=60, ge=1, description="Milvus collections (and the knowledge they mirror)")
    audit_db: int = Field(default=300, ge=1, description="the ClickHouse audit log")
    state: int = Field(default=60, ge=1, description="the gateway's and the sync hub's SQLite state")
    vault: int = Field(default=3600, ge=1, description="the Vault/OpenBao raft snapshot")


class DrObjectLock(Strict):
    mode: Literal["governance", "compliance"] = Field(
        default="governance", description="compliance: nobody, root included, can shorten or lift it"
    )
    days: int = Field(default=30, ge=1, le=36500, description="default retention of every object written")


class Dr(Strict):
    ship_interval_seconds: int = Field(
        default=30, ge=1, le=30, description="continuous shipping runs at least this often (RPO <= 60 s needs <= 30)"
    )
    rpo_seconds: DrTargets = Field(default_factory=DrTargets)
    rto_seconds: DrTargets = Field(default_factory=lambda: DrTargets(vectors=900, audit_db=600, state=600, vault=600))
    object_lock: DrObjectLock = Field(default_factory=DrObjectLock)
    sse: Literal["auto", "AES256", "off"] = Field(
        default="auto", description="server-side encryption on top of client-side: auto = where the endpoint offers it"
    )
    encryption_key_vault_path: str = Field(
        default="membria/dr-encryption-key", min_length=1, description="Vault KV path of the client-side data key"
    )
    prefix: str = Field(
        default="membria", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="key prefix in the DR buckets"
    )
    noncurrent_version_days: int = Field(
        default=90, ge=1, description="lifecycle: old versions expire this long after being replaced (and unlocked)"
    )


# --- the embedded lab ------------------------------------------------------------------------------


class LabPorts(Strict):
    openbao: Port = Field(default=8200, description="OpenBao also listens on this port + 1 (its raft cluster port)")
    s3: Port = 9000
    llm: Port = 8081
    core: Port = 8444
    gateway: Port = 8443
    edge: Port = 8450

    @model_validator(mode="after")
    def _distinct(self) -> LabPorts:
        seen: dict[int, str] = {}
        for service, port in self.model_dump().items():
            if port in seen:
                raise PydanticCustomError(
                    "port_clash",
                    "port {port} is used by both {first} and {service}",
                    {"port": port, "first": seen[port], "service": service, "at": [service]},
                )
            seen[port] = service
        return self


class Lab(Strict):
    host: Literal["127.0.0.1", "::1"] = Field(
        default="127.0.0.1", description="embedded services listen on loopback only"
    )
    state_dir: Pathname = Field(
        default=Path(".lab"), description="logs, pid files and data; relative to the working directory"
    )
    ports: LabPorts = Field(default_factory=LabPorts)
    corpus_dir: Pathname = Field(
        default=Path("examples/corpus"), description="<department>/<files> loaded through the gateway on `lab up`"
    )
    edge_profile: Name | None = Field(
        default=None, description="the edge profile of the lab's one edge agent (default: the first profile)"
    )
    dr_shipper: bool = Field(
        default=True,
        description=(
            "DR shipping to the lab's S3: the core node's `dr_agent` timer (core: host) or "
            "`appliance dr ship` as a lab process (core: processes)"
        ),
    )
    core: Literal["host", "processes"] = Field(
        default="host",
        description=(
            "host: the first core node becomes a systemd-nspawn test host on a private bridge, provisioned "
            "by `appliance core apply` with the roles, as a rack node is (needs root and systemd-nspawn); "
            "processes: the core server, gateway and llama.cpp run as local processes (quick; the "
            "integration tests use it)"
        ),
    )


# --- the site --------------------------------------------------------------------------------------


def _duplicates(names: list[str]) -> list[tuple[int, str, int]]:
    """(index, name, index of first use) for every repeated name."""
    first: dict[str, int] = {}
    out = []
    for i, name in enumerate(names):
        if name in first:
            out.append((i, name, first[name]))
        else:
            first[name] = i
    return out


class Site(Strict):
    site: SiteInfo
    core_nodes: list[CoreNode] = Field(min_length=1)
    services: Services
    edge_profiles: list[EdgeProfile] = Field(default_factory=list)
    licensing: Licensing
    rbac: Rbac
    bundle: BundleSigning | None = None
    edge: EdgeImages | None = None
    audit: AuditSettings | None = None
    dr: Dr = Field(default_factory=Dr)
    lab: Lab = Field(default_factory=Lab)

    @field_validator("core_nodes", "edge_profiles")
    @classmethod
    def _unique_names(cls, items: list[Any]) -> list[Any]:
        dups = _duplicates([item.name for item in items])
        if dups:
            index, name, first = dups[0]
            # `at` lets the error printer point at the repeated item's own line.
            raise PydanticCustomError(
                "duplicate_name",
                "name '{name}' is used twice (items {first} and {index})",
                {"name": name, "first": first, "index": index, "at": [index, "name"]},
            )
        return items

    @property
    def embedded(self) -> dict[str, bool]:
        s = self.services
        return {
            "llm": s.llm.backend == "embedded",
            "vectors": s.vectors.backend == "embedded",
            "audit_db": s.audit_db.backend == "embedded",
            "vault": s.vault.backend == "embedded",
            "s3": s.s3.primary.backend == "embedded",
        }


def load_site(path: Path) -> Site:
    """Read and validate a site file; raises yamldoc.InvalidFile (exit code 2) listing every problem.

    Paths inside the file are kept as written: they are resolved by whoever uses them, against the working directory.
    """
    return load_model(path, Site)
