"""What `lab up` sets up once its services answer; every step creates only what is missing.

- the site PKI (root, intermediate, roles) and the certificates the lab's runtime services use;
- secrets in Vault: the S3 credentials, the audit HMAC key, the service-token signing key;
- DR buckets with versioning and object lock, and `dr init` (the DR data key, default retention,
  encryption and lifecycle);
- a lab license, signed by a lab-only key (the lab acts as its own vendor).

The dev OpenBao starts empty on every start (its raft directory is wiped: dev semantics), so after a
restart the CA is new: certificates that no longer chain to it are issued again.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.backends import Backends, S3Target, s3_credentials_path
from appliance.errors import ServiceError
from appliance.lab.state import LabState
from appliance.license import sign_license
from appliance.pki import Pki
from appliance.site import EmbeddedS3, Site
from runtime.common import atomic
from runtime.common.license import License, LicenseError, verify_license

AUDIT_HMAC_PATH = "membria/audit-hmac"
SERVICE_TOKEN_KEY_PATH = "membria/service-token-signing-key"  # noqa: S105 - a Vault path, not a secret
LAB_LICENSE_KEY_PATH = "membria/lab-license-signing-key"
LAB_LICENSE_SEATS = 25


@dataclass(frozen=True)
class ServiceCert:
    """A certificate the lab issues for itself: which PKI role, which CN, where it lives."""

    name: str
    role: str
    common_name: str
    ou: str | None = None


def service_certs(site: Site) -> list[ServiceCert]:
    domain = site.site.domain
    return [
        ServiceCert("gateway", "gateway", f"gateway.{domain}"),
        ServiceCert("core", "core", f"{site.core_nodes[0].name}.{domain}"),
        # The lab's own operator identity: health checks and the smoke run use it.
        ServiceCert("lab-admin", "admin", "ops-admin"),
    ]


def cert_paths(state: LabState, name: str) -> tuple[Path, Path]:
    return state.pki_dir / f"{name}.crt", state.pki_dir / f"{name}.key"


def ca_chain_path(state: LabState) -> Path:
    return state.pki_dir / "ca-chain.pem"


def run(site: Site, state: LabState) -> list[str]:
    backends = Backends(site, state)
    done: list[str] = []
    pki = Pki.for_site(site, backends.vault())
    done += pki.bootstrap()
    done += _ensure_certificates(site, state, pki)
    done += _ensure_secrets(backends)
    done += _ensure_buckets(site, backends)
    done += _ensure_dr(backends)
    done += _ensure_license(site, backends)
    return done


# --- certificates -------------------------------------------------------------------------------------------


def chains_to(cert_file: Path, chain_pem: str, min_validity: dt.timedelta) -> bool:
    try:
        leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    chain = x509.load_pem_x509_certificates(chain_pem.encode())
    # Names alone are not enough: a restarted dev OpenBao makes a new CA with the same name.
    issuer_ok = any(_signed_by(leaf, ca) for ca in chain)
    return issuer_ok and leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) > min_validity


def _signed_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def write_crl(state: LabState, pki: Pki) -> None:
    """The gateway re-reads this file when it changes: a revocation takes effect without a restart."""
    crl = pki.crl_pem()
    path = crl_path(state)
    if not path.exists() or path.read_text() != crl:
        atomic.write_text(path, crl)


def crl_path(state: LabState) -> Path:
    return state.pki_dir / "crl.pem"


def _ensure_certificates(site: Site, state: LabState, pki: Pki) -> list[str]:
    done: list[str] = []
    chain = pki.ca_chain_pem()
    if not ca_chain_path(state).exists() or ca_chain_path(state).read_text() != chain:
        atomic.write_text(ca_chain_path(state), chain)
        done.append("site CA chain written")
    write_crl(state, pki)
    for spec in service_certs(site):
        cert_file, _ = cert_paths(state, spec.name)
        if chains_to(cert_file, chain, dt.timedelta(hours=2)):
            continue
        server = spec.role in ("gateway", "core")
        issued = pki.issue(
            spec.role,
            spec.common_name,
            alt_names=["localhost"] if server else None,
            ip_sans=[site.lab.host] if server else None,
            ou=spec.ou,
        )
        issued.write(state.pki_dir, spec.name)
        done.append(f"certificate {spec.name} ({spec.common_name})")
    return done


# --- secrets --------------------------------------------------------------------------------------------------


def _has_secret(backends: Backends, path: str) -> bool:
    try:
        backends.read_secret(path)
    except ServiceError:
        return False
    return True


def _ensure_secrets(backends: Backends) -> list[str]:
    done: list[str] = []
    if not _has_secret(backends, AUDIT_HMAC_PATH):
        backends.write_secret(AUDIT_HMAC_PATH, {"key_hex": secrets.token_hex(32)})
        done.append(f"audit pseudonymization key stored in Vault at {AUDIT_HMAC_PATH}")
    if not _has_secret(backends, SERVICE_TOKEN_KEY_PATH):
        backends.write_secret(SERVICE_TOKEN_KEY_PATH, {"private_pem": _new_ed25519_pem()})
        done.append(f"service-token signing key stored in Vault at {SERVICE_TOKEN_KEY_PATH}")
    return done


def _new_ed25519_pem() -> str:
    key = Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def ed25519_from_vault(backends: Backends, path: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(backends.read_secret(path)["private_pem"].encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ServiceError(f"the key at {path} in Vault is not Ed25519")
    return key


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- S3 ----------------------------------------------------------------------------------------------------------


def _ensure_buckets(site: Site, backends: Backends) -> list[str]:
    done: list[str] = []
    for name, spec in (("primary", site.services.s3.primary), ("replica", site.services.s3.replica)):
        if not isinstance(spec, EmbeddedS3):
            continue
        path = s3_credentials_path(name)
        if not _has_secret(backends, path):
            backends.write_secret(path, {"access_key": f"membria-lab-{name}", "secret_key": secrets.token_urlsafe(30)})
            done.append(f"S3 {name} credentials stored in Vault at {path}")
        if ensure_locked_bucket(backends.s3(name)):
            done.append(f"bucket {spec.bucket} (versioning, object lock)")
    return done


def ensure_locked_bucket(target: S3Target) -> bool:
    """Create the bucket with object lock (which implies versioning) unless it exists. True if created."""
    client = target.client
    try:
        client.head_bucket(Bucket=target.bucket)
        exists = True
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise ServiceError(f"S3 bucket {target.bucket} at {target.endpoint}: {exc}") from exc
        exists = False
    if not exists:
        client.create_bucket(Bucket=target.bucket, ObjectLockEnabledForBucket=True)
    client.put_bucket_versioning(Bucket=target.bucket, VersioningConfiguration={"Status": "Enabled"})
    return not exists


def _ensure_dr(backends: Backends) -> list[str]:
    """The DR data key and the buckets' retention, encryption and lifecycle (`appliance dr init`)."""
    from appliance.dr.setup import DrSetup

    return [f"DR {step.target}: {step.what}" for step in DrSetup(backends).apply()]


# --- the lab license -------------------------------------------------------------------------------------------


def _ensure_license(site: Site, backends: Backends) -> list[str]:
    lic_file = site.licensing.license_file
    pub_file = site.licensing.public_key_path
    try:
        current = verify_license(lic_file, pub_file)
        if current.days_left() > 30:
            return []
    except LicenseError:
        pass
    if not _has_secret(backends, LAB_LICENSE_KEY_PATH):
        backends.write_secret(LAB_LICENSE_KEY_PATH, {"private_pem": _new_ed25519_pem()})
    key = ed25519_from_vault(backends, LAB_LICENSE_KEY_PATH)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    lic = License(
        license_id=f"lab-{secrets.token_hex(4)}",
        customer=f"{site.site.name} (lab)",
        seats=LAB_LICENSE_SEATS,
        issued_at=now,
        expires_at=now + dt.timedelta(days=365),
        features=["gateway", "core", "edge", "dr", "audit"],
    )
    atomic.write_bytes(pub_file, public_pem(key))
    atomic.write_text(lic_file, json.dumps(sign_license(lic, key), indent=2) + "\n")
    return [f"lab license for {lic.seats} seats written to {lic_file}"]
