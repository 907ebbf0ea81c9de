"""What the appliance's own checks (framework `membria`) compare against: facts from the site file.

`site_facts` is computed once per audit on the controller and travels in every target's spec (JSON). It holds
no secret: paths (on the node and on the controller), ports, addresses, DR targets, the license public key's
path. Checks that talk to the site's services (the audit log, the DR bucket, Vault's CA) rebuild `Backends`
themselves from `site_file` and `state_dir` (`backends_from_facts`), inside their own pytest process.

Paths on a node come from the roles' defaults: a provisioned node is what auditors audit. The lab's process
mode (`lab.core: processes`: the runtime runs as local processes on the controller) keeps the same files under
its state directory; the facts then point there instead. Any key can be overridden by whoever builds the
targets (tests point them at their own files and endpoints).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.bundle.needs import role_defaults
from appliance.core.inventory import controller_path, is_lab_site, node_ports
from appliance.dr.status import PRODUCTION_HEARTBEAT
from appliance.lab import bootstrap
from appliance.lab.state import LabState
from appliance.site import Site, load_site
from runtime.common.audit import DEFAULT_TABLE

if TYPE_CHECKING:
    from appliance.backends import Backends

# How old the newest recorded DR drill may be (days) before MEM-DR-RTO fails: a quarterly drill, plus slack.
DRILL_MAX_AGE_DAYS = 100
# The lab's operator certificate (appliance/lab/bootstrap.py): the audit's "a valid client certificate".
LAB_CLIENT = "lab-admin"
_REFERENCE = re.compile(r"^\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}(.*)$")


def role_path(defaults: dict[str, Any], name: str, role: str) -> str:
    """A role default that is a plain path, or `{{ other_default }}/rest` (one level), as a string."""
    value = defaults.get(name)
    if not isinstance(value, str):
        raise KeyError(f"roles/{role}/defaults/main.yml has no {name}")
    match = _REFERENCE.match(value)
    if match:
        return role_path(defaults, match.group(1), role) + match.group(2)
    if "{{" in value:
        raise KeyError(f"roles/{role}/defaults/main.yml: {name} is an expression, not a path ({value})")
    return value


def node_files(site: Site, lab_state: Path | None) -> dict[str, str]:
    """Where the checked files are on a core node (the roles' defaults), or in the lab's process mode."""
    gateway, core, dr_agent = role_defaults("gateway"), role_defaults("core_server"), role_defaults("dr_agent")
    files = {
        "gateway_config": role_path(gateway, "gateway_config_file", "gateway"),
        "core_config": role_path(core, "core_server_config_file", "core_server"),
        "gateway_unit": "/etc/systemd/system/membria-gateway.service",
        # The DR agent runs `appliance dr` with --state-dir <dr_agent_state_dir> (roles/dr_agent, membria-dr.sh):
        # for a site with embedded stores its shipper heartbeat is under that state's data directory.
        "dr_heartbeat": (
            str(LabState(Path(role_path(dr_agent, "dr_agent_state_dir", "dr_agent"))).data_dir / "dr" / "shipper.json")
            if is_lab_site(site)
            else str(PRODUCTION_HEARTBEAT)
        ),
    }
    if lab_state is not None and site.lab.core == "processes":
        state = LabState(lab_state)
        files["gateway_config"] = str(state.root / "config" / "gateway.json")
        files["core_config"] = str(state.root / "config" / "core.json")
        files["dr_heartbeat"] = str(state.data_dir / "dr" / "shipper.json")
    return files


def site_facts(site: Site, site_file: Path, state_dir: Path | None) -> dict[str, Any]:
    """The facts every target of this audit carries (JSON-serialisable; no secrets)."""
    lab = is_lab_site(site)
    lab_state = controller_path(state_dir or site.lab.state_dir) if lab else None
    processes = lab_state is not None and site.lab.core == "processes"
    files = node_files(site, lab_state)
    nodes = {
        node.name: {"address": site.lab.host if processes else node.address, "ports": node_ports(site, node)}
        for node in site.core_nodes
    }
    tls: dict[str, str | None] = {"ca_file": None, "client_cert": None, "client_key": None}
    if lab_state is not None:
        state = LabState(lab_state)
        ca = bootstrap.ca_chain_path(state)
        cert, key = bootstrap.cert_paths(state, LAB_CLIENT)
        tls["ca_file"] = str(ca) if ca.is_file() else None
        if cert.is_file() and key.is_file():
            tls["client_cert"], tls["client_key"] = str(cert), str(key)
    audit_embedded = site.services.audit_db.backend == "embedded"
    return {
        "site": site.site.name,
        "domain": site.site.domain,
        "site_file": str(controller_path(site_file)),
        "state_dir": str(lab_state) if lab_state else (str(controller_path(state_dir)) if state_dir else None),
        "nodes": nodes,
        "node_files": files,
        "license_public_key": str(controller_path(site.licensing.public_key_path)),
        "tls": tls,
        "audit_log": {
            # The controller reaches an external ClickHouse, and the lab's chDB when the gateway runs here; an
            # embedded chDB on a provisioned node is read on the node, by the node's own runtime.
            "verify_on": "node" if audit_embedded and not processes else "controller",
            "table": DEFAULT_TABLE,
        },
        "dr": {
            "rpo_seconds": site.dr.rpo_seconds.model_dump(),
            "rto_seconds": site.dr.rto_seconds.model_dump(),
            "drill_max_age_days": DRILL_MAX_AGE_DAYS,
            "heartbeat_on": "controller" if processes else "node",
        },
        "edge_profiles": {
            profile.name: {"tpm2_pcrs": list(profile.image.tpm2_pcrs), "tpm2_pin": profile.image.tpm2_pin}
            for profile in site.edge_profiles
        },
        "edge_gateways": list(site.edge.gateways) if site.edge else [],
    }


def backends_from_facts(facts: dict[str, Any]) -> Backends:
    """The site's service clients, as the CLI builds them (the lab's state directory for embedded services).

    The state directory is only read: no `prepare()`, so an audit never creates a lab's directories.
    """
    from appliance.backends import Backends

    site = load_site(Path(facts["site_file"]))
    state_dir = facts.get("state_dir")
    state = LabState(Path(state_dir)) if state_dir and is_lab_site(site) else None
    return Backends(site, state)
