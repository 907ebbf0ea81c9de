"""Who is calling: derived from a verified client certificate (or a service token), never from headers
the caller controls.

Certificates from the site PKI carry CN = user or device id, OU = department(s), O = the kind of
identity (set by the PKI role that issued it: see appliance/pki.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

Kind = Literal["user", "device", "service"]

# The O attribute each PKI role writes; anything else is not an identity of this site.
ORG_FOR_KIND: dict[Kind, str] = {"user": "membria-user", "device": "membria-device", "service": "membria-service"}
KIND_FOR_ORG: dict[str, Kind] = {v: k for k, v in ORG_FOR_KIND.items()}


@dataclass(frozen=True)
class Identity:
    subject: str
    kind: Kind
    departments: tuple[str, ...]
    auth: Literal["mtls", "token"]
    cert_serial: str | None = None

    @property
    def key(self) -> str:
        """Stable key for per-identity state (rate limits, seats)."""
        return f"{self.kind}:{self.subject}"


class NotAnIdentity(ValueError):
    """The certificate is valid TLS-wise but does not describe a site identity."""


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    subject = cert.subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if not cns:
        raise NotAnIdentity("certificate has no CN")
    kinds = {KIND_FOR_ORG[str(o.value)] for o in orgs if str(o.value) in KIND_FOR_ORG}
    if len(kinds) != 1:
        raise NotAnIdentity("certificate does not carry exactly one Membria kind in O")
    departments = tuple(sorted(str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)))
    return Identity(
        subject=str(cns[0].value),
        kind=kinds.pop(),
        departments=departments,
        auth="mtls",
        cert_serial=format(cert.serial_number, "x"),
    )
