"""`python -m runtime.gateway --config gateway.json`: check the license, then serve with mTLS.

Refuses to start (exit 2 for bad input, 1 for an invalid license, 3 for a missing secret) with one clear
line on stderr: a missing, tampered or expired license never gets as far as opening the port.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from runtime.common.license import LicenseError, SeatLedger, verify_license
from runtime.common.rbac import load_policy
from runtime.common.serve import serve
from runtime.common.tls import uvicorn_tls_kwargs
from runtime.common.yamldoc import InvalidFile
from runtime.gateway.app import GatewayDeps, create_app
from runtime.gateway.audit_writer import AuditWriter
from runtime.gateway.settings import GatewaySettings


def _fail(message: str, code: int) -> int:
    print(f"gateway: refusing to start: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.gateway", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="gateway settings (JSON)")
    args = parser.parse_args(argv)
    try:
        settings = GatewaySettings.model_validate_json(args.config.read_text())
    except OSError as exc:
        return _fail(f"cannot read {args.config}: {exc.strerror}", 2)
    except ValidationError as exc:
        return _fail(f"{args.config}: {exc.error_count()} error(s): {exc.errors()[0]['msg']}", 2)
    try:
        lic = verify_license(settings.license_file, settings.license_public_key)
    except LicenseError as exc:
        return _fail(exc.message, exc.exit_code)
    try:
        policy = load_policy(settings.rbac_policy)
    except InvalidFile as exc:
        return _fail(exc.message, 2)
    key_hex = os.environ.get(settings.audit.hmac_key_env, "")
    try:
        pseudonym_key = bytes.fromhex(key_hex)
    except ValueError:
        pseudonym_key = b""
    if len(pseudonym_key) < 16:
        return _fail(f"the audit pseudonymization key is missing from ${settings.audit.hmac_key_env}", 3)
    password = os.environ.get(settings.audit.password_env, "") if settings.audit.password_env else ""

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    seats = SeatLedger(settings.state_dir / "seats.sqlite", lic.seats)
    writer = AuditWriter.for_dsn(
        settings.audit.dsn, pseudonym_key=pseudonym_key, password=password, table=settings.audit.table
    ).start()
    try:
        app = create_app(GatewayDeps(settings, policy, lic, seats, writer.submit, writer.has_capacity))
        # CERT_OPTIONAL when a route has another credential (service tokens, enrollment tokens); every other
        # route still refuses a request that brings neither (app.authenticate).
        optional = settings.service_token_public_key is not None or settings.enrollment is not None
        tls = uvicorn_tls_kwargs(settings.tls.files(), require_client_cert=not optional)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10, **tls
        )
        serve(config)  # returns on SIGTERM, so `finally` flushes the audit queue
    finally:
        writer.close()  # graceful shutdown: every accepted request's audit row is written
        seats.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
