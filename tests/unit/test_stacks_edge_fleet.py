"""The edge fleet stack under Pulumi's mocks: one EdgeImage per profile with the content hash the provider will
recompute, the build's timeouts, the exported {profile: sha256} map, and nothing secret in what state would hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulumi
import pytest
from ruamel.yaml import YAML

from appliance.errors import BadInput
from appliance.iac.edge_image import CHECKOUT, edge_image_hash
from appliance.site import Site, load_site
from stacks.components.config import StackSettings
from stacks.components.edge_image import TYPE
from stacks.edge_fleet import program
from tests.conftest import lab_site_data, write_site
from tests.unit.pulumi_harness import (
    CANARY_VAULT_TOKEN,
    MembriaMocks,
    is_secret_envelope,
    leaks,
    recorded,
    run_program,
)

pytestmark = pytest.mark.unit

PROJECT = CHECKOUT / "stacks" / "edge_fleet"
PROFILES = ["engineering-laptop", "sales-laptop"]


def _image_outputs(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What EdgeImageProvider.create would add (mocks never run it)."""
    return {
        "sha256": "f" * 64,
        "image_path": f"{inputs['output_root']}/{inputs['profile']}/membria-edge.img",
        "manifest_sha256": "e" * 64,
        "version": "0.0.0-test",
        "built_at": "2025-01-01T00:00:00+00:00",
        "build_seconds": 1.0,
    }


def _mocks() -> MembriaMocks:
    return MembriaMocks(outputs={TYPE: _image_outputs})


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[StackSettings, Site]:
    monkeypatch.setenv("VAULT_TOKEN", CANARY_VAULT_TOKEN)  # the program must never read it
    site_file = write_site(tmp_path / "site.yaml", lab_site_data(tmp_path / "state"))
    return StackSettings(site_file=site_file, workdir=CHECKOUT, state_dir=tmp_path / "state"), load_site(site_file)


@pytest.mark.parametrize("preview", [False, True])
def test_one_image_per_profile(lab: tuple[StackSettings, Site], tmp_path: Path, preview: bool) -> None:
    settings, site = lab
    out = tmp_path / "images"
    exports, monitor = run_program(
        lambda: program.build(settings, site, output_root=out), mocks=_mocks(), preview=preview
    )
    images = sorted(monitor.of_type(TYPE), key=lambda r: r.name)  # registered concurrently: any order
    assert [r.name for r in images] == [f"image-{p}" for p in PROFILES]
    for resource, profile in zip(images, PROFILES, strict=True):
        assert resource.custom and resource.custom_timeouts == {"create": "120m", "update": "120m"}
        inputs = {k: v for k, v in resource.inputs.items() if k != "__provider"}
        assert inputs == {
            "site_file": str(settings.site_file),
            "workdir": str(CHECKOUT),
            "profile": profile,
            "output_root": str(out),
            "state_dir": str(tmp_path / "state"),
            "content_hash": edge_image_hash(site, profile, workdir=CHECKOUT),
        }
        assert is_secret_envelope(resource.raw["__provider"])  # the pickle is a secret, though it holds none
    assert images[0].dependencies == [] and images[1].dependencies == [images[0].urn]  # one build at a time
    assert exports["sha256"].value == dict.fromkeys(PROFILES, "f" * 64)
    assert exports["image_paths"].value == {p: f"{out}/{p}/membria-edge.img" for p in PROFILES}
    assert exports["versions"].value == dict.fromkeys(PROFILES, "0.0.0-test")
    assert not any(e.secret for e in exports.values())
    assert leaks(recorded(monitor), [CANARY_VAULT_TOKEN]) == []


def test_chosen_profiles_only(lab: tuple[StackSettings, Site], tmp_path: Path) -> None:
    settings, site = lab
    exports, monitor = run_program(
        lambda: program.build(settings, site, profiles=["sales-laptop"], output_root=tmp_path), mocks=_mocks()
    )
    assert [r.inputs["profile"] for r in monitor.of_type(TYPE)] == ["sales-laptop"]
    assert list(exports["sha256"].value) == ["sales-laptop"]


def test_an_unknown_profile_fails_the_program(lab: tuple[StackSettings, Site], tmp_path: Path) -> None:
    settings, site = lab
    with pytest.raises(BadInput, match="no edge profile 'tablet'"):
        program.build(settings, site, profiles=["tablet"], output_root=tmp_path)


@pytest.mark.parametrize(
    ("raw", "wanted"),
    [(None, None), ("", None), ("a,b", ["a", "b"]), (" a , ", ["a"]), ('["a", "b"]', ["a", "b"])],
)
def test_profiles_config(raw: str | None, wanted: list[str] | None) -> None:
    assert program.parse_profiles(raw) == wanted


def test_profiles_config_refuses_an_object() -> None:
    with pytest.raises(BadInput, match="list of profile names"):
        program.parse_profiles('[{"name": "a"}]')


def test_main_with_the_lab_stack_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main() as `pulumi up` runs it: in the project directory, configured by Pulumi.lab.yaml (the CLI hands a
    structured value to the program as its JSON text)."""
    monkeypatch.chdir(PROJECT)
    config = YAML(typ="safe").load((PROJECT / "Pulumi.lab.yaml").read_text())["config"]
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    values["membria:stateDir"] = str(tmp_path / "state")  # not the checkout's .lab
    exported: dict[str, Any] = {}
    monkeypatch.setattr(pulumi, "export", exported.__setitem__)  # the stack's outputs, resolved by run_program

    def run_main() -> dict[str, Any]:
        program.main()
        return exported

    pulumi.runtime.set_all_config(values)
    try:
        exports, monitor = run_program(run_main, mocks=_mocks())
    finally:
        pulumi.runtime.set_all_config({})
    [image] = monitor.of_type(TYPE)
    assert image.inputs["profile"] == "engineering-laptop"
    assert image.inputs["output_root"] == str(CHECKOUT / ".lab" / "edge-images")
    assert image.inputs["site_file"] == str(CHECKOUT / "examples" / "lab.yaml")
    assert exports["sha256"].value == {"engineering-laptop": "f" * 64}
    assert set(exports) == {"sha256", "image_paths", "versions"}


def test_project_files() -> None:
    project = YAML(typ="safe").load((PROJECT / "Pulumi.yaml").read_text())
    assert project["name"] == "membria-edge-fleet"
    assert project["runtime"] == {"name": "python", "options": {"toolchain": "pip", "virtualenv": "../../.venv"}}
    assert (PROJECT / "__main__.py").read_text().splitlines()[0] == "from stacks.edge_fleet.program import main"
    config = YAML(typ="safe").load((PROJECT / "Pulumi.lab.yaml").read_text())["config"]
    assert (CHECKOUT / config["membria:siteFile"]).is_file()
    sensitive = [k for k in config if any(w in k.lower() for w in ("token", "secret", "password"))]
    assert all(isinstance(config[k], dict) and "secure" in config[k] for k in sensitive)
