"""The CoreNode dynamic provider doing its real work (stacks/DESIGN.md §5): on a fresh nspawn host with the lab's
OpenBao bootstrapped, as `pulumi up` would call it: check, create, diff, update, and an update that changes nothing.

One cheap role (`monitoring`: the node exporter is in the host image, so nothing is downloaded) keeps the three
runs short; every role's own behaviour is tested in test_core_apply. The secret id each run mints is captured
(through a wrapped `node_credentials`) to prove it never reaches the outputs Pulumi would store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from appliance.core import vault_access
from appliance.hosts.nspawn import Bind, TestHost, free_network, unique_name
from appliance.hosts.relay import TcpRelay
from appliance.iac import core_node
from appliance.lab.services import OpenBao
from stacks.components.core_node import CoreNodeProvider
from tests.integration.vault_support import bootstrapped_vault

pytestmark = [pytest.mark.hosts, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
ROLE = "monitoring"


@dataclass
class Steps:
    """What each provider call returned (or raised), in `pulumi up` order."""

    node: str
    token: str
    minted: list[str] = field(default_factory=list)  # secret ids node_credentials made
    results: dict[str, Any] = field(default_factory=dict)
    props: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        result = self.results[name]
        if isinstance(result, BaseException):
            raise AssertionError(f"{name} raised {result!r}") from result
        return result


def _write_vars(path: Path, variables: dict[str, Any]) -> Path:
    with path.open("w") as handle:
        YAML().dump({"all": variables}, handle)
    return path


def _props(site_file: Path, state_dir: Path, node: str, vars_file: Path) -> dict[str, Any]:
    props: dict[str, Any] = {
        "site_file": str(site_file),
        "workdir": str(REPO),
        "node": node,
        "state_dir": str(state_dir),
        "vars_file": str(vars_file),
        "bundle": None,
        "tags": [ROLE],
        "__provider": "pickled",  # what the engine passes along; the provider ignores it
    }
    props["content_hash"] = core_node.node_hash(props)  # as the program computes it at preview
    return props


def _call(steps: Steps, name: str, call: Any) -> None:
    try:
        steps.results[name] = call()
    except Exception as exc:  # recorded, and raised by the test that reads it
        steps.results[name] = exc


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Steps]:
    root = tmp_path_factory.mktemp("stack-core-node")
    network = free_network()
    host = TestHost(unique_name("stack"), network.address(11), network, binds=[Bind(REPO, REPO)])

    def on_the_bridge(data: dict[str, Any]) -> None:
        node = data["core_nodes"][0]
        node["address"] = host.address
        node["ssh"] = {"user": "root", "key": str(host.key_path)}
        data["lab"]["dr_shipper"] = False

    try:
        with bootstrapped_vault(root / "lab", on_the_bridge) as backends, pytest.MonkeyPatch.context() as patch:
            assert backends.state is not None
            site = backends.site
            bao = OpenBao(site, backends.state)
            recorded = Steps(site.core_nodes[0].name, bao.root_token())
            real = vault_access.node_credentials

            def node_credentials(*args: Any, **kwargs: Any) -> tuple[str, str]:
                role_id, secret_id = real(*args, **kwargs)
                recorded.minted.append(secret_id)
                return role_id, secret_id

            patch.setattr(vault_access, "node_credentials", node_credentials)
            with TcpRelay((site.lab.host, bao.port), listen_host=network.gateway) as relay:
                host.create()
                host.start()
                variables: dict[str, Any] = {
                    "ansible_ssh_common_args": host.ansible_vars()["ansible_ssh_common_args"],
                    "base_apt_update_cache": False,
                    "membria_vault_addr": f"https://{network.gateway}:{relay.port}",
                }
                site_file, state = root / "lab" / "site.yaml", Path(site.lab.state_dir)
                first = _props(site_file, state, recorded.node, _write_vars(root / "vars.yaml", variables))
                changed_vars = _write_vars(root / "vars-2.yaml", {**variables, "monitoring_scrape_interval": "15s"})
                second = _props(site_file, state, recorded.node, changed_vars)
                recorded.props = {"first": first, "second": second}
                provider = CoreNodeProvider()
                _call(recorded, "check", lambda: provider.check({}, first))
                _call(recorded, "create", lambda: provider.create(first))
                if not isinstance(recorded.results["create"], Exception):
                    outs = recorded.results["create"].outs
                    _call(recorded, "diff same", lambda: provider.diff("id", outs, first))
                    _call(recorded, "diff vars", lambda: provider.diff("id", outs, second))
                    _call(recorded, "update", lambda: provider.update("id", outs, second))
                    if not isinstance(recorded.results["update"], Exception):
                        again = recorded.results["update"].outs
                        _call(recorded, "update again", lambda: provider.update("id", again, second))
                yield recorded
    finally:
        host.destroy()
        network.down()


def test_check_accepts_the_site(steps: Steps) -> None:
    assert steps.get("check").failures == []


def test_create_provisions_the_node(steps: Steps) -> None:
    created = steps.get("create")
    assert created.id == f"lab/{steps.node}"
    assert created.outs["recap"]["changed"] > 0, created.outs
    assert created.outs["recap"]["failed"] == 0 and created.outs["recap"]["unreachable"] == 0
    assert Path(created.outs["events_path"]).is_file()
    assert created.outs["content_hash"] == steps.props["first"]["content_hash"]


def test_outputs_carry_no_secret_id_and_no_vault_token(steps: Steps) -> None:
    outs = [steps.get(name).outs for name in ("create", "update", "update again")]
    assert len(steps.minted) == 3 and all(steps.minted)  # one fresh secret id per run
    text = json.dumps(outs)
    for secret in [*steps.minted, steps.token]:
        assert secret not in text


def test_diff_sees_a_vars_change_only(steps: Steps) -> None:
    same, changed = steps.get("diff same"), steps.get("diff vars")
    assert (same.changes, same.replaces) == (False, [])
    assert (changed.changes, changed.replaces) == (True, [])


def test_update_applies_the_change(steps: Steps) -> None:
    recap = steps.get("update").outs["recap"]
    assert recap["changed"] > 0 and recap["failed"] == 0, recap  # the scrape config was rewritten


def test_a_second_update_changes_nothing(steps: Steps) -> None:
    outs = steps.get("update again").outs
    assert outs["recap"]["changed"] == 0 and outs["changes"] == 0, outs
    assert outs["recap"]["failed"] == 0 and outs["recap"]["unreachable"] == 0
