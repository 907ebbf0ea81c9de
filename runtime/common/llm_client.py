"""One OpenAI-compatible client for every model server the runtime talks to.

The same code calls llama.cpp's server in the lab and on edge laptops and vLLM on the core node: only
`LlmConfig.base_url` (the `/v1` root) and `model` change. Two prompt styles exist because the lab's
Gemma 3 270M is a *base* model: it continues text (`/v1/completions`) and has no chat template worth
using, while production instruction-tuned models are asked through `/v1/chat/completions`.
`generate()` / `stream_generate()` pick the endpoint from `prompt_style`; `complete()` and `chat()` are
the explicit calls.

Errors are two exception types carrying the HTTP status (None when no response came) and a short
message taken from the server's error body:

- `LlmUnavailable`: nothing usable answered (connection refused, timeout, 502/503/504): retry later or
  elsewhere;
- `LlmError`: the server answered and refused or failed (other 4xx/5xx, a malformed body).

The API key is a `SecretStr`: it goes into the Authorization header and nowhere else (not into
`repr`, exceptions or logs).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

PromptStyle = Literal["completion", "chat"]
Message = dict[str, str]

_UNAVAILABLE_STATUSES = frozenset({502, 503, 504})
_MESSAGE_LIMIT = 300


class LlmConfig(BaseModel):
    """Where the model server is and how to prompt it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(min_length=1, description="the OpenAI-compatible root, e.g. http://127.0.0.1:8081/v1")
    model: str = Field(min_length=1, description="model id (llama.cpp: --model_alias; vLLM: served model name)")
    api_key: SecretStr | None = None
    prompt_style: PromptStyle = "completion"
    timeout_s: float = Field(default=120.0, gt=0, description="read timeout for a whole (non-streamed) answer")
    connect_timeout_s: float = Field(default=5.0, gt=0)


class LlmClientError(Exception):
    """Base of the client's errors: `status` is the HTTP status, or None when no response came."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})" if self.status is not None else self.message


class LlmUnavailable(LlmClientError):
    """The model server could not be reached or is not serving right now."""


class LlmError(LlmClientError):
    """The model server answered with an error or with something that is not a valid answer."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    token_logprobs: list[float] | None = None
    tokens: list[str] | None = field(default=None, repr=False)

    @property
    def mean_logprob(self) -> float | None:
        """Mean token log-probability (a confidence signal), when logprobs were asked for."""
        if not self.token_logprobs:
            return None
        return sum(self.token_logprobs) / len(self.token_logprobs)


# -- request and response shapes -------------------------------------------------------------------------


def _sampling(
    max_tokens: int, temperature: float, top_p: float, stop: Sequence[str] | None, stream: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stream": stream}
    if stop:
        body["stop"] = list(stop)
    return body


def _completion_body(
    config: LlmConfig,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: Sequence[str] | None,
    logprobs: int | None,
    stream: bool,
) -> dict[str, Any]:
    body = {"model": config.model, "prompt": prompt, **_sampling(max_tokens, temperature, top_p, stop, stream)}
    if logprobs is not None:
        body["logprobs"] = logprobs
    return body


def _chat_body(
    config: LlmConfig,
    messages: Sequence[Message],
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: Sequence[str] | None,
    logprobs: bool,
    stream: bool,
) -> dict[str, Any]:
    body = {
        "model": config.model,
        "messages": list(messages),
        **_sampling(max_tokens, temperature, top_p, stop, stream),
    }
    if logprobs:
        body["logprobs"] = True
    return body


def _as_messages(prompt: str, system: str | None) -> list[Message]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


def _headers(config: LlmConfig) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if config.api_key is not None and config.api_key.get_secret_value():
        headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
    return headers


def _timeout(config: LlmConfig) -> httpx.Timeout:
    return httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"


def _error_message(body: bytes) -> str:
    """The server's own words from an error body (OpenAI `{"error": {"message"}}`, FastAPI `detail`)."""
    try:
        data = json.loads(body)
    except ValueError:
        return _short(body.decode("utf-8", "replace")) or "empty error body"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _short(str(error["message"]))
        if isinstance(error, str):
            return _short(error)
        if "detail" in data:
            return _short(json.dumps(data["detail"]) if not isinstance(data["detail"], str) else data["detail"])
    return _short(json.dumps(data))


def _raise_for_status(status: int, body: bytes, what: str) -> None:
    if status < 400:
        return
    message = f"{what}: {_error_message(body)}"
    if status in _UNAVAILABLE_STATUSES:
        raise LlmUnavailable(message, status)
    raise LlmError(message, status)


def _transport_error(exc: httpx.HTTPError, what: str) -> LlmClientError:
    if isinstance(exc, httpx.TimeoutException):
        return LlmUnavailable(f"{what}: timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.TransportError):
        return LlmUnavailable(f"{what}: cannot reach the model server ({type(exc).__name__}: {_short(str(exc))})")
    return LlmError(f"{what}: {type(exc).__name__}: {_short(str(exc))}")


def _first_choice(data: Any, what: str) -> dict[str, Any]:
    if isinstance(data, dict) and isinstance(data.get("error"), dict | str):
        raise LlmError(f"{what}: {_error_message(json.dumps(data).encode())}")
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LlmError(f"{what}: the answer has no choices")
    choice: dict[str, Any] = choices[0]
    return choice


def _logprobs(choice: dict[str, Any]) -> tuple[list[float] | None, list[str] | None]:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None, None
    if isinstance(lp.get("token_logprobs"), list):  # /v1/completions
        values = [float(v) for v in lp["token_logprobs"] if v is not None]
        tokens = [str(t) for t in lp.get("tokens") or []]
        return values, tokens or None
    if isinstance(lp.get("content"), list):  # /v1/chat/completions
        items = [i for i in lp["content"] if isinstance(i, dict) and i.get("logprob") is not None]
        return [float(i["logprob"]) for i in items], [str(i.get("token", "")) for i in items]
    return None, None


def _parse_answer(data: Any, config: LlmConfig, chat: bool, what: str) -> Completion:
    choice = _first_choice(data, what)
    if chat:
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        text = choice.get("text")
    if text is None and choice.get("finish_reason"):
        text = ""  # e.g. a chat answer that stopped at once
    if not isinstance(text, str):
        raise LlmError(f"{what}: the answer has no text")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    values, tokens = _logprobs(choice)
    return Completion(
        text=text,
        finish_reason=choice.get("finish_reason"),
        model=str(data.get("model") or config.model),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        token_logprobs=values,
        tokens=tokens,
    )


def _json(response_body: bytes, what: str) -> Any:
    try:
        return json.loads(response_body)
    except ValueError as exc:
        raise LlmError(f"{what}: the answer is not JSON") from exc


def _sse_delta(line: str, chat: bool, what: str) -> str | None:
    """The text delta carried by one SSE line; None for lines that carry none. Raises at `[DONE]`."""
    if not line.startswith("data:"):
        return None  # blank separators, comments (": ping"), `event:` lines
    payload = line[5:].strip()
    if payload == "[DONE]":
        raise _Done
    if not payload:
        return None
    data = _json(payload.encode(), what)
    if isinstance(data, dict) and data.get("choices") == []:
        return None  # a usage-only chunk (vLLM's stream_options.include_usage)
    choice = _first_choice(data, what)
    if chat:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    return text if isinstance(text, str) and text else None


class _Done(Exception):
    pass


# -- the clients -----------------------------------------------------------------------------------------


class LlmClient:
    """Synchronous client; safe to share between threads (httpx.Client is)."""

    def __init__(self, config: LlmConfig, *, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        self._http = httpx.Client(
            base_url=config.base_url.rstrip("/") + "/",
            headers=_headers(config),
            timeout=_timeout(config),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"LlmClient(base_url={self.config.base_url!r}, model={self.config.model!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LlmClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any], what: str) -> Any:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, what) from exc
        _raise_for_status(response.status_code, response.content, what)
        return _json(response.content, what)

    def _stream(self, path: str, body: dict[str, Any], chat: bool, what: str) -> Iterator[str]:
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    _raise_for_status(response.status_code, response.read(), what)
                for line in response.iter_lines():
                    try:
                        delta = _sse_delta(line, chat, what)
                    except _Done:
                        return
                    if delta is not None:
                        yield delta
        except httpx.HTTPError as exc:
            raise _transport_error(exc, what) from exc
        raise LlmUnavailable(f"{what}: the stream ended without [DONE]")

    def models(self) -> list[str]:
        """The model ids the server serves (a cheap readiness probe)."""
        what = "GET /models"
        try:
            response = self._http.get("models", timeout=httpx.Timeout(10.0, connect=self.config.connect_timeout_s))
        except httpx.HTTPError as exc:
            raise _transport_error(exc, what) from exc
        _raise_for_status(response.status_code, response.content, what)
        data = _json(response.content, what)
        items = data.get("data") if isinstance(data, dict) else None
        return [str(m.get("id")) for m in items or [] if isinstance(m, dict)]

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.2,
        top_p: float = 0.95,
        stop: Sequence[str] | None = None,
        logprobs: int | None = None,
    ) -> Completion:
        """`/v1/completions`: continue `prompt` (base models). `logprobs=1` adds per-token log-probs."""
        what = "completion"
        body = _completion_body(self.config, prompt, max_tokens, temperature, top_p, stop, logprobs, False)
        return _parse_answer(self._post("completions", body, what), self.config, False, what)

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.2,
        top_p: float = 0.95,
        stop: Sequence[str] | None = None,
        logprobs: bool = False,
    ) -> Completion:
        """`/v1/chat/completions` with `messages` ({"role", "content"} dicts)."""
        what = "chat completion"
        body = _chat_body(self.config, messages, max_tokens, temperature, top_p, stop, logprobs, False)
        return _parse_answer(self._post("chat/completions", body, what), self.config, True, what)

    def stream_complete(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.2,
        top_p: float = 0.95,
        stop: Sequence[str] | None = None,
    ) -> Iterator[str]:
        """Text deltas of a streamed `/v1/completions`."""
        body = _completion_body(self.config, prompt, max_tokens, temperature, top_p, stop, None, True)
        return self._stream("completions", body, False, "streamed completion")

    def stream_chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.2,
        top_p: float = 0.95,
        stop: Sequence[str] | None = None,
    ) -> Iterator[str]:
        """Text deltas of a streamed `/v1/chat/completions`."""
        body = _chat_body(self.config, messages, max_tokens, temperature, top_p, stop, False, True)
        return self._stream("chat/completions", body, True, "streamed chat completion")

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.2,
        top_p: float = 0.95,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        """Ask in the configured prompt style: `prompt` is continued as is ("completion", with `system`
        prepended as plain text) or sent as the user message after an optional system message ("chat")."""
        if self.config.prompt_style == "chat":
            return self.chat(
                _as_messages(prompt, system), max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop
            )
        text = f"{system}\n\n{prompt}" if system else prompt
        return self.complete(text, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop)

    def stream_generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.2,
        top_p: float = 0.95,
        stop: Sequence[str] | None = None,
    ) -> Iterator[str]:
        """`generate()`, streamed as text deltas."""
        if self.config.prompt_style == "chat":
            return self.stream_chat(
                _as_messages(prompt, system), max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop
            )
        text = f"{system}\n\n{prompt}" if system else prompt
        return self.stream_complete(text, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop)
