"""First boot's LUKS steps with the real cryptsetup and systemd-cryptenroll, on a partition file made like the image's.

Not here: the online path (`--active-name root`, growpart, resize) needs device-mapper, and the TPM2 binding a TPM;
both run for real in the qemu boot tier (tests/boot). Where `finish` needs a TPM2 token, the test imports a
stand-in token (named as such: its blob unseals nothing) over a slot of its own, to show which slots finish kills.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from edge_image import esp, luks
from edge_image.device import firstboot
from edge_image.device.firstboot import Paths
from edge_image.errors import ImageBadInput, ImageError

pytestmark = pytest.mark.image

SIZE = luks.LuksParams().data_offset + 8 * luks.MIB


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytes, Paths]:
    """A LUKS2 partition file as the image has it (slot 0 = bootstrap key), and an ESP tree with the cpio."""
    partition = tmp_path / "root.luks"
    with partition.open("wb") as fh:
        fh.truncate(SIZE)
    bootstrap = os.urandom(32).hex().encode()
    luks.luks_format(partition, volume_key=os.urandom(64), passphrase=bootstrap)
    paths = Paths(state=tmp_path / "state", esp=tmp_path / "esp", etc=tmp_path / "etc", hosts=tmp_path / "hosts",
                  hostname=tmp_path / "hostname")  # fmt: skip
    (paths.esp / "membria").mkdir(parents=True)
    (paths.esp / "loader" / "entries").mkdir(parents=True)
    paths.cpio.write_bytes(esp.bootstrap_cpio(bootstrap))
    (paths.esp / "loader" / "loader.conf").write_text(esp.loader_conf(firstboot.FIRST_BOOT_ENTRY))
    (paths.esp / "loader" / "entries" / firstboot.FIRST_BOOT_ENTRY).write_text("title first boot\n")
    (paths.esp / "loader" / "entries" / "membria-6.1.0-test.conf").write_text("title Membria\n")
    paths.enroll_json.write_text(json.dumps({"device": "lap-1", "token": "hvs.x", "gateways": []}))
    return partition, bootstrap, paths


def stand_in_tpm2_token(partition: Path, bootstrap: bytes, tmp_path: Path) -> None:
    """A systemd-tpm2-typed token over a slot of its own: the shape systemd-cryptenroll leaves, without a TPM."""
    unlock, extra = tmp_path / "unlock", tmp_path / "extra"
    unlock.write_bytes(bootstrap)
    extra.write_bytes(os.urandom(32))
    subprocess.run(["cryptsetup", "luksAddKey", "--batch-mode", "--key-file", unlock, "--new-keyfile", extra,
                    "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", partition], check=True)  # fmt: skip
    slot = next(k for k in firstboot.unaccounted_slots(firstboot.header(partition)) if k != 0)
    token = {
        "type": "systemd-tpm2",
        "keyslots": [str(slot)],
        "tpm2-blob": "AAAA",
        "tpm2-pcrs": [7],
        "tpm2-pcr-bank": "sha256",
        "tpm2-primary-alg": "ecc",
        "tpm2-policy-hash": "00",
        "tpm2-pin": False,
    }
    subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", partition], input=json.dumps(token).encode(),
                   check=True)  # fmt: skip


def test_reencrypt_gives_a_new_volume_key_and_runs_once(disk: tuple[Path, bytes, Paths]) -> None:
    partition, bootstrap, paths = disk
    before = luks.dump_volume_key(partition, bootstrap)
    with firstboot.bootstrap_key_file(paths) as key_file:
        assert firstboot.reencrypt(paths, partition, key_file, active_name=None) is True
        after = luks.dump_volume_key(partition, bootstrap)
        assert after != before and len(after) == 64
        meta = firstboot.header(partition)
        assert not firstboot.reencrypt_pending(meta)
        segment = meta["segments"]["0"]
        assert (segment["encryption"], segment["sector_size"]) == ("aes-xts-plain64", 4096)
        assert paths.marker("reencrypted").exists()
        # A second run (a reboot before enrollment finished) does nothing.
        assert firstboot.reencrypt(paths, partition, key_file, active_name=None) is False
    assert luks.dump_volume_key(partition, bootstrap) == after
    # The key file lived on tmpfs and is gone.
    assert not key_file.exists()


def test_recovery_key_is_argon2id_and_a_second_one_replaces_the_unescrowed_first(
    disk: tuple[Path, bytes, Paths],
) -> None:
    partition, _, paths = disk
    with firstboot.bootstrap_key_file(paths) as key_file:
        first = firstboot.new_recovery_key(partition, key_file)
        assert luks.opens(partition, first.encode())
        second = firstboot.new_recovery_key(partition, key_file)
    assert second != first
    assert not luks.opens(partition, first.encode())
    assert luks.opens(partition, second.encode())
    meta = firstboot.header(partition)
    (token,) = firstboot.tokens_of(meta, firstboot.RECOVERY_TOKEN)
    (slot,) = token["keyslots"]
    assert meta["keyslots"][slot]["kdf"]["type"] == "argon2id"


def test_finish_kills_only_the_bootstrap_slot_and_clears_the_esp(
    disk: tuple[Path, bytes, Paths], tmp_path: Path
) -> None:
    partition, bootstrap, paths = disk
    with firstboot.bootstrap_key_file(paths) as key_file:
        recovery = firstboot.new_recovery_key(partition, key_file)
    stand_in_tpm2_token(partition, bootstrap, tmp_path)
    assert firstboot.unaccounted_slots(firstboot.header(partition)) == [0]

    assert firstboot.finish(paths, partition) == [0]
    assert not luks.opens(partition, bootstrap)
    assert luks.opens(partition, recovery.encode())
    meta = firstboot.header(partition)
    assert firstboot.unaccounted_slots(meta) == []
    assert {t["type"] for t in meta["tokens"].values()} == {"systemd-tpm2", "systemd-recovery"}
    assert not paths.cpio.exists() and not paths.enroll_json.exists()
    assert not (paths.esp / "loader" / "entries" / firstboot.FIRST_BOOT_ENTRY).exists()
    assert (paths.esp / "loader" / "entries" / "membria-6.1.0-test.conf").exists()
    assert "default membria-*" in (paths.esp / "loader" / "loader.conf").read_text()
    assert paths.marker("done").exists()
    # Idempotent: a second run finds nothing to kill.
    assert firstboot.finish(paths, partition) == []


def test_finish_refuses_while_the_tpm2_or_recovery_token_is_missing(disk: tuple[Path, bytes, Paths]) -> None:
    partition, bootstrap, paths = disk
    with pytest.raises(ImageError, match="no systemd-tpm2 token"):
        firstboot.finish(paths, partition)
    assert luks.opens(partition, bootstrap)
    assert paths.cpio.exists()
    assert (paths.esp / "loader" / "entries" / firstboot.FIRST_BOOT_ENTRY).exists()
    assert not paths.marker("done").exists()


def test_bootstrap_key_needs_the_esp(tmp_path: Path) -> None:
    paths = Paths(esp=tmp_path / "not-mounted")
    with pytest.raises(ImageError, match="is the ESP mounted"), firstboot.bootstrap_key_file(paths):
        pass


def test_enrollment_file_errors_are_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ImageBadInput, match="flash the laptop with"):
        firstboot.Enrollment.read(tmp_path / "enroll.json")
    (tmp_path / "enroll.json").write_text("{not json")
    with pytest.raises(ImageBadInput, match="not an enrollment file"):
        firstboot.Enrollment.read(tmp_path / "enroll.json")
    (tmp_path / "enroll.json").write_text(
        json.dumps({"device": "x", "token": "secret-token", "resolve": {"gw": "10.0.2.100"}})
    )
    enrollment = firstboot.Enrollment.read(tmp_path / "enroll.json")
    assert "secret-token" not in repr(enrollment)
    assert enrollment.resolve == {"gw": "10.0.2.100"}


def test_hosts_entries_are_added_once(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n127.0.1.1\tmembria-edge")
    firstboot.add_hosts(hosts, {"gateway.lab.example": "10.0.2.100"})
    firstboot.add_hosts(hosts, {"gateway.lab.example": "10.0.2.100"})
    assert hosts.read_text() == "127.0.0.1\tlocalhost\n127.0.1.1\tmembria-edge\n10.0.2.100\tgateway.lab.example\n"


def test_enrollment_retries_every_gateway_then_gives_up(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    sleeps: list[float] = []
    with pytest.raises(ImageError, match="no gateway answered after 3 attempts"):
        firstboot.enroll_with_retries(
            [f"https://127.0.0.1:{port}"], ca, "t" * 20, {}, attempts=3, backoff=2, backoff_max=3, sleep=sleeps.append
        )
    assert sleeps == [2, 3]


def test_units_order_reencryption_before_secrets_and_enrollment_before_the_agent() -> None:
    reencrypt = firstboot.UNITS["membria-reencrypt.service"]
    enroll = firstboot.UNITS["membria-enroll.service"]
    assert "Before=sysinit.target ssh.service systemd-random-seed.service" in reencrypt
    assert "ConditionPathExists=!/var/lib/membria/firstboot/done" in reencrypt
    assert "Before=membria-edge-agent.service" in enroll and "After=network-online.target" in enroll
    assert set(firstboot.ENABLED) == set(firstboot.UNITS)


def test_the_grown_mapping_is_whole_encryption_sectors(disk: tuple[Path, bytes, Paths]) -> None:
    partition, _, _ = disk
    meta = firstboot.header(partition)
    offset = int(meta["segments"]["0"]["offset"])
    # A partition grown to the last usable LBA: 33 sectors short of a MiB boundary, not a multiple of 4096.
    grown = offset + 2048 * luks.MIB - 33 * 512
    assert firstboot.mapped_sectors(grown, meta) == (2048 * luks.MIB - 5 * 4096) // 512  # 16.5 KiB short: 5 sectors
    assert firstboot.mapped_sectors(offset + 8192, meta) == 16
    with pytest.raises(ImageError, match="ends before the LUKS data offset"):
        firstboot.mapped_sectors(offset, meta)


def test_the_partition_grows_to_whole_mebibytes_and_only_once() -> None:
    mib = 2048
    # A 6.5 GiB + 5 sectors disk, the root starting at 529 MiB with 4 GiB: grown to the last whole MiB before the
    # backup GPT.
    disk_sectors = 6656 * mib + 5
    start, size = 529 * mib, 4096 * mib
    grown = firstboot.grown_size(disk_sectors, start, size)
    assert grown is not None and grown % mib == 0
    assert start + grown + firstboot.GPT_TAIL_SECTORS <= disk_sectors < start + grown + mib + firstboot.GPT_TAIL_SECTORS
    assert firstboot.grown_size(disk_sectors, start, grown) is None  # a second first boot changes nothing
