"""The gateway's HTTP application: every route authenticates, authorizes (deny by default), is rate
limited and leaves one audit row. It forwards to the core server over mTLS with its own certificate.

Authentication: the verified client certificate (CN = user or device id, OU = departments, O = kind),
or, for service accounts without a certificate, a short-lived EdDSA bearer token.

Edge devices escalate with an `Idempotency-Key` on POST /v1/chat/completions: a repeated key is answered
from the gateway's store (runtime/gateway/idempotency.py) without a second call to the core. They sync
through POST /v1/sync/push and /v1/sync/pull (RBAC action `sync`), which go on to the core's sync hub.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import httpx
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.common import service_tokens
from runtime.common.asgi import limit_receive
from runtime.common.identity import Identity, NotAnIdentity, identity_from_certificate
from runtime.common.license import License, SeatLedger
from runtime.common.rbac import NAME_PATTERN, Action, Policy, decide
from runtime.common.sync_wire import MAX_RECORD_ID_CHARS, MAX_TOPIC_CHARS
from runtime.common.tls import client_context, peer_certificate
from runtime.common.vclock import MAX_COUNTER, REPLICA_PATTERN
from runtime.gateway.idempotency import (
    IdempotencyStore,
    InvalidKey,
    KeyInProgress,
    KeyReused,
    Replay,
    request_hash,
    validate_key,
)
from runtime.gateway.ratelimit import RateLimiter, retry_after_header
from runtime.gateway.revocation import RevocationList
from runtime.gateway.settings import GatewaySettings

AuditSubmit = Callable[[dict[str, Any]], None]
log = logging.getLogger("membria.gateway")


# --- request bodies (OpenAI-compatible where the route is) --------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (name, tool ids)
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=32_000)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=100)
    stream: bool = False
    max_tokens: int = Field(default=256, ge=1, le=1024)  # the core server's own limit
    temperature: float = Field(default=0.2, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] = Field(min_length=1)


class SearchRequest(Strict):
    query: str = Field(min_length=1, max_length=4000)
    departments: list[str] | None = Field(default=None, max_length=50)
    top_k: int = Field(default=5, ge=1, le=50)


# Sync (runtime/edge/DESIGN.md, "Wire"): the gateway checks shapes and scope, the core's hub merges (and checks
# each record again, field by field). Limits are the hub's own (runtime.common.vclock / sync_wire).
ReplicaId = Annotated[str, Field(pattern=REPLICA_PATTERN)]
ClockValue = Annotated[StrictInt, Field(ge=0, le=MAX_COUNTER)]
Clock = dict[ReplicaId, ClockValue]
DepartmentName = Annotated[str, Field(pattern=NAME_PATTERN)]


class SyncRecord(Strict):
    kind: Literal["chunk", "reasoning", "lora"]  # lora is named only to be refused with a clear 400
    record_id: str = Field(min_length=1, max_length=MAX_RECORD_ID_CHARS)
    department: DepartmentName
    topic: str | None = Field(default=None, min_length=1, max_length=MAX_TOPIC_CHARS)
    origin: ReplicaId
    seq: Annotated[StrictInt, Field(ge=1, le=MAX_COUNTER)]
    lamport: Annotated[StrictInt, Field(ge=1, le=MAX_COUNTER)]
    payload: dict[str, Any] | None = Field(description="a JSON object; null or {} for a deleted record")
    deleted: StrictBool


class SyncPushRequest(Strict):
    replica: ReplicaId
    records: list[SyncRecord] = Field(max_length=100_000)
    clock: Clock


class SyncPullRequest(Strict):
    replica: ReplicaId
    clock: Clock
    departments: list[DepartmentName] = Field(
        default_factory=list, max_length=50, description="the subscription; empty: the caller's whole sync scope"
    )
    topics: list[Annotated[str, Field(min_length=1, max_length=MAX_TOPIC_CHARS)]] | None = Field(
        default=None, max_length=200
    )
    max_patch_bytes: int = Field(default=20 * 1024 * 1024, ge=0, le=1024 * 1024 * 1024)


# --- per-request context ------------------------------------------------------------------------------


@dataclass
class AuditContext:
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    identity: Identity | None = None
    decision: str = "deny"
    reason: str = ""
    model: str = ""
    departments: tuple[str, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _ctx(request: Request) -> AuditContext:
    ctx: AuditContext | None = getattr(request.state, "audit", None)
    if ctx is None:
        ctx = request.state.audit = AuditContext()
    return ctx


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class GatewayError(HTTPException):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


class BodyLimit:
    """Enforces the body limit on the bytes actually received. The Content-Length check in the audit
    middleware cannot see a chunked body, which would otherwise be read into memory whatever its size."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # FastAPI re-raises an HTTPException met while reading the body: it becomes our 413.
        message = f"request bodies are limited to {self.max_body_bytes} bytes"
        limited = limit_receive(receive, self.max_body_bytes, lambda: GatewayError(413, "body_too_large", message))
        await self.app(scope, limited, send)


# --- the application ------------------------------------------------------------------------------------


@dataclass
class GatewayDeps:
    """What the app needs besides its settings; built by `runtime.gateway.__main__` (or a test)."""

    settings: GatewaySettings
    policy: Policy
    license: License
    seats: SeatLedger
    audit: AuditSubmit
    audit_has_capacity: Callable[[], bool] = lambda: True
    core: httpx.AsyncClient | None = None
    idempotency: IdempotencyStore | None = None  # opened from the settings at start-up when not given


def create_app(deps: GatewayDeps) -> FastAPI:
    settings = deps.settings
    limiter = RateLimiter(settings.rate_limit.rate_per_second, settings.rate_limit.burst)
    revoked = RevocationList(settings.tls.crl)
    token_key = (
        load_pem_public_key(settings.service_token_public_key.read_bytes())
        if settings.service_token_public_key
        else None
    )
    registry = CollectorRegistry()
    requests_total = Counter(
        "membria_gateway_requests_total", "Requests by route and status", ["route", "status"], registry=registry
    )
    latency = Histogram("membria_gateway_request_seconds", "Request latency", ["route"], registry=registry)
    decisions = Counter("membria_gateway_decisions_total", "Authorization decisions", ["decision"], registry=registry)
    core_requests = Counter(
        "membria_gateway_core_requests_total", "Requests sent to the core server", ["path"], registry=registry
    )
    keyed_outcomes = Counter(
        "membria_gateway_idempotency_total",
        "Requests with an Idempotency-Key by outcome",
        ["outcome"],
        registry=registry,
    )
    # Upstream calls made for an Idempotency-Key run as tasks of their own: a client that disconnects does not
    # cancel them, so the answer is stored and its retry is replayed rather than sent to the core again.
    keyed_calls: set[asyncio.Task[Any]] = set()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if deps.core is None:
            deps.core = httpx.AsyncClient(
                base_url=settings.core_url,
                verify=client_context(settings.tls.files()),
                timeout=settings.core_timeout_seconds,
            )
        own_store = deps.idempotency is None
        if deps.idempotency is None:
            deps.idempotency = IdempotencyStore(
                settings.idempotency_path,
                ttl_seconds=settings.idempotency.ttl_seconds,
                lease_seconds=settings.core_timeout_seconds + 30,  # past it, the holder's call has timed out
            )
        try:
            yield
        finally:
            if keyed_calls:  # let answers being computed for a key be stored before the store closes
                await asyncio.wait(keyed_calls, timeout=settings.core_timeout_seconds)
            await deps.core.aclose()
            if own_store:
                deps.idempotency.close()

    app = FastAPI(
        title="Membria gateway",
        version="1.0",
        description="mTLS front door of the Membria core node: OpenAI-compatible chat and embeddings, "
        "department-scoped knowledge. Every call is authenticated, authorized, rate limited and audited.",
        lifespan=lifespan,
    )

    # -- middleware: body limit, then audit + metrics around everything ----------------------------------

    class AuditMiddleware(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
            started = time.perf_counter()
            ctx = _ctx(request)
            length = request.headers.get("content-length")
            if not deps.audit_has_capacity():
                # No audit row, no service: refuse before doing any work rather than serve unaudited.
                response = _error(503, "audit_unavailable", "the audit log is not accepting rows; retry later")
                response.headers["Retry-After"] = "5"
            elif length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
                response = _error(
                    413, "body_too_large", f"request bodies are limited to {settings.max_body_bytes} bytes"
                )
            else:
                response = await call_next(request)
            elapsed = time.perf_counter() - started
            route = request.scope.get("route")
            route_path = getattr(route, "path", request.url.path if response.status_code != 404 else "unmatched")
            requests_total.labels(route_path, str(response.status_code)).inc()
            latency.labels(route_path).observe(elapsed)
            response.headers["x-request-id"] = ctx.request_id
            if route_path in ("/healthz", "/metrics"):
                return response
            body = getattr(response, "body_iterator", None)
            if body is None:
                _submit_audit(request, ctx, route_path, response.status_code, elapsed)
            else:
                # The row is written once the body has gone out: a streamed answer's tokens are counted by then.
                response.body_iterator = _audited(  # type: ignore[attr-defined]
                    body, request, ctx, route_path, response.status_code, started
                )
            return response

    async def _audited(
        body: AsyncIterator[Any], request: Request, ctx: AuditContext, route: str, status: int, started: float
    ) -> AsyncIterator[Any]:
        try:
            async for part in body:
                yield part
        finally:
            _submit_audit(request, ctx, route, status, time.perf_counter() - started)

    def _submit_audit(request: Request, ctx: AuditContext, route: str, status: int, elapsed: float) -> None:
        ident = ctx.identity
        reason = ctx.reason
        if ident is not None:
            # RBAC reasons name the caller ("user:alice's roles ..."); the row carries only the pseudonym.
            reason = reason.replace(ident.key, f"the {ident.kind}")
        event = {
            "request_id": ctx.request_id,
            "subject": ident.subject if ident else "",
            "device": ident.subject if ident and ident.kind == "device" else "",
            "departments": list(ctx.departments or (ident.departments if ident else ())),
            "route": route,
            "method": request.method,
            "model": ctx.model,
            "decision": ctx.decision if status < 500 else "error",
            "reason": reason,
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
            "latency_ms": round(elapsed * 1000, 3),
            "status": status,
        }
        try:
            deps.audit(event)
        except Exception:  # the queue filled between the capacity check and now: say so loudly
            log.exception("audit row for request %s could not be queued", ctx.request_id)

    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)  # inside: its 413 is audited too
    app.add_middleware(AuditMiddleware)

    # -- errors: always JSON, never a 500 for bad input ------------------------------------------------------

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return _error(exc.status_code, exc.code, str(exc.detail), exc.headers)

    # Starlette's class, not FastAPI's subclass: routing (404, 405) and body parsing (400) raise that one.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()[:20]
        ]
        return JSONResponse(
            {"error": {"code": "invalid_request", "message": "invalid request", "problems": problems}}, 422
        )

    # -- authentication, authorization, rate limiting -----------------------------------------------------

    def authenticate(request: Request) -> Identity:
        ctx = _ctx(request)
        cert = peer_certificate(request.scope)
        if cert is not None:
            try:
                ident = identity_from_certificate(cert)
            except NotAnIdentity as exc:
                ctx.reason = str(exc)
                raise GatewayError(403, "not_an_identity", str(exc)) from exc
            if revoked.is_revoked(ident.cert_serial):
                ctx.reason = "certificate revoked"
                raise GatewayError(401, "certificate_revoked", "the client certificate has been revoked")
        else:
            auth = request.headers.get("authorization", "")
            if not auth.lower().startswith("bearer ") or token_key is None:
                ctx.reason = "no client certificate and no bearer token"
                raise GatewayError(401, "unauthenticated", "a client certificate or a service token is required")
            try:
                ident = service_tokens.verify(auth[7:].strip(), token_key)  # type: ignore[arg-type]
            except service_tokens.TokenRejected as exc:
                ctx.reason = str(exc)
                raise GatewayError(401, "unauthenticated", str(exc)) from exc
        ctx.identity = ident
        if ident.kind == "device" and not deps.seats.admit(ident.subject):
            ctx.reason = "license seat limit reached"
            raise GatewayError(403, "seat_limit", f"the license allows {deps.license.seats} devices; all are taken")
        wait = limiter.take(ident.key)
        if wait > 0:
            ctx.decision, ctx.reason = "rate_limited", "rate limit"
            decisions.labels("rate_limited").inc()
            raise GatewayError(
                429, "rate_limited", "too many requests", headers={"Retry-After": retry_after_header(wait)}
            )
        return ident

    def authorize(
        request: Request, ident: Identity, action: Action, departments: list[str] | None = None
    ) -> tuple[str, ...]:
        """Deny by default; returns the departments this call may touch."""
        ctx = _ctx(request)
        decision = decide(deps.policy, ident, action, departments or ())
        ctx.decision = "allow" if decision.allowed else "deny"
        ctx.reason = decision.reason
        decisions.labels(ctx.decision).inc()
        if not decision.allowed:
            raise GatewayError(403, "forbidden", decision.reason)
        scope = tuple(departments) if departments else tuple(decision.allowed_departments)
        ctx.departments = scope
        return scope

    def check_model(request: Request, model: str) -> None:
        _ctx(request).model = model
        if model not in settings.models:
            raise GatewayError(404, "model_not_found", f"unknown model {model!r}; served: {', '.join(settings.models)}")

    async def core_call(method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """One call to the core server; a refusal or a failure becomes the matching GatewayError. With
        `stream=True` the body is left unread (the caller closes the response) unless the call failed."""
        assert deps.core is not None
        core_requests.labels(path).inc()
        try:
            response = await deps.core.send(deps.core.build_request(method, path, **kwargs), stream=stream)
            if stream and response.status_code >= 400:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except httpx.HTTPError as exc:
            raise GatewayError(
                503, "core_unavailable", f"the core server is unavailable: {type(exc).__name__}"
            ) from exc
        if response.status_code >= 500:
            raise GatewayError(502, "core_error", f"the core server failed (HTTP {response.status_code})")
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail") or response.json().get("error", {}).get("message")
            except ValueError:
                detail = response.text[:200]
            raise GatewayError(response.status_code, "core_refused", str(detail))
        return response

    Authenticated = Depends(authenticate)

    # -- routes ------------------------------------------------------------------------------------------------

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        assert deps.core is not None
        try:
            core = await deps.core.get("/readyz", timeout=5)
            ready = core.status_code == 200
        except httpx.HTTPError:
            ready = False
        days_left = deps.license.days_left()
        body = {"status": "ready" if ready else "not ready", "core": ready, "license_days_left": days_left}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics(ident: Identity = Authenticated) -> PlainTextResponse:
        # Any site identity may scrape (Prometheus uses a service token or certificate): the figures
        # name routes and statuses, never callers.
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions", tags=["openai"], response_model=None)
    async def chat_completions(
        body: ChatRequest,
        request: Request,
        ident: Identity = Authenticated,
        idempotency_key: str | None = Header(
            default=None,
            alias="Idempotency-Key",
            description="1-128 characters [A-Za-z0-9_-:.]; a repeated key is answered from the gateway's store "
            "(header Idempotent-Replayed: true) without calling the core again. Not with stream=true.",
        ),
    ) -> JSONResponse | StreamingResponse:
        if idempotency_key is not None:
            try:
                validate_key(idempotency_key)
            except InvalidKey as exc:
                raise GatewayError(400, "invalid_idempotency_key", str(exc)) from exc
            if body.stream:
                raise GatewayError(
                    400, "idempotency_not_streamable", "an Idempotency-Key is accepted only with stream=false"
                )
        check_model(request, body.model)
        scope = authorize(request, ident, "chat")
        question = next((m.content for m in reversed(body.messages) if m.role == "user"), "")
        if not question.strip():
            raise GatewayError(422, "invalid_request", "the conversation has no user message")
        payload = {
            "question": question,
            "departments": list(scope),
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
        }
        created = int(time.time())
        completion_id = f"chatcmpl-{_ctx(request).request_id}"
        if body.stream:
            # Opened before the response starts, so a refusal (or an unavailable core) is an HTTP error
            # status rather than a 200 whose stream breaks off.
            upstream = await core_call("POST", "/internal/rag", json={**payload, "stream": True}, stream=True)
            return StreamingResponse(
                _stream_chat(request, upstream, body.model, completion_id, created), media_type="text/event-stream"
            )

        async def answer() -> dict[str, Any]:
            result = (await core_call("POST", "/internal/rag", json={**payload, "stream": False})).json()
            ctx = _ctx(request)
            usage = result.get("usage") or {}
            ctx.prompt_tokens = int(usage.get("prompt_tokens", 0))
            ctx.completion_tokens = int(usage.get("completion_tokens", 0))
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": result["answer"]}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": ctx.prompt_tokens,
                    "completion_tokens": ctx.completion_tokens,
                    "total_tokens": ctx.prompt_tokens + ctx.completion_tokens,
                },
                "membria": {"sources": result.get("sources", []), "cached": result.get("cached", False)},
            }

        if idempotency_key is None:
            return JSONResponse(await answer())
        return await idempotent(request, ident, idempotency_key, body.model_dump(mode="json"), answer)

    async def idempotent(
        request: Request,
        ident: Identity,
        key: str,
        request_body: dict[str, Any],
        produce: Callable[[], Awaitable[dict[str, Any]]],
    ) -> JSONResponse:
        """Answer from the store when `key` was answered before; otherwise produce the answer once and store it."""
        store = deps.idempotency
        assert store is not None
        ctx = _ctx(request)
        route = request.url.path
        # The key is the client's text: the audit row names a digest of it, never the text itself.
        tag = hashlib.sha256(key.encode()).hexdigest()[:16]
        try:
            outcome = await store.begin(
                ident.key,
                key,
                request_hash({"route": route, "body": request_body}),
                wait_seconds=settings.idempotency.wait_seconds,
            )
        except KeyReused as exc:
            keyed_outcomes.labels("reused").inc()
            raise GatewayError(422, "idempotency_key_reused", str(exc)) from exc
        except KeyInProgress as exc:
            keyed_outcomes.labels("in_progress").inc()
            raise GatewayError(409, "idempotency_in_progress", str(exc), headers={"Retry-After": "2"}) from exc
        if isinstance(outcome, Replay):
            keyed_outcomes.labels("replayed").inc()
            ctx.reason = f"{ctx.reason}; idempotent replay (key #{tag})"
            return JSONResponse(
                outcome.response.body, status_code=outcome.response.status, headers={"Idempotent-Replayed": "true"}
            )
        keyed_outcomes.labels("claimed").inc()
        ctx.reason = f"{ctx.reason}; idempotency key #{tag}"

        async def call_and_store() -> dict[str, Any]:
            try:
                result = await produce()
                await asyncio.to_thread(store.complete, ident.key, key, 200, result)
            except BaseException:
                store.release(ident.key, key)  # synchronous: no await may be cancelled before the release
                raise
            return result

        task = asyncio.create_task(call_and_store())
        keyed_calls.add(task)
        task.add_done_callback(keyed_calls.discard)
        return JSONResponse(await asyncio.shield(task))

    async def _stream_chat(
        request: Request, upstream: httpx.Response, model: str, completion_id: str, created: int
    ) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n".encode()

        finish = "stop"
        try:
            yield chunk({"role": "assistant"})
            async for line in upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("type") == "error":  # the model failed mid-answer: do not present it as complete
                    _ctx(request).reason = f"model error during the stream: {event.get('message', '')}"[:500]
                    finish = "error"
                    break
                if event.get("delta"):
                    _ctx(request).completion_tokens += 1
                    yield chunk({"content": event["delta"]})
        except httpx.HTTPError:
            finish = "error"
        finally:
            await upstream.aclose()
        yield chunk({}, finish)
        yield b"data: [DONE]\n\n"

    @app.post("/v1/embeddings", tags=["openai"])
    async def embeddings(body: EmbeddingsRequest, request: Request, ident: Identity = Authenticated) -> JSONResponse:
        _ctx(request).model = body.model
        authorize(request, ident, "embeddings", None)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > 256 or any(len(t) > 20_000 for t in texts):
            raise GatewayError(413, "too_large", "at most 256 inputs of 20000 characters each")
        result = (await core_call("POST", "/internal/embeddings", json={"input": texts})).json()
        return JSONResponse(result)

    @app.post("/v1/knowledge/documents", tags=["knowledge"])
    async def upload_document(
        request: Request,
        file: UploadFile = File(...),
        department: str = Form(..., min_length=1, max_length=64),
        doc_id: str | None = Form(None, max_length=200),
        title: str | None = Form(None, max_length=500),
        ident: Identity = Authenticated,
    ) -> JSONResponse:
        authorize(request, ident, "write_documents", [department])
        content = await file.read(settings.max_body_bytes + 1)
        if len(content) > settings.max_body_bytes:
            raise GatewayError(413, "body_too_large", "document too large")
        form: dict[str, str] = {"department": department}
        if doc_id:
            form["doc_id"] = doc_id
        if title:
            form["title"] = title
        files = {"file": (file.filename or "upload", content, file.content_type or "application/octet-stream")}
        result = await core_call("POST", "/internal/documents", data=form, files=files)
        return JSONResponse(result.json(), status_code=201)

    @app.get("/v1/knowledge/documents", tags=["knowledge"])
    async def list_documents(department: str, request: Request, ident: Identity = Authenticated) -> JSONResponse:
        authorize(request, ident, "read_documents", [department])
        result = await core_call("GET", "/internal/documents", params={"department": department})
        return JSONResponse(result.json())

    @app.post("/v1/knowledge/search", tags=["knowledge"])
    async def search(body: SearchRequest, request: Request, ident: Identity = Authenticated) -> JSONResponse:
        scope = authorize(request, ident, "search", body.departments)
        result = await core_call(
            "POST", "/internal/search", json={"query": body.query, "departments": list(scope), "top_k": body.top_k}
        )
        return JSONResponse(result.json())

    def check_replica(ident: Identity, replica: str) -> None:
        """A device syncs as itself: its replica id is its certificate's host name (the CN's first label), so
        one laptop cannot push or pull under another's id. Operators may act for any replica."""
        if ident.kind == "device" and replica not in (ident.subject, ident.subject.split(".", 1)[0]):
            raise GatewayError(
                403, "forbidden", f"device {ident.subject} may sync only as replica {ident.subject.split('.', 1)[0]!r}"
            )

    @app.post("/v1/sync/push", tags=["sync"])
    async def sync_push(body: SyncPushRequest, request: Request, ident: Identity = Authenticated) -> Response:
        """A replica's changes for the core's hub. Every record's department must be in the caller's sync scope;
        LoRA adapters never leave their device, so a push carrying one is refused whole."""
        for index, record in enumerate(body.records):
            if record.kind == "lora":
                raise GatewayError(
                    400,
                    "lora_refused",
                    f"records[{index}] ({record.record_id!r}) is a LoRA adapter: adapters never leave their device",
                )
        requested = sorted({r.department for r in body.records})
        authorize(request, ident, "sync", requested)
        check_replica(ident, body.replica)
        # The hub is told everything the caller may sync, not only what this push touches.
        allowed = decide(deps.policy, ident, "sync").allowed_departments
        forwarded = {**body.model_dump(mode="json"), "departments": list(allowed)}
        result = await core_call("POST", "/internal/sync/push", json=forwarded)
        return Response(result.content, status_code=result.status_code, media_type="application/json")

    @app.post("/v1/sync/pull", tags=["sync"])
    async def sync_pull(body: SyncPullRequest, request: Request, ident: Identity = Authenticated) -> Response:
        """The changes the caller has not seen in its subscription (a patch, or a snapshot when large).
        An empty `departments` subscribes to every department the caller may sync."""
        scope = authorize(request, ident, "sync", body.departments or None)
        check_replica(ident, body.replica)
        forwarded = {**body.model_dump(mode="json"), "departments": list(scope)}
        result = await core_call("POST", "/internal/sync/pull", json=forwarded)
        # Passed through as bytes: a snapshot can be large, and the gateway has no reason to parse it.
        return Response(result.content, status_code=result.status_code, media_type="application/json")

    if settings.enrollment is not None:
        from runtime.gateway import enrollment  # imports this module: loaded here, once create_app runs

        enrollment.register(app, deps, settings.enrollment)
    if settings.device_commands is not None:
        from runtime.gateway import device_commands  # imports this module too

        device_commands.register(app, deps, settings.device_commands)

    return app
