"""Done means 2 and 4, across all three stacks (stacks/DESIGN.md §4, §5): no secret in plain text in anything the
engine would keep (each resource's inputs as serialised for the state, the components' outputs, the stack's
exports), and every stack's resources pass the policy pack.

Canaries stand in for every secret a program sees: the S3 keys from Vault's KV (the mocked invoke), the lab's
OpenBao root token (its state file), a rack's AppRole secret id (its environment variable). A canary may appear
only inside a secret envelope, which the engine encrypts with the stack's secrets provider.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from appliance.site import load_site
from stacks.components.config import StackSettings
from stacks.core import program as core_program
from stacks.dr import program as dr_program
from stacks.edge_fleet import program as edge_program
from stacks.policy.membria_policies import violations
from tests.conftest import REPO
from tests.unit.pulumi_harness import (
    APPROLE_SECRET_ENV,
    CANARIES,
    CANARY_SECRET_ID,
    CANARY_VAULT_TOKEN,
    Export,
    MembriaMocks,
    RecordingMonitor,
    is_secret_envelope,
    lab_state_with_openbao,
    leaks,
    plain_strings,
    recorded,
    run_program,
)

pytestmark = pytest.mark.unit

CORE_NODE = "pulumi-python:dynamic/membria:CoreNode"
EDGE_IMAGE = "pulumi-python:dynamic/membria:EdgeImage"


def _dynamic_outputs(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What the dynamic providers would return (never run under mocks): nothing secret, by their design."""
    return {
        "recap": {"ok": 40, "changed": 0, "failed": 0},
        "changes": 0,
        "events_path": f"/state/{name}.jsonl",
        "sha256": "f" * 64,
        "image_path": f"/images/{name}.img",
        "manifest_sha256": "e" * 64,
        "version": "0.1.0",
    }


def _mocks() -> MembriaMocks:
    return MembriaMocks({CORE_NODE: _dynamic_outputs, EDGE_IMAGE: _dynamic_outputs})


Build = Callable[[StackSettings], Mapping[str, Any]]

PROGRAMS: dict[str, Build] = {
    "core": lambda settings: core_program.build(settings, settings.load_site()),
    "dr": lambda settings: dr_program.build(settings, settings.load_site(), agent_principal="arn:aws:iam::1:user/dr"),
    "edge_fleet": lambda settings: edge_program.build(
        settings, settings.load_site(), output_root=settings.workdir / ".lab" / "edge-images"
    ),
}
CASES = [
    ("core", "lab"),
    ("core", "rack"),
    ("dr", "lab"),
    ("dr", "rack"),
    ("edge_fleet", "lab"),
]


@pytest.fixture(autouse=True)
def approle_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(APPROLE_SECRET_ENV, CANARY_SECRET_ID)


def run(stack: str, site: str, state_dir: Path, *, preview: bool) -> tuple[dict[str, Export], RecordingMonitor]:
    settings = StackSettings(REPO / "examples" / f"{site}.yaml", REPO, lab_state_with_openbao(state_dir))
    return run_program(lambda: PROGRAMS[stack](settings), mocks=_mocks(), preview=preview)


@pytest.mark.parametrize("preview", [False, True], ids=["up", "preview"])
@pytest.mark.parametrize(("stack", "site"), CASES)
def test_no_secret_in_plain_text(stack: str, site: str, preview: bool, tmp_path: Path) -> None:
    exports, monitor = run(stack, site, tmp_path, preview=preview)
    assert monitor.registered, "the program declared nothing"
    assert leaks(recorded(monitor), CANARIES) == []
    for key, export in exports.items():
        assert (
            not [p for p, text in plain_strings(export.value) if any(c in text for c in CANARIES)] or export.secret
        ), key


@pytest.mark.parametrize(("stack", "site"), [c for c in CASES if c[0] != "edge_fleet"])
def test_the_credentials_that_reach_a_provider_are_secrets(stack: str, site: str, tmp_path: Path) -> None:
    """The canaries are there (so the scan above looked at them), each inside an envelope."""
    _, monitor = run(stack, site, tmp_path, preview=False)
    (vault,) = monitor.of_type("pulumi:providers:vault")
    if load_site(REPO / "examples" / f"{site}.yaml").embedded["vault"]:
        assert is_secret_envelope(vault.raw["token"]) and vault.raw["token"]["value"] == CANARY_VAULT_TOKEN
    else:  # rack.yaml: an AppRole login; the secret id is the secret, the role id is not
        login = vault.raw["authLogin"]
        assert is_secret_envelope(login) and CANARY_SECRET_ID in str(login["value"])
    vault_resources = [r for r in monitor.registered if r.type.startswith("vault:")]
    assert all(r.provider.startswith(vault.urn + "::") for r in vault_resources if r.custom)
    for aws in monitor.of_type("pulumi:providers:aws"):
        for key in ("accessKey", "secretKey"):
            assert is_secret_envelope(aws.raw[key]), (aws.name, key)
    if stack == "dr":
        assert monitor.of_type("pulumi:providers:aws")


def test_the_scan_finds_a_canary_in_plain_text(tmp_path: Path) -> None:
    """The scan can fail: the same records with one envelope opened leak the token."""
    _, monitor = run("dr", "lab", tmp_path, preview=False)
    (vault,) = monitor.of_type("pulumi:providers:vault")
    opened = {**recorded(monitor), "opened": {**vault.raw, "token": vault.raw["token"]["value"]}}
    assert leaks(opened, CANARIES) == ["opened:token"]


@pytest.mark.parametrize("preview", [False, True], ids=["up", "preview"])
@pytest.mark.parametrize(("stack", "site"), CASES)
def test_every_stack_passes_the_policy_pack(stack: str, site: str, preview: bool, tmp_path: Path) -> None:
    _, monitor = run(stack, site, tmp_path, preview=preview)
    resources = [(r.type, r.raw, r.urn, r.name, r.property_dependencies) for r in monitor.registered]
    assert violations(resources) == []
    # ... and the pack does look at them: a bound tighter than ours fails, a bucket without versioning fails.
    if stack == "core":
        assert violations(resources, {"pki-ttl-bounds": {"rootMaxTtl": "1h"}})
    if stack == "dr":
        assert violations([r for r in resources if not r[0].startswith("aws:s3/bucketVersioning")])


@pytest.mark.parametrize(
    "stack_file", sorted(REPO.glob("stacks/*/Pulumi.*.yaml")), ids=lambda p: p.parent.name + "/" + p.name
)
def test_example_stack_files_hold_no_plain_secret(stack_file: Path) -> None:
    config = YAML(typ="safe").load(stack_file.read_text()).get("config") or {}
    sensitive = [key for key in config if any(word in key.lower() for word in ("token", "secret", "password"))]
    assert all(isinstance(config[key], dict) and set(config[key]) == {"secure"} for key in sensitive), sensitive
