"""The harness the stack tests stand on: it records what the engine would get, and its leak scan finds a secret
written in plain text and accepts one kept as a Pulumi secret."""

from __future__ import annotations

import subprocess
import sys

import pulumi
import pulumi_vault as vault
import pytest

from tests.conftest import REPO
from tests.unit.pulumi_harness import CANARY_SECRET_KEY, CANARY_VAULT_TOKEN, leaks, recorded, run_program

pytestmark = pytest.mark.unit


def _program(*, wrap: bool) -> dict[str, pulumi.Output[str]]:
    token = pulumi.Output.secret(CANARY_VAULT_TOKEN) if wrap else CANARY_VAULT_TOKEN
    provider = vault.Provider("vault", address="https://vault.example:8200", token=token, skip_child_token=True)
    secret = vault.kv.get_secret_v2_output(
        mount="membria", name="dr/s3", opts=pulumi.InvokeOutputOptions(provider=provider)
    )
    mount = vault.Mount("pki", path="pki", type="pki", opts=pulumi.ResourceOptions(provider=provider, protect=True))
    key = secret.data.apply(lambda d: d["secret_key"])
    return {"mount": mount.path, "key": pulumi.Output.secret(key) if wrap else key}


@pytest.mark.parametrize("preview", [False, True])
def test_a_wrapped_secret_is_an_envelope_and_no_leak(preview: bool) -> None:
    exports, monitor = run_program(lambda: _program(wrap=True), preview=preview)
    provider = monitor.one("pulumi:providers:vault")
    assert provider.raw["token"]["value"] == CANARY_VAULT_TOKEN  # inside the envelope
    assert leaks(recorded(monitor), [CANARY_VAULT_TOKEN, CANARY_SECRET_KEY]) == []
    mount = monitor.one("vault:index/mount:Mount", "pki")
    assert mount.protect and mount.inputs["type"] == "pki" and mount.provider.startswith(provider.urn)
    assert exports["key"].secret and exports["key"].value == CANARY_SECRET_KEY
    assert not exports["mount"].secret and exports["mount"].value == "pki"


def test_a_plain_secret_is_found() -> None:
    exports, monitor = run_program(lambda: _program(wrap=False))
    assert leaks(recorded(monitor), [CANARY_VAULT_TOKEN]) == [
        f"inputs {monitor.one('pulumi:providers:vault').urn}:token"
    ]
    assert not exports["key"].secret and exports["key"].value == CANARY_SECRET_KEY


def test_a_program_runs_after_asyncio_run_left_no_current_loop() -> None:
    """In the whole suite an earlier test's `asyncio.run` leaves the main thread without a current loop, before
    the first program creates Pulumi's root stack (a fresh process, so that first time is this one)."""
    script = (
        "import asyncio\n"
        "asyncio.run(asyncio.sleep(0))\n"
        "from tests.unit.test_pulumi_harness import _program\n"
        "from tests.unit.pulumi_harness import run_program\n"
        "exports, _ = run_program(lambda: _program(wrap=True))\n"
        "print(exports['mount'].value)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "pki", done.stderr[-2000:]
