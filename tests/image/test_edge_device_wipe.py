"""`membria-edge-wipe` (edge_image.device.wipe) for real on a LUKS2 partition file laid out like the image's: a
recovery slot and a second slot with a token, as first boot leaves them (the TPM2 slot is played by a passphrase
slot and a `systemd-tpm2`-typed token). After the wipe no keyslot and no token remain and neither key opens the
file (`cryptsetup open --test-passphrase`). Never powers off: `power_off=False` / `--no-power-off`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_image import luks
from edge_image.device import wipe
from tests.conftest import REPO

pytestmark = pytest.mark.image

MIB = 1024 * 1024


def test_passphrase(partition: Path, key: bytes, tmp_path: Path) -> bool:
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    done = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(key_file), str(partition)],
        capture_output=True,
        timeout=60,
    )
    key_file.unlink()
    return done.returncode == 0


test_passphrase.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def laptop_partition(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    """A partition file with two keyslots (recovery + "tpm2") and a token naming the second."""
    partition = tmp_path / "root.luks"
    with partition.open("wb") as fh:
        fh.truncate(luks.LuksParams().data_offset + 8 * MIB)
    recovery, tpm = os.urandom(32).hex().encode(), os.urandom(32).hex().encode()
    luks.luks_format(partition, volume_key=os.urandom(64), passphrase=recovery)
    (tmp_path / "recovery").write_bytes(recovery)
    (tmp_path / "tpm").write_bytes(tpm)
    subprocess.run(
        ["cryptsetup", "luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
         "--key-file", str(tmp_path / "recovery"), str(partition), str(tmp_path / "tpm")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    token = {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-blob": "AAAA", "tpm2-pcrs": [7],  # what the plugin
             "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc", "tpm2-policy-hash": "aabbccdd",  # accepts
             "tpm2-pin": False}  # fmt: skip
    subprocess.run(
        ["cryptsetup", "token", "import", str(partition)],
        input=json.dumps(token).encode(), check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    for name in ("recovery", "tpm"):
        (tmp_path / name).unlink()
    return partition, recovery, tpm


def test_wipe_destroys_every_keyslot_and_token_of_a_luks_file(tmp_path: Path) -> None:
    partition, recovery, tpm = laptop_partition(tmp_path)
    header = luks.read_header(partition)
    assert sorted(header.keyslots) == ["0", "1"] and list(header.tokens) == ["0"]
    assert test_passphrase(partition, recovery, tmp_path) and test_passphrase(partition, tpm, tmp_path)
    uuid = header.uuid

    result = wipe.wipe("stolen (test)", device=partition, power_off=False)

    assert result.keyslots_erased == ("0", "1") and result.tokens_removed == ("0",)
    after = wipe.luks_metadata(partition)
    assert after["keyslots"] == {} and after["tokens"] == {}
    assert not test_passphrase(partition, recovery, tmp_path) and not test_passphrase(partition, tpm, tmp_path)
    assert not luks.opens(partition, recovery)
    assert luks.read_header(partition).uuid == uuid  # still a LUKS2 header (both copies), only with nothing to open

    # Again: nothing left to erase, still nothing opens (the guard may be told twice).
    again = wipe.wipe("again", device=partition, power_off=False)
    assert again.keyslots_erased == () and again.tokens_removed == ()


def test_wipe_command_line(tmp_path: Path) -> None:
    partition, recovery, _ = laptop_partition(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge_image.device.wipe", *args],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    refused = run("--device", str(partition), "--no-power-off")
    assert refused.returncode == 2 and "--yes-destroy-all-data" in refused.stderr
    assert test_passphrase(partition, recovery, tmp_path)  # untouched
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * MIB)
    not_luks = run("--yes-destroy-all-data", "--device", str(plain), "--no-power-off")
    assert not_luks.returncode == 2 and "not a LUKS2 volume" in not_luks.stderr and "Traceback" not in not_luks.stderr
    missing = run("--yes-destroy-all-data", "--device", str(tmp_path / "none"), "--no-power-off")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr

    done = run("--yes-destroy-all-data", "--device", str(partition), "--no-power-off", "--reason", "test")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 keyslot(s), 1 token(s) destroyed" in done.stdout
    assert not test_passphrase(partition, recovery, tmp_path)
