"""Known-bad breaks of the appliance's own core controls, for the hosts tier's closed-loop audit test.

`BREAKS` maps a control id to a shell command run as root on a provisioned core node that makes that control fail
(and leaves root's SSH key login alone). The paths are the roles' defaults (`breaks(node_files)` takes others:
tests/integration/test_audit_core_controls.py runs the same commands against the lab's files on this machine).

Not here, because a command on the node cannot break them (or not at once):
- MEM-DR-RPO and MEM-DR-RTO: the evidence is the DR bucket's catalog (backup manifests, shipment heads, drill
  reports), written with object lock to S3 the node does not own. Stopping the DR agent's timers
  (`systemctl stop membria-dr-ship.timer membria-dr-backup.timer`) only fails MEM-DR-RPO once a store's RPO has
  passed (60 s for vectors and state by default, with no writes: the shipper's heartbeat stops too).
"""

from __future__ import annotations

import shlex

from appliance.audit.facts import role_path
from appliance.bundle.needs import role_defaults

_GATEWAY = role_defaults("gateway")
NODE_FILES = {
    "gateway_config": role_path(_GATEWAY, "gateway_config_file", "gateway"),
    "gateway_unit": "/etc/systemd/system/membria-gateway.service",
}

# Each edit reads the gateway's own configuration for the file it changes, as the check does.
_LICENSE = """
import json, sys
conf = json.load(open(sys.argv[1]))
path = conf["license_file"]
doc = json.load(open(path))
doc["license"]["seats"] = int(doc["license"]["seats"]) + 1000  # the signature no longer matches
with open(path, "w") as fh:
    json.dump(doc, fh, indent=2)
"""
# A valid policy in which every user certificate of the site, whatever its OU, may read the audit trail.
_RBAC = """
import json, sys
conf = json.load(open(sys.argv[1]))
policy = {
    "departments": ["engineering"],
    "roles": [{"name": "everyone", "actions": ["audit_read"], "departments": ["engineering"]}],
    "bindings": [{"role": "everyone", "kind": "user"}],
}
with open(conf["rbac_policy"], "w") as fh:  # JSON is YAML; the file keeps its owner and mode
    json.dump(policy, fh, indent=2)
"""
# The gateway trusts its own leaf certificate instead of the site CA: no site client certificate gets through.
_MTLS = """
import json, sys
path = sys.argv[1]
conf = json.load(open(path))
conf["tls"]["ca"] = conf["tls"]["cert"]
with open(path, "w") as fh:
    json.dump(conf, fh, indent=2)
"""
_WAIT_FOR_PORT = """
import json, socket, sys, time
port = int(json.load(open(sys.argv[1]))["port"])
deadline = time.monotonic() + 120
while True:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"the gateway does not listen on port {port} after its restart")
        time.sleep(1)
"""
# Run by the gateway's own interpreter (its unit's ExecStart), which has chDB: one row's reason is changed without
# its hash (or, with no row written yet, the table is dropped: the log is gone). Waits for the gateway's writer to
# release the engine between batches, as `appliance audit-log verify` does.
_CHAIN = """
import json, sys
from runtime.common.audit import connect_when_free, quote_table, table_exists
dsn = json.load(open(sys.argv[1]))["audit"]["dsn"]
table = quote_table("audit_log")
client = connect_when_free(dsn, 120)
try:
    rows = int(client.command(f"SELECT count() FROM {table}")) if table_exists(client, "audit_log") else 0
    if rows:
        client.command(f"ALTER TABLE {table} UPDATE reason = concat(reason, ' (edited)') WHERE seq = 1",
                       settings={"mutations_sync": 2})
    else:
        client.command(f"DROP TABLE IF EXISTS {table}")
finally:
    client.close()
"""


def _python(script: str, *args: str, interpreter: str = "python3") -> str:
    return " ".join([interpreter, "-c", shlex.quote(script.strip() + "\n"), *(shlex.quote(a) for a in args)])


def breaks(files: dict[str, str], *, restart: bool = True) -> dict[str, str]:
    """The break commands for a node whose gateway configuration and unit are at `files`.

    restart: restart the gateway after changing its TLS settings (a node; the lab's processes are restarted by the
    caller, if at all).
    """
    config, unit = files["gateway_config"], files["gateway_unit"]
    mtls = _python(_MTLS, config)
    if restart:
        mtls += " && systemctl restart membria-gateway.service && " + _python(_WAIT_FOR_PORT, config)
    # The audit log is changed as the gateway's own user with its interpreter (its unit's User= and ExecStart=):
    # files of root's in the chDB directory would lock the gateway out of it, which is not the break meant.
    q_unit = shlex.quote(unit)
    as_gateway = (
        f"py=$(sed -n 's/^ExecStart=\\([^ ]*\\) .*/\\1/p' {q_unit} | head -n1) && "
        f"u=$(sed -n 's/^User=//p' {q_unit} | head -n1) && "
        f"h=$(sed -n 's/^WorkingDirectory=//p' {q_unit} | head -n1) && "
        'cd / && if [ -n "$u" ]; then set -- runuser -u "$u" -- env HOME="${h:-/tmp}" "$py"; else set -- "$py"; fi && '
        '"$@"'
    )
    # In this order when several are applied: the MTLS break restarts the gateway, which refuses to start on a
    # tampered license (and the gateway reads its RBAC policy only at start, so that break needs no restart).
    return {
        "MEM-MTLS": mtls,
        "MEM-AUDITLOG-CHAIN": as_gateway + " " + _python(_CHAIN, config, interpreter="").lstrip(),
        "MEM-RBAC-DENY": _python(_RBAC, config),
        "MEM-LICENSE": _python(_LICENSE, config),
    }


BREAKS: dict[str, str] = breaks(NODE_FILES)
