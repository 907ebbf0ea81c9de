"""The core stack's graph under Pulumi's mocks (stacks/DESIGN.md §5 "1 graph"): the PKI first, then one CoreNode
per core node, each after the PKI and the node before; inputs the provider can use (absolute paths, the content
hash the provider recomputes) and the stack's exports. The VaultPki's own resources are tested with its component."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pulumi
import pytest
from ruamel.yaml import YAML

from appliance.errors import BadInput
from appliance.iac.content_hash import core_node_hash
from appliance.site import load_site
from stacks.components.config import StackSettings
from stacks.core import program
from tests.unit.pulumi_harness import (
    APPROLE_SECRET_ENV,
    CANARY_SECRET_ID,
    SECRET_SIG,
    SECRET_SIG_KEY,
    MembriaMocks,
    lab_state_with_openbao,
    run_program,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CORE_NODE = "pulumi-python:dynamic/membria:CoreNode"
VAULT_PKI = "membria:vault:VaultPki"


def _recap(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What the provider would return after a run: the mocks never call it."""
    return {"recap": {"ok": 40, "changed": 3, "failed": 0}, "changes": 3, "events_path": f"/state/{name}.jsonl"}


def _mocks() -> MembriaMocks:
    return MembriaMocks({CORE_NODE: _recap})


@pytest.fixture
def three_nodes(tmp_path: Path) -> Path:
    """rack.yaml with three core nodes: the rolling chain needs more than one."""
    yaml = YAML()
    data = yaml.load((REPO / "examples" / "rack.yaml").read_text())
    first = data["core_nodes"][0]
    for number in (2, 3):
        node = yaml.load(yaml_dump(yaml, first))
        node["name"], node["address"] = f"core-{number}", f"10.20.0.{10 + number}"
        data["core_nodes"].append(node)
    path = tmp_path / "rack3.yaml"
    with path.open("w") as handle:
        yaml.dump(data, handle)
    return path


def yaml_dump(yaml: YAML, value: Any) -> str:
    from io import StringIO

    out = StringIO()
    yaml.dump(value, out)
    return out.getvalue()


@pytest.fixture(autouse=True)
def lab_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Vault provider's credentials: the lab's OpenBao token file, rack.yaml's AppRole secret id."""
    monkeypatch.setenv(APPROLE_SECRET_ENV, CANARY_SECRET_ID)
    return lab_state_with_openbao(tmp_path / "lab-state")


def _settings(site_file: Path, state_dir: Path) -> StackSettings:
    return StackSettings(site_file=site_file, workdir=REPO, state_dir=state_dir)


@pytest.mark.parametrize("preview", [False, True])
def test_a_core_node_per_node_rolled_after_the_pki(three_nodes: Path, lab_state: Path, preview: bool) -> None:
    settings = _settings(three_nodes, lab_state)
    site = settings.load_site()
    exports, monitor = run_program(lambda: program.build(settings, site), mocks=_mocks(), preview=preview)
    pki = monitor.one(VAULT_PKI, "pki")
    pki_children = {r.urn for r in monitor.registered if r.parent == pki.urn}
    nodes = monitor.of_type(CORE_NODE)
    assert [n.name for n in nodes] == ["core-1", "core-2", "core-3"]
    for before, node in zip([None, *nodes], nodes, strict=False):
        deps = set(node.dependencies)
        assert pki_children <= deps  # depending on the component is waiting for every resource in it
        assert (before is not None and before.urn in deps) or (before is None and not deps & {n.urn for n in nodes})
    assert all(n.raw["__provider"][SECRET_SIG_KEY] == SECRET_SIG for n in nodes)  # the pickle is a secret
    assert set(exports) == {"ca_chain_pem", "approle_role_ids", "nodes"}
    assert set(exports["approle_role_ids"].value or {}) <= {"core-1", "core-2", "core-3"}
    assert exports["nodes"].value["core-2"] == {"recap": _recap("core-2", {})["recap"], "changes": 3}


def test_inputs_are_absolute_and_the_hash_is_the_one_the_provider_checks(tmp_path: Path, lab_state: Path) -> None:
    vars_file = tmp_path / "vars.yaml"
    vars_file.write_text("core-1: {base_ntp_servers: [ntp.example]}\n")
    settings = _settings(REPO / "examples" / "lab.yaml", lab_state)
    site = settings.load_site()
    _, monitor = run_program(
        lambda: program.build(settings, site, vars_file=vars_file, tags=["base,monitoring"]), mocks=_mocks()
    )
    node = monitor.one(CORE_NODE, "core-1")
    inputs = {k: v for k, v in node.inputs.items() if k not in ("__provider", "recap", "changes", "events_path")}
    with contextlib.chdir(REPO):
        expected = core_node_hash(
            load_site(settings.site_file),
            "core-1",
            site_file=settings.site_file,
            vars_file=vars_file,
            tags=["base", "monitoring"],
        )
    assert inputs == {
        "site_file": str(REPO / "examples" / "lab.yaml"),
        "workdir": str(REPO),
        "node": "core-1",
        "state_dir": str(lab_state),
        "content_hash": expected,
        "vars_file": str(vars_file),
        "tags": ["base", "monitoring"],
    }


def test_an_unknown_tag_fails_the_program(lab_state: Path) -> None:
    settings = _settings(REPO / "examples" / "lab.yaml", lab_state)
    site = settings.load_site()
    with pytest.raises(BadInput, match="nosuchrole"):
        program.build(settings, site, tags=["nosuchrole"])


def test_main_reads_the_stack_config(tmp_path: Path, lab_state: Path) -> None:
    (tmp_path / "vars.yaml").write_text("all: {}\n")
    config = {
        "membria:siteFile": "examples/lab.yaml",
        "membria:workdir": str(REPO),
        "membria:stateDir": str(lab_state),
        "membria:varsFile": str(tmp_path / "vars.yaml"),
        "membria:tags": '["base", "gateway"]',
    }

    def run_main() -> dict[str, Any]:
        program.main()  # exports through pulumi.export, which the harness does not collect
        return {}

    pulumi.runtime.set_all_config(config)
    try:
        _, monitor = run_program(run_main, mocks=_mocks())
    finally:
        pulumi.runtime.set_all_config({})
    node = monitor.one(CORE_NODE, "core-1")
    assert node.inputs["vars_file"] == str(tmp_path / "vars.yaml") and node.inputs["tags"] == ["base", "gateway"]
    assert node.inputs["site_file"] == str(REPO / "examples" / "lab.yaml")


def test_the_example_stack_files_name_their_sites_and_hold_no_secret() -> None:
    for stack, site in (("lab", "examples/lab.yaml"), ("rack", "examples/rack.yaml")):
        config = YAML(typ="safe").load((REPO / "stacks" / "core" / f"Pulumi.{stack}.yaml").read_text())["config"]
        assert config["membria:siteFile"] == site and (REPO / site).is_file()
        assert not [k for k in config if any(word in k.lower() for word in ("token", "secret", "password"))]
    project = YAML(typ="safe").load((REPO / "stacks" / "core" / "Pulumi.yaml").read_text())
    assert project["name"] == "membria-core" and project["runtime"]["options"]["virtualenv"] == "../../.venv"
