"""Every role on a fresh core test host, through the CLI an IT admin runs: `core plan`, `core apply`, the
services checked with pytest-testinfra, and a second `core apply` that reports exactly changed=0.

The admin machine plays the site's infrastructure: the lab's OpenBao (PKI, AppRoles, secrets; exposed on
the test bridge by a TCP relay) and S3 server. Two variants run the same checks:

- online (`make test-slow`): the node's image carries the Debian packages, and the runtime is this checkout,
  bound read-only;
- bundle (air-gapped, issue 10): a bare Debian node with no route anywhere, provisioned by
  `core apply --bundle` from a bundle this test builds, signs and verifies with `appliance bundle`: every
  package and the runtime venv come from the bundle.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from appliance.core.runner import read_events, summarize
from appliance.hosts.nspawn import Bind, HostNetwork, TestHost, free_network, unique_name
from appliance.hosts.relay import TcpRelay
from appliance.lab import bootstrap
from appliance.lab.services import OpenBao
from appliance.lab.state import LabState
from appliance.site import Site
from tests.integration.vault_support import bootstrapped_vault

pytestmark = [pytest.mark.hosts, pytest.mark.timeout(1800)]  # the module fixture provisions a node (~5 min)

REPO = Path(__file__).resolve().parents[2]
APPLIANCE = [sys.executable, "-m", "appliance"]
# A fresh minimal Debian 12 with SSH (what a rack node has before provisioning): everything else the roles
# install must come from the bundle.
BARE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "iproute2")
# An address of PyPI's CDN: the air-gapped node must not reach it (nor anything else off the bridge).
REGISTRY_ADDRESS = "151.101.0.223"


@dataclass
class Provisioned:
    variant: str
    host: TestHost
    site: Site
    site_file: Path
    state: LabState
    runs: dict[str, subprocess.CompletedProcess[str]]
    events: dict[str, Path]
    bundle: Path | None = None

    def recap(self, run: str) -> dict[str, Any]:
        summary = summarize(read_events(self.events[run]))
        return {host: vars(recap) for host, recap in summary.recap.items()}

    @property
    def ports(self) -> Any:
        return self.site.lab.ports

    def client_context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(bootstrap.ca_chain_path(self.state)))
        context.check_hostname = False  # the node is reached by its bridge address; the chain is what counts
        if with_cert:
            cert, key = bootstrap.cert_paths(self.state, "lab-admin")
            context.load_cert_chain(cert, key)
        return context


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*APPLIANCE, *args], capture_output=True, text=True, timeout=1500, env={**os.environ, **(env or {})}
    )


def _make_host(variant: str, network: HostNetwork) -> TestHost:
    if variant == "online":
        return TestHost(unique_name("core"), network.address(11), network, binds=[Bind(REPO, REPO)])
    return TestHost(unique_name("air"), network.address(11), network, packages=BARE_PACKAGES)


# The online variant runs under `make test-slow`: `make test` keeps the bundle variant (the same roles and checks,
# plus the bundle's build, join and verify) and test_lab_core_host's online apply, to stay within CI's time.
@pytest.fixture(scope="module", params=[pytest.param("online", marks=pytest.mark.slow), "bundle"])
def provisioned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    variant: str = request.param
    root = tmp_path_factory.mktemp(f"core-apply-{variant}")
    network = free_network()
    host = _make_host(variant, network)

    def on_the_bridge(data: dict[str, Any]) -> None:
        node = data["core_nodes"][0]
        node["address"] = host.address  # the certificates carry the node's real address
        node["ssh"] = {"user": "root", "key": str(host.key_path)}
        data["lab"]["dr_shipper"] = False

    try:
        with bootstrapped_vault(root / "lab", on_the_bridge) as backends:
            assert backends.state is not None
            bao = OpenBao(backends.site, backends.state)
            with TcpRelay((backends.site.lab.host, bao.port), listen_host=network.gateway) as relay:
                host.create()
                host.start()
                variables: dict[str, Any] = {
                    # the test host's pinned host key instead of trust-on-first-use
                    "ansible_ssh_common_args": host.ansible_vars()["ansible_ssh_common_args"],
                    "base_apt_update_cache": False,  # no route to a mirror (a bundle refreshes its own index)
                    "membria_vault_addr": f"https://{network.gateway}:{relay.port}",
                    "vault_agent_tls_server_name": "localhost",  # the relay's address is not in the cert
                }
                if variant == "online":
                    variables["membria_runtime_python"] = str(REPO / ".venv" / "bin" / "python")
                    variables["membria_runtime_root"] = str(REPO)  # the venv and the sources it imports (editable)
                vars_file = root / "vars.yaml"
                with vars_file.open("w") as fh:
                    YAML().dump({"all": variables}, fh)
                site_file = root / "lab" / "site.yaml"
                common = ["--site", str(site_file), "--vars", str(vars_file)]
                runs: dict[str, subprocess.CompletedProcess[str]] = {}
                events: dict[str, Path] = {}
                if variant == "bundle":
                    # As IT does it: build on the connected side in parts for removable media, join and
                    # verify them on the air-gapped side, apply from what was joined.
                    built = root / "built" / "membria-lab"
                    runs["keygen"] = _cli("bundle", "keygen", "--site", str(site_file))
                    runs["build"] = _cli("bundle", "build", str(site_file), "-o", str(built), "--split-size", "300M")
                    parts = built.parent / "membria-lab-parts" / "membria-lab.parts.json"
                    runs["join"] = _cli("bundle", "join", str(parts), "-o", str(root / "media"))
                    bundle = root / "media" / "membria-lab"
                    runs["verify"] = _cli("bundle", "verify", str(bundle), "--site", str(site_file))
                    common += ["--bundle", str(bundle)]
                else:
                    runs["plan"] = _cli("core", "plan", *common, "--json")
                for name in ("apply", "reapply"):
                    events[name] = root / f"{name}-events.jsonl"
                    runs[name] = _cli("core", "apply", *common, "--events", str(events[name]))
                bundle_dir = root / "media" / "membria-lab" if variant == "bundle" else None
                yield Provisioned(variant, host, backends.site, site_file, backends.state, runs, events, bundle_dir)
    finally:
        host.destroy()
        network.down()


def _ok(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"


def test_plan_on_a_fresh_host_completes(provisioned: Provisioned) -> None:
    if provisioned.variant == "bundle":
        # A check run cannot install the bundle's repository it would need to simulate apt on a bare node.
        pytest.skip("core plan --bundle on a bare node: see the bundle tests below")
    _ok(provisioned.runs["plan"])
    assert '"changes"' in provisioned.runs["plan"].stdout


def test_apply_succeeds(provisioned: Provisioned) -> None:
    _ok(provisioned.runs["apply"])
    recap = provisioned.recap("apply")[provisioned.site.core_nodes[0].name]
    assert recap["changed"] > 0 and recap["failed"] == 0 and recap["unreachable"] == 0


def test_second_apply_changes_nothing(provisioned: Provisioned) -> None:
    _ok(provisioned.runs["reapply"])
    recap = provisioned.recap("reapply")[provisioned.site.core_nodes[0].name]
    assert recap["changed"] == 0, provisioned.runs["reapply"].stdout[-6000:]
    assert recap["failed"] == 0 and recap["unreachable"] == 0


@pytest.mark.parametrize(
    "unit",
    [
        "ssh",
        "nftables",
        "membria-vault-agent",
        "membria-llm",
        "membria-core",
        "membria-gateway",
        "prometheus-node-exporter",
        "membria-dr-ship.timer",
        "membria-dr-backup.timer",
        "membria-dr-drill.timer",
    ],
)
def test_services_run(provisioned: Provisioned, unit: str) -> None:
    _ok(provisioned.runs["apply"])
    service = provisioned.host.testinfra_host().service(unit)
    assert service.is_running, provisioned.host.ssh(f"systemctl status {unit} --no-pager", check=False).stdout
    assert service.is_enabled


def test_services_listen(provisioned: Provisioned) -> None:
    remote = provisioned.host.testinfra_host()
    ports = provisioned.ports
    for port in (ports.gateway, ports.core, 9100):
        assert remote.socket(f"tcp://0.0.0.0:{port}").is_listening, port
    # llama.cpp cannot check client certificates: it is reached by the core server on loopback only.
    assert remote.socket(f"tcp://127.0.0.1:{ports.llm}").is_listening
    assert not remote.socket(f"tcp://0.0.0.0:{ports.llm}").is_listening


@pytest.mark.parametrize("service", ["gateway", "core", "node_exporter"])
def test_tls13_with_client_certificates(provisioned: Provisioned, service: str) -> None:
    port = {"gateway": provisioned.ports.gateway, "core": provisioned.ports.core, "node_exporter": 9100}[service]
    address = provisioned.host.address
    with socket.create_connection((address, port), timeout=10) as raw:
        with provisioned.client_context().wrap_socket(raw) as tls:
            assert tls.version() == "TLSv1.3"
    old = provisioned.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError), socket.create_connection((address, port), timeout=10) as raw:
        old.wrap_socket(raw).do_handshake()
    anonymous = provisioned.client_context(with_cert=False)
    if service == "gateway":
        # The gateway also admits service accounts with bearer tokens (no certificate): without either, the
        # API answers 401.
        import httpx

        with httpx.Client(verify=anonymous, timeout=30) as client:
            assert client.get(f"https://{address}:{port}/v1/knowledge/documents").status_code == 401
        return
    # No client certificate: the handshake (TLS 1.3 checks it after the first read) or the first request fails.
    with pytest.raises((ssl.SSLError, ConnectionError)), socket.create_connection((address, port), timeout=10) as raw:
        with anonymous.wrap_socket(raw) as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            if not tls.recv(1):
                raise ConnectionError("closed without an answer")


def test_gateway_is_ready_end_to_end(provisioned: Provisioned) -> None:
    """Ready = the gateway, the core server and the LLM on the node answer each other over TLS."""
    import httpx

    url = f"https://{provisioned.host.address}:{provisioned.ports.gateway}/readyz"
    # The core server loads its embedding model on the first readiness check (a few seconds on 2 cores,
    # longer than the gateway's 5 s probe): poll as `lab up` does.
    deadline = time.monotonic() + 180
    with httpx.Client(verify=provisioned.client_context(), timeout=30) as client:
        while True:
            response = client.get(url)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(3)
    assert response.status_code == 200, f"{response.text}\n{_diagnose(provisioned)}"


CORE_READYZ = (
    "import json, ssl, urllib.request; c = ssl.create_default_context(cafile='/etc/membria/tls/ca.pem'); "
    "c.check_hostname = False; c.load_cert_chain('/etc/membria/tls/gateway.pem', '/etc/membria/tls/gateway-key.pem')\n"
    "try: print(urllib.request.urlopen('https://127.0.0.1:{port}/readyz', context=c, timeout=30).read().decode())\n"
    "except Exception as e: print('core /readyz:', e, getattr(e, 'read', lambda: b'')().decode())"
)


def _diagnose(provisioned: Provisioned) -> str:
    """What a failed readiness check needs: the core's own answer and the runtime units' journals."""
    host = provisioned.host
    script = CORE_READYZ.replace("{port}", str(provisioned.ports.core))
    out = [host.ssh(f'python3 -c "{script}"', check=False).stdout]
    for unit in ("membria-core", "membria-llm", "membria-gateway"):
        out.append(host.ssh(f"journalctl -u {unit} -n 25 --no-pager", check=False).stdout)
    return "\n".join(out)


def test_firewall_drops_what_the_appliance_does_not_serve(provisioned: Provisioned) -> None:
    host = provisioned.host
    host.ssh("systemd-run --unit=probe-listener python3 -m http.server 7777 --bind 0.0.0.0")
    try:
        remote = host.testinfra_host()
        for _ in range(50):  # systemd-run returns before the listener binds
            if remote.socket("tcp://0.0.0.0:7777").is_listening:
                break
            time.sleep(0.2)
        assert remote.socket("tcp://0.0.0.0:7777").is_listening
        with pytest.raises(OSError):
            socket.create_connection((host.address, 7777), timeout=3).close()
    finally:
        host.ssh("systemctl stop probe-listener", check=False)


# ---- the air-gapped variant only -------------------------------------------------------------------------


def _bundle_only(provisioned: Provisioned) -> None:
    if provisioned.variant != "bundle":
        pytest.skip("bundle variant only")


def test_bundle_is_built_signed_and_verified(provisioned: Provisioned) -> None:
    _bundle_only(provisioned)
    assert provisioned.bundle is not None
    for step in ("keygen", "build", "join", "verify"):
        _ok(provisioned.runs[step])
    assert "verified" in provisioned.runs["verify"].stdout
    sbom = json.loads((provisioned.bundle / "sbom.cdx.json").read_text())
    names = {component["name"] for component in sbom["components"]}
    assert {"openssh-server", "nftables", "llama-cpp-python", "membria-appliance"} <= names


def test_a_tampered_bundle_is_refused_before_any_node_is_touched(provisioned: Provisioned, tmp_path: Path) -> None:
    _bundle_only(provisioned)
    assert provisioned.bundle is not None
    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-al", str(provisioned.bundle), str(tampered)], check=True)  # hard links: cheap
    victim = sorted((tampered / "debs").glob("nftables_*.deb"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.unlink()  # a new file: the hard-linked original stays intact
    victim.write_bytes(bytes(data))
    verify = _cli("bundle", "verify", str(tampered), "--site", str(provisioned.site_file))
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert f"debs/{victim.name}: sha256 differs" in verify.stderr
    apply = _cli("core", "apply", "--site", str(provisioned.site_file), "--bundle", str(tampered))
    assert apply.returncode == 1 and "sha256 differs" in apply.stderr
    assert "recap" not in apply.stdout  # refused before the play started


def test_air_gapped_node_has_no_route_off_the_bridge(provisioned: Provisioned) -> None:
    _bundle_only(provisioned)
    host = provisioned.host
    assert host.ssh("ip -4 route show default").stdout.strip() == ""
    probe = f"python3 -c \"import socket; socket.create_connection(('{REGISTRY_ADDRESS}', 443), timeout=3)\""
    assert host.ssh(probe, check=False).returncode != 0


def test_packages_and_runtime_came_from_the_bundle(provisioned: Provisioned) -> None:
    _bundle_only(provisioned)
    _ok(provisioned.runs["apply"])
    remote = provisioned.host.testinfra_host()
    # apt's only source is the bundle's repository, and the installed packages were taken from it.
    policy = remote.check_output("apt-cache policy nftables")
    assert "file:/var/lib/membria/bundle/debs" in policy
    assert "deb.debian.org" not in remote.check_output("apt-cache policy")
    # The runtime services run from the venv the runtime role built out of the bundle's wheels.
    unit = remote.check_output("systemctl cat membria-core")
    assert "/opt/membria/runtime/bin/python" in unit
    assert remote.file("/opt/membria/runtime/bin/python").exists
    assert not remote.file(str(REPO)).exists  # nothing of this checkout on the node
