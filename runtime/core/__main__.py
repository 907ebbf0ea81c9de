"""`python -m runtime.core --config core.json`: the core server under uvicorn, mTLS only.

The JSON file holds the `CoreSettings` fields plus where to listen and the TLS files:

    {"host": "10.77.0.11", "port": 8443,
     "tls": {"cert": "core.pem", "key": "core.key", "ca": "site-ca.pem"},
     "milvus_uri": "/var/lib/membria/milvus.db", "cache_path": "/var/lib/membria/cache.db",
     "llm": {"base_url": "http://127.0.0.1:8081/v1", "model": "gemma-3-270m-q4_k_m"}}

Secrets (the Milvus token, the LLM API key) may be given as environment variables instead of in the
file: MEMBRIA_MILVUS_TOKEN, MEMBRIA_LLM_API_KEY. SIGTERM / SIGINT stop accepting connections, let
in-flight requests finish (up to `graceful_shutdown_s`), then close Milvus, the cache and the LLM client.
Exit codes: 0 stopped cleanly, 2 bad configuration, 3 missing files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.common.serve import serve
from runtime.common.tls import TlsFiles, uvicorn_tls_kwargs
from runtime.core.settings import CoreSettings


class TlsPaths(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert: Path
    key: Path
    ca: Path


class CoreServerConfig(CoreSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=1, le=65535)
    tls: TlsPaths
    graceful_shutdown_s: float = Field(default=20.0, gt=0)
    log_level: str = Field(default="info", pattern=r"^(critical|error|warning|info|debug)$")


def load_config(path: Path) -> CoreServerConfig:
    try:
        data: Any = json.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(_fail(3, f"{path}: cannot read: {exc.strerror}")) from None
    except ValueError as exc:
        raise SystemExit(_fail(2, f"{path}: not JSON: {exc}")) from None
    if not isinstance(data, dict):
        raise SystemExit(_fail(2, f"{path}: the top level must be an object"))
    if os.environ.get("MEMBRIA_MILVUS_TOKEN") and "milvus_token" not in data:
        data["milvus_token"] = os.environ["MEMBRIA_MILVUS_TOKEN"]
    if os.environ.get("MEMBRIA_LLM_API_KEY") and isinstance(data.get("llm"), dict) and "api_key" not in data["llm"]:
        data["llm"]["api_key"] = os.environ["MEMBRIA_LLM_API_KEY"]
    base = path.resolve().parent
    try:
        config = CoreServerConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise SystemExit(_fail(2, "\n".join(lines))) from None
    # Relative paths are relative to the config file, not to wherever the service was started.
    tls = TlsPaths(cert=base / config.tls.cert, key=base / config.tls.key, ca=base / config.tls.ca)
    updates: dict[str, Any] = {"tls": tls, "cache_path": base / config.cache_path}
    if config.milvus_is_lite:
        updates["milvus_uri"] = str(base / Path(config.milvus_uri).expanduser())
    config = config.model_copy(update=updates)
    missing = [str(p) for p in (tls.cert, tls.key, tls.ca) if not p.is_file()]
    if missing:
        raise SystemExit(_fail(3, f"{path}: TLS files missing: {', '.join(missing)}"))
    return config


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.core", description="Membria core server (mTLS)")
    parser.add_argument("--config", required=True, type=Path, help="JSON settings file")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from runtime.core.app import create_app

    app = create_app(config)
    server_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=int(config.graceful_shutdown_s),
        lifespan="on",
        **uvicorn_tls_kwargs(TlsFiles(cert=config.tls.cert, key=config.tls.key, ca=config.tls.ca)),
    )
    serve(server_config)  # drains, runs the lifespan shutdown, then returns on SIGINT/SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
