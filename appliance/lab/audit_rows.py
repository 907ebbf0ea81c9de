"""The decisions the audit log holds for some request ids, as JSON: the lab smoke's proof that a request
was audited. Locally for the process lab; on the core node over SSH for `lab.core: host`, where the audit
log lives in the node's gateway data:

    python -m appliance.lab.audit_rows --site /etc/membria/site.yaml --state-dir /var/lib/membria/dr/state ID...

prints {"version": "<ClickHouse version>", "decisions": {"<request id>": "allow" | "deny", ...}}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from appliance.audit_log import open_audit_db
from appliance.backends import Backends


def decisions(backends: Backends, request_ids: list[str], *, wait_s: float = 2) -> dict[str, Any]:
    """Raises CheckFailed/ServiceError while chDB is missing or busy; the caller polls."""
    client = open_audit_db(backends, wait_s=wait_s)
    try:
        version = str(client.query("SELECT version()").result_rows[0][0])
        try:
            rows = client.query(
                "SELECT request_id, decision FROM audit_log WHERE request_id IN {ids:Array(String)}",
                parameters={"ids": request_ids},
            ).result_rows
        except Exception:  # noqa: BLE001 - the table appears with the gateway's first batch
            rows = []
    finally:
        client.close()
    return {"version": version, "decisions": {str(r[0]): str(r[1]) for r in rows}}


def main(argv: list[str] | None = None) -> int:
    from appliance.errors import ApplianceError
    from appliance.lab.state import LabState
    from appliance.site import load_site

    parser = argparse.ArgumentParser(prog="python -m appliance.lab.audit_rows", description=__doc__)
    parser.add_argument("--site", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("request_ids", nargs="*")
    args = parser.parse_args(argv)
    try:
        backends = Backends(load_site(args.site), LabState(args.state_dir.resolve()))
        print(json.dumps(decisions(backends, args.request_ids)))
    except ApplianceError as exc:
        parser.exit(1, f"{exc.message}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
