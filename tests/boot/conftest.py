"""Fixtures for the `boot` tier: the lab image flashed onto a sparse file, booted in qemu + OVMF + swtpm
(edge_image/boottest.py) as one laptop whose disk, firmware variables and TPM persist from boot to boot."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_image.boottest import BootMachine, BootResult, require_tools
from edge_image.errors import ImageMissingTool
from edge_image.manifest import ImageManifest
from tests.conftest import appliance_cli

# TCG (no usable KVM here): a first boot with re-encryption and the agent's start is estimated at 10-15 min.
BOOT_TIMEOUT_S = 45 * 60
GROW_BYTES = 2 << 30  # the flashed disk is larger than the image: first boot grows the root into it


@dataclass(frozen=True)
class Laptop:
    machine: BootMachine
    site: Path
    out: Path
    manifest: ImageManifest


def record(laptop: Laptop, result: BootResult) -> None:
    """Keep each boot's figures beside its logs (boots.json in the machine's directory) and print them (-s)."""
    path = laptop.machine.workdir / "boots.json"
    boots = json.loads(path.read_text()) if path.exists() else []
    report = result.report or {}
    boots.append(
        {
            "boot": result.number,
            "accel": result.accel,
            "seconds": round(result.seconds, 1),
            "exit_code": result.exit_code,
            "guest_uptime_s": report.get("uptime_s"),
            "guest_waited_s": report.get("waited_s"),
            "analyze": report.get("analyze"),
        }
    )
    path.write_text(json.dumps(boots, indent=2) + "\n")
    print(f"boot {result.number}: {result.accel}, {result.seconds:.0f} s, qemu exit {result.exit_code}")


@pytest.fixture(scope="session")
def boot_tools() -> None:
    try:
        require_tools()
    except ImageMissingTool as exc:
        pytest.fail(f"the boot tier needs: {exc.message} ({exc.hint})")


@pytest.fixture(scope="session")
def laptop(
    boot_tools: None, lab_edge_image: tuple[Path, Path, ImageManifest], tmp_path_factory: pytest.TempPathFactory
) -> Laptop:
    """The session's lab image flashed with `edge flash` onto a sparse file, then grown by 2 GiB."""
    site, out, manifest = lab_edge_image
    work = tmp_path_factory.mktemp("laptop")
    disk = work / "disk.raw"
    flashed = appliance_cli("edge", "flash", str(out), str(disk), "--site", str(site), "--yes")
    assert flashed.returncode == 0, flashed.stdout + flashed.stderr
    os.truncate(disk, disk.stat().st_size + GROW_BYTES)
    return Laptop(machine=BootMachine(work, disk), site=site, out=out, manifest=manifest)


@pytest.fixture(scope="session")
def first_boot(laptop: Laptop) -> BootResult:
    """Boot 1: the first-boot entry, the root opened with the bootstrap key from the ESP's cpio."""
    result = laptop.machine.boot(BOOT_TIMEOUT_S)
    record(laptop, result)
    return result
