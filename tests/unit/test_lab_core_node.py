"""`lab.core: host`: the lab's core node is derived from the site and its state directory, and refuses an
address it cannot put on a private bridge before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.errors import BadInput
from appliance.lab.core_node import CHECKOUT, LabCoreNode, bridge_relays, is_host_lab
from appliance.lab.dr_shipper import dr_services
from appliance.lab.runtime_services import CoreServer, Gateway
from appliance.lab.services import process_services
from appliance.lab.state import LabState
from appliance.site import Site
from tests.conftest import lab_site_data

pytestmark = pytest.mark.unit


def _site(tmp_path: Path, **node: Any) -> tuple[Site, LabState]:
    data = lab_site_data(tmp_path / "state")
    data["lab"]["core"] = "host"
    data["core_nodes"][0].update(node)
    return Site.model_validate(data), LabState.at(tmp_path / "state")


def test_the_example_lab_runs_its_core_on_a_test_host() -> None:
    from appliance.site import load_site

    site = load_site(CHECKOUT / "examples" / "lab.yaml")
    assert is_host_lab(site)
    assert site.core_nodes[0].address == "10.77.0.11"


def test_names_and_addresses_derive_from_the_site_and_state(tmp_path: Path) -> None:
    site, state = _site(tmp_path, address="10.99.7.23")
    node = LabCoreNode(site, state)
    assert node.host.address == "10.99.7.23"
    assert node.network.cidr == "10.99.7.1/24" and node.admin_address == "10.99.7.1"
    assert node.host.home.parent == state.root / "hosts"
    other_site, other_state = _site(tmp_path / "other", address="10.99.7.23")
    other = LabCoreNode(other_site, other_state)
    # Two labs (the tests' and `make lab`'s) never share a machine or a bridge.
    assert other.host.name != node.host.name and other.network.bridge != node.network.bridge
    assert len(node.network.bridge) <= 15


def test_runtime_endpoints_move_to_the_node(tmp_path: Path) -> None:
    site, state = _site(tmp_path, address="10.99.7.23")
    assert Gateway(site, state).endpoint == f"https://10.99.7.23:{site.lab.ports.gateway}"
    assert CoreServer(site, state).endpoint == f"https://10.99.7.23:{site.lab.ports.core}"
    # llama.cpp and the DR shipper are the node's (llm and dr_agent roles), not lab processes.
    assert [s.name for s in process_services(site, state)] == ["openbao", "s3"]
    assert dr_services(site, state) == []
    relays = bridge_relays(site, state)
    assert [(r.name, r.host, r.port) for r in relays] == [
        ("openbao-relay", "10.99.7.1", site.lab.ports.openbao),
        ("s3-relay", "10.99.7.1", site.lab.ports.s3),
    ]


def test_the_process_lab_is_unchanged(tmp_path: Path) -> None:
    data = lab_site_data(tmp_path / "state")
    site, state = Site.model_validate(data), LabState.at(tmp_path / "state")
    assert not is_host_lab(site)
    assert Gateway(site, state).endpoint == f"https://127.0.0.1:{site.lab.ports.gateway}"
    assert [s.name for s in process_services(site, state)] == ["openbao", "s3", "llm"]
    assert bridge_relays(site, state) == []


def test_role_vars_name_the_relays_and_carry_no_secret(tmp_path: Path) -> None:
    site, state = _site(tmp_path, address="10.99.7.23")
    node = LabCoreNode(site, state)
    variables = node.role_vars()
    assert variables["membria_vault_addr"] == f"https://10.99.7.1:{site.lab.ports.openbao}"
    assert variables["membria_s3_url"] == f"http://10.99.7.1:{site.lab.ports.s3}"
    assert variables["membria_vault_tls_server_name"] == "localhost"
    assert variables["membria_runtime_root"] == str(CHECKOUT)
    assert not any(word in key for key in variables for word in ("token", "secret", "password"))


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("core-1.lab.example", "needs an IPv4 address"),
        ("10.99.7.1", ".1 is the admin"),
        ("10.99.7.0", "are taken"),
        ("10.99.7.255", "are taken"),
    ],
)
def test_an_address_that_cannot_be_on_the_bridge_is_refused(tmp_path: Path, address: str, words: str) -> None:
    site, state = _site(tmp_path, address=address)
    with pytest.raises(BadInput, match=r"core_nodes\[0\]\.address") as caught:
        LabCoreNode(site, state)
    assert words in caught.value.message


def test_a_site_without_core_nodes_is_refused(tmp_path: Path) -> None:
    site, state = _site(tmp_path)
    with pytest.raises(BadInput, match="no core_nodes"):
        LabCoreNode(site.model_copy(update={"core_nodes": []}), state)
