"""TLS between tiers: TLS 1.3 only, client certificates verified against the site CA.

Uvicorn does not put the client certificate into the ASGI scope, so `MtlsH11Protocol` adds it the way
the ASGI TLS extension describes (`scope["extensions"]["tls"]["client_cert_chain"]`, PEM strings).
`uvicorn.Config(app, **uvicorn_tls_kwargs(files))` wires both.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path  # the site CA chain that peers' certificates must chain to


def server_context(files: TlsFiles, *, require_client_cert: bool = True) -> ssl.SSLContext:
    """A TLS 1.3-only server context. With `require_client_cert=False` a client may connect without a
    certificate (service accounts with bearer tokens); a certificate it does present is still verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.3-only client context presenting `files.cert` and trusting only the site CA."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files.cert, files.key)
    return ctx


def uvicorn_tls_kwargs(files: TlsFiles, *, require_client_cert: bool = True) -> dict[str, Any]:
    """uvicorn.Config keyword arguments: our `server_context` and the protocol that exposes the peer cert."""
    return {
        "ssl_certfile": str(files.cert),
        "ssl_keyfile": str(files.key),
        "ssl_context_factory": lambda _config, _default: server_context(files, require_client_cert=require_client_cert),
        "http": MtlsH11Protocol,
    }


def peer_certificate(scope: Mapping[str, Any]) -> x509.Certificate | None:
    """The verified client certificate of this request, if the client presented one."""
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    return x509.load_pem_x509_certificate(chain[0].encode()) if chain else None


class _WithTlsExtension:
    def __init__(self, app: Any, client_cert_chain: list[str], tls_version: str | None) -> None:
        self.app = app
        self.tls = {"client_cert_chain": client_cert_chain, "tls_version": tls_version}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "extensions": {**scope.get("extensions", {}), "tls": self.tls}}
        await self.app(scope, receive, send)


class MtlsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the verified peer certificate in every request's scope."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
        self.app = _WithTlsExtension(self.app, chain, ssl_object.version())
