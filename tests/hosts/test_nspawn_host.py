"""The test hosts themselves: a fresh machine boots systemd, answers SSH with its own pinned host key, and
leaves nothing behind."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from appliance.hosts.nspawn import HostNetwork, TestHost

pytestmark = pytest.mark.hosts


def test_boots_systemd_with_sshd_on_the_private_network(make_host: Callable[..., TestHost]) -> None:
    host = make_host()
    remote = host.testinfra_host()
    assert remote.file("/proc/1/comm").content_string.strip() == "systemd"
    assert remote.service("ssh").is_running
    assert remote.socket("tcp://0.0.0.0:22").is_listening
    assert remote.system_info.distribution == "debian" and remote.system_info.release.startswith("12")
    assert remote.interface("host0").addresses[0] == host.address
    # No route off the bridge: the only route is the bridge's own subnet.
    assert "default" not in host.ssh("ip route").stdout


def test_host_key_is_pinned(make_host: Callable[..., TestHost], host_network: HostNetwork) -> None:
    host = make_host()
    other = make_host()
    # The other machine's key does not pass for this one's address: SSH refuses rather than trusting it.
    argv = ["ssh", *other.ssh_options(), f"root@{host.address}", "true"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "Host key verification failed" in result.stderr or "No ED25519 host key" in result.stderr


def test_destroy_removes_the_machine(host_network: HostNetwork) -> None:
    host = TestHost("t-destroy", host_network.address(200), host_network)
    host.create()
    host.start()
    pid = host.pid()
    assert pid is not None
    host.destroy()
    assert not host.running()
    assert not host.home.exists()
    host.destroy()  # idempotent
