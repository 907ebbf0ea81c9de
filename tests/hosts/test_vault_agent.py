"""The vault_agent role on a fresh Debian 12 test host (systemd-nspawn), against the lab's real OpenBao.

The lab's OpenBao listens on 127.0.0.1 only (HTTPS with its dev-tls certificate); a TCP relay exposes it on
the test bridge's admin-side address, and the agent verifies OpenBao's own certificate through it (CA from
the inventory, TLS server name `localhost`). The controller side (`vault_access.node_credentials`) makes
the node's AppRole and mints a fresh secret id before every run, as `core apply` does, and hands it to the
play through the runner's environment only.

Order, fixed in the fixture: `--check --diff` on the fresh host, then two real runs (the second must change
nothing, although it brings a new secret id), `--check --diff` again (nothing to do), then the checks.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from appliance.backends import Backends
from appliance.core.inventory import bao_binary
from appliance.core.runner import MASK, RunResult, run_playbook
from appliance.core.vault_access import node_credentials
from appliance.hosts.nspawn import HostNetwork, TestHost, unique_name
from appliance.hosts.relay import TcpRelay
from appliance.lab import bootstrap
from appliance.lab.services import OpenBao
from appliance.pki import Pki
from tests.integration.vault_support import bootstrapped_vault

pytestmark = pytest.mark.hosts

NODE = "core-1"
SECRET_ENV = "MEMBRIA_VAULT_SECRET_ID_CORE_1"
PLAYBOOK = """\
- name: The Vault agent alone
  hosts: all
  gather_facts: false
  roles:
    - {role: vault_agent, tags: [vault_agent]}
"""
# A stand-in for the core server's unit: the agent restarts it when core.pem is renewed.
FAKE_CORE_UNIT = """\
[Unit]
Description=stand-in for the core server (test)
[Service]
ExecStart=/bin/sleep infinity
"""


@dataclass
class Agent:
    host: TestHost
    backends: Backends
    workdir: Path
    secret_ids: dict[str, str] = field(default_factory=dict)  # run name -> the secret id its environment held
    runs: dict[str, RunResult] = field(default_factory=dict)
    observed: dict[str, str] = field(default_factory=dict)

    @property
    def domain(self) -> str:
        return self.backends.site.site.domain

    def play(self, name: str, *, check: bool = False) -> RunResult:
        envvars: dict[str, str] = {}
        if not check:  # `core plan` mints nothing: the check run has no secret id at all
            _, self.secret_ids[name] = node_credentials(self.backends.site, NODE, self.backends)
            envvars[SECRET_ENV] = self.secret_ids[name]
        self.runs[name] = run_playbook(
            None,
            check=check,
            diff=check,
            limit=None,
            tags=None,
            on_event=None,
            private_data_dir=self.workdir / "runner",
            envvars=envvars,
            inventory=self.workdir / "inventory.json",
            playbook=self.workdir / "play.yml",
        )
        return self.runs[name]

    def sh(self, command: str) -> str:
        return self.host.ssh(command).stdout

    def certificate(self, name: str) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.sh(f"cat /etc/membria/tls/{name}.pem").encode())


def inventory(host: TestHost, agent_vars: dict[str, Any]) -> dict[str, Any]:
    return {"all": {"hosts": {host.name: {**host.ansible_vars(), **agent_vars}}}}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, host_network: HostNetwork) -> Iterator[Agent]:
    workdir = tmp_path_factory.mktemp("vault-agent")
    network = host_network
    address = network.address(21)  # clear of make_host's numbers (11 upwards)
    host = TestHost(unique_name("vagt"), address, network)

    def on_the_bridge(data: dict[str, Any]) -> None:
        data["core_nodes"][0]["address"] = address  # the certificates carry the node's real address

    try:
        with bootstrapped_vault(workdir / "lab", on_the_bridge) as backends:
            assert backends.state is not None
            bao = OpenBao(backends.site, backends.state)
            with TcpRelay((backends.site.lab.host, bao.port), listen_host=network.gateway) as relay:
                host.create()
                host.start()
                role_id, _ = node_credentials(backends.site, NODE, backends)
                site = backends.site
                agent_vars = {
                    "membria_site": site.site.name,
                    "membria_domain": site.site.domain,
                    "membria_node": NODE,
                    "membria_node_index": 0,
                    "membria_core_nodes": [{"name": NODE, "address": address}],
                    "membria_backends": {"llm": "embedded", "vectors": "embedded", "audit_db": "embedded"},
                    "membria_vault_addr": f"https://{network.gateway}:{relay.port}",
                    "membria_vault_ca_pem": bao.ca_file.read_text(),
                    "membria_vault_role_id": role_id,
                    "membria_bao_binary": bao_binary(),
                    # The relay's address is not in OpenBao's dev certificate; its name is.
                    "vault_agent_tls_server_name": "localhost",
                }
                (workdir / "inventory.json").write_text(json.dumps(inventory(host, agent_vars)))
                (workdir / "play.yml").write_text(PLAYBOOK)
                agent = Agent(host, backends, workdir)
                agent.play("check", check=True)
                agent.observed["after_check"] = agent.host.ssh(
                    "ls /usr/local/bin/bao /etc/membria 2>&1; systemctl cat membria-vault-agent 2>&1 | head -1",
                    check=False,
                ).stdout
                host.ssh(
                    f"printf '%s' '{FAKE_CORE_UNIT}' > /etc/systemd/system/membria-core.service && "
                    "systemctl daemon-reload && systemctl start membria-core.service"
                )
                agent.play("first")
                agent.observed["journal_after_first"] = agent.host.ssh(
                    "journalctl -u membria-vault-agent --no-pager -o cat | tail -40", check=False
                ).stdout
                agent.play("second")
                agent.play("plan", check=True)  # `core plan` on the provisioned node
                yield agent
    finally:
        host.destroy()


def recap(run: RunResult, agent: Agent) -> dict[str, int]:
    host = agent.host
    assert not run.errors, run.errors
    assert not run.failures, ([(f.task, f.message) for f in run.failures], agent.observed.get("journal_after_first"))
    return {"changed": run.recap[host.name].changed, "failed": run.recap[host.name].failed}


# --- runs ------------------------------------------------------------------------------------------------------


def test_check_mode_on_a_fresh_host_succeeds_and_leaves_nothing(agent: Agent) -> None:
    run = agent.runs["check"]
    assert run.rc == 0 and recap(run, agent)["failed"] == 0
    after = agent.observed["after_check"]
    assert "'/usr/local/bin/bao': No such file" in after
    assert "'/etc/membria': No such file" in after
    assert "No files found for membria-vault-agent" in after


def test_apply_then_apply_again_changes_nothing(agent: Agent) -> None:
    first, second = agent.runs["first"], agent.runs["second"]
    assert first.rc == 0 and recap(first, agent)["changed"] > 0
    assert second.rc == 0
    assert recap(second, agent)["changed"] == 0, [(c.task, c.target) for c in second.changes]
    plan = agent.runs["plan"]
    assert plan.rc == 0 and recap(plan, agent)["changed"] == 0, [(c.task, c.target) for c in plan.changes]


def test_the_agent_runs_enabled_and_hardened(agent: Agent) -> None:
    infra = agent.host.testinfra_host()
    service = infra.service("membria-vault-agent")
    assert service.is_running and service.is_enabled
    props = dict(
        line.split("=", 1)
        for line in agent.sh(
            "systemctl show membria-vault-agent -p Restart -p NoNewPrivileges -p ProtectSystem "
            "-p CapabilityBoundingSet -p LimitCORE"
        ).splitlines()
    )
    assert props["Restart"] == "always"
    assert props["NoNewPrivileges"] == "yes" and props["ProtectSystem"] == "strict"
    assert props["CapabilityBoundingSet"] == "cap_chown" and props["LimitCORE"] == "0"
    binary = infra.file("/usr/local/bin/bao")
    assert (binary.user, binary.mode) == ("root", 0o755)


# --- what it renders --------------------------------------------------------------------------------------------


def test_the_ca_chain_is_the_site_chain(agent: Agent) -> None:
    site_chain = Pki.for_site(agent.backends.site, agent.backends.vault()).ca_chain_pem()
    on_node = x509.load_pem_x509_certificates(agent.sh("cat /etc/membria/tls/ca.pem").encode())
    assert on_node == x509.load_pem_x509_certificates(site_chain.encode())
    assert "BEGIN X509 CRL" in agent.sh("cat /etc/membria/tls/crl.pem")


def test_the_core_certificate_chains_to_the_site_ca_with_its_names(agent: Agent, tmp_path: Path) -> None:
    leaf, issuing = agent.certificate("core")
    (tmp_path / "core.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    site_chain = Pki.for_site(agent.backends.site, agent.backends.vault()).ca_chain_pem()
    assert bootstrap.chains_to(tmp_path / "core.pem", site_chain, dt.timedelta(hours=48))
    assert issuing == x509.load_pem_x509_certificates(site_chain.encode())[0]  # the intermediate
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"{NODE}.{agent.domain}"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted([f"{NODE}.{agent.domain}", f"core.{agent.domain}"])
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(agent.host.address),
        ipaddress.ip_address("127.0.0.1"),
    ]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=71) < lifetime <= dt.timedelta(hours=72, minutes=1)  # vault_agent_cert_ttl


def test_every_certificate_and_its_key(agent: Agent) -> None:
    infra = agent.host.testinfra_host()
    assert infra.group("membria").exists
    names = {
        "core": f"{NODE}.{agent.domain}",
        "gateway": f"gateway.{agent.domain}",
        "llm": f"llm.{NODE}.{agent.domain}",
        "node-exporter": f"node-exporter.{NODE}.{agent.domain}",
    }
    for name, common_name in names.items():
        leaf = agent.certificate(name)[0]
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == common_name
        key = serialization.load_pem_private_key(
            agent.sh(f"cat /etc/membria/tls/{name}-key.pem").encode(), password=None
        )
        assert key.public_key() == leaf.public_key(), name
        for path in (f"/etc/membria/tls/{name}.pem", f"/etc/membria/tls/{name}-key.pem"):
            file = infra.file(path)
            assert (file.user, file.group, file.mode) == ("root", "membria", 0o640), path
    tls_dir = infra.file("/etc/membria/tls")
    assert (tls_dir.group, tls_dir.mode) == ("membria", 0o750)


def test_the_gateway_secrets(agent: Agent) -> None:
    infra = agent.host.testinfra_host()
    env = infra.file("/etc/membria/secrets/gateway.env")
    assert (env.user, env.group, env.mode) == ("root", "root", 0o600)
    key_hex = agent.backends.read_secret(bootstrap.AUDIT_HMAC_PATH)["key_hex"]
    assert env.content_string == f"MEMBRIA_AUDIT_HMAC_KEY={key_hex}\n"
    signing = bootstrap.ed25519_from_vault(agent.backends, bootstrap.SERVICE_TOKEN_KEY_PATH)
    assert infra.file("/etc/membria/gateway/service-token.pub").content == bootstrap.public_pem(signing)
    assert "PRIVATE KEY" not in agent.sh("cat /etc/membria/gateway/service-token.pub")


# --- the secret id ----------------------------------------------------------------------------------------------


def test_the_secret_id_is_written_once_and_kept_private(agent: Agent) -> None:
    infra = agent.host.testinfra_host()
    secret_file = infra.file("/etc/membria/vault-agent/secret-id")
    assert (secret_file.user, secret_file.mode) == ("root", 0o600)
    assert infra.file("/etc/membria/vault-agent/role-id").mode == 0o600
    # The second run brought a fresh secret id, and left the file alone: the agent's token was valid.
    assert secret_file.content_string.strip() == agent.secret_ids["first"]
    assert agent.secret_ids["second"] != agent.secret_ids["first"]


# --- renewal ---------------------------------------------------------------------------------------------------


def test_a_renewed_certificate_restarts_its_unit(agent: Agent) -> None:
    """A new core certificate (its bundle gone, so the agent must issue one) restarts membria-core.service."""
    before_serial = agent.certificate("core")[0].serial_number
    before_run = agent.sh("systemctl show -p InvocationID --value membria-core.service").strip()
    agent.sh("rm /var/lib/membria/vault-agent/core.bundle.pem && systemctl restart membria-vault-agent")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if agent.certificate("core")[0].serial_number != before_serial:
            break
        time.sleep(1)
    else:
        pytest.fail("the agent did not issue a new core certificate:\n" + agent.sh("journalctl -u membria-vault-agent"))
    deadline = time.monotonic() + 30
    while agent.sh("systemctl show -p InvocationID --value membria-core.service").strip() == before_run:
        assert time.monotonic() < deadline, agent.sh("journalctl -u membria-vault-agent --no-pager | tail -20")
        time.sleep(0.5)
    assert agent.sh("systemctl is-active membria-core.service").strip() == "active"


def test_an_agent_without_a_valid_token_gets_a_fresh_secret_id(agent: Agent) -> None:
    """Its token revoked (or past its 24 h) while the agent was down: the next apply delivers the secret id it
    brings and starts the agent, which logs in with it."""
    agent.sh("systemctl stop membria-vault-agent")
    agent.backends.vault().auth.token.revoke(agent.sh("cat /etc/membria/vault-agent/token").strip())
    run = agent.play("after-revocation")
    assert run.rc == 0 and recap(run, agent)["failed"] == 0
    assert sorted(c.task for c in run.changes) == ["Deliver the AppRole secret id", "Run the agent"]
    assert agent.sh("cat /etc/membria/vault-agent/secret-id").strip() == agent.secret_ids["after-revocation"]
    assert agent.sh("systemctl is-active membria-vault-agent").strip() == "active"
    deadline = time.monotonic() + 30
    while agent.host.ssh(
        "BAO_ADDR=$(sed -n 's/^ *address = \"\\(.*\\)\"/\\1/p' /etc/membria/vault-agent/agent.hcl) "
        "BAO_CACERT=/etc/membria/vault-agent/vault-ca.pem BAO_TLS_SERVER_NAME=localhost "
        'BAO_TOKEN="$(cat /etc/membria/vault-agent/token)" bao token lookup >/dev/null',
        check=False,
    ).returncode:
        assert time.monotonic() < deadline, agent.sh("journalctl -u membria-vault-agent --no-pager | tail -20")
        time.sleep(1)


# --- last: every run above, including the recovery one --------------------------------------------------------


def test_the_secret_id_never_reaches_a_log(agent: Agent) -> None:
    secrets = set(agent.secret_ids.values())
    for name, run in agent.runs.items():
        events = run.events_path.read_text()
        assert run.events_path.stat().st_size > 0
        # Not even masked: the runner's masking is a second line of defence, no_log is the first. (Ansible's
        # banners are rows of asterisks: a mask is eight of them alone.)
        assert not re.search(rf"(?<!\*){re.escape(MASK)}(?!\*)", events), name
        assert not any(secret in events for secret in secrets), name
    for path in (agent.workdir / "runner").rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not any(secret in text for secret in secrets), path
    # The node's journal: the agent's own log and the modules ansible ran (they log their arguments).
    journal = agent.sh("journalctl --no-pager -o cat")
    assert "authentication successful" in journal and "ansible" in journal
    assert not any(secret in journal for secret in secrets)
