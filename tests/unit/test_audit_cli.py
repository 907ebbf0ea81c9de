"""`appliance audit` refuses bad input with exit 2 and a message naming it, before it touches Vault or a target."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import appliance_cli, lab_site_data, write_site

pytestmark = pytest.mark.unit


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site.yaml", lab_site_data(tmp_path / "state"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--host", "core-9"], "no core node named core-9"),
        (["--format", "json,pdf"], "unknown report format(s): pdf"),
        (["--image", "/nonexistent-image"], "/nonexistent-image is not an edge image directory"),
        (["--local-kind", "laptop", "--local"], "--local-kind laptop: use core or edge"),
    ],
)
def test_bad_input_exits_2_before_anything_runs(site_file: Path, args: list[str], expected: str) -> None:
    run = appliance_cli("audit", str(site_file), *args, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert expected in run.stderr
    assert "Traceback" not in run.stderr


def test_a_malformed_waiver_file_exits_2_with_its_line(site_file: Path, tmp_path: Path) -> None:
    waivers = tmp_path / "waivers.yaml"
    waivers.write_text("waivers:\n  - control: CIS-5.1.6\n    approver: ciso\n")
    run = appliance_cli("audit", str(site_file), "--waivers", str(waivers), timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"{waivers}:2: waivers[0].justification" in run.stderr


def test_an_existing_output_directory_is_never_overwritten(site_file: Path, tmp_path: Path) -> None:
    run = appliance_cli("audit", str(site_file), "-o", str(tmp_path), timeout=120)
    assert run.returncode == 2 and "already exists" in run.stderr, run.stderr


def test_verify_report_needs_a_key_it_can_read(tmp_path: Path) -> None:
    run = appliance_cli("audit", "verify-report", str(tmp_path), "--public-key", str(tmp_path / "none.pub"))
    assert run.returncode == 2 and "no such public key file" in run.stderr, run.stderr
