"""The edge's HTTP client to the gateway: mTLS with the device certificate (TLS 1.3 only), a primary and
secondary endpoints, bounded retries with exponential backoff and jitter.

`post_json` tries the preferred endpoint `retries_per_endpoint` times, then the next one, and so on; when
every endpoint has failed it raises `GatewayUnreachable` naming each of them and the last error. What is
retried: connection failures and timeouts, 5xx answers, 408 and 429 (whose Retry-After is honoured up to
`backoff_max`). Any other answer (2xx, 3xx, 4xx) is the gateway's word and is returned as is: a refusal
does not get better by asking again.

After a failover the endpoint that answered stays preferred for `failback_seconds`, so a queue of items is
not each delayed by the dead primary's retries; then the primary is tried first again.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import httpx

from runtime.common.tls import TlsFiles, client_context

RETRIED_STATUSES = frozenset({408, 429})


class GatewayUnreachable(Exception):
    """No endpoint gave an answer worth returning; `errors` holds each endpoint's last error."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = dict(errors)
        listed = "; ".join(f"{endpoint}: {error}" for endpoint, error in errors.items())
        super().__init__(f"no gateway answered ({listed})")


class GatewayResponse(NamedTuple):
    status: int
    body: Any  # the parsed JSON answer; None when the body is not JSON
    endpoint: str  # which gateway answered


class GatewayTransport:
    def __init__(
        self,
        endpoints: Sequence[str],
        tls: TlsFiles,
        *,
        timeout: float = 30.0,
        retries_per_endpoint: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 5.0,
        failback_seconds: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`retries_per_endpoint`: attempts on each endpoint before the next is tried (at least one)."""
        if not endpoints:
            raise ValueError("at least one gateway endpoint is needed")
        for endpoint in endpoints:
            if not endpoint.startswith("https://"):
                raise ValueError(f"gateway endpoints must be https URLs, not {endpoint!r}")
        if backoff_base <= 0 or backoff_max < backoff_base:
            raise ValueError("backoff_base must be > 0 and backoff_max >= backoff_base")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.attempts_per_endpoint = max(1, retries_per_endpoint)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.failback_seconds = failback_seconds
        self._sleep = sleep
        self._client = httpx.Client(verify=client_context(tls), timeout=timeout)
        self._lock = threading.Lock()
        self._preferred = 0
        self._preferred_since = 0.0

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GatewayTransport:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def post_json(self, path: str, body: Any, *, idempotency_key: str | None = None) -> GatewayResponse:
        """POST `body` as JSON to `path` on the first endpoint that answers; see the module docstring."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        errors: dict[str, str] = {}
        for index in self._order():
            endpoint = self.endpoints[index]
            for attempt in range(self.attempts_per_endpoint):
                try:
                    response = self._client.post(f"{endpoint}{path}", json=body, headers=headers)
                except httpx.TransportError as exc:
                    errors[endpoint] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    wait = self._backoff(attempt)
                else:
                    if response.status_code < 500 and response.status_code not in RETRIED_STATUSES:
                        self._prefer(index)
                        return GatewayResponse(response.status_code, _json(response), endpoint)
                    errors[endpoint] = f"HTTP {response.status_code}{_detail(response)}"
                    wait = max(self._backoff(attempt), self._retry_after(response))
                if attempt + 1 < self.attempts_per_endpoint:  # no wait before moving to the next endpoint
                    self._sleep(min(wait, self.backoff_max))
        raise GatewayUnreachable(errors)

    # -- internals -----------------------------------------------------------------------------------------

    def _order(self) -> list[int]:
        with self._lock:
            if self._preferred and time.monotonic() - self._preferred_since > self.failback_seconds:
                self._preferred = 0  # time to see whether the primary is back
            first = self._preferred
        return [first] + [i for i in range(len(self.endpoints)) if i != first]

    def _prefer(self, index: int) -> None:
        with self._lock:
            if index != self._preferred:
                self._preferred = index
                self._preferred_since = time.monotonic()

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter (half fixed, half random) so clients that failed together spread."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not a secret

    def _retry_after(self, response: httpx.Response) -> float:
        value = response.headers.get("retry-after", "").strip()
        if not value:
            return 0.0
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 0.0
        return max(0.0, float(when.timestamp()) - time.time())


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(response: httpx.Response) -> str:
    body = _json(response)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f" ({body['error'].get('message', '')})"[:300]
    return ""
