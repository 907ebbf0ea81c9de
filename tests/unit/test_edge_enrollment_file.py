"""The enrollment file's checks (edge_image/flash.py): what `edge flash --enrollment` refuses and why, without ever
quoting the token; `--resolve NAME=ADDR` of `edge enroll-token`, refused before anything is minted."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.edge import enrollment
from appliance.errors import BadInput
from appliance.site import load_site
from edge_image import flash
from edge_image.errors import ImageBadInput
from tests.conftest import EXAMPLES, REPO

pytestmark = pytest.mark.unit

TOKEN = "s.unit-secret-token-value"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def doc(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": 1,
        "site": "lab",
        "device": "lt-0042",
        "token": TOKEN,
        "expires_at": "2026-11-25T12:00:00Z",
        "gateways": ["https://gateway.lab.membria:8443"],
        "resolve": {"Gateway.Lab.Membria": "10.0.2.2", "core.lab.membria": "fd00::0002"},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def check(data: dict[str, Any] | bytes, site: str | None = "lab") -> flash.Enrollment:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return flash.check_enrollment(raw, source=Path("enroll.json"), site=site, now=NOW)


@pytest.mark.parametrize(
    ("name", "folded"),
    [("gateway.lab.membria", "gateway.lab.membria"), ("GW-1.Example.COM", "gw-1.example.com"), ("localhost", None)],
)
def test_host_names_accepted_lower_cased(name: str, folded: str | None) -> None:
    assert flash.check_hostname(name) == (folded or name)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "not a host name"),
        ("-gw.lab", "not a host name"),
        ("gw-.lab", "not a host name"),
        ("gw..lab", "not a host name"),
        ("gw.lab.", "not a host name"),
        ("gw_1.lab", "not a host name"),
        ("gw lab", "not a host name"),
        ("a" * 64 + ".lab", "not a host name"),
        (".".join(["abcdefgh"] * 29), "not a host name"),  # 260 characters
        ("10.0.0.5", "last label is all digits"),
    ],
)
def test_bad_host_names(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        flash.check_hostname(name)


def test_addresses() -> None:
    assert flash.check_address("10.0.2.2") == "10.0.2.2"
    assert flash.check_address("FD00:0:0::0002") == "fd00::2"
    for bad, why in [
        ("10.0.0.999", "not an IPv4 or IPv6 address"),
        ("010.0.0.1", "not an IPv4 or IPv6 address"),
        ("gateway", "not an IPv4 or IPv6 address"),
        ("", "not an IPv4 or IPv6 address"),
        ("10.0.0.0/8", "not an IPv4 or IPv6 address"),
        ("fe80::1%eth0", "interface zone"),
    ]:
        with pytest.raises(ValueError, match=why):
            flash.check_address(bad)
    assert flash.check_resolve({"GW.lab": "::1", "core": "127.0.0.1"}) == {"gw.lab": "::1", "core": "127.0.0.1"}
    with pytest.raises(ValueError, match="given twice"):
        flash.check_resolve({"gw.lab": "10.0.0.1", "GW.LAB": "10.0.0.2"})


def test_a_good_file_is_kept_byte_for_byte_and_hides_its_token() -> None:
    raw = (json.dumps(doc(), indent=2) + "\n").encode()
    checked = check(raw)
    assert checked.data == raw and checked.device == "lt-0042"
    assert checked.expires == "2026-11-25 12:00:00 UTC"
    assert checked.file.resolve == {"gateway.lab.membria": "10.0.2.2", "core.lab.membria": "fd00::2"}
    assert checked.file.token.get_secret_value() == TOKEN
    assert TOKEN not in repr(checked) and TOKEN not in str(checked.file)
    assert check(doc(resolve=...), site=None).file.resolve is None  # resolve is optional; no site: not compared


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b'{"format": 1, "token": "' + TOKEN.encode(), "not JSON: Unterminated string"),
        (b"[1, 2]", "a JSON object is expected"),
        (doc(format=2), "format 1 only"),
        (doc(format=...), "format 1 only"),
        (doc(device="Laptop 42"), "field device: String should match pattern"),
        (doc(device="x" * 64), "field device: String should match pattern"),
        (doc(token=...), "field token: Field required"),
        (doc(token=""), "field token: Value should have at least 1 item"),
        (doc(token=42), "field token: Input should be a valid string"),
        (doc(site=""), "field site: String should have at least 1 character"),
        (doc(expires_at="2026-11-25T12:00:00"), "field expires_at: Input should have timezone info"),
        (doc(expires_at="soon"), "field expires_at: Input should be a valid datetime"),
        (doc(gateways=[]), "field gateways: List should have at least 1 item"),
        (doc(gateways=[""]), "field gateways.0: String should have at least 1 character"),
        (doc(resolve={"gw.lab": "10.0.0.999"}), "field resolve: Value error, '10.0.0.999' is not an IPv4"),
        (doc(resolve={"gw_1": "10.0.0.1"}), "field resolve: Value error, 'gw_1' is not a host name"),
        (doc(resolve=["gw", "10.0.0.1"]), "field resolve: Input should be a valid dictionary"),
        (doc(secret=TOKEN), "field secret: Extra inputs are not permitted"),
        (doc(expires_at="2026-11-22T11:59:59Z"), "the enrollment token of lt-0042 expired at 2026-11-22 11:59:59 UTC"),
        (doc(expires_at=NOW.isoformat()), "expired at 2026-11-22 12:00:00 UTC"),
        (doc(site="other"), "is for site 'other', the image for 'lab'"),
    ],
)
def test_bad_files_are_refused_naming_the_field_never_the_token(data: dict[str, Any] | bytes, why: str) -> None:
    with pytest.raises(ImageBadInput) as err:
        check(data)
    assert err.value.exit_code == 2
    assert err.value.message.startswith("enroll.json: ") and why in err.value.message, err.value.message
    assert TOKEN not in err.value.message and TOKEN not in (err.value.hint or "")
    # nothing chained whose text holds the input (pydantic's and json's errors quote it)
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


def test_load_refuses_what_is_not_a_small_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ImageBadInput, match="no such enrollment file"):
        flash.load_enrollment(tmp_path / "missing.json")
    with pytest.raises(ImageBadInput, match="not a regular file"):
        flash.load_enrollment(tmp_path)
    big = tmp_path / "big.json"
    big.write_text(json.dumps(doc(pad="x" * 70_000)))
    with pytest.raises(ImageBadInput, match="too large"):
        flash.load_enrollment(big)
    good = tmp_path / "enroll.json"
    good.write_text(json.dumps(doc(expires_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())))
    assert flash.load_enrollment(good, site="lab").data == good.read_bytes()


def test_mint_refuses_a_bad_resolve_before_asking_vault(tmp_path: Path) -> None:
    """The lab site's Vault is not running here: the refusal must come first, and no file is written."""
    site = load_site(EXAMPLES / "lab.yaml")
    out = tmp_path / "enroll.json"
    for resolve, why in [
        ({"gateway.lab.membria": "10.0.0.999"}, "not an IPv4 or IPv6 address"),
        ({"gw_1.lab": "10.0.0.1"}, "not a host name"),
        ({"gw.lab": "10.0.0.1", "GW.lab": "10.0.0.2"}, "given twice"),
    ]:
        with pytest.raises(BadInput, match=f"--resolve: .*{why}") as err:
            enrollment.mint(site, profile="engineering-laptop", device="lt-0042", out=out, resolve=resolve)
        assert err.value.exit_code == 2
    assert not out.exists()


def test_cli_resolve_must_be_name_equals_address(tmp_path: Path) -> None:
    out = tmp_path / "enroll.json"
    base = [sys.executable, "-m", "appliance", "edge", "enroll-token", "--site", str(EXAMPLES / "lab.yaml")]
    base += ["--profile", "engineering-laptop", "--device", "lt-0042", "-o", str(out)]
    done = subprocess.run([*base, "--resolve", "gateway.lab.membria"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "expected NAME=ADDR" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
