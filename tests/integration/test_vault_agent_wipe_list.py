"""The rack's wipe list (edge_image/DESIGN.md, "Wipe"): the vault_agent role's `wipe-list.ctmpl`, rendered by
Ansible, run by the real `bao agent` against the lab's OpenBao and logged in with the node's AppRole, whose policy
`core apply` writes (`vault_access.node_credentials`). What `appliance edge wipe` writes reaches the file the
gateway's `device_commands.wipe_list` reads, in a form its reader accepts; before any wipe the list is empty.

OpenBao's agent never renders a `secret` whose KV secret does not exist: it retries the read (`no secret exists
at ...`) and leaves the file unwritten. So `node_credentials` writes an empty list when there is none
(`vault_access.ensure_wipe_list`), and the agent renders it at its next retry.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.backends import Backends
from appliance.core.inventory import bao_binary, vault_mounts
from appliance.core.vault_access import ensure_wipe_list, node_credentials
from appliance.edge import wipe
from appliance.lab import process
from appliance.lab.runtime_services import wipe_list_path
from appliance.lab.services import OpenBao
from runtime.gateway.device_commands import WipeList, parse_wipe_list
from tests.integration.vault_support import bootstrapped_vault
from tests.role_templates import render

pytestmark = pytest.mark.integration

NODE = "core-1"
DEVICE = "lt-0042"
# The role's agent.hcl with its paths under the test's directory: one template, the wipe list, read again every
# second (the role's static_secret_render_interval is 5 min).
AGENT_HCL = """\
pid_file = "{work}/agent.pid"
vault {{
  address = "{address}"
  ca_cert = "{ca}"
}}
auto_auth {{
  method "approle" {{
    mount_path = "auth/approle"
    config = {{
      role_id_file_path   = "{work}/role-id"
      secret_id_file_path = "{work}/secret-id"
      remove_secret_id_file_after_reading = false
    }}
  }}
}}
template_config {{
  static_secret_render_interval = "1s"
}}
template {{
  source      = "{work}/wipe-list.ctmpl"
  destination = "{work}/wipe-list.json"
  perms       = "0644"
}}
"""


@dataclass
class Agent:
    backends: Backends
    work: Path
    log: Path

    @property
    def rendered(self) -> Path:
        return self.work / "wipe-list.json"

    def text(self) -> str:
        return self.rendered.read_text() if self.rendered.exists() else ""

    def wait_for(self, devices: set[str], timeout: float = 30) -> str:
        def there() -> bool:
            try:
                return set(json.loads(self.text())["devices"]) == devices
            except ValueError:
                return False

        assert process.wait_until(there, timeout=timeout, interval=0.2), (self.text(), self.log.read_text()[-3000:])
        return self.text()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    work = tmp_path_factory.mktemp("wipe-list-agent")
    with bootstrapped_vault(work / "lab") as backends:
        assert backends.state is not None
        site = backends.site
        # A fresh Vault has no wipe list; `core apply` writes an empty one with the node's identity.
        assert wipe.read_list(backends.vault(), backends.kv_mount)[1] == 0
        role_id, secret_id = node_credentials(site, NODE, backends)
        assert wipe.read_list(backends.vault(), backends.kv_mount) == ({"devices": {}}, 1)
        # Then taken away again (an admin's `kv metadata delete`): the agent starts on a missing secret.
        backends.vault().secrets.kv.v2.delete_metadata_and_all_versions(
            path=wipe.WIPE_LIST_PATH, mount_point=backends.kv_mount
        )
        source = render(
            work / "ansible",
            {"node": {"membria_vault_mounts": vault_mounts(site)}},
            {"t": "vault_agent/wipe-list.ctmpl.j2"},
        )
        (work / "wipe-list.ctmpl").write_text(source["node"]["t"])
        (work / "role-id").write_text(role_id)
        (work / "secret-id").write_text(secret_id)
        bao = OpenBao(site, backends.state)
        (work / "agent.hcl").write_text(AGENT_HCL.format(work=work, address=bao.endpoint, ca=bao.ca_file))
        log = work / "agent.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [bao_binary(), "agent", f"-config={work / 'agent.hcl'}"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", ""), "HOME": str(work)},
            )
        try:
            yield Agent(backends, work, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# In order: the module's agent goes from a missing secret to an empty list, a wipe, and its cancellation.


def test_a_missing_secret_is_retried_not_rendered(agent: Agent) -> None:
    assert process.wait_until(lambda: "no secret exists at" in agent.log.read_text(), timeout=30), agent.log.read_text()
    assert not agent.rendered.exists()


def test_the_empty_list_core_apply_writes_renders(agent: Agent) -> None:
    assert ensure_wipe_list(agent.backends)
    text = agent.wait_for(set(), timeout=60)  # the agent's retry back-off has grown to a few seconds by now
    assert json.loads(text) == {"devices": {}}
    assert parse_wipe_list(text) == {}
    assert oct(agent.rendered.stat().st_mode & 0o777) == "0o644"
    assert not ensure_wipe_list(agent.backends)  # there now: left alone


def test_edge_wipe_reaches_the_gateway(agent: Agent) -> None:
    site = agent.backends.site
    done = wipe.request(site, wipe.plan(site, device=DEVICE, reason="stolen from a car"))
    assert done.added
    text = agent.wait_for({DEVICE})
    # The same document the lab renders for its gateway (wipe.render), and the gateway's reader takes it.
    assert agent.backends.state is not None
    assert json.loads(text) == json.loads(wipe_list_path(agent.backends.state).read_text())
    entry = WipeList(agent.rendered).entry(DEVICE)
    assert entry is not None and entry.id == done.entry["id"] and entry.reason == "stolen from a car"
    assert not ensure_wipe_list(agent.backends)  # a list with entries is never reset


def test_a_cancelled_wipe_leaves_the_list(agent: Agent) -> None:
    assert wipe.cancel(agent.backends.site, device=DEVICE) is not None
    assert json.loads(agent.wait_for(set())) == {"devices": {}}
    assert WipeList(agent.rendered).entry(DEVICE) is None
