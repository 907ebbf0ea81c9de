"""The base, nvidia and monitoring roles applied over SSH to a fresh Debian 12 test host (systemd-nspawn).

One host per module: `--check --diff` on the fresh host first, then two real runs (the second must change
nothing), then the checks. The host is a container, so the steps a container cannot do must be skipped with
a recorded reason; it has no GPU, so the nvidia role must skip with its reason.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ruamel.yaml import YAML

from appliance.hosts.nspawn import HostNetwork, TestHost, free_network, unique_name

pytestmark = pytest.mark.hosts

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
DOMAIN = "lab.membria.test"
PORTS = {"gateway": 8443, "core": 8444, "llm": 8081, "node_exporter": 9100, "ssh": 22}
PLAYBOOK = """\
- name: Core node roles under test
  hosts: core
  gather_facts: true
  roles:
    - {role: base, tags: [base]}
    - {role: nvidia, tags: [nvidia]}
    - {role: monitoring, tags: [monitoring]}
"""
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


@dataclass
class Run:
    returncode: int
    output: str

    def recap(self, host: str) -> dict[str, int]:
        for match in RECAP.finditer(self.output):
            if match.group(1) == host:
                return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, match.groups()[1:]), strict=True))
        raise AssertionError(f"no recap for {host} in:\n{self.output[-3000:]}")


@dataclass
class Node:
    host: TestHost
    workdir: Path
    ops_key: Path
    runs: dict[str, Run] = field(default_factory=dict)
    observed: dict[str, Any] = field(default_factory=dict)

    def play(self, *args: str) -> Run:
        env = {"ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
        result = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-i", str(self.workdir / "inventory.json"), str(self.workdir / "play.yml"), *args],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            env={**os.environ, **env},
        )
        return Run(result.returncode, result.stdout + result.stderr)

    def cat(self, path: str) -> str:
        return self.host.ssh(f"cat {path}").stdout


def inventory(host: TestHost, ops_public_key: str) -> dict[str, Any]:
    variables = {
        **host.ansible_vars(),
        "membria_site": "lab",
        "membria_domain": DOMAIN,
        "membria_node": "core-1",
        "membria_node_index": 0,
        "membria_ports": PORTS,
        "membria_admin_users": [{"name": "ops", "ssh_public_keys": [ops_public_key]}],
        "membria_core_nodes": [{"name": "core-1", "address": host.address}],
        "membria_vip": None,
        "membria_hardware": {"gpus": []},
        "base_apt_update_cache": False,
    }
    return {"all": {"children": {"core": {"hosts": {host.name: variables}}}}}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    workdir = tmp_path_factory.mktemp("base")
    network: HostNetwork = free_network()
    host = TestHost(unique_name("base"), network.address(11), network)
    try:
        host.create()
        host.start()
        ops_key = workdir / "ops_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ops_key)], check=True)
        (workdir / "inventory.json").write_text(
            json.dumps(inventory(host, ops_key.with_suffix(".pub").read_text().strip()))
        )
        (workdir / "play.yml").write_text(PLAYBOOK)
        node = Node(host, workdir, ops_key)
        # Order matters and is fixed here: check mode on the fresh host, then two real runs.
        node.runs["check"] = node.play("--check", "--diff")
        node.runs["first"] = node.play()
        node.runs["second"] = node.play()
        # What the pending-TLS exporter serves, before test_node_exporter_mtls puts certificates in place.
        node.observed["pending_local"] = host.ssh(
            "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:9100/metrics').status)\"",
            check=False,
        ).stdout.strip()
        yield node
    finally:
        host.destroy()
        network.down()


def test_check_mode_on_a_fresh_host_succeeds(node: Node) -> None:
    run = node.runs["check"]
    assert run.returncode == 0, run.output[-4000:]
    assert run.recap(node.host.name)["failed"] == 0


def test_apply_then_apply_again_changes_nothing(node: Node) -> None:
    first, second = node.runs["first"], node.runs["second"]
    assert first.returncode == 0, first.output[-4000:]
    assert first.recap(node.host.name)["changed"] > 0
    assert second.returncode == 0, second.output[-4000:]
    assert second.recap(node.host.name)["changed"] == 0, second.output[-6000:]


def test_root_still_logs_in_with_its_key(node: Node) -> None:
    assert node.host.ssh("id -u").stdout.strip() == "0"


def test_admin_logs_in_with_its_key_and_sudoes(node: Node) -> None:
    options = node.host.ssh_options()
    options[options.index("-i") + 1] = str(node.ops_key)
    result = subprocess.run(
        ["ssh", *options, f"ops@{node.host.address}", "sudo -n id -u"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
    keys = node.host.testinfra_host().file("/home/ops/.ssh/authorized_keys")
    assert (keys.user, keys.group, keys.mode) == ("ops", "ops", 0o600)


def test_sshd_runs_the_hardened_config(node: Node) -> None:
    effective = dict(line.split(" ", 1) for line in node.host.ssh("sshd -T").stdout.splitlines() if " " in line)
    assert effective["permitrootlogin"] == "without-password"  # sshd -T spells prohibit-password so
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["x11forwarding"] == "no"
    assert effective["maxauthtries"] == "3"
    assert effective["loglevel"] == "VERBOSE"
    assert "cbc" not in effective["ciphers"] and "sha1" not in effective["macs"]


def test_broken_sshd_config_never_reaches_sshd(node: Node) -> None:
    live = "/etc/ssh/sshd_config.d/50-membria.conf"
    before = node.cat(live)
    run = node.play("--tags", "base", "-e", json.dumps({"base_ssh_ciphers": ["no-such-cipher"]}))
    assert run.returncode != 0
    assert "SSH candidate config passes sshd -t" in run.output
    assert node.cat(live) == before
    assert node.host.ssh("true", check=False).returncode == 0


def test_firewall_drops_what_it_does_not_open(node: Node) -> None:
    ruleset = node.host.ssh("nft list ruleset").stdout
    assert "policy drop" in ruleset
    for port in (8443, 8444, 8081, 9100):
        assert f"tcp dport {port} accept" in ruleset
    # Nothing listens on 7: a dropped SYN times out, where an open firewall would answer with a reset.
    with pytest.raises(TimeoutError), socket.create_connection((node.host.address, 7), timeout=2):
        pass


def test_network_sysctls_applied_in_the_container(node: Node) -> None:
    for key, value in {
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.all.accept_redirects": "0",
        "net.ipv4.conf.all.log_martians": "1",
        "net.ipv4.tcp_syncookies": "1",
    }.items():
        assert node.host.ssh(f"sysctl -n {key}").stdout.strip() == value, key
    assert "kernel.kptr_restrict = 2" in node.cat("/etc/sysctl.d/60-membria-hardening.conf")


def test_container_skips_are_recorded(node: Node) -> None:
    status = json.loads(node.cat("/var/lib/membria/provision/base.status"))
    assert status["in_container"] is True
    items = " ".join(item["item"] for item in status["skipped_items"])
    assert "auditd" in items and "kernel.*" in items and "timesyncd" in items
    assert "-w /etc/sudoers.d -p wa -k scope" in node.cat("/etc/audit/rules.d/60-membria.rules")
    assert node.host.ssh("systemctl is-enabled systemd-timesyncd nftables").stdout.split() == ["enabled", "enabled"]
    assert 'Automatic-Reboot "false"' in node.cat("/etc/apt/apt.conf.d/52membria-unattended")


def test_nvidia_skips_without_a_gpu(node: Node) -> None:
    status = json.loads(node.cat("/var/lib/membria/provision/nvidia.status"))
    assert status == {"role": "nvidia", "skipped": True, "reason": "no NVIDIA GPU found by lspci", "skipped_items": []}
    assert "nvidia role skipped" in node.runs["first"].output


def test_scrape_config_lists_every_core_node(node: Node) -> None:
    config = YAML(typ="safe").load(node.cat("/etc/membria/prometheus/scrape-membria.yml"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"membria-node", "membria-gateway", "membria-core"}
    node_job = jobs["membria-node"]
    assert node_job["scheme"] == "https"
    assert node_job["tls_config"]["server_name"] == f"node-exporter.{DOMAIN}"
    assert node_job["static_configs"][0]["targets"] == [f"{node.host.address}:9100"]


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    **kw: Any,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if "san" in kw:
        builder = builder.add_extension(x509.SubjectAlternativeName(kw["san"]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_node_exporter_mtls(node: Node) -> None:
    """Pending TLS first (loopback only, recorded); with vault_agent's files in place, mTLS on TLS 1.3 only."""
    assert node.observed["pending_local"] == "200"
    pending = json.loads(node.cat("/var/lib/membria/provision/monitoring.status"))
    assert "TLS pending" in pending["skipped_items"][0]["reason"]

    # Stand in for vault_agent: a CA, the node exporter's certificate and a scraper's client certificate.
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("membria test CA", ca_key, None)
    server = _certificate(
        f"node-exporter.{DOMAIN}",
        server_key,
        (ca, ca_key),
        san=[x509.DNSName(f"node-exporter.{DOMAIN}"), x509.IPAddress(ipaddress.ip_address(node.host.address))],
    )
    client = _certificate("prometheus", client_key, (ca, ca_key))
    tls_dir = node.host.root / "etc/membria/tls"
    tls_dir.mkdir(parents=True, exist_ok=True)
    for name, data in {
        "ca.pem": _pem(ca),
        "node-exporter.pem": _pem(server),
        "node-exporter-key.pem": _pem(server_key),
    }.items():
        (tls_dir / name).write_bytes(data)
    node.host.ssh("chown root:membria /etc/membria/tls/* && chmod 0640 /etc/membria/tls/*")
    run = node.play("--tags", "monitoring")
    assert run.returncode == 0, run.output[-4000:]
    assert json.loads(node.cat("/var/lib/membria/provision/monitoring.status"))["skipped_items"] == []

    files = node.workdir / "scraper"
    files.mkdir()
    for name, data in {"ca.pem": _pem(ca), "client.pem": _pem(client), "client-key.pem": _pem(client_key)}.items():
        (files / name).write_bytes(data)
    url = f"https://{node.host.address}:9100/metrics"

    def context(with_client: bool, tls12: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(files / "ca.pem"))
        if with_client:
            ctx.load_cert_chain(files / "client.pem", files / "client-key.pem")
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    response = httpx.get(url, verify=context(with_client=True), timeout=10)
    assert response.status_code == 200 and "node_exporter_build_info" in response.text
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=context(with_client=False), timeout=10).raise_for_status()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=context(with_client=True, tls12=True), timeout=10)
