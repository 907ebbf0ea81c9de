"""MEM-IMAGE-LUKS2, MEM-IMAGE-TPM2: an edge image encrypts its root as promised and binds it to the TPM at first boot.

The LUKS2 header is read from the image file itself (its GPT, then a private copy of the header area); the
first-boot binding from the decrypted root filesystem the chroot target looks at, and the ESP's boot entries.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from appliance.audit.checks import membria_support as mem
from appliance.audit.targets import TargetSpec
from appliance.errors import ApplianceError
from edge_image import boot, disk, esp
from edge_image.device import firstboot
from edge_image.errors import ImageError

UNIT_DIR = "/etc/systemd/system"
IMAGE_JSON = "/etc/membria/image.json"
CRYPTTAB = "/etc/crypttab"
CRYPTENROLL = "/usr/bin/systemd-cryptenroll"
FIRSTBOOT_STEPS = {"membria-reencrypt.service": "reencrypt", "membria-enroll.service": "enroll"}


def _image(target: TargetSpec) -> Path:
    if not target.image:
        raise LookupError("the target names no image directory: the image file itself is needed for this check")
    from appliance.audit import image_root

    return image_root.image_file(Path(target.image))


def _root_header(target: TargetSpec, evidence: Any) -> tuple[Path, Any]:
    from appliance.audit import image_root

    image = _image(target)
    what = f"LUKS2 header of partition {disk.ROOT_NAME} in {image.name} (cryptsetup luksDump on a private copy)"
    try:
        header = image_root.root_header(image)
    except (ApplianceError, ImageError) as exc:
        evidence.add(what, exc.message, 1)
        raise AssertionError(exc.message) from None
    return image, header


def test_image_root_luks2_aes256_xts(target: TargetSpec, evidence: Any) -> None:
    image, header = _root_header(target, evidence)
    summary = mem.luks_summary(header.model_dump(mode="json"))
    evidence.add(
        f"LUKS2 header of partition {disk.ROOT_NAME} in {image.name} (cryptsetup luksDump on a private copy)",
        json.dumps({"uuid": header.uuid, "label": header.label, **summary}, indent=1),
        0,
    )
    problems = mem.luks_problems(summary, tpm2_slots_exempt_from_kdf=False)
    assert not problems, f"{image.name}: " + "; ".join(problems)


def _luks_options(cmdline: str, luks_uuid: str) -> tuple[bool, list[str]]:
    """(names the root by this LUKS UUID, the rd.luks.options values for it) from a kernel command line."""
    words = shlex.split(cmdline)
    named = f"rd.luks.name={luks_uuid}=root" in words
    options = [w.split("=", 2)[2] for w in words if w.startswith(f"rd.luks.options={luks_uuid}=")]
    options += [w.split("=", 1)[1] for w in words if w.startswith("rd.luks.options=") and w.count("=") == 1]
    return named, options


def _has_tpm2(options: list[str]) -> bool:
    return any(o.startswith("tpm2-device=") for value in options for o in value.split(","))


def _units(host: Any, problems: list[str]) -> None:
    """The first-boot units are installed as the image recipe writes them, and enabled (offline: the links)."""
    for unit, step in FIRSTBOOT_STEPS.items():
        path = f"{UNIT_DIR}/{unit}"
        text = mem.read_text(host, path)
        if text is None:
            problems.append(f"{path} is missing (first boot would never bind the disk to the TPM)")
            continue
        argv = mem.exec_start(text)
        if argv[-3:] != ["-m", "edge_image.device.firstboot", step]:
            problems.append(f"{path} does not run `edge_image.device.firstboot {step}` (ExecStart {shlex.join(argv)})")
        elif not host.file(argv[0]).is_executable:
            problems.append(f"{path} runs {argv[0]}, which is not in the image")
        wanted = mem.unit_wanted_by(text)
        if not wanted:
            problems.append(f"{path} has no WantedBy= in [Install]: nothing starts it")
        for target_name in wanted:
            link = mem.unit_dir_link(UNIT_DIR, target_name, unit)
            if not host.file(link).is_symlink:
                problems.append(f"{unit} is not enabled: no {link}")


def _boot_config(host: Any, luks_uuid: str, problems: list[str]) -> None:
    cmdline = mem.read_text(host, "/etc/kernel/cmdline")
    if cmdline is None:
        problems.append("/etc/kernel/cmdline is missing (kernel upgrades would write entries without the TPM2 unlock)")
    else:
        named, options = _luks_options(cmdline, luks_uuid)
        if not named:
            problems.append(f"/etc/kernel/cmdline does not name LUKS {luks_uuid} as the root (rd.luks.name=)")
        if not _has_tpm2(options):
            problems.append("/etc/kernel/cmdline does not unlock the root with the TPM2 (no tpm2-device= option)")
    crypttab = mem.read_text(host, CRYPTTAB)
    for line in (crypttab or "").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and luks_uuid in fields[1] and not _has_tpm2(fields[3:4]):
            problems.append(f"{CRYPTTAB} opens LUKS {luks_uuid} without tpm2-device=")
    conf_path = "/" + boot.DRACUT_CONF
    conf = mem.read_text(host, conf_path)
    if conf is None:
        problems.append(f"{conf_path} is missing (an initrd made on the laptop would lack the TPM2 unlock)")
    else:
        if "tpm2-tss" not in conf:
            problems.append(f"{conf_path} does not add dracut's tpm2-tss module")
        if boot.TOKEN_PLUGIN not in conf:
            problems.append(f"{conf_path} does not install {boot.TOKEN_PLUGIN} into the initrd")
    if not host.file(boot.TOKEN_PLUGIN).is_file:
        problems.append(f"the systemd-cryptsetup TPM2 token plugin {boot.TOKEN_PLUGIN} is not in the image")
    if not host.file(CRYPTENROLL).is_executable:
        problems.append(f"{CRYPTENROLL} is not in the image (first boot enrolls the TPM2 with it)")


def _pcrs(host: Any, target: TargetSpec, problems: list[str]) -> None:
    text = mem.read_text(host, IMAGE_JSON)
    if text is None:
        problems.append(f"{IMAGE_JSON} is missing (first boot reads the PCRs to seal to from it)")
        return
    try:
        image = json.loads(text)
        pcrs = mem.pcr_list(image.get("tpm2_pcrs"))
    except (ValueError, TypeError, AttributeError):
        problems.append(f"{IMAGE_JSON} is not the image's settings (JSON with tpm2_pcrs)")
        return
    if not pcrs:
        problems.append(f"{IMAGE_JSON} names no PCR to seal the disk key to")
    profile = (target.facts.get("edge_profiles") or {}).get(image.get("profile"))
    if profile is not None:
        wanted = mem.pcr_list(profile.get("tpm2_pcrs"))
        if pcrs != wanted:
            problems.append(
                f"{IMAGE_JSON} seals to PCRs {pcrs}, the site's profile {image.get('profile')} says {wanted}"
            )
        if bool(image.get("tpm2_pin")) != bool(profile.get("tpm2_pin")):
            problems.append(
                f"{IMAGE_JSON} tpm2_pin is {image.get('tpm2_pin')}, the profile says {profile.get('tpm2_pin')}"
            )


def _esp_entries(target: TargetSpec, image: Path, luks_uuid: str, evidence: Any, problems: list[str]) -> None:
    """The ESP's normal boot entries (what boots after first boot) unlock the root with the TPM2."""
    from appliance.audit import image_root

    manifest = image_root.manifest(Path(str(target.image)))
    offset = disk.read_table(image).partition(disk.ESP_NAME).start
    names = sorted(
        n
        for n in manifest.esp
        if n.startswith("loader/entries/") and n != "loader/entries/" + firstboot.FIRST_BOOT_ENTRY
    )
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = esp.read_file(image, offset, name).decode(errors="replace")
        except ImageError as exc:
            found[name] = f"unreadable: {exc.message}"
    evidence.add(f"boot entries on the ESP of {image.name} (mtools)", json.dumps(found, indent=1), 0)
    if not names:
        problems.append("the ESP has no normal boot entry")
    for name, text in found.items():
        options = next((ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("options ")), "")
        named, luks_options = _luks_options(options, luks_uuid)
        if not named or not _has_tpm2(luks_options):
            problems.append(f"ESP {name} does not unlock LUKS {luks_uuid} with the TPM2 (tpm2-device=)")


def test_image_binds_disk_to_tpm2_at_first_boot(host: Any, target: TargetSpec, evidence: Any) -> None:
    image, header = _root_header(target, evidence)
    problems: list[str] = []
    _units(host, problems)
    _boot_config(host, header.uuid, problems)
    _pcrs(host, target, problems)
    _esp_entries(target, image, header.uuid, evidence, problems)
    assert not problems, "; ".join(problems)
