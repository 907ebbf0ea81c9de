"""A laptop's whole life from flash to second boot, in qemu + OVMF + swtpm against the lab's gateway and OpenBao.

The lab image is built against the running lab (its PKI's CA baked in), flashed with an enrollment token for
`boot-1` whose `resolve` sends the gateway's name to qemu's guestfwd address. Boot 1 (first-boot entry, bootstrap
key): the disk is re-encrypted online to the laptop's own key and grown, bound to the TPM (PCR 7), a recovery key is
escrowed through `POST /v1/enroll` and a certificate comes back, the bootstrap slot and the first-boot files go, the
agent starts. The host then reads the disk offline. Boot 2 (normal entry): nobody can type a passphrase, so reaching
the selftest proves the TPM unsealed the disk; the agent is active again. The selftest's report and exit code are the
signal, never the console.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from appliance.lab.services import OpenBao
from edge_image import disk, esp, luks
from edge_image.boottest import GUEST_GATEWAY, BootMachine, BootResult
from edge_image.build import FIRST_BOOT_ENTRY
from edge_image.manifest import ImageManifest
from tests.boot.conftest import BOOT_TIMEOUT_S, GROW_BYTES, Laptop, record
from tests.conftest import EDGE_PROFILE, appliance_cli
from tests.integration.conftest import GatewayLab, lab  # noqa: F401 (the session's lab, a fixture)
from tests.integration.test_edge_enrollment import site_file  # noqa: F401 (the lab site with edge profiles)

pytestmark = [pytest.mark.boot, pytest.mark.timeout(3 * 3600)]

DEVICE = "boot-1"


@dataclass(frozen=True)
class Enrolled:
    laptop: Laptop
    token: dict[str, object]
    lab: GatewayLab


def _ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def enrolled(
    boot_tools: None,
    lab: GatewayLab,  # noqa: F811
    site_file: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Enrolled:
    work = tmp_path_factory.mktemp("enrolled")
    state = ["--site", str(site_file), "--state-dir", str(lab.state.root)]
    _ok(appliance_cli("edge", "keygen", *state))
    out = work / "out"
    _ok(appliance_cli("edge", "build", *state, "--profile", EDGE_PROFILE, "-o", str(out)))
    manifest = ImageManifest.model_validate_json((out / "manifest.json").read_text())
    token_file = work / "enroll.json"
    gateway_name = f"gateway.{lab.site.site.domain}"
    _ok(appliance_cli("edge", "enroll-token", *state, "--profile", EDGE_PROFILE, "--device", DEVICE,
                      "--resolve", f"{gateway_name}={GUEST_GATEWAY[0]}", "-o", str(token_file)))  # fmt: skip
    raw = work / "disk.raw"
    _ok(appliance_cli("edge", "flash", str(out), str(raw), *state[:2], "--enrollment", str(token_file), "--yes"))
    os.truncate(raw, raw.stat().st_size + GROW_BYTES)
    laptop = Laptop(machine=BootMachine(work / "machine", raw), site=site_file, out=out, manifest=manifest)
    return Enrolled(laptop=laptop, token=json.loads(token_file.read_text()), lab=lab)


@pytest.fixture(scope="module")
def boot1(enrolled: Enrolled) -> BootResult:
    result = enrolled.laptop.machine.boot(BOOT_TIMEOUT_S, gateway_port=enrolled.lab.port)
    record(enrolled.laptop, result)
    return result


@pytest.fixture(scope="module")
def boot2(enrolled: Enrolled, boot1: BootResult) -> BootResult:
    assert boot1.passed, boot1.describe()
    result = enrolled.laptop.machine.boot(BOOT_TIMEOUT_S, gateway_port=enrolled.lab.port)
    record(enrolled.laptop, result)
    return result


@pytest.fixture(scope="module")
def header_after(enrolled: Enrolled, boot1: BootResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The root partition's LUKS2 header area read off the laptop's disk after boot 1 (offline, as a thief would)."""
    root = enrolled.laptop.manifest.layout.partition(disk.ROOT_NAME)
    path = tmp_path_factory.mktemp("after") / "header.bin"
    with enrolled.laptop.machine.disk.open("rb") as src:
        src.seek(root.start)
        path.write_bytes(src.read(enrolled.laptop.manifest.luks.data_offset))
    yield path


def bootstrap_key(enrolled: Enrolled) -> bytes:
    out = enrolled.laptop.out
    image = out / enrolled.laptop.manifest.image
    esp_start = enrolled.laptop.manifest.layout.partition(disk.ESP_NAME).start
    return esp.cpio_member(esp.read_file(image, esp_start, "membria/bootstrap.cpio"), esp.BOOTSTRAP_KEY_PATH)


def test_first_boot_enrolls_the_laptop(boot1: BootResult, enrolled: Enrolled) -> None:
    assert boot1.passed, boot1.describe()
    report = boot1.report
    assert report is not None
    assert report["firstboot"]["done"] is True, report["firstboot"]
    assert report["agent"]["state"] == "active", report["agent"]
    assert sorted(t["type"] for t in report["luks"]["tokens"].values()) == ["systemd-recovery", "systemd-tpm2"]
    assert not report["luks"]["reencrypting"]
    # Grown into the 2 GiB the flashed disk has beyond the image (statvfs counts less than the superblock's size).
    assert report["filesystem"]["size"] > enrolled.laptop.manifest.root.size + GROW_BYTES // 2, report["filesystem"]
    assert report["boot_loader"]["entry"] == FIRST_BOOT_ENTRY
    assert report["boot_loader"]["first_boot_files"] == {"bootstrap.cpio": False, "enroll.json": False}


def test_the_disk_has_its_own_key_the_tpm_binding_and_an_escrowed_recovery_key(
    enrolled: Enrolled, header_after: Path
) -> None:
    lab_ = enrolled.lab
    bootstrap = bootstrap_key(enrolled)
    assert not luks.opens(header_after, bootstrap)  # the bootstrap slot is gone
    escrow = lab_.backends.read_secret(f"membria/edge/recovery/{DEVICE}")
    recovery = escrow["recovery_key"].encode()
    assert luks.opens(header_after, recovery)
    assert escrow["luks_uuid"] == enrolled.laptop.manifest.luks.uuid and escrow["tpm2_pcrs"] == [7]
    # Re-encrypted: the volume key is not the image's (which every laptop flashed from it started with).
    image = enrolled.laptop.out / enrolled.laptop.manifest.image
    root = enrolled.laptop.manifest.layout.partition(disk.ROOT_NAME)
    before = header_after.with_name("header-before.bin")
    with image.open("rb") as src:
        src.seek(root.start)
        before.write_bytes(src.read(enrolled.laptop.manifest.luks.data_offset))
    assert luks.dump_volume_key(header_after, recovery) != luks.dump_volume_key(before, bootstrap)
    meta = json.loads(
        subprocess.run(
            ["cryptsetup", "luksDump", "--dump-json-metadata", header_after], check=True, capture_output=True
        ).stdout
    )
    tokens = {t["type"]: t for t in meta["tokens"].values()}
    assert tokens["systemd-tpm2"]["tpm2-pcrs"] == [7]
    slots = {k: s["kdf"]["type"] for k, s in meta["keyslots"].items()}
    assert slots[tokens["systemd-recovery"]["keyslots"][0]] == "argon2id"
    assert set(slots) == {k for t in tokens.values() for k in t["keyslots"]}  # no slot outside a token
    # The one-time token is spent.
    bao = OpenBao(lab_.site, lab_.state)
    client = hvac.Client(url=bao.endpoint, token=str(enrolled.token["token"]), verify=str(bao.ca_file), timeout=10)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.token.lookup_self()


def test_second_boot_unlocks_with_the_tpm_alone_and_the_agent_runs(boot2: BootResult, boot1: BootResult) -> None:
    assert boot2.passed, boot2.describe()
    report = boot2.report
    assert report is not None and boot1.report is not None
    assert report["boot"] == 2
    assert report["boot_loader"]["entry"].startswith("membria-"), report["boot_loader"]
    assert not any(option.startswith("rd.luks.key=") for option in report["cmdline"].split())
    assert report["agent"]["state"] == "active", report["agent"]
    assert report["firstboot"]["done"] is True
    assert report["tpm"]["pcrs"]["7"] == boot1.report["tpm"]["pcrs"]["7"]  # the policy's PCR did not move
