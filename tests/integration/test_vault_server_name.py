"""`services.vault.tls_server_name`: Vault reached at an address its certificate does not carry (the lab's
core node dials OpenBao through a relay on the lab bridge) is still verified, against the configured name."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.backends import Backends
from appliance.errors import ServiceError
from appliance.hosts.relay import TcpRelay
from appliance.lab.services import OpenBao
from appliance.site import Site
from tests.integration.vault_support import bootstrapped_vault

pytestmark = pytest.mark.integration

RELAY_ADDRESS = "127.0.0.2"  # on loopback, but not in OpenBao's dev certificate (127.0.0.1, localhost)


@pytest.fixture(scope="module")
def relayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Backends, TcpRelay]]:
    with bootstrapped_vault(tmp_path_factory.mktemp("server-name")) as backends:
        assert backends.state is not None
        bao = OpenBao(backends.site, backends.state)
        with TcpRelay((backends.site.lab.host, bao.port), listen_host=RELAY_ADDRESS) as relay:
            yield backends, relay


def _external(relayed: tuple[Backends, TcpRelay], port: int | None = None, **vault: Any) -> Backends:
    backends, relay = relayed
    assert backends.state is not None
    bao = OpenBao(backends.site, backends.state)
    data = backends.site.model_dump(mode="json")
    data["services"]["vault"] = {
        "backend": "external",
        "url": f"https://{RELAY_ADDRESS}:{port or relay.port}",
        "ca_file": str(bao.ca_file),
        "auth": {"method": "token", "token_env": "MEMBRIA_TEST_VAULT_TOKEN"},
        **vault,
    }
    return Backends(Site.model_validate(data), backends.state)


@pytest.fixture(autouse=True)
def _token(relayed: tuple[Backends, TcpRelay], monkeypatch: pytest.MonkeyPatch) -> None:
    backends, _ = relayed
    assert backends.state is not None
    monkeypatch.setenv("MEMBRIA_TEST_VAULT_TOKEN", OpenBao(backends.site, backends.state).root_token())


def test_the_configured_name_is_verified(relayed: tuple[Backends, TcpRelay]) -> None:
    backends = _external(relayed, tls_server_name="localhost")
    assert backends.read_secret("membria/s3-primary")["access_key"]


def test_without_the_name_the_address_is_refused(relayed: tuple[Backends, TcpRelay]) -> None:
    with pytest.raises(ServiceError, match=r"unreachable.*(certificate|SSL)"):
        _external(relayed).vault()


def test_a_name_the_certificate_does_not_carry_is_refused(relayed: tuple[Backends, TcpRelay]) -> None:
    with pytest.raises(ServiceError, match="unreachable"):
        _external(relayed, tls_server_name="vault.elsewhere.example").vault()


def test_the_relay_runs_as_a_command(relayed: tuple[Backends, TcpRelay], tmp_path: Path) -> None:
    """`python -m appliance.hosts.relay LISTEN UPSTREAM`, as the lab runs it, until SIGTERM."""
    from tests.conftest import free_port

    backends, _ = relayed
    assert backends.state is not None
    bao = OpenBao(backends.site, backends.state)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.hosts.relay", f"{RELAY_ADDRESS}:{port}", f"127.0.0.1:{bao.port}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "relaying" in proc.stdout.readline()
        through_command = _external(relayed, port, tls_server_name="localhost")
        assert through_command.read_secret("membria/s3-primary")["access_key"]
    finally:
        proc.terminate()
    assert proc.wait(timeout=10) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "appliance.hosts.relay", "nowhere", "127.0.0.1:1"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "expected HOST:PORT" in bad.stderr
