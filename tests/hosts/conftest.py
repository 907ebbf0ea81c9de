"""Fixtures for the `hosts` tier: Debian 12 nspawn machines on a private bridge (appliance/hosts/nspawn.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.errors import MissingEnvironment
from appliance.hosts.nspawn import Bind, HostNetwork, TestHost, ensure_rootfs, free_network, require_tools, unique_name

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def host_network() -> Iterator[HostNetwork]:
    try:
        require_tools()
    except MissingEnvironment as exc:
        pytest.fail(f"the hosts tier needs: {exc.message} ({exc.hint})")
    ensure_rootfs()
    network = free_network()
    yield network
    network.down()


@pytest.fixture
def make_host(host_network: HostNetwork) -> Iterator[Callable[..., TestHost]]:
    """A factory of fresh, booted machines; every one is destroyed after the test.

    `with_repo=True` binds this checkout (and its .venv) read-only at the same path, so the node can run
    the appliance runtime from `membria_runtime_python` without a package index.
    """
    made: list[TestHost] = []
    taken = {11}

    def make(prefix: str = "t", *, with_repo: bool = False) -> TestHost:
        number = max(taken) + 1 if made else 11
        taken.add(number)
        binds = [Bind(REPO, REPO)] if with_repo else []
        host = TestHost(unique_name(prefix), host_network.address(number), host_network, binds=binds)
        made.append(host)
        host.create()
        host.start()
        return host

    yield make
    for host in made:
        host.destroy()
