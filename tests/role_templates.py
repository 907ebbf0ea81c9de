"""Render the roles' templates as a real apply does: ansible-playbook's template module on localhost, with the
roles' defaults loaded and a host's inventory variables (from `build_inventory`), writing only under a
temporary directory. The `.ctmpl.j2` sources get their `#jinja2:` delimiter header honoured as in a run."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.core.runner import run_playbook

ROLES_DIR = Path(__file__).resolve().parents[1] / "roles"
DEFAULTS = ("gateway", "vault_agent")  # the roles whose defaults the templates below read
PLAYBOOK = """\
- name: Render role templates
  hosts: all
  connection: local
  gather_facts: false
  vars_files: {vars_files}
  tasks:
    - name: Render
      ansible.builtin.template:
        src: "{{{{ item.src }}}}"
        dest: "{{{{ render_out }}}}/{{{{ inventory_hostname }}}}/{{{{ item.name }}}}"
        mode: "0600"
      loop: {templates}
"""


def render(
    workdir: Path, hosts: Mapping[str, Mapping[str, Any]], templates: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """`templates` maps an output name to a role template (`gateway/gateway.json.j2`); returns
    host -> output name -> text. Connection variables of the hosts are replaced by local ones."""
    out = workdir / "rendered"
    local = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "ansible_remote_tmp": str(workdir / "ansible-tmp"),
        "render_out": str(out),
    }
    inventory = {"all": {"hosts": {name: {**dict(hostvars), **local} for name, hostvars in hosts.items()}}}
    for name in hosts:
        (out / name).mkdir(parents=True, exist_ok=True)
    (workdir / "inventory.json").write_text(json.dumps(inventory))
    vars_files = [str(ROLES_DIR / role / "defaults" / "main.yml") for role in DEFAULTS]
    items = [
        {"name": name, "src": str(ROLES_DIR / role_file.split("/")[0] / "templates" / role_file.split("/")[1])}
        for name, role_file in templates.items()
    ]
    (workdir / "play.yml").write_text(PLAYBOOK.format(vars_files=json.dumps(vars_files), templates=json.dumps(items)))
    result = run_playbook(
        None,
        check=False,
        diff=False,
        limit=None,
        tags=None,
        on_event=None,
        private_data_dir=workdir / "runner",
        envvars={},
        inventory=workdir / "inventory.json",
        playbook=workdir / "play.yml",
    )
    assert not result.errors, result.errors
    assert not result.failures, [(f.task, f.message) for f in result.failures]
    assert result.rc == 0
    return {name: {item: (out / name / item).read_text() for item in templates} for name in hosts}
