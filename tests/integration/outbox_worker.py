"""Delivers an outbox file through the gateway, as the edge agent's worker does, until nothing is pending;
the kill -9 tests in test_edge_outbox.py run it as a process of its own and kill it.

    python tests/integration/outbox_worker.py --db edge.sqlite --endpoint https://... --cert c --key k --ca ca
        [--die-after-post N]

`--die-after-post N` SIGKILLs this process right after the N-th POST of this run got its answer and before
the outbox records it: the exact window where a crash must neither lose nor duplicate the item.
Exit 0 once every item is delivered or rejected.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from runtime.common.tls import TlsFiles  # noqa: E402 - after the path set-up, as a script
from runtime.edge.outbox import Outbox, OutboxWorker  # noqa: E402
from runtime.edge.transport import GatewayResponse, GatewayTransport  # noqa: E402


class DyingTransport(GatewayTransport):
    """The real transport, and a SIGKILL of this process once `die_after` answers have come back."""

    def __init__(self, *args: Any, die_after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.die_after = die_after
        self.answers = 0

    def post_json(self, path: str, body: Any, *, idempotency_key: str | None = None) -> GatewayResponse:
        response = super().post_json(path, body, idempotency_key=idempotency_key)
        self.answers += 1
        if self.answers == self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return response


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--endpoint", action="append", required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--die-after-post", type=int, default=0)
    args = parser.parse_args()
    tls = TlsFiles(cert=args.cert, key=args.key, ca=args.ca)
    options: dict[str, Any] = {"timeout": 120, "retries_per_endpoint": 3, "backoff_base": 0.1, "backoff_max": 0.5}
    transport = (
        DyingTransport(args.endpoint, tls, die_after=args.die_after_post, **options)
        if args.die_after_post
        else GatewayTransport(args.endpoint, tls, **options)
    )
    outbox = Outbox(args.db, backoff_base=0.1, backoff_max=0.5)
    worker = OutboxWorker(outbox, transport, idle_seconds=0.5).start()
    while outbox.pending():
        time.sleep(0.05)
    worker.stop()
    outbox.close()
    transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
