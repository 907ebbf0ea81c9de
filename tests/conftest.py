"""Shared fixtures: sites for tests with their own state directory and free loopback ports."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from appliance.site import Site
from edge_image.manifest import ImageManifest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
APPLIANCE = str(REPO / ".venv" / "bin" / "appliance")
EDGE_PROFILE = "engineering-laptop"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair() -> int:
    """A free port whose successor is free too (OpenBao's cluster listener takes port + 1)."""
    for _ in range(100):
        port = free_port()
        if port < 65535:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two adjacent free ports on loopback")


def _lab_ports() -> dict[str, int]:
    while True:
        ports = {"openbao": free_port_pair(), **{n: free_port() for n in ("s3", "llm", "core", "gateway", "edge")}}
        if len(set(ports.values()) | {ports["openbao"] + 1}) == len(ports) + 1:
            return ports


def example_data(name: str = "lab.yaml") -> dict[str, Any]:
    data: dict[str, Any] = YAML(typ="safe").load((EXAMPLES / name).read_text())
    return data


def lab_site_data(state_dir: Path) -> dict[str, Any]:
    """examples/lab.yaml with its own state directory and free ports, so tests never meet `make lab`."""
    data = example_data()
    data["licensing"] = {
        "license_file": str(state_dir / "license" / "license.json"),
        "public_key_file": str(state_dir / "license" / "signing.pub"),
    }
    data["rbac"] = {"policy_file": str(EXAMPLES / "rbac.yaml")}
    data["bundle"] = {"public_key_file": str(state_dir / "bundle" / "signing.pub")}
    data["edge"] = {"signing": {"public_key_file": str(state_dir / "edge" / "image-signing.pub")}}
    data["audit"] = {"signing": {"public_key_file": str(state_dir / "audit" / "report-signing.pub")}}
    data["lab"] = {
        "host": "127.0.0.1",
        "state_dir": str(state_dir),
        "ports": _lab_ports(),
        "corpus_dir": str(EXAMPLES / "corpus"),
        "edge_profile": data["lab"]["edge_profile"],
        # The runtime as local processes: quick, and the integration tests read its stores directly. The
        # core node on a test host (`core: host`) is tested in tests/hosts/test_lab_core_host.py.
        "core": "processes",
    }
    for profile in data["edge_profiles"]:
        if "routing" in profile:
            profile["routing"]["taxonomy_file"] = str(EXAMPLES / "taxonomy.yaml")
    return data


def write_site(path: Path, data: dict[str, Any]) -> Path:
    yaml = YAML()
    with path.open("w") as fh:
        yaml.dump(data, fh)
    return path


@pytest.fixture
def lab_site(tmp_path: Path) -> Site:
    return Site.model_validate(lab_site_data(tmp_path / "state"))


def appliance_cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    """The `appliance` command of this checkout's venv, run from the checkout."""
    return subprocess.run([APPLIANCE, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def lab_edge_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, ImageManifest]]:
    """The lab profile's real image, built once per session through the CLI with the lab's OpenBao (kept running
    for the session: the boot tier needs it too): (site file, output directory, manifest). Tens of minutes cold."""
    from tests.integration.vault_support import bootstrapped_vault

    root = tmp_path_factory.mktemp("edge-full")
    with bootstrapped_vault(root / "lab"):
        site = root / "lab" / "site.yaml"
        keygen = appliance_cli("edge", "keygen", "--site", str(site))
        assert keygen.returncode == 0, keygen.stdout + keygen.stderr
        out = root / "out"
        result = appliance_cli("edge", "build", "--site", str(site), "--profile", EDGE_PROFILE, "-o", str(out))
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        manifest = ImageManifest.model_validate_json((out / "manifest.json").read_text())
        yield site, out, manifest
