"""Small ASGI helpers shared by the runtime's HTTP services."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import Message

Receive = Callable[[], Awaitable[Message]]


def limit_receive(receive: Receive, limit: int, too_large: Callable[[], Exception]) -> Receive:
    """Wrap `receive` so the body counts the bytes actually received and raises `too_large()` past `limit`.

    A Content-Length check cannot see a chunked body, which would otherwise be read whatever its size."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large()
        return message

    return limited
