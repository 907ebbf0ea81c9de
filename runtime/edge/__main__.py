"""`python -m runtime.edge --config edge.json`: the edge agent and its local API.

Loads the local model, precomputes the pinned knowledge, starts the outbox and sync loops, then serves the
local API on 127.0.0.1 (or a unix socket, mode 0600). SIGTERM/SIGINT stop accepting requests, let the one in
hand finish, flush the outbox worker and close the SQLite file. Exit codes: 0 stopped cleanly, 2 bad
configuration, 3 a missing file (model, certificate, taxonomy).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from runtime.common.serve import serve
from runtime.common.yamldoc import InvalidFile
from runtime.edge.settings import EdgeSettings


def _fail(message: str, code: int) -> int:
    print(f"edge agent: refusing to start: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.edge", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="edge agent settings (JSON)")
    args = parser.parse_args(argv)
    try:
        settings = EdgeSettings.model_validate_json(args.config.read_text())
    except OSError as exc:
        return _fail(f"cannot read {args.config}: {exc.strerror}", 3)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return _fail(f"{args.config}: {exc.error_count()} error(s), first at {where}: {first['msg']}", 2)
    for what, path in (
        ("model", settings.model.path),
        ("device certificate", settings.tls.cert),
        ("device key", settings.tls.key),
        ("CA chain", settings.tls.ca),
        ("taxonomy", settings.routing.taxonomy_file),
    ):
        if not path.is_file():
            return _fail(f"the {what} file {path} does not exist", 3)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from runtime.edge.agent import EdgeAgent  # heavy imports (torch, llama.cpp) after the cheap checks
    from runtime.edge.app import create_app

    try:
        agent = EdgeAgent(settings).start()
    except InvalidFile as exc:
        return _fail(exc.message, 2)
    try:
        app = create_app(agent)
        if settings.unix_socket is not None:
            sock = _private_socket(settings.unix_socket)  # kept referenced: uvicorn only gets its descriptor
            config = uvicorn.Config(app, fd=sock.fileno(), log_level="info", timeout_graceful_shutdown=10)
            try:
                serve(config)
            finally:
                sock.close()
                settings.unix_socket.unlink(missing_ok=True)
        else:
            config = uvicorn.Config(
                app, host=settings.host, port=settings.port or 8450, log_level="info", timeout_graceful_shutdown=10
            )
            serve(config)
    finally:
        agent.stop()  # reached on SIGTERM too: the outbox worker flushes, SQLite closes
    return 0


def _private_socket(path: Path) -> socket.socket:
    """A unix socket only its owner may connect to. uvicorn's own `uds=` makes it 0666 after binding, which
    would let any local user talk to this laptop user's agent; bound here, it is 0600 before it listens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    return sock


if __name__ == "__main__":
    sys.exit(main())
