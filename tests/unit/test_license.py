"""Licenses: a signed file that fails loudly and specifically, and a seat ledger that survives restarts."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.errors import BadInput
from appliance.license import generate_signing_key, issue_license
from runtime.common.license import License, LicenseError, SeatLedger, verify_license

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
EXPIRES = datetime(2027, 12, 31, 23, 59, 59, tzinfo=UTC)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "signing.pub"
    generate_signing_key(private, public)
    return private, public


@pytest.fixture
def signed(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    out = tmp_path / "license.json"
    issue_license(keys[0], "Acme Ltd", 25, EXPIRES, ["rag", "sync"], out, issued_at=NOW - timedelta(days=1))
    return out


def edit(path: Path, change: dict[str, object], *, top: bool = False) -> Path:
    document = json.loads(path.read_text())
    (document if top else document["license"]).update(change)
    path.write_text(json.dumps(document, indent=4))
    return path


def failure(path: Path, public: Path, now: datetime = NOW) -> LicenseError:
    with pytest.raises(LicenseError) as caught:
        verify_license(path, public, now=now)
    return caught.value


# --- keys ---------------------------------------------------------------------------------------------------


def test_keygen_writes_private_key_0600(keys: tuple[Path, Path]) -> None:
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_keygen_refuses_to_overwrite(keys: tuple[Path, Path]) -> None:
    private, public = keys
    before = private.read_bytes()
    with pytest.raises(BadInput, match="already exists"):
        generate_signing_key(private, public)
    assert private.read_bytes() == before
    generate_signing_key(private, public, force=True)
    assert private.read_bytes() != before


# --- verification -------------------------------------------------------------------------------------------


def test_good_license(signed: Path, keys: tuple[Path, Path]) -> None:
    lic = verify_license(signed, keys[1], now=NOW)
    assert isinstance(lic, License)
    assert (lic.customer, lic.seats, lic.features) == ("Acme Ltd", 25, ["rag", "sync"])
    assert lic.expires_at == EXPIRES
    assert lic.has_feature("rag") and not lic.has_feature("admin")
    assert lic.days_left(NOW) == 578


def test_reformatting_keeps_it_valid(signed: Path, keys: tuple[Path, Path]) -> None:
    document = json.loads(signed.read_text())
    signed.write_text(json.dumps({"signature": document["signature"], "license": document["license"]}))
    assert verify_license(signed, keys[1], now=NOW).seats == 25  # key_id is optional


def test_tampered_seats(signed: Path, keys: tuple[Path, Path]) -> None:
    error = failure(edit(signed, {"seats": 2500}), keys[1])
    assert (error.reason, error.exit_code) == ("tampered", 1)
    assert "altered after signing" in error.message


def test_tampered_expiry(signed: Path, keys: tuple[Path, Path]) -> None:
    assert failure(edit(signed, {"expires_at": "2099-12-31T23:59:59Z"}), keys[1]).reason == "tampered"


def test_tampered_signature(signed: Path, keys: tuple[Path, Path]) -> None:
    document = json.loads(signed.read_text())
    raw = bytearray(base64.b64decode(document["signature"]))
    raw[0] ^= 1
    error = failure(edit(signed, {"signature": base64.b64encode(bytes(raw)).decode()}, top=True), keys[1])
    assert error.reason == "tampered"


def test_wrong_public_key(signed: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pub"
    generate_signing_key(tmp_path / "other.pem", other)
    error = failure(signed, other)
    assert (error.reason, error.exit_code) == ("wrong_key", 1)
    assert "signed by key ed25519:" in error.message
    # Without the key id hint it is still refused, as a signature that does not match.
    document = json.loads(signed.read_text())
    del document["key_id"]
    signed.write_text(json.dumps(document))
    assert "signed by another key" in failure(signed, other).message


def test_expired(signed: Path, keys: tuple[Path, Path]) -> None:
    error = failure(signed, keys[1], now=EXPIRES + timedelta(days=3))
    assert (error.reason, error.exit_code) == ("expired", 1)
    assert "expired on 2027-12-31 23:59:59 UTC (3 days ago)" in error.message


def test_not_yet_valid(signed: Path, keys: tuple[Path, Path]) -> None:
    error = failure(signed, keys[1], now=NOW - timedelta(days=30))
    assert error.reason == "not_yet_valid"
    assert "not valid before 2026-05-31 12:00:00 UTC" in error.message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "valid dictionary"),
        (b'{"license": {}, "signature": "x", "extra": 1}', "extra"),
        (b'{"license": {"seats": 1, "seats": 2}, "signature": "x"}', "duplicate key 'seats'"),
        (b'{"license": {"seats": NaN}, "signature": "x"}', "NaN is not JSON"),
    ],
)
def test_malformed_files(tmp_path: Path, keys: tuple[Path, Path], content: bytes, expected: str) -> None:
    path = tmp_path / "license.json"
    path.write_bytes(content)
    error = failure(path, keys[1])
    assert (error.reason, error.exit_code) == ("malformed", 2)
    assert expected in error.message


def test_malformed_license_lists_every_field(signed: Path, keys: tuple[Path, Path]) -> None:
    error = failure(edit(signed, {"seats": 0, "expires_at": "2027-12-31T00:00:00", "customer": ""}), keys[1])
    assert error.reason == "malformed"
    for field in ("license.seats", "license.expires_at", "license.customer"):
        assert field in error.message
    assert "timezone" in error.message


def test_seats_must_be_an_integer(signed: Path, keys: tuple[Path, Path]) -> None:
    assert failure(edit(signed, {"seats": True}), keys[1]).reason == "malformed"


def test_signature_not_base64(signed: Path, keys: tuple[Path, Path]) -> None:
    assert failure(edit(signed, {"signature": "not base64!"}, top=True), keys[1]).reason == "malformed"


def test_missing_file(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    error = failure(tmp_path / "nope.json", keys[1])
    assert (error.reason, error.exit_code) == ("missing", 2)
    assert "no such license file" in error.message


def test_bad_public_key(signed: Path, tmp_path: Path) -> None:
    assert failure(signed, tmp_path / "none.pub").reason == "key"
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    assert "not a PEM public key" in failure(signed, junk).message


def test_issue_rejects_bad_values(keys: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="seats"):
        issue_license(keys[0], "Acme", 0, EXPIRES, [], tmp_path / "l.json")
    with pytest.raises(BadInput, match="timezone"):
        issue_license(keys[0], "Acme", 1, datetime(2027, 1, 1), [], tmp_path / "l.json")
    with pytest.raises(BadInput, match="no such signing key"):
        issue_license(tmp_path / "none.pem", "Acme", 1, EXPIRES, [], tmp_path / "l.json")
    assert not (tmp_path / "l.json").exists()


# --- the CLI ------------------------------------------------------------------------------------------------


def appliance(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "appliance", "license", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stdout + result.stderr
    return result


def test_cli_round_trip(tmp_path: Path) -> None:
    private, public, out = tmp_path / "k.pem", tmp_path / "k.pub", tmp_path / "license.json"
    assert appliance("keygen", "--private", private, "--public", public).returncode == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    again = appliance("keygen", "--private", private, "--public", public)
    assert again.returncode == 2 and "already exists" in again.stderr

    issued = appliance(
        "issue", "--key", private, "--customer", "Acme Ltd", "--seats", "25", "--expires", "2099-12-31",
        "--feature", "rag", "--feature", "sync", "-o", out,
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    assert json.loads(out.read_text())["license"]["expires_at"] == "2099-12-31T23:59:59Z"

    ok = appliance("verify", out, "--public-key", public)
    assert ok.returncode == 0, ok.stderr
    for text in ("Acme Ltd", "25", "2099-12-31 23:59 UTC", "days left", "rag, sync", "is valid"):
        assert text in ok.stdout

    edit(out, {"seats": 2500})
    tampered = appliance("verify", out, "--public-key", public)
    assert tampered.returncode == 1
    assert "signature does not match" in tampered.stderr


def test_cli_exit_codes(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = keys
    other_private, other_public = tmp_path / "o.pem", tmp_path / "o.pub"
    generate_signing_key(other_private, other_public)
    wrong = appliance("verify", signed, "--public-key", other_public)
    assert wrong.returncode == 1 and "signed by key" in wrong.stderr

    expired = tmp_path / "expired.json"
    issue_license(private, "Acme", 5, NOW, [], expired, issued_at=NOW - timedelta(days=365))
    result = appliance("verify", expired, "--public-key", public)
    assert result.returncode == 1 and "expired on 2026-06-01" in result.stderr

    malformed = tmp_path / "malformed.json"
    malformed.write_text("{not json")
    result = appliance("verify", malformed, "--public-key", public)
    assert result.returncode == 2 and "malformed license" in result.stderr

    assert appliance("verify", tmp_path / "none.json", "--public-key", public).returncode == 2
    past = appliance("issue", "--key", private, "--customer", "A", "--seats", "1", "--expires", "2001-01-01", "-o", "x")
    assert past.returncode == 2 and "already past" in past.stderr
    zero = appliance("issue", "--key", private, "--customer", "A", "--seats", "0", "--expires", "2099-01-01", "-o", "x")
    assert zero.returncode == 2
    naive = appliance(
        "issue", "--key", private, "--customer", "A", "--seats", "1", "--expires", "2099-01-01T10:00", "-o", "x"
    )
    assert naive.returncode == 2 and "no time zone" in naive.stderr


# --- seats --------------------------------------------------------------------------------------------------


def test_seat_ledger_limits_new_devices(tmp_path: Path) -> None:
    with SeatLedger(tmp_path / "seats.db", seats=2) as ledger:
        assert ledger.admit("laptop-1")
        assert ledger.admit("laptop-2")
        assert not ledger.admit("laptop-3")
        assert ledger.admit("laptop-1")  # already admitted: always admitted again
        assert len(ledger) == 2


def test_seat_ledger_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "seats.db"
    with SeatLedger(path, seats=2) as ledger:
        assert ledger.admit("laptop-1") and ledger.admit("laptop-2")
    with SeatLedger(path, seats=2) as ledger:
        assert not ledger.admit("laptop-3")
        assert ledger.admit("laptop-2")
        assert ledger.admitted() == ["laptop-1", "laptop-2"]
    with SeatLedger(path, seats=1) as ledger:  # a renewal with fewer seats keeps devices already in
        assert ledger.admit("laptop-1") and ledger.admit("laptop-2")
        assert not ledger.admit("laptop-3")


def test_seat_ledger_is_thread_safe(tmp_path: Path) -> None:
    results: list[bool] = []
    with SeatLedger(tmp_path / "seats.db", seats=10) as ledger:
        barrier = threading.Barrier(8)

        def worker(n: int) -> None:
            barrier.wait()
            for i in range(10):
                results.append(ledger.admit(f"laptop-{n}-{i}"))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 10
        assert len(ledger) == 10


def test_seat_ledger_shared_between_connections(tmp_path: Path) -> None:
    # Two gateway workers (two connections) must not both take the last seat.
    path = tmp_path / "seats.db"
    with SeatLedger(path, seats=1) as first, SeatLedger(path, seats=1) as second:
        assert first.admit("laptop-1")
        assert not second.admit("laptop-2")
        assert second.admit("laptop-1")


def test_seat_ledger_rejects_nonsense(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seats"):
        SeatLedger(tmp_path / "seats.db", seats=0)
    with SeatLedger(tmp_path / "seats.db", seats=1) as ledger, pytest.raises(ValueError, match="empty"):
        ledger.admit("")
