"""The site PKI on Vault/OpenBao: a root CA, an intermediate that signs everything, and one role per
kind of identity. The same calls run against the lab's OpenBao and a customer's Vault.

Roles and their certificates (short-lived on purpose; renewal is the vault agent's job):

| role        | used by                         | usage         | default ttl / max |
|-------------|---------------------------------|---------------|-------------------|
| gateway     | the gateway's TLS listener      | server+client | 24h / 72h         |
| core        | the core server                 | server+client | 24h / 72h         |
| edge-device | a laptop's edge agent (CN=id)   | client        | 7d / 30d          |
| admin       | an operator or auditor (CN=user)| client        | 8h / 24h          |

`edge-device` roles sign a laptop's CSR at enrollment (appliance/edge/enrollment.py): they ignore the CSR's
subject and SANs (`use_csr_common_name=false, use_csr_sans=false`), so the only name issued is the
`common_name` the enrollment token's policy pins.

A department goes into the certificate's OU. Vault roles fix the OU per role, so `issue(..., ou=D)`
uses a role `<role>--<D>` derived from the base role on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import hvac
import hvac.exceptions

from appliance.errors import BadInput, ServiceError
from appliance.site import ExternalVault, Site
from runtime.common import atomic
from runtime.common.identity import ORG_FOR_KIND, Kind

ROOT_TTL = "87600h"
INTERMEDIATE_TTL = "43800h"

# The mount names of an embedded Vault (OpenBao); an external one names its own in the site file.
DEFAULT_ROOT_MOUNT = "pki"
DEFAULT_INT_MOUNT = "pki_int"


class PkiMounts(NamedTuple):
    root_mount: str
    int_mount: str


def mounts_for_site(site: Site) -> PkiMounts:
    """The site's PKI mounts (what `Pki.for_site` uses), without a Vault client."""
    vault = site.services.vault
    if isinstance(vault, ExternalVault):
        return PkiMounts(vault.pki_mount, vault.pki_int_mount)
    return PkiMounts(DEFAULT_ROOT_MOUNT, DEFAULT_INT_MOUNT)


_DURATION = re.compile(r"(\d+)([hms]?)")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1, "": 1}


def _duration(text: str) -> int | None:
    """Seconds in a Vault duration ("24h", "30m", "45s", "86400"); None when `text` is not one."""
    match = _DURATION.fullmatch(text.strip())
    return int(match[1]) * _UNIT_SECONDS[match[2]] if match else None


def ttl_seconds(text: str) -> int:
    """A Vault duration in seconds: "24h" -> 86400 (h, m, s or plain seconds)."""
    seconds = _duration(text)
    if seconds is None:
        raise ValueError(f"not a duration: {text!r} (expected e.g. 24h, 30m, 45s or 86400)")
    return seconds


@dataclass(frozen=True)
class RoleSpec:
    name: str
    server: bool
    client: bool
    ttl: str
    max_ttl: str
    any_name: bool  # user and device ids are not host names
    kind: Kind  # written to O, so a peer knows what kind of identity a certificate is


ROLES: dict[str, RoleSpec] = {
    r.name: r
    for r in (
        RoleSpec("gateway", kind="service", server=True, client=True, ttl="24h", max_ttl="72h", any_name=False),
        RoleSpec("core", kind="service", server=True, client=True, ttl="24h", max_ttl="72h", any_name=False),
        RoleSpec("edge-device", kind="device", server=False, client=True, ttl="168h", max_ttl="720h", any_name=True),
        RoleSpec("admin", kind="user", server=False, client=True, ttl="8h", max_ttl="24h", any_name=True),
    )
}


@dataclass(frozen=True)
class IssuedCertificate:
    certificate: str
    private_key: str = field(repr=False)  # never printed, never logged
    issuing_ca: str = ""
    ca_chain: list[str] = field(default_factory=list)
    serial_number: str = ""
    expiration: int = 0

    def write(self, directory: Path, name: str) -> dict[str, Path]:
        """Write NAME.crt, NAME.key (0600) and ca-chain.pem atomically; returns the paths."""
        paths = {
            "certificate": directory / f"{name}.crt",
            "private_key": directory / f"{name}.key",
            "ca_chain": directory / "ca-chain.pem",
        }
        atomic.write_text(paths["private_key"], self.private_key.strip() + "\n", mode=0o600)
        atomic.write_text(paths["certificate"], self.certificate.strip() + "\n")
        atomic.write_text(paths["ca_chain"], "\n".join(c.strip() for c in self.ca_chain) + "\n")
        return paths


class Pki:
    def __init__(
        self,
        client: hvac.Client,
        domain: str,
        *,
        root_mount: str = DEFAULT_ROOT_MOUNT,
        int_mount: str = DEFAULT_INT_MOUNT,
    ):
        self.client = client
        self.domain = domain
        self.root_mount = root_mount
        self.int_mount = int_mount

    @classmethod
    def for_site(cls, site: Site, client: hvac.Client) -> Pki:
        root_mount, int_mount = mounts_for_site(site)
        return cls(client, site.site.domain, root_mount=root_mount, int_mount=int_mount)

    # -- bootstrap (idempotent) ------------------------------------------------------------------------

    def bootstrap(self) -> list[str]:
        """Create whatever is missing; return what was done (empty when everything was already there)."""
        done: list[str] = []
        try:
            mounts = self.client.sys.list_mounted_secrets_engines()["data"]
            if f"{self.root_mount}/" not in mounts:
                self.client.sys.enable_secrets_engine("pki", path=self.root_mount, config={"max_lease_ttl": ROOT_TTL})
                done.append(f"mounted {self.root_mount}/")
            if not self._has_ca(self.root_mount):
                self.client.secrets.pki.generate_root(
                    "internal",
                    f"Membria Root CA ({self.domain})",
                    extra_params={"ttl": ROOT_TTL, "key_type": "ec", "key_bits": 384, "issuer_name": "root"},
                    mount_point=self.root_mount,
                )
                done.append("generated the root CA")
            if f"{self.int_mount}/" not in mounts:
                self.client.sys.enable_secrets_engine(
                    "pki", path=self.int_mount, config={"max_lease_ttl": INTERMEDIATE_TTL}
                )
                done.append(f"mounted {self.int_mount}/")
            if not self._has_ca(self.int_mount):
                self._make_intermediate()
                done.append("generated and signed the intermediate CA")
            for spec in ROLES.values():
                if self._write_role_if_changed(spec.name, self._role_params(spec)):
                    done.append(f"role {spec.name}")
        except hvac.exceptions.VaultError as exc:
            raise ServiceError(f"PKI bootstrap failed: {exc}") from exc
        return done

    def _has_ca(self, mount: str) -> bool:
        issuers = self.client.list(f"{mount}/issuers")  # None when the mount has no issuer yet
        return bool(issuers and issuers.get("data", {}).get("keys"))

    def _make_intermediate(self) -> None:
        csr = self.client.secrets.pki.generate_intermediate(
            "internal",
            f"Membria Intermediate CA ({self.domain})",
            extra_params={"key_type": "ec", "key_bits": 256},
            mount_point=self.int_mount,
        )["data"]["csr"]
        signed = self.client.secrets.pki.sign_intermediate(
            csr,
            f"Membria Intermediate CA ({self.domain})",
            extra_params={"ttl": INTERMEDIATE_TTL, "format": "pem_bundle"},
            mount_point=self.root_mount,
        )["data"]["certificate"]
        self.client.secrets.pki.set_signed_intermediate(signed, mount_point=self.int_mount)

    def _role_params(self, spec: RoleSpec, ou: str | None = None) -> dict[str, Any]:
        return role_params(spec, self.domain, ou)

    def _write_role_if_changed(self, name: str, params: dict[str, Any]) -> bool:
        try:
            current = self.client.secrets.pki.read_role(name, mount_point=self.int_mount)["data"]
        except hvac.exceptions.InvalidPath:
            current = None
        if current is not None and all(_same(current.get(k), v) for k, v in params.items()):
            return False
        self.client.secrets.pki.create_or_update_role(name, extra_params=params, mount_point=self.int_mount)
        return True

    def ensure_role(self, role: str, ou: str | None = None) -> str:
        """The Vault role for `role` (per department when `ou` is given), created or updated; returns its name."""
        spec = ROLES.get(role)
        if spec is None:
            raise BadInput(f"unknown certificate role {role!r}; roles: {', '.join(ROLES)}")
        name = f"{role}--{ou}" if ou else role
        try:
            self._write_role_if_changed(name, self._role_params(spec, ou))
        except hvac.exceptions.VaultError as exc:
            raise ServiceError(f"writing the PKI role {name} failed: {exc}") from exc
        return name

    # -- issuing -------------------------------------------------------------------------------------------

    def issue(
        self,
        role: str,
        common_name: str,
        *,
        alt_names: list[str] | None = None,
        ip_sans: list[str] | None = None,
        ttl: str | None = None,
        ou: str | None = None,
    ) -> IssuedCertificate:
        spec = ROLES.get(role)
        if spec is None:
            raise BadInput(f"unknown certificate role {role!r}; roles: {', '.join(ROLES)}")
        role_name = role
        if ou:
            role_name = f"{role}--{ou}"
            self._write_role_if_changed(role_name, self._role_params(spec, ou))
        extra: dict[str, Any] = {}
        if alt_names:
            extra["alt_names"] = ",".join(alt_names)
        if ip_sans:
            extra["ip_sans"] = ",".join(ip_sans)
        if ttl:
            extra["ttl"] = ttl
        try:
            data = self.client.secrets.pki.generate_certificate(
                role_name, common_name, extra_params=extra, mount_point=self.int_mount
            )["data"]
        except hvac.exceptions.InvalidRequest as exc:
            raise BadInput(f"the PKI refused a {role} certificate for {common_name!r}: {exc}") from exc
        except hvac.exceptions.VaultError as exc:
            raise ServiceError(f"issuing a {role} certificate failed: {exc}") from exc
        return IssuedCertificate(
            certificate=data["certificate"],
            private_key=data["private_key"],
            issuing_ca=data["issuing_ca"],
            ca_chain=list(data.get("ca_chain") or [data["issuing_ca"]]),
            serial_number=data["serial_number"],
            expiration=int(data["expiration"]),
        )

    def revoke(self, serial_number: str) -> None:
        self.client.secrets.pki.revoke_certificate(serial_number, mount_point=self.int_mount)

    def ca_chain_pem(self) -> str:
        """The intermediate and the root, PEM: what a peer needs to verify a site certificate."""
        chain = self.client.secrets.pki.read_ca_certificate_chain(mount_point=self.int_mount)
        root = self.client.secrets.pki.read_ca_certificate(mount_point=self.root_mount)
        return chain_pem(str(chain), str(root))

    def crl_pem(self) -> str:
        return str(self.client.secrets.pki.read_crl(mount_point=self.int_mount))


def role_params(spec: RoleSpec, domain: str, ou: str | None = None) -> dict[str, Any]:
    """The Vault fields of the PKI role for `spec` (per department when `ou` is given), as written to
    `<int mount>/roles/<name>`; the Pulumi stack declares the same (stacks/components/vault_pki.py)."""
    params: dict[str, Any] = {
        "ttl": spec.ttl,
        "max_ttl": spec.max_ttl,
        "server_flag": spec.server,
        "client_flag": spec.client,
        "key_type": "ec",
        "key_bits": 256,
        "allow_ip_sans": True,
        "allow_localhost": True,
        "require_cn": True,
        "no_store": False,  # stored, so a certificate can be listed and revoked
        "organization": [ORG_FOR_KIND[spec.kind]],
    }
    if spec.any_name:
        params.update(allow_any_name=True, enforce_hostnames=False, allow_ip_sans=False, allow_localhost=False)
    else:
        params.update(allowed_domains=[domain], allow_subdomains=True, allow_bare_domains=True)
    if spec.kind == "device":
        # A signed CSR must not smuggle in a name of its own: only the policy-pinned common_name counts.
        params.update(use_csr_common_name=False, use_csr_sans=False)
    if ou:
        params["ou"] = [ou]
    return params


def chain_pem(*texts: str) -> str:
    """The certificates in `texts`, in order, each once: an intermediate's chain may already end with the root."""
    pems: list[str] = []
    for pem in _split_pems("\n".join(texts)):
        if pem not in pems:
            pems.append(pem)
    return "\n".join(pems) + "\n"


def _split_pems(text: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [part.strip() + "\n" + end for part in text.split(end) if "BEGIN CERTIFICATE" in part]


def _same(current: Any, wanted: Any) -> bool:
    """Compare a role field as Vault returns it with the value we would write."""
    if isinstance(wanted, list):
        return sorted(map(str, current or [])) == sorted(map(str, wanted))
    if isinstance(wanted, str) and isinstance(current, int):  # Vault returns TTLs in seconds
        seconds = _duration(wanted)
        if seconds is not None:
            return current == seconds
    return bool(current == wanted)
