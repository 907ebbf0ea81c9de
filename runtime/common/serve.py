"""Run a uvicorn server so that SIGINT/SIGTERM end in a clean exit that runs the caller's `finally` blocks.

uvicorn drains on the first signal (stops accepting, lets requests finish, runs the lifespan shutdown) and
then raises the same signal again. With the default handlers that second signal kills the process before
the service has flushed its queues (the gateway's audit rows, the edge agent's outbox); here it becomes a
return from `serve`.
"""

from __future__ import annotations

import signal

import uvicorn


def _stopped(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def serve(config: uvicorn.Config) -> None:
    """Serve until stopped by a signal; return normally once uvicorn has shut down."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stopped)
    try:
        uvicorn.Server(config).run()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
