"""The nvidia role's plan in check mode, on a test host fed FAKE lspci output for GPUs that are not here.

The rack's RTX 5090s are not on this machine, so `nvidia_gpu_probe_override` stands in for `lspci -nn -d 10de:`
(a FAKE of the PCI bus only: the play, the host and the check-mode run are real). Check mode never reaches
NVIDIA's repository, so nothing is installed; the plan the role prints is what a real run would install.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ansible_runner
import pytest

from appliance.hosts.nspawn import HostNetwork, TestHost, free_network, unique_name

pytestmark = pytest.mark.hosts

REPO = Path(__file__).resolve().parents[2]
RUNS = itertools.count()
# ansible-runner runs the ansible-playbook it finds on PATH: this interpreter's (the venv's) first.
PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
PLAYBOOK = """\
- name: Nvidia role under test
  hosts: core
  gather_facts: true
  roles:
    - {role: nvidia, tags: [nvidia]}
"""
PLAN_TASK = "Install plan, shown"


def fake_lspci(device: str, description: str, count: int, pci_class: str = "0300") -> str:
    """FAKE `lspci -nn -d 10de:` output: `count` GPUs, each with its HDMI audio function (also 10de, no GPU)."""
    lines = []
    for index in range(count):
        bus = 0x01 + 0x20 * index
        kind = "VGA compatible controller" if pci_class == "0300" else "3D controller"
        lines.append(f"{bus:02x}:00.0 {kind} [{pci_class}]: NVIDIA Corporation {description} [10de:{device}] (rev a1)")
        lines.append(f"{bus:02x}:00.1 Audio device [0403]: NVIDIA Corporation Device [10de:22e8] (rev a1)")
    return "\n".join(lines) + "\n"


FAKE_4X_RTX_5090 = fake_lspci("2b85", "GB202 [GeForce RTX 5090]", 4)
FAKE_1X_L40S = fake_lspci("26b9", "AD102GL [L40S]", 1, pci_class="0302")


@dataclass
class CheckRun:
    returncode: int
    results: dict[str, dict[str, Any]]  # task name -> its result on the host (the last one, for loops)
    output: str

    def task(self, name: str) -> dict[str, Any]:
        if name not in self.results:
            raise AssertionError(f"task {name!r} did not run:\n{self.output[-3000:]}")
        return self.results[name]


@dataclass
class Node:
    host: TestHost
    workdir: Path

    def check(self, **extra_vars: Any) -> CheckRun:
        """`ansible-playbook --check --diff` through ansible-runner, whose events carry each task's result."""
        private = self.workdir / f"runner-{next(RUNS)}"
        private.mkdir()
        runner = ansible_runner.run(
            private_data_dir=str(private),
            playbook=str(self.workdir / "play.yml"),
            inventory=str(self.workdir / "inventory.json"),
            cmdline=f"--check --diff -e {shlex.quote(json.dumps(extra_vars))}",
            envvars={"ANSIBLE_ROLES_PATH": str(REPO / "roles"), "PATH": PATH},
            quiet=True,
        )
        results = {
            event["event_data"]["task"]: event["event_data"]["res"]
            for event in runner.events
            if event.get("event") in ("runner_on_ok", "runner_on_failed")
        }
        return CheckRun(runner.rc, results, runner.stdout.read())


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    workdir = tmp_path_factory.mktemp("nvidia")
    network: HostNetwork = free_network()
    host = TestHost(unique_name("nvid"), network.address(11), network)
    try:
        host.create()
        host.start()
        variables = {
            **host.ansible_vars(),
            "membria_site": "lab",
            "membria_domain": "lab.membria.test",
            "membria_ports": {"gateway": 8443, "core": 8444, "llm": 8081, "node_exporter": 9100, "ssh": 22},
            "membria_core_nodes": [{"name": "core-1", "address": host.address}],
            "membria_hardware": {"gpus": []},
        }
        inventory = {"all": {"children": {"core": {"hosts": {host.name: variables}}}}}
        (workdir / "inventory.json").write_text(json.dumps(inventory))
        (workdir / "play.yml").write_text(PLAYBOOK)
        yield Node(host, workdir)
    finally:
        host.destroy()
        network.down()


def rtx_5090s(count: int) -> dict[str, Any]:
    return {"gpus": [{"model": "RTX 5090", "memory_gb": 32, "count": count}]}


def test_rtx_5090_plan_is_open_modules_cuda_dcgm_and_no_fabric_manager(node: Node) -> None:
    run = node.check(nvidia_gpu_probe_override=FAKE_4X_RTX_5090, membria_hardware=rtx_5090s(4))
    assert run.returncode == 0, run.output[-4000:]
    plan = run.task(PLAN_TASK)["msg"]
    assert plan["kernel_modules"] == "open"
    assert len(plan["gpus"]) == 4  # the audio functions are not counted
    assert all(gpu["blackwell"] and gpu["device_id"] == "2b85" for gpu in plan["gpus"])
    packages = plan["packages"]
    assert "nvidia-open" in packages
    assert "cuda-toolkit-12-9" in packages
    assert "datacenter-gpu-manager-4-cuda12" in packages
    assert not [name for name in packages if "fabricmanager" in name]
    assert "FAKE" in plan["probe"]
    # Check mode changed nothing on the host.
    assert node.host.ssh("test -e /etc/apt/sources.list.d/nvidia-cuda.sources", check=False).returncode == 1
    assert node.host.ssh("test -e /var/lib/membria/provision/nvidia.status", check=False).returncode == 1


def test_gpu_count_differing_from_the_site_fails_clearly(node: Node) -> None:
    run = node.check(
        nvidia_gpu_probe_override=fake_lspci("2b85", "GB202 [GeForce RTX 5090]", 2), membria_hardware=rtx_5090s(4)
    )
    assert run.returncode != 0
    message = run.task("GPUs found match the site (membria_hardware.gpus)")["msg"]
    assert "declares 4 NVIDIA GPU(s)" in message and "found 2" in message


def test_older_gpu_follows_the_flavor_variable(node: Node) -> None:
    run = node.check(
        nvidia_gpu_probe_override=FAKE_1X_L40S,
        membria_hardware={"gpus": [{"model": "L40S", "memory_gb": 48, "count": 1}]},
        nvidia_other_flavor="proprietary",
    )
    assert run.returncode == 0, run.output[-4000:]
    plan = run.task(PLAN_TASK)["msg"]
    assert plan["kernel_modules"] == "proprietary"
    assert "cuda-drivers" in plan["packages"] and "nvidia-open" not in plan["packages"]


def test_a_plan_with_fabric_manager_is_refused(node: Node) -> None:
    run = node.check(
        nvidia_gpu_probe_override=FAKE_4X_RTX_5090,
        membria_hardware=rtx_5090s(4),
        nvidia_extra_packages=["nvidia-persistenced", "nvidia-fabricmanager-575"],
    )
    assert run.returncode != 0
    result = run.task("The plan installs no fabric manager and uses open modules on Blackwell")
    assert "no NVSwitch" in result["msg"]


def test_no_gpu_is_skipped_with_its_reason(node: Node) -> None:
    run = node.check()
    assert run.returncode == 0, run.output[-4000:]
    assert "no NVIDIA GPU found by lspci" in run.task("Nvidia role skipped")["msg"]
