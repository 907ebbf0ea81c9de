"""The core server's HTTP API: internal, JSON, called only by the gateway over mTLS.

The gateway authenticates the end user, applies RBAC and passes the caller's *allowed departments*
explicitly in each request; the core server trusts nothing but the gateway's service certificate
(O=membria-service, CN starting with `gateway_subject_prefix`) and never widens the departments it is
given. An empty department list is refused (403): nothing is searchable by default.

Routes (all under `/internal` require the gateway peer when `require_gateway_peer` is on):

    POST   /internal/documents                    multipart: file, department, doc_id?, title?
    GET    /internal/documents?department=D
    DELETE /internal/documents/{department}/{doc_id}
    POST   /internal/search      {query, departments[], top_k?, mode?}
    POST   /internal/rag         {question, departments[], max_tokens?, temperature?, top_p?, top_k?, stream?}
    POST   /internal/embeddings  {input: str | [str], model?}  (OpenAI-shaped answer)
    POST   /internal/sync/push   {replica, records[], clock, departments[]} -> {accepted, clock}
    POST   /internal/sync/pull   {replica, clock, departments[], topics?, max_patch_bytes?}
                                 -> {mode, records | null, snapshot_b64 | null, clock, bytes}
    GET    /healthz              liveness
    GET    /readyz               Milvus, embedding model, LLM and cache answer a real request

Errors are JSON `{"error": {"code", "message"}}` with a 4xx status for anything the caller can fix
(415 unsupported type, 413 too large, 422 invalid, 403 not the gateway / no departments / a synced record
outside the caller's departments, 400 a LoRA record pushed, 404), 502/503
when the model server or Milvus fails; a 500 means a bug.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.common.asgi import limit_receive
from runtime.common.embeddings import EmbeddingError
from runtime.common.identity import Identity, NotAnIdentity, identity_from_certificate
from runtime.common.ingest import DOC_ID_PATTERN, DocumentTooLarge, IngestError, UnsupportedDocumentType
from runtime.common.llm_client import LlmError, LlmUnavailable
from runtime.common.replica import LoraNotShareable, SyncError, SyncFormatError
from runtime.common.tls import peer_certificate
from runtime.core.rag import Generation
from runtime.core.retrieval import SearchHit, SearchMode
from runtime.core.service import CoreService
from runtime.core.settings import CoreSettings
from runtime.core.store import DEPARTMENT_PATTERN, DocumentNotFound, InvalidDepartment, StoreError
from runtime.core.sync_hub import SyncForbidden

log = logging.getLogger("membria.core")

Department = Annotated[str, Field(pattern=DEPARTMENT_PATTERN)]
_MULTIPART_SLACK = 64 * 1024  # boundaries and the small form fields around the file
# The upload route parses its form itself (after the gateway check), so describe the body by hand.
_UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "department"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "TXT, Markdown or PDF"},
                        "department": {"type": "string", "pattern": DEPARTMENT_PATTERN},
                        "doc_id": {"type": "string", "pattern": DOC_ID_PATTERN},
                        "title": {"type": "string", "maxLength": 1000},
                    },
                }
            }
        },
    }
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


# -- request and response models ---------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Strict):
    query: str = Field(min_length=1)
    departments: list[Department]
    top_k: int | None = Field(default=None, ge=1)
    mode: SearchMode = "hybrid"


class RagRequest(_Strict):
    question: str = Field(min_length=1)
    departments: list[Department]
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stream: bool = False


class EmbeddingsRequest(_Strict):
    input: str | list[str]
    model: str | None = None  # accepted for OpenAI compatibility; there is one model
    encoding_format: Literal["float"] = "float"


class SyncPushRequest(_Strict):
    """runtime/edge/DESIGN.md "Wire", plus `departments`: the caller's whole sync scope, set by the gateway.
    Records and the clock are checked field by field by the hub (precise messages), not here."""

    replica: str
    records: list[Any]
    clock: dict[str, Any]
    departments: list[Department]


class SyncPullRequest(_Strict):
    replica: str
    clock: dict[str, Any]
    departments: list[Department]  # the subscription (the gateway keeps it inside the caller's scope)
    topics: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = None
    max_patch_bytes: int | None = Field(default=None, ge=0)  # capped by the server's sync_max_patch_bytes


class IngestResponse(BaseModel):
    department: str
    doc_id: str
    version: int
    previous_version: int | None
    title: str
    chunks: int
    unchanged_chunks: int
    removed_chunks: int
    changed: bool


class SearchResponse(BaseModel):
    results: list[SearchHit]  # the retriever's own record, serialized as is
    departments: list[str]
    mode: SearchMode


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RagResponse(BaseModel):
    answer: str
    sources: list[SearchHit]
    cached: bool
    model: str
    finish_reason: str | None
    usage: Usage


# -- the gateway check ----------------------------------------------------------------------------------


def _settings(request: Request) -> CoreSettings:
    settings: CoreSettings = request.app.state.settings
    return settings


def _service(request: Request) -> CoreService:
    service: CoreService = request.app.state.service
    return service


def require_gateway(request: Request) -> Identity | None:
    """403 unless the TLS peer is the gateway (a service certificate with the gateway's CN)."""
    settings = _settings(request)
    if not settings.require_gateway_peer:
        return None
    try:
        cert = peer_certificate(request.scope)
    except ValueError:
        cert = None
    if cert is None:
        raise ApiError(403, "forbidden", "the core server answers only the gateway: no client certificate")
    try:
        identity = identity_from_certificate(cert)
    except NotAnIdentity as exc:
        raise ApiError(403, "forbidden", f"the client certificate is not a site identity: {exc}") from exc
    if identity.kind != "service" or not identity.subject.startswith(settings.gateway_subject_prefix):
        raise ApiError(403, "forbidden", f"{identity.kind} {identity.subject!r} is not the gateway")
    return identity


def _departments(departments: list[str]) -> list[str]:
    if not departments:
        raise ApiError(403, "no_departments", "no departments given: nothing is searchable")
    return sorted(set(departments))


# -- the app --------------------------------------------------------------------------------------------


def create_app(settings: CoreSettings, *, service: CoreService | None = None) -> FastAPI:
    """The core server. `service` may be passed in (tests sharing one); otherwise it is built from
    `settings` and closed at shutdown."""
    own_service = service is None
    core = service or CoreService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if own_service:
                core.close()

    app = FastAPI(title="Membria core server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.service = core
    _install_error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = core.readiness()
        ready = all(c.ok for c in checks.values())
        body = {"status": "ready" if ready else "not_ready", "checks": {k: c.to_dict() for k, c in checks.items()}}
        return JSONResponse(body, status_code=200 if ready else 503)

    internal = APIRouter(prefix="/internal", dependencies=[Depends(require_gateway)])

    @internal.post("/documents", response_model=IngestResponse, openapi_extra=_UPLOAD_OPENAPI)
    async def upload_document(request: Request) -> IngestResponse:
        # The form is parsed here, after the gateway check, through a receive that stops at the limit.
        limit = settings.max_upload_bytes + _MULTIPART_SLACK
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise DocumentTooLarge(f"upload of {declared} bytes; the limit is {settings.max_upload_bytes}")
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(415, "unsupported_media_type", "upload the document as multipart/form-data")
        too_large = DocumentTooLarge(f"the upload is larger than the limit of {limit} bytes")
        limited = Request(request.scope, receive=limit_receive(request.receive, limit, lambda: too_large))
        try:
            form = await limited.form(max_files=1, max_fields=8)
        except DocumentTooLarge:
            raise
        except Exception as exc:
            raise ApiError(400, "bad_multipart", f"cannot parse the multipart body: {exc}") from exc
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "invalid_request", "form field 'file' (the document) is required")
            department = _form_text(form.get("department"), "department", required=True)
            doc_id = _form_text(form.get("doc_id"), "doc_id")
            title = _form_text(form.get("title"), "title")
            if department is None:
                raise ApiError(422, "invalid_request", "form field 'department' is required")
            data = await upload.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise DocumentTooLarge(
                    f"{upload.filename!r} is larger than the limit of {settings.max_upload_bytes} bytes"
                )
            filename = upload.filename or ""
            result = await run_in_threadpool(
                core.ingest_file,
                department,
                filename,
                data,
                doc_id=doc_id,
                title=title,
                content_type=upload.content_type,
            )
        finally:
            await form.close()
        return IngestResponse(**result.__dict__)

    @internal.get("/documents")
    def list_documents(department: Annotated[str, Query(pattern=DEPARTMENT_PATTERN)]) -> dict[str, Any]:
        docs = core.list_documents(department)
        return {"department": department, "documents": [d.__dict__ for d in docs]}

    @internal.delete("/documents/{department}/{doc_id}")
    def delete_document(department: str, doc_id: str) -> dict[str, Any]:
        deleted, invalidated = core.delete_document(department, doc_id)
        return {
            "department": department,
            "doc_id": doc_id,
            "deleted_chunks": deleted,
            "invalidated_answers": invalidated,
        }

    @internal.post("/search", response_model=SearchResponse)
    def search(body: SearchRequest) -> SearchResponse:
        departments = _departments(body.departments)
        _check_query(body.query, "query", settings)
        top_k = min(body.top_k or settings.default_top_k, settings.max_top_k)
        hits = core.search(body.query, departments, top_k=top_k, mode=body.mode)
        return SearchResponse(results=list(hits), departments=departments, mode=body.mode)

    @internal.post("/rag", response_model=None)
    def rag(body: RagRequest) -> RagResponse | StreamingResponse:
        departments = _departments(body.departments)
        _check_query(body.question, "question", settings)
        if body.max_tokens > settings.max_answer_tokens:
            raise ApiError(422, "invalid_request", f"max_tokens must be at most {settings.max_answer_tokens}")
        generation = Generation(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p)
        top_k = min(body.top_k, settings.max_top_k) if body.top_k else None
        if body.stream:
            events = core.rag.stream(body.question, departments, generation, top_k=top_k)
            return StreamingResponse(
                _sse(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        answer = core.rag.answer(body.question, departments, generation, top_k=top_k)
        return RagResponse(
            answer=answer.answer,
            sources=list(answer.sources),
            cached=answer.cached,
            model=answer.model,
            finish_reason=answer.finish_reason,
            usage=Usage(
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                total_tokens=answer.prompt_tokens + answer.completion_tokens,
            ),
        )

    @internal.post("/embeddings")
    def embeddings(body: EmbeddingsRequest) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ApiError(422, "invalid_request", "input must not be empty")
        if len(texts) > settings.max_embedding_inputs:
            raise ApiError(413, "too_large", f"at most {settings.max_embedding_inputs} inputs per request")
        for index, text in enumerate(texts):
            if not text.strip():
                raise ApiError(422, "invalid_request", f"input[{index}] is empty")
            if len(text) > settings.max_embedding_input_chars:
                raise ApiError(
                    413, "too_large", f"input[{index}] is longer than {settings.max_embedding_input_chars} characters"
                )
        vectors, tokens = core.embed(texts)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": core.embedder.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @internal.post("/sync/push")
    async def sync_push(request: Request) -> Response:
        # Read under a limit (a push can be large), then validate: the body is not parsed by FastAPI.
        limit = settings.sync_max_push_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "too_large", f"push of {declared} bytes; the limit is {limit}")
        too_large = ApiError(413, "too_large", f"the push is larger than the limit of {limit} bytes")
        limited = Request(request.scope, receive=limit_receive(request.receive, limit, lambda: too_large))
        raw = await limited.body()
        try:
            body = SyncPushRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
        result = await run_in_threadpool(core.sync_hub.push, body.replica, body.records, body.clock, body.departments)
        return JSONResponse(result.to_wire())

    @internal.post("/sync/pull")
    def sync_pull(body: SyncPullRequest) -> Response:
        payload = core.sync_hub.pull(body.replica, body.clock, body.departments, body.topics, body.max_patch_bytes)
        # Encoded here rather than by FastAPI: the records' payloads are already JSON.
        return Response(payload.encode(), media_type="application/json")

    app.include_router(internal)
    return app


def _form_text(value: Any, name: str, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise ApiError(422, "invalid_request", f"form field {name!r} is required")
        return None
    if not isinstance(value, str):
        raise ApiError(422, "invalid_request", f"form field {name!r} must be text")
    text: str = value.strip()
    if not text:
        if required:
            raise ApiError(422, "invalid_request", f"form field {name!r} must not be empty")
        return None
    if len(text) > 1000:
        raise ApiError(422, "invalid_request", f"form field {name!r} is too long")
    if name == "doc_id" and not re.fullmatch(DOC_ID_PATTERN, text):
        raise ApiError(422, "invalid_request", f"doc_id must match {DOC_ID_PATTERN}")
    return text


def _check_query(text: str, field: str, settings: CoreSettings) -> None:
    if not text.strip():
        raise ApiError(422, "invalid_request", f"{field} must not be blank")
    if len(text) > settings.max_query_chars:
        raise ApiError(413, "too_large", f"{field} is longer than {settings.max_query_chars} characters")


def _sse(events: Iterator[dict[str, Any]]) -> Iterator[str]:
    for event in events:
        yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def _install_error_handlers(app: FastAPI) -> None:
    def handler(status: int, code: str) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        async def handle(_: Request, exc: Exception) -> JSONResponse:
            return _error(status, code, str(exc))

        return handle

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.code, exc.message)

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg')}" for d in details)
        return _error(422, "invalid_request", summary or "invalid request", details=jsonable_encoder(details))

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return _error(exc.status_code, "http_error", str(exc.detail))

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("dependency unavailable: %s", exc)
        return _error(503, "unavailable", str(exc))

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error(500, "internal_error", "internal error; see the core server's log")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(UnsupportedDocumentType, handler(415, "unsupported_document_type"))
    app.add_exception_handler(DocumentTooLarge, handler(413, "too_large"))
    app.add_exception_handler(IngestError, handler(422, "unprocessable_document"))
    app.add_exception_handler(InvalidDepartment, handler(422, "invalid_department"))
    app.add_exception_handler(DocumentNotFound, handler(404, "not_found"))
    app.add_exception_handler(SyncFormatError, handler(422, "invalid_sync_data"))
    app.add_exception_handler(SyncForbidden, handler(403, "forbidden"))
    app.add_exception_handler(LoraNotShareable, handler(400, "lora_refused"))
    app.add_exception_handler(SyncError, handler(422, "sync_error"))
    app.add_exception_handler(LlmUnavailable, unavailable)
    app.add_exception_handler(LlmError, handler(502, "llm_error"))
    app.add_exception_handler(StoreError, unavailable)
    app.add_exception_handler(EmbeddingError, unavailable)
    app.add_exception_handler(Exception, unexpected)
