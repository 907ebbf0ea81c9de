"""MEM-EDGE-LUKS2, MEM-EDGE-TPM2, MEM-EDGE-MTLS: an enrolled laptop, audited on itself.

The disk is the one behind the root filesystem (`/dev/mapper/root`, which the boot entries name), found through
sysfs; its LUKS2 metadata is read from a private copy of the header area, never from the disk in place.
Facts `edge.*` override the laptop's paths (`luks_device`, `firstboot_state`, `esp`, `etc`).
"""

from __future__ import annotations

import json
from typing import Any

from appliance.audit.checks import membria_support as mem
from appliance.audit.targets import TargetSpec
from edge_image.device import firstboot

MAPPING = firstboot.MAPPING  # rd.luks.name=<uuid>=root
DEFAULTS = firstboot.Paths()
# write_identity / device_key_and_csr: the device key is 0640 root:membria (the agent reads it, nobody else).
KEY_OWNER, KEY_GROUP, KEY_MODE = "root", "membria", 0o640


def _edge(target: TargetSpec, name: str, default: str) -> str:
    return str((target.facts.get("edge") or {}).get(name) or default)


def _device(host: Any, target: TargetSpec) -> str:
    explicit = (target.facts.get("edge") or {}).get("luks_device")
    if explicit:
        return str(explicit)
    found = host.run('dm=$(basename "$(readlink -f /dev/mapper/%s)") && ls /sys/block/"$dm"/slaves', MAPPING)
    slaves = found.stdout.split() if found.rc == 0 else []
    assert len(slaves) == 1, (
        f"cannot find the disk behind /dev/mapper/{MAPPING} (slaves: {slaves or 'none'}): "
        "is the root filesystem on the LUKS2 volume?"
    )
    return f"/dev/{slaves[0]}"


def _metadata(host: Any, target: TargetSpec, evidence: Any) -> tuple[str, dict[str, Any]]:
    device = _device(host, target)
    result = host.run(mem.header_dump_command(device))
    assert result.rc == 0, f"{device} holds no LUKS2 header cryptsetup reads: {result.stderr.strip()[-300:]}"
    try:
        meta: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"cryptsetup printed no LUKS2 metadata for {device}") from None
    summary = mem.luks_summary(meta)
    evidence.add(f"LUKS2 metadata of {device}, summarised", json.dumps(summary, indent=1), 0)
    return device, meta


def test_edge_disk_luks2_aes256_xts(host: Any, target: TargetSpec, evidence: Any) -> None:
    device, meta = _metadata(host, target, evidence)
    problems = mem.luks_problems(mem.luks_summary(meta), tpm2_slots_exempt_from_kdf=True)
    assert not problems, f"{device}: " + "; ".join(problems)


def _wanted_pcrs(host: Any, target: TargetSpec) -> tuple[list[int], bool, str]:
    """(PCRs, PIN) the disk must be sealed to: the site's profile, else what the image says; and where from."""
    etc = _edge(target, "etc", str(DEFAULTS.etc))
    text = mem.read_text(host, f"{etc}/image.json")
    image = json.loads(text) if text else {}
    profile = (target.facts.get("edge_profiles") or {}).get(image.get("profile"))
    if profile is not None:
        return mem.pcr_list(profile.get("tpm2_pcrs")), bool(profile.get("tpm2_pin")), f"profile {image['profile']}"
    assert text is not None, f"{etc}/image.json is missing and the site names no profile for this laptop"
    return mem.pcr_list(image.get("tpm2_pcrs", [7])), bool(image.get("tpm2_pin")), f"{etc}/image.json"


def test_edge_disk_key_bound_to_tpm2(host: Any, target: TargetSpec, evidence: Any) -> None:
    device, meta = _metadata(host, target, evidence)
    summary = mem.luks_summary(meta)
    problems: list[str] = []
    pcrs, pin, source = _wanted_pcrs(host, target)
    tokens = [t for t in summary["tokens"].values() if t.get("type") == mem.TPM2_TOKEN]
    if not tokens:
        problems.append(f"{device} has no {mem.TPM2_TOKEN} token: the disk key is not bound to the TPM")
    for token in tokens:
        sealed = mem.pcr_list(token.get("tpm2-pcrs"))
        if sealed != pcrs:
            problems.append(f"the TPM2 token is sealed to PCRs {sealed}, the {source} says {pcrs}")
        if pin and not token.get("tpm2-pin"):
            problems.append(f"the {source} asks for a TPM PIN, the token has none")
    loose = firstboot.unaccounted_slots(meta)
    if loose:
        problems.append(f"keyslot(s) {loose} belong to no token: the image's bootstrap key (public) may still open it")
    state = _edge(target, "firstboot_state", str(DEFAULTS.state))
    if not host.file(f"{state}/done").exists:
        problems.append(f"first boot has not finished ({state}/done is missing)")
    cpio = f"{_edge(target, 'esp', str(DEFAULTS.esp))}/membria/bootstrap.cpio"
    if host.file(cpio).exists:
        problems.append(f"the bootstrap key is still on the ESP ({cpio})")
    assert not problems, "; ".join(problems)


def test_edge_mtls_to_gateways(host: Any, target: TargetSpec, evidence: Any) -> None:
    etc = _edge(target, "etc", str(DEFAULTS.etc))
    path = f"{etc}/edge.json"
    text = mem.read_text(host, path)
    assert text is not None, f"{path} is missing: the laptop is not enrolled (first boot writes it)"
    try:
        settings = json.loads(text)
        gateways = [str(g) for g in settings.get("gateways") or []]
        tls = {k: str(v) for k, v in (settings.get("tls") or {}).items()}
    except (ValueError, AttributeError):
        raise AssertionError(f"{path} is not the agent's settings (JSON with gateways and tls)") from None
    problems: list[str] = []
    if not gateways:
        problems.append(f"{path} names no gateway")
    plain = [g for g in gateways if not g.startswith("https://")]
    if plain:
        problems.append(f"{path} reaches gateways without TLS: {', '.join(plain)}")
    known = [g.rstrip("/") for g in target.facts.get("edge_gateways") or []]
    unknown = [g for g in gateways if known and g.rstrip("/") not in known]
    if unknown:
        problems.append(f"{path} names gateways the site does not: {', '.join(unknown)} (site: {', '.join(known)})")
    for name in ("cert", "key", "ca"):
        if not tls.get(name):
            problems.append(f"{path} has no tls.{name}")
        elif not host.file(tls[name]).is_file:
            problems.append(f"tls.{name} {tls[name]} is missing")
    key = tls.get("key")
    if key and host.file(key).is_file:
        f = host.file(key)
        owner, group, mode = f.user, f.group, f.mode
        if (owner, group) != (KEY_OWNER, KEY_GROUP):
            problems.append(f"the device key {key} is owned by {owner}:{group}, not {KEY_OWNER}:{KEY_GROUP}")
        if mode & ~KEY_MODE:
            problems.append(f"the device key {key} has mode {mode:04o}, more than {KEY_MODE:04o}")
    evidence.add(f"{path}: gateways and TLS files", json.dumps({"gateways": gateways, "tls": tls}, indent=1), 0)
    assert not problems, "; ".join(problems)
