"""MEM-MTLS: the node's gateway and core server speak only TLS 1.3 and admit only clients the site CA vouches for.

Handshakes from the controller, to each service's address and port (the site's):
- TLS 1.3 is negotiated and the server's certificate chains to the site CA;
- a client that offers at most TLS 1.2 is refused;
- a client certificate from another CA (made here, thrown away) is refused;
- without any client certificate: the core server refuses; the gateway, which also admits service and enrollment
  tokens, lets the handshake through but its API answers 401;
- a client certificate of the site (facts `tls.client_cert`) is accepted.
The site CA comes from facts `tls.ca_file`, else from Vault's PKI (read only).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.audit.checks import membria_support as mem
from appliance.audit.targets import TargetSpec

TIMEOUT = 15.0
PROTECTED = "/v1/knowledge/documents"  # any API route: without a credential the gateway answers 401


@contextmanager
def _site_ca(target: TargetSpec) -> Iterator[Path]:
    given = (target.facts.get("tls") or {}).get("ca_file")
    if given:
        yield Path(given)
        return
    from appliance.audit.facts import backends_from_facts
    from appliance.pki import Pki

    backends = backends_from_facts(target.facts)
    pem = Pki.for_site(backends.site, backends.vault()).ca_chain_pem()
    with tempfile.TemporaryDirectory(prefix="membria-audit-ca-") as tmp:
        path = Path(tmp) / "ca-chain.pem"
        path.write_text(pem)
        yield path


@contextmanager
def _foreign_client() -> Iterator[tuple[Path, Path]]:
    """A client certificate from a CA the site has never seen (made for this check, deleted after)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "membria audit: not the site CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "ops-admin"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "membria-user"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    with tempfile.TemporaryDirectory(prefix="membria-audit-foreign-") as tmp:
        cert_path, key_path = Path(tmp) / "client.pem", Path(tmp) / "client.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        yield cert_path, key_path


def _context(ca: Path, *, client: tuple[str, str] | None = None, max_tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.check_hostname = False  # nodes are reached by address; the chain to the site CA is what is checked
    if max_tls12:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if client is not None:
        ctx.load_cert_chain(client[0], client[1])
    return ctx


def _exchange(address: str, port: int, ctx: ssl.SSLContext, path: str) -> dict[str, Any]:
    """Handshake, then one GET; what happened at each step (never raises for a refusal)."""
    out: dict[str, Any] = {"handshake": False, "version": None, "status": None, "refused": None}
    try:
        with socket.create_connection((address, port), timeout=TIMEOUT) as raw, ctx.wrap_socket(raw) as tls:
            cipher = tls.cipher()
            out["handshake"], out["version"], out["cipher"] = True, tls.version(), cipher[0] if cipher else None
            peer = tls.getpeercert()
            subject: Any = peer.get("subject", ()) if peer else ()
            out["server"] = {str(k): str(v) for rdn in subject for k, v in rdn}
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = tls.recv(1024)
                if not chunk:
                    break
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode(errors="replace")
            if line.startswith("HTTP/"):
                out["status"] = int(line.split()[1])
            else:
                out["refused"] = "closed without an HTTP answer"
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        out["refused"] = f"{type(exc).__name__}: {exc}"
    return out


def _check_service(
    service: str, address: str, port: int, ca: Path, client: tuple[str, str] | None, evidence: Any
) -> list[str]:
    problems: list[str] = []
    where = f"{service} at {address}:{port}"
    plain = _exchange(address, port, _context(ca), "/healthz")
    evidence.add(f"TLS handshake with {where}, no client certificate", repr(plain))
    if not plain["handshake"]:
        return [f"{where}: no TLS 1.3 handshake verified by the site CA ({plain['refused']})"]
    if plain["version"] != "TLSv1.3":
        problems.append(f"{where} negotiated {plain['version']}, not TLSv1.3")
    if service == "gateway":
        api = _exchange(address, port, _context(ca), PROTECTED)
        evidence.add(f"GET {PROTECTED} on {where}, no client certificate and no token", repr(api))
        if api["status"] is not None and api["status"] != 401:
            problems.append(f"{where} answered {api['status']} to a request without certificate or token, not 401")
    elif plain["status"] is not None:
        problems.append(f"{where} answered HTTP {plain['status']} to a client without a certificate")
    old = _exchange(address, port, _context(ca, max_tls12=True), "/healthz")
    evidence.add(f"TLS 1.2 handshake with {where}", repr(old))
    if old["handshake"]:
        problems.append(f"{where} accepts TLS 1.2")
    with _foreign_client() as foreign:
        stranger = _exchange(address, port, _context(ca, client=(str(foreign[0]), str(foreign[1]))), "/healthz")
    evidence.add(f"TLS 1.3 handshake with {where}, a client certificate from another CA", repr(stranger))
    if stranger["status"] is not None:
        problems.append(f"{where} accepted a client certificate from another CA (HTTP {stranger['status']})")
    if client is None:
        evidence.add(f"a site client certificate on {where}", "not tried: the facts name no tls.client_cert")
    else:
        ok = _exchange(address, port, _context(ca, client=client), "/healthz")
        evidence.add(f"GET /healthz on {where} with the site client certificate {client[0]}", repr(ok))
        if ok["status"] != 200 or ok["version"] != "TLSv1.3":
            problems.append(f"{where} did not answer a site client certificate over TLS 1.3 ({ok})")
    return problems


def test_mtls_tls13_between_tiers(target: TargetSpec, evidence: Any) -> None:
    tls = target.facts.get("tls") or {}
    client = (
        (str(tls["client_cert"]), str(tls["client_key"])) if tls.get("client_cert") and tls.get("client_key") else None
    )
    problems: list[str] = []
    with _site_ca(target) as ca:
        for service in ("gateway", "core"):
            address, port = mem.endpoint(target, service)
            problems += _check_service(service, address, port, ca, client, evidence)
    assert not problems, "; ".join(problems)
