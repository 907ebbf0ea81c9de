"""The edge agent's local API and chat page, on 127.0.0.1 or a unix socket only.

It has no login of its own: it is the laptop user's agent, reachable only from the laptop. Browsers are
kept out of other sites' reach by a Host check (DNS rebinding) and by refusing cross-origin writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import psutil
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from runtime.common.ingest import IngestError
from runtime.edge.agent import EdgeAgent, Sampling, SyncRefused
from runtime.edge.transport import GatewayUnreachable

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
_LOCAL_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1", "edge.local"]


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=8000)
    conversation_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1024)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    share: bool = False
    use_cache: bool = True
    wait_seconds: float | None = Field(default=None, ge=0, le=300)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(agent: EdgeAgent) -> FastAPI:
    app = FastAPI(title="Membria edge agent", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=_LOCAL_HOSTS)

    @app.middleware("http")
    async def same_origin_writes(request: Request, call_next: Any) -> Any:
        # A page on another site may POST to 127.0.0.1 from the user's browser: refuse cross-origin writes.
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin is not None:
            host = request.headers.get("host", "")
            if origin not in (f"http://{host}", f"https://{host}"):
                return _error(403, "cross_origin", "cross-origin requests are refused")
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return agent.status()

    @app.get("/api/monitor")
    def monitor() -> dict[str, Any]:
        memory = psutil.virtual_memory()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "ram_used_bytes": memory.total - memory.available,
            "ram_total_bytes": memory.total,
            "agent_rss_bytes": psutil.Process().memory_info().rss,
        }

    @app.post("/api/ask")
    def ask(body: AskRequest) -> Any:
        if body.model is not None and body.model != agent.settings.model.name:  # one model per laptop
            return _error(422, "unknown_model", f"model '{body.model}' is not on this device")
        try:
            answer = agent.ask(
                body.question,
                conversation_id=body.conversation_id,
                sampling=Sampling(body.temperature, body.top_p, body.max_tokens, body.presence_penalty),
                share=body.share,
                use_cache=body.use_cache,
                wait_seconds=body.wait_seconds,
            )
        except ValueError as exc:
            return _error(422, "invalid_request", str(exc))
        return answer.to_json()

    @app.get("/api/escalations/{escalation_id}")
    def escalation(escalation_id: str) -> Any:
        try:
            return agent.escalation(escalation_id)
        except KeyError:
            return _error(404, "not_found", f"no escalation {escalation_id}")

    @app.get("/api/decisions")
    def decisions(limit: int = 50) -> list[dict[str, Any]]:
        return agent.decisions(min(max(limit, 1), 500))

    @app.post("/api/documents")
    async def upload(
        file: Annotated[UploadFile, File()],
        department: Annotated[str | None, Form()] = None,
        local_only: Annotated[bool, Form()] = False,
    ) -> Any:
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return _error(413, "too_large", f"documents are limited to {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        labels = list(agent.settings.routing.local_only_labels[:1]) if local_only else []
        try:
            return agent.add_document(file.filename or "upload.txt", data, department=department, labels=labels)
        except IngestError as exc:
            return _error(422, "bad_document", str(exc))
        except ValueError as exc:
            return _error(422, "invalid_request", str(exc))

    @app.post("/api/sync")
    def sync() -> Any:
        try:
            return agent.sync_now().to_json()
        except GatewayUnreachable as exc:
            return _error(503, "gateway_unreachable", str(exc))
        except SyncRefused as exc:
            return _error(502, "sync_refused", str(exc))

    return app
