"""`appliance audit-log verify`: check the gateway's hash-chained audit log in the site's audit DB.

In production the audit DB is a ClickHouse server and verify simply reads it. In the lab it is chDB, which
one process at a time may open (see `runtime.common.audit`): the gateway's writer opens it only for each
batch, so verify waits until the engine is free, takes it for the length of the read (the gateway keeps
its rows in memory meanwhile and retries), and gives it back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.backends import Backends
from appliance.errors import CheckFailed, ServiceError
from runtime.common.audit import (
    DEFAULT_TABLE,
    AuditDbBusy,
    Head,
    VerifyResult,
    chdb_engine_holder,
    is_engine_lock_error,
    quote_table,
    table_exists,
    verify_chain,
)

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


def open_audit_db(backends: Backends, *, wait_s: float = 30.0) -> Client:
    """A client on the site's audit DB. For chDB, wait up to `wait_s` for another process to release it."""
    if backends.site.services.audit_db.backend != "embedded":
        try:
            return backends.audit_db()
        except Exception as exc:
            raise ServiceError(f"cannot reach the audit DB: {type(exc).__name__}: {exc}") from exc
    path = backends.chdb_path()
    if not (path / "metadata").is_dir():
        raise CheckFailed(
            f"there is no embedded audit DB at {path}",
            hint="the gateway creates it with its first request; check --site/--state-dir",
        )
    deadline = time.monotonic() + wait_s
    holder: int | None = None
    while True:
        holder = chdb_engine_holder(path)
        if holder is None:
            try:
                return backends.audit_db()
            except AuditDbBusy as exc:  # taken between the probe and the open
                holder = exc.pid
            except Exception as exc:
                if not is_engine_lock_error(exc):
                    raise ServiceError(f"cannot open the embedded audit DB at {path}: {exc}") from exc
        if time.monotonic() >= deadline:
            who = f"process {holder}" if holder else "another process"
            raise ServiceError(
                f"the embedded audit DB at {path} is held by {who} for more than {wait_s:g} s",
                hint="chDB admits one process at a time; the gateway only holds it while writing a batch. "
                "Retry, or raise --wait.",
            )
        time.sleep(0.1)


def verify(
    backends: Backends,
    *,
    table: str = DEFAULT_TABLE,
    expected_head: Head | None = None,
    wait_s: float = 30.0,
    progress: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Verify the chain in `table`; a missing table is a failed check (nothing was ever audited there)."""
    quote_table(table)
    client = open_audit_db(backends, wait_s=wait_s)
    try:
        if not table_exists(client, table):
            raise CheckFailed(
                f"the audit DB has no table {table}", hint="the gateway creates it with its first request"
            )
        return verify_chain(client, table, expected_head=expected_head, progress=progress)
    finally:
        client.close()
