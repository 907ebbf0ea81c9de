"""The appliance's own image and laptop controls (MEM-IMAGE-*, MEM-EDGE-*) through the real audit runner.

Images: a good and a bad one assembled from small synthetic trees by `edge_image.build.assemble` (real mke2fs,
cryptsetup, mtools, sfdisk, bmaptool), decrypted and mounted read-only by `appliance.audit.image_root.mounted_root`,
and audited as chroot targets. The trees hold real programs of this machine (a shell, coreutils, cryptsetup) so
testinfra's chroot backend runs in them; the good tree has what the image recipe puts there for first boot (the
units from `firstboot.UNITS`, enabled with `systemctl --root`, `boot.configure`'s kernel command line and dracut
drop-in, the token plugin and systemd-cryptenroll copied from this machine).

Laptops: there is no laptop here, so a STAND-IN LAPTOP is a chroot tree (kind edge) whose disk is a STAND-IN LUKS2
FILE (`facts.edge.luks_device`), taken through first boot's real steps (`firstboot.new_recovery_key`, `finish`) with
the stand-in TPM2 token of tests/image/test_edge_firstboot.py (no TPM here: its blob unseals nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from appliance.audit import runner
from appliance.audit.facts import site_facts
from appliance.audit.image_root import PLAINTEXT, mounted_root, root_header
from appliance.audit.report import Report
from appliance.audit.targets import TargetSpec, chroot_target
from appliance.errors import CheckFailed
from appliance.site import Site
from edge_image import boot, disk, esp, luks
from edge_image.build import BuildSpec, assemble
from edge_image.device import firstboot
from runtime.common.signed_manifest import sign
from tests.audit_membria import by_control, explain, membria_catalog
from tests.conftest import lab_site_data, write_site
from tests.image.audit_trees import BASE_PROGRAMS, LUKS_PROGRAMS, MEMBRIA_GID, copy_in, devices, shell_tree
from tests.image.test_edge_firstboot import stand_in_tpm2_token

pytestmark = pytest.mark.image

MIB = 1 << 20
LUKS_UUID = "5b0c8c1e-6f3a-4c55-9d2e-1f0a7f3c2b11"
PROFILE = "engineering-laptop"
GATEWAY = "https://gateway.lab.membria.internal:8443"
PYTHON = "/opt/membria/runtime/bin/python"
IMAGE_IDS = {"MEM-IMAGE-LUKS2", "MEM-IMAGE-TPM2"}
EDGE_IDS = {"MEM-EDGE-LUKS2", "MEM-EDGE-TPM2", "MEM-EDGE-MTLS"}
STAND_IN_DISK = "/var/lib/membria-stand-in/laptop-disk-stand-in.luks"  # inside the stand-in laptop's tree


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What `appliance audit` would hand every target for the lab site (no lab running: paths only)."""
    root = tmp_path_factory.mktemp("audit-site")
    data = lab_site_data(root / "state")
    data["edge"]["gateways"] = [GATEWAY]
    site_file = write_site(root / "site.yaml", data)
    return site_facts(Site.model_validate(data), site_file, None)


# --- images ---------------------------------------------------------------------------------------------------


def _esp_tree(base: Path) -> Path:
    tree = base / "esp"
    tree.mkdir()
    (tree / "vmlinuz").write_bytes(b"synthetic kernel: nothing boots it in this tier\n" * 100)
    (tree / "initrd.img").write_bytes(os.urandom(64 * 1024))
    return tree


def _image_json(tree: Path, pcrs: list[int]) -> None:
    (tree / "etc/membria").mkdir(parents=True, exist_ok=True)
    image = {
        "site": "lab",
        "profile": PROFILE,
        "version": "0.0.0-test",
        "domain": "lab.membria.internal",
        "gateways": [GATEWAY],
        "tpm2_pcrs": pcrs,
        "tpm2_pin": False,
    }
    (tree / "etc/membria/image.json").write_text(json.dumps(image, indent=2) + "\n")


def good_tree(base: Path) -> Path:
    """What the recipe leaves for first boot: units enabled, TPM2 unlock configured, plugin and cryptenroll in."""
    tree = base / "good-root"
    shell_tree(tree)
    units = tree / "etc/systemd/system"
    units.mkdir(parents=True)
    for name, text in firstboot.UNITS.items():
        (units / name).write_text(text)
    subprocess.run(["systemctl", f"--root={tree}", "enable", *firstboot.ENABLED], check=True, capture_output=True)
    boot.configure(tree, luks_uuid=LUKS_UUID, tpm2_pcrs=[7])
    copy_in(tree, boot.TOKEN_PLUGIN, "/usr/bin/systemd-cryptenroll")
    (tree / PYTHON.lstrip("/")).parent.mkdir(parents=True)
    shutil.copy2(Path(os.path.realpath("/usr/bin/python3")), tree / PYTHON.lstrip("/"))
    _image_json(tree, [7])
    return tree


def bad_tree(base: Path) -> Path:
    """An image whose first boot never binds the TPM: no units, no TPM2 unlock, no plugin, other PCRs."""
    tree = base / "bad-root"
    shell_tree(tree)
    (tree / "etc/kernel").mkdir(parents=True)
    (tree / "etc/kernel/cmdline").write_text(esp.kernel_options(LUKS_UUID, first_boot=True) + "\n")
    _image_json(tree, [0])
    return tree


BAD_LUKS = luks.LuksParams(cipher="aes-cbc-essiv:sha256", key_bits=256, pbkdf="pbkdf2", pbkdf_iterations=1000)


@dataclass(frozen=True)
class Images:
    good: Path
    bad: Path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    base = tmp_path_factory.mktemp("audit-images")
    key = Ed25519PrivateKey.generate()
    common = {"site": "lab", "profile": PROFILE, "version": "0.0.0-test", "root_size": 64 * MIB, "esp_size": 64 * MIB}
    sign_with = lambda data: sign(data, key)  # noqa: E731
    (base / "g").mkdir()
    (base / "b").mkdir()
    good = assemble(
        BuildSpec(**common, luks_uuid=LUKS_UUID),
        good_tree(base),
        _esp_tree(base / "g"),
        base / "good",
        signer=sign_with,
    )
    bad = assemble(
        BuildSpec(**common, luks_uuid=LUKS_UUID, luks=BAD_LUKS),
        bad_tree(base),
        _esp_tree(base / "b"),
        base / "bad",
        signer=sign_with,
    )
    assert good.luks.key_bits == 512 and bad.luks.key_bits == 256
    return Images(base / "good", base / "bad")


def _audit(spec: TargetSpec) -> Report:
    return runner.run("lab", membria_catalog(), [spec])


def test_mounted_root_is_private_read_only_and_cleaned_up(images: Images) -> None:
    with mounted_root(images.good) as root:
        private = root.parent
        assert private.stat().st_mode & 0o777 == 0o700
        assert (private / PLAINTEXT).stat().st_mode & 0o777 == 0o600
        assert (root / "etc/membria/image.json").is_file()
        options = next(
            line.split()[3] for line in Path("/proc/mounts").read_text().splitlines() if line.split()[1] == str(root)
        )
        assert "ro" in options.split(",")
        with pytest.raises(OSError):
            (root / "etc/written-by-the-audit").write_text("no")
    assert not private.exists()
    assert str(root) not in Path("/proc/mounts").read_text()
    # An exception inside the block cleans up the same way.
    with pytest.raises(RuntimeError), mounted_root(images.good) as root:
        raise RuntimeError("a check crashed")
    assert not root.parent.exists() and str(root) not in Path("/proc/mounts").read_text()


def test_mounted_root_refuses_a_changed_ciphertext(images: Images, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", "--sparse=always", str(images.good), str(copy)], check=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    image = copy / manifest["image"]
    start = disk.read_table(image).partition(disk.ROOT_NAME).start + manifest["luks"]["data_offset"]
    first = next(o for o, _ in disk.data_ranges(image, start, image.stat().st_size))
    with image.open("r+b") as fh:
        fh.seek(first + 100)
        byte = fh.read(1)
        fh.seek(first + 100)
        fh.write(bytes([byte[0] ^ 1]))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CheckFailed, match="ciphertext changed"), mounted_root(copy, workdir=work):
        pass
    assert list(work.iterdir()) == []  # no plaintext left behind


def test_root_header_is_read_from_the_gpt(images: Images) -> None:
    manifest = json.loads((images.good / "manifest.json").read_text())
    header = root_header(images.good / manifest["image"])
    assert header.uuid == LUKS_UUID and header.segment.encryption == "aes-xts-plain64"


def test_image_controls_pass_on_a_good_image(images: Images, facts: dict[str, Any]) -> None:
    started = time.monotonic()
    with mounted_root(images.good) as root:
        report = _audit(chroot_target("good-image", root, kind="image", image=images.good, facts=facts))
    results = by_control(report)
    assert set(results) == IMAGE_IDS, explain(report)
    assert all(r.status == "pass" for r in results.values()), explain(report)
    assert all(r.evidence for r in results.values())
    luks_evidence = "\n".join(e.output for e in results["MEM-IMAGE-LUKS2"].evidence)
    assert "aes-xts-plain64" in luks_evidence and "argon2id" in luks_evidence
    commands = [e.command for e in results["MEM-IMAGE-TPM2"].evidence]
    assert any("membria-enroll.service" in c for c in commands)
    print(f"good image audited in {time.monotonic() - started:.1f} s")


def test_image_controls_fail_on_a_bad_image(images: Images, facts: dict[str, Any]) -> None:
    with mounted_root(images.bad) as root:
        report = _audit(chroot_target("bad-image", root, kind="image", image=images.bad, facts=facts))
    results = by_control(report)
    assert {c: r.status for c, r in results.items()} == dict.fromkeys(IMAGE_IDS, "fail"), explain(report)
    luks_message = results["MEM-IMAGE-LUKS2"].message
    assert "aes-cbc-essiv:sha256" in luks_message and "256-bit" in luks_message and "pbkdf2" in luks_message
    tpm = results["MEM-IMAGE-TPM2"].message
    for expected in ("membria-reencrypt.service is missing", "tpm2-device", "token plugin", "PCRs [0]"):
        assert expected in tpm, tpm
    assert "edge_image/device/firstboot.py" in results["MEM-IMAGE-TPM2"].remediation


# --- the stand-in laptop ---------------------------------------------------------------------------------------


def _self_signed(cn: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def stand_in_laptop(base: Path, *, enrolled: bool) -> Path:
    """A STAND-IN LAPTOP (chroot tree) with a STAND-IN LUKS2 FILE for its disk.

    enrolled: first boot went through (recovery key, stand-in TPM2 token, bootstrap slot killed, identity written);
    otherwise it is a laptop whose first boot never ran, on an old cipher, with a careless edge.json.
    """
    tree = base / "laptop"
    shell_tree(tree, BASE_PROGRAMS + LUKS_PROGRAMS)
    devices(tree)
    paths = firstboot.Paths(
        state=tree / "var/lib/membria/firstboot",
        esp=tree / "efi",
        etc=tree / "etc/membria",
        hosts=tree / "etc/hosts",
        hostname=tree / "etc/hostname",
    )
    for directory in (paths.tls, paths.esp / "membria", paths.esp / "loader/entries"):
        directory.mkdir(parents=True, exist_ok=True)
    partition = tree / STAND_IN_DISK.lstrip("/")
    partition.parent.mkdir(parents=True)
    with partition.open("wb") as fh:
        fh.truncate(luks.LuksParams().data_offset + 8 * MIB)
    bootstrap = os.urandom(32).hex().encode()
    params = luks.LuksParams() if enrolled else BAD_LUKS
    luks.luks_format(partition, volume_key=os.urandom(params.key_bits // 8), passphrase=bootstrap, params=params)
    paths.cpio.write_bytes(esp.bootstrap_cpio(bootstrap))
    (paths.esp / "loader/loader.conf").write_text(esp.loader_conf(firstboot.FIRST_BOOT_ENTRY))
    _image_json(tree, [7])
    (paths.etc / "edge-profile.json").write_text(json.dumps({"profile": PROFILE, "departments": ["engineering"]}))
    (paths.tls / "ca.pem").write_text(_self_signed("stand-in site CA"))
    if enrolled:
        with firstboot.bootstrap_key_file(paths) as key_file:
            firstboot.new_recovery_key(partition, key_file)
        stand_in_tpm2_token(partition, bootstrap, base)
        assert firstboot.finish(paths, partition) == [0]
        firstboot.device_key_and_csr(paths, "laptop-1.lab.membria.internal")
        os.chown(paths.tls / "device.key", 0, MEMBRIA_GID)
        firstboot.write_identity(
            paths,
            "laptop-1",
            "laptop-1.lab.membria.internal",
            [GATEWAY],
            {"certificate_pem": _self_signed("laptop-1.lab.membria.internal")},
        )
    else:
        firstboot.device_key_and_csr(paths, "laptop-1.lab.membria.internal")
        (paths.tls / "device.key").chmod(0o644)
        firstboot.write_identity(
            paths,
            "laptop-1",
            "laptop-1.lab.membria.internal",
            ["http://gateway.lab.membria.internal:8080"],
            {"certificate_pem": _self_signed("laptop-1.lab.membria.internal")},
        )
    # write_identity names the files as this machine sees them; on the laptop they are under /etc/membria.
    settings = json.loads(paths.edge_json.read_text())
    settings["tls"] = {k: "/" + Path(v).relative_to(tree).as_posix() for k, v in settings["tls"].items()}
    paths.edge_json.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return tree


@pytest.fixture
def laptop_facts(facts: dict[str, Any]) -> dict[str, Any]:
    return {**facts, "edge": {"luks_device": STAND_IN_DISK}}


def test_edge_controls_pass_on_an_enrolled_stand_in_laptop(tmp_path: Path, laptop_facts: dict[str, Any]) -> None:
    tree = stand_in_laptop(tmp_path, enrolled=True)
    report = _audit(chroot_target("laptop-1", tree, kind="edge", facts=laptop_facts))
    results = by_control(report)
    assert set(results) == EDGE_IDS, explain(report)
    assert all(r.status == "pass" for r in results.values()), explain(report)
    summary = next(e.output for e in results["MEM-EDGE-TPM2"].evidence if "summarised" in e.command)
    assert "systemd-tpm2" in summary and "systemd-recovery" in summary
    # What the header dump printed (recorded as evidence) had its salts, digests and the sealed blob blanked.
    dumped = "".join(e.output for r in results.values() for e in r.evidence if "luksDump" in e.command)
    assert '"salt":"[omitted]"' in dumped and '"tpm2-blob":"AAAA"' not in dumped
    # The header was read from a copy: the audit wrote nothing next to the disk.
    assert sorted(p.name for p in (tree / STAND_IN_DISK.lstrip("/")).parent.iterdir()) == [Path(STAND_IN_DISK).name]


def test_edge_controls_fail_on_a_stand_in_laptop_that_never_enrolled(
    tmp_path: Path, laptop_facts: dict[str, Any]
) -> None:
    tree = stand_in_laptop(tmp_path, enrolled=False)
    report = _audit(chroot_target("laptop-2", tree, kind="edge", facts=laptop_facts))
    results = by_control(report)
    assert {c: r.status for c, r in results.items()} == dict.fromkeys(EDGE_IDS, "fail"), explain(report)
    assert "aes-cbc-essiv:sha256" in results["MEM-EDGE-LUKS2"].message
    tpm = results["MEM-EDGE-TPM2"].message
    assert "no systemd-tpm2 token" in tpm and "keyslot(s) [0]" in tpm and "done is missing" in tpm
    assert "bootstrap.cpio" in tpm
    mtls = results["MEM-EDGE-MTLS"].message
    assert "without TLS" in mtls and "root:root" in mtls and "0644" in mtls
