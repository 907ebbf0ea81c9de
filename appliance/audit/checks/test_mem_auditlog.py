"""MEM-AUDITLOG-CHAIN: the gateway's hash-chained audit log verifies row by row (`appliance audit-log verify`).

Where the controller reaches the audit DB (an external ClickHouse; the lab's chDB when the gateway runs on this
machine), it is verified from here through the site's backends, as the CLI does. An embedded chDB on a provisioned
node is only reachable there: the node's own runtime (the interpreter the gateway's unit runs) walks the chain with
the same `runtime.common.audit.verify_chain`, waiting for the gateway to release the engine between batches.
A missing table fails: nothing was ever audited, or the log was dropped.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from appliance.audit.checks import membria_support as mem
from appliance.audit.targets import TargetSpec
from runtime.common.audit import DEFAULT_TABLE

GATEWAY_UNIT = "/etc/systemd/system/membria-gateway.service"
WAIT_S = 60.0
# Run by the node's runtime interpreter: argv = DSN, table, seconds to wait for the chDB engine. Prints one JSON line.
_ON_NODE = """
import json, sys
from runtime.common.audit import connect_when_free, table_exists, verify_chain
dsn, table, wait = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = connect_when_free(dsn, wait)
try:
    if not table_exists(client, table):
        print(json.dumps({"ok": False, "missing": True, "rows_checked": 0}))
        sys.exit(0)
    r = verify_chain(client, table)
    print(json.dumps({"ok": r.ok, "rows_checked": r.rows_checked, "head": str(r.head) if r.head else None,
                      "truncated": r.truncated,
                      "findings": [{"seq": f.seq, "kind": f.kind, "detail": f.detail} for f in r.findings[:20]]}))
finally:
    client.close()
"""


def _on_controller(target: TargetSpec, table: str) -> dict[str, Any]:
    from appliance import audit_log
    from appliance.audit.facts import backends_from_facts
    from appliance.errors import CheckFailed

    backends = backends_from_facts(target.facts)
    try:
        result = audit_log.verify(backends, table=table, wait_s=WAIT_S)
    except CheckFailed as exc:
        return {"ok": False, "missing": True, "rows_checked": 0, "why": exc.message}
    return {
        "ok": result.ok,
        "rows_checked": result.rows_checked,
        "head": str(result.head) if result.head else None,
        "truncated": result.truncated,
        "findings": [{"seq": f.seq, "kind": f.kind, "detail": f.detail} for f in result.findings[:20]],
    }


def node_command(unit: str, python: str, dsn: str, table: str) -> str:
    """The node-side verification, run as the gateway's own user (its unit's User=, HOME its WorkingDirectory=).

    Never as root when the gateway is not: chDB writes lock and temporary files into its directory, and files of
    root's there would lock the gateway out of its own audit log.
    """
    command = f"{shlex.quote(python)} -c {shlex.quote(_ON_NODE)} {shlex.quote(dsn)} {shlex.quote(table)} {WAIT_S:g}"
    user = mem.unit_value(unit, "User")
    if not user:
        return command
    home = mem.unit_value(unit, "WorkingDirectory") or "/tmp"  # noqa: S108 - only HOME for a process that needs one
    return f"cd / && runuser -u {shlex.quote(user)} -- env HOME={shlex.quote(home)} {command}"


def _on_node(host: Any, target: TargetSpec, table: str) -> dict[str, Any]:
    config_path, config = mem.gateway_config(host, target)
    dsn = str((config.get("audit") or {}).get("dsn") or "")
    assert dsn, f"{config_path} names no audit DSN"
    unit_path = mem.node_file(target, "gateway_unit", GATEWAY_UNIT)
    unit = mem.read_text(host, unit_path)
    python = (target.facts.get("node_files") or {}).get("runtime_python") or (
        mem.exec_start(unit)[0] if unit and mem.exec_start(unit) else None
    )
    assert python, f"cannot tell the gateway's interpreter: {unit_path} is missing or has no ExecStart"
    result = host.run(node_command(unit or "", python, dsn, table))
    assert result.rc == 0, f"verifying the audit log on the node failed: {result.stderr.strip()[-500:]}"
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    data["dsn"] = dsn
    return data


def test_audit_log_chain_verifies(host: Any, target: TargetSpec, evidence: Any) -> None:
    facts = target.facts.get("audit_log") or {}
    table = str(facts.get("table") or DEFAULT_TABLE)
    where = str(facts.get("verify_on") or "controller")
    data = _on_node(host, target, table) if where == "node" else _on_controller(target, table)
    evidence.add(
        f"audit-log verify of table {table} (on the {where})", json.dumps(data, indent=1), 0 if data["ok"] else 1
    )
    if data.get("missing"):
        raise AssertionError(
            f"there is no audit table {table}: nothing was ever audited, or the log was dropped "
            f"({data.get('why', 'the table does not exist')})"
        )
    findings = "; ".join(f"seq {f['seq']}: {f['kind']} ({f['detail']})" for f in data.get("findings", [])[:5])
    assert data["ok"], f"the audit log {table} is not intact ({data['rows_checked']} rows checked): {findings}"
