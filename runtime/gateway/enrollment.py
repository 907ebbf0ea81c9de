"""POST /v1/enroll: a freshly imaged laptop escrows its LUKS recovery key and gets its first certificate
(edge_image/DESIGN.md, "Enrollment protocol").

The laptop has no client certificate yet. Its credential is a one-device Vault token (header
`Membria-Enrollment-Token`, minted by `appliance edge enroll-token`): the listener runs CERT_OPTIONAL, as for
service tokens, and this route alone accepts a request without a certificate; every other route still goes
through `authenticate`. The gateway holds no Vault credential: it calls Vault *with the laptop's token*
(lookup-self, KV write, sign, revoke-self), so Vault enforces expiry, uses, scope and revocation, and the
gateway cannot do more than that one token allows.

The reply is stored under sha256(token) (with the body's hash) in the idempotency store: a retry after a lost
reply is answered from there (the token is revoked by then); the same token with another body reaches Vault,
which refuses the revoked token (401).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from datetime import UTC, datetime
from typing import Annotated, Any

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from runtime.common.identity import Identity
from runtime.common.vault_session import server_name_session
from runtime.gateway.app import GatewayDeps, GatewayError, _ctx
from runtime.gateway.idempotency import KeyInProgress, KeyReused, Replay, request_hash
from runtime.gateway.ratelimit import RateLimiter, retry_after_header
from runtime.gateway.settings import EnrollmentSettings

log = logging.getLogger("membria.gateway.enroll")

ENROLL_HEADER = "Membria-Enrollment-Token"
MAX_BODY_BYTES = 64 * 1024  # a CSR and a few short fields: far below the gateway's general limit
DEVICE_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_TOKEN_RE = re.compile(r"[A-Za-z0-9._\-]{8,512}")
_IDEMPOTENCY_CALLER = "enroll"  # a namespace of its own in the shared store: keys are sha256(token)


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    device: str = Field(pattern=DEVICE_PATTERN)
    csr_pem: str = Field(min_length=100, max_length=16_384)
    recovery_key: str = Field(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")
    luks_uuid: str = Field(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
    tpm2_pcrs: list[Annotated[StrictInt, Field(ge=0, le=23)]] = Field(max_length=24)
    image_id: str = Field(min_length=1, max_length=200, pattern=r"^[\x20-\x7e]+$")


class _Refused(Exception):
    """Vault refused the token (expired, used up, revoked, or asked for something outside its policy)."""


class _WrongDevice(Exception):
    pass


class _VaultInvalid(Exception):
    """Vault found the request itself invalid (e.g. a CSR it would not sign)."""


def check_csr(pem: str, expected_cn: str) -> x509.CertificateSigningRequest:
    """A well-formed, self-signed CSR for an EC P-256 or RSA >= 2048 key with CN == expected_cn."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError:
        raise GatewayError(400, "invalid_csr", "csr_pem is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise GatewayError(400, "invalid_csr", "the CSR's signature does not verify")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise GatewayError(400, "invalid_csr", f"EC keys must be P-256, not {key.curve.name}")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise GatewayError(400, "invalid_csr", f"RSA keys must have at least 2048 bits, not {key.key_size}")
    else:
        raise GatewayError(400, "invalid_csr", "the CSR's key must be EC P-256 or RSA >= 2048")
    cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [expected_cn]:
        raise GatewayError(400, "csr_name_mismatch", f"the CSR's CN must be {expected_cn!r} (got {cns or 'none'})")
    return csr


def _enroll_with_vault(conf: EnrollmentSettings, token: str, body: EnrollRequest) -> dict[str, Any]:
    """The four Vault calls, with the laptop's token (blocking: run in a thread)."""
    verify: str | bool = str(conf.vault_ca) if conf.vault_ca else True
    session = server_name_session(conf.vault_tls_server_name, verify) if conf.vault_tls_server_name else None
    client = hvac.Client(
        url=conf.vault_url.rstrip("/"), token=token, verify=verify, timeout=conf.vault_timeout_seconds, session=session
    )
    try:
        meta = client.auth.token.lookup_self()["data"].get("meta") or {}
        if meta.get("device") != body.device:
            raise _WrongDevice(str(meta.get("device") or "(none)"))
        department = str(meta.get("department") or "")
        role = f"edge-device--{department}" if department else "edge-device"
        escrow_path = f"membria/edge/recovery/{body.device}"
        written = client.secrets.kv.v2.create_or_update_secret(
            path=escrow_path,
            secret={
                "recovery_key": body.recovery_key,
                "luks_uuid": body.luks_uuid.lower(),
                "image_id": body.image_id,
                "tpm2_pcrs": body.tpm2_pcrs,
                "enrolled_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            },
            mount_point=conf.kv_mount,
        )
        version = int(written["data"]["version"])
        # Exactly the parameters the token's policy allows (allowed_parameters): anything more is refused.
        signed = client.adapter.post(
            f"/v1/{conf.pki_int_mount}/sign/{role}",
            json={"csr": body.csr_pem, "common_name": f"{body.device}.{conf.domain}", "ttl": conf.cert_ttl},
        )["data"]
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
        raise _Refused(type(exc).__name__) from None
    except hvac.exceptions.InvalidRequest as exc:
        raise _VaultInvalid(_first_line(exc)) from None
    try:
        client.auth.token.revoke_self()
    except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as exc:
        # Enrolled all the same: the token has at most two uses left, no delete right, and expires on its own.
        log.warning("revoke-self after enrolling %s failed: %s", body.device, type(exc).__name__)
    chain = [str(c) for c in (signed.get("ca_chain") or [signed["issuing_ca"]])]
    return {
        "certificate_pem": str(signed["certificate"]).strip() + "\n",
        "ca_chain_pem": "\n".join(c.strip() for c in chain) + "\n",
        "escrow": {"path": f"{conf.kv_mount}/{escrow_path}", "version": version},
        "_department": department,
        "_serial": str(signed.get("serial_number", "")),
    }


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


async def _read_body(request: Request) -> bytes:
    """The body, refusing past MAX_BODY_BYTES while reading (a chunked body has no Content-Length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise GatewayError(413, "body_too_large", f"enrollment requests are limited to {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def register(app: FastAPI, deps: GatewayDeps, conf: EnrollmentSettings) -> None:
    limits = deps.settings.rate_limit
    limiter = RateLimiter(limits.rate_per_second, limits.burst)  # per peer address: there is no identity yet
    running: set[asyncio.Task[Any]] = set()

    def as_device(request: Request, device: str, department: str) -> None:
        ctx = _ctx(request)
        ctx.identity = Identity(
            subject=device, kind="device", departments=(department,) if department else (), auth="token"
        )
        ctx.departments = ctx.identity.departments

    @app.post("/v1/enroll", tags=["edge"])
    async def enroll(request: Request) -> JSONResponse:
        """A laptop's first contact: escrow its recovery key, get its certificate. Credential: the header
        Membria-Enrollment-Token (a one-device Vault token); no client certificate needed. Body: {device,
        csr_pem, recovery_key, luks_uuid, tpm2_pcrs, image_id}; reply: {certificate_pem, ca_chain_pem,
        escrow: {path, version}}. A retry with the same token and body gets the same reply."""
        ctx = _ctx(request)
        peer = request.client.host if request.client else "unknown"
        wait = limiter.take(f"peer:{peer}")
        if wait > 0:
            ctx.decision, ctx.reason = "rate_limited", "enrollment rate limit"
            raise GatewayError(
                429, "rate_limited", "too many requests", headers={"Retry-After": retry_after_header(wait)}
            )
        token = request.headers.get(ENROLL_HEADER, "")
        if not _TOKEN_RE.fullmatch(token):
            ctx.reason = "enrollment without a usable token header"
            raise GatewayError(401, "unauthenticated", f"the {ENROLL_HEADER} header is missing or malformed")
        raw = await _read_body(request)
        try:
            body = EnrollRequest.model_validate_json(raw)
        except ValidationError as exc:
            problems = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in exc.errors()[:20]]
            return JSONResponse(
                {"error": {"code": "invalid_request", "message": "invalid request", "problems": problems}}, 422
            )
        check_csr(body.csr_pem, f"{body.device}.{conf.domain}")

        store = deps.idempotency
        assert store is not None
        # Keyed by sha256(token) (the token itself is never stored) and the body's hash: the same token and body
        # replay the stored reply; another body goes to Vault, which refuses a token already revoked (401). A
        # failed attempt (e.g. the wrong device) leaves no claim that would block the right body.
        body_hash = request_hash({"route": "/v1/enroll", "body": body.model_dump(mode="json")})
        key = f"{hashlib.sha256(token.encode()).hexdigest()}.{body_hash}"
        try:
            outcome = await store.begin(
                _IDEMPOTENCY_CALLER, key, body_hash, wait_seconds=deps.settings.idempotency.wait_seconds
            )
        except KeyReused:  # cannot happen (the hash is part of the key); refused all the same
            raise GatewayError(401, "token_used", "this enrollment token has already been used") from None
        except KeyInProgress as exc:
            raise GatewayError(409, "enrollment_in_progress", str(exc), headers={"Retry-After": "2"}) from None
        if isinstance(outcome, Replay):
            reply = outcome.response.body
            as_device(request, body.device, _department_of(reply.get("certificate_pem", "")))
            ctx.decision, ctx.reason = "allow", "enrollment replayed from the store (same token, same body)"
            return JSONResponse(reply, status_code=outcome.response.status, headers={"Idempotent-Replayed": "true"})

        async def call_and_store() -> dict[str, Any]:
            try:
                result = await asyncio.to_thread(_enroll_with_vault, conf, token, body)
                reply = {k: v for k, v in result.items() if not k.startswith("_")}
                await asyncio.to_thread(store.complete, _IDEMPOTENCY_CALLER, key, 200, reply)
            except BaseException:
                store.release(_IDEMPOTENCY_CALLER, key)  # a failed attempt may be retried with the same token
                raise
            return result

        # Its own task: a client that disconnects mid-way does not cancel the Vault calls, so the reply is
        # stored and the laptop's retry is answered from the store.
        task = asyncio.create_task(call_and_store())
        running.add(task)
        task.add_done_callback(running.discard)
        try:
            result = await asyncio.shield(task)
        except _WrongDevice as exc:
            ctx.reason = f"enrollment token is for device {exc}, not {body.device}"
            raise GatewayError(403, "wrong_device", f"this enrollment token is not for device {body.device}") from None
        except _Refused:
            ctx.reason = f"Vault refused the enrollment token (claimed device {body.device})"
            raise GatewayError(
                401, "token_refused", "the enrollment token was refused (expired, used up, revoked or out of scope)"
            ) from None
        except _VaultInvalid as exc:
            ctx.reason = f"Vault refused the enrollment request: {exc}"
            raise GatewayError(400, "enrollment_refused", f"Vault refused the request: {exc}") from None
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as exc:
            ctx.reason = f"Vault failed during enrollment: {type(exc).__name__}"
            raise GatewayError(503, "vault_unavailable", f"Vault is unavailable: {type(exc).__name__}") from None
        as_device(request, body.device, str(result["_department"]))
        ctx.decision = "allow"
        ctx.reason = (
            f"enrolled; recovery key escrowed (version {result['escrow']['version']}), "
            f"certificate serial {result['_serial']}"
        )
        return JSONResponse({k: v for k, v in result.items() if not k.startswith("_")})


def _department_of(certificate_pem: str) -> str:
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError:
        return ""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(units[0].value) if units else ""
