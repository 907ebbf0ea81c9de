"""Shared by the appliance's own checks (test_mem_*.py): reading files on the target, the gateway's own
configuration, LUKS2 metadata, and where a node's services listen.

Everything read on the target goes through testinfra's `host` (so the plugin records it as evidence); what is
read or computed on the controller is added through the `evidence` fixture by the checks.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from appliance.audit.targets import TargetSpec

# roles/gateway/defaults/main.yml (gateway_config_file): where a provisioned node keeps the gateway's settings.
GATEWAY_CONFIG = "/etc/membria/gateway.json"
LUKS_CIPHER = "aes-xts-plain64"
LUKS_KEY_BITS = 512  # XTS splits the key in two: AES-256-XTS
KDF = "argon2id"
TPM2_TOKEN = "systemd-tpm2"  # noqa: S105 - a LUKS2 token type
# How much of the device the header copy takes: the LUKS2 header area (two metadata copies and the keyslots) is
# 16 MiB as the image makes it (edge_image/luks.py LuksParams.data_offset); twice that leaves room.
HEADER_COPY_MIB = 32


class NotReadable(Exception):
    """A file the check needs could not be read on the target (the message says which, and why)."""


def read_text(host: Any, path: str) -> str | None:
    """The file's content, or None when it does not exist; NotReadable when it exists but cannot be read."""
    result = host.run("cat -- %s", path)
    if result.rc == 0:
        return str(result.stdout)
    if not host.file(path).exists:
        return None
    raise NotReadable(f"{path} exists but cannot be read: {(result.stderr or '').strip() or f'exit {result.rc}'}")


def node_file(target: TargetSpec, name: str, default: str) -> str:
    files: Mapping[str, str] = target.facts.get("node_files") or {}
    return str(files.get(name) or default)


def gateway_config(host: Any, target: TargetSpec) -> tuple[str, dict[str, Any]]:
    """(path, settings) of the gateway's configuration file on the node: what the running gateway reads."""
    path = node_file(target, "gateway_config", GATEWAY_CONFIG)
    text = read_text(host, path)
    if text is None:
        raise AssertionError(f"no gateway configuration at {path}: the gateway role has not been applied")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise AssertionError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AssertionError(f"{path} is not a JSON object")
    return path, data


def endpoint(target: TargetSpec, service: str) -> tuple[str, int]:
    """(address, port) of a node's service (gateway, core) as the controller reaches it.

    Facts `endpoints.<service>` ("host:port") win; else the node of that name in the site (an SSH target's own
    address first), else the site's only node.
    """
    explicit = (target.facts.get("endpoints") or {}).get(service)
    if explicit:
        host_part, _, port = str(explicit).rpartition(":")
        return host_part.strip("[]"), int(port)
    nodes: Mapping[str, Any] = target.facts.get("nodes") or {}
    node = nodes.get(target.name)
    if node is None and len(nodes) == 1:
        node = next(iter(nodes.values()))
    if node is None:
        raise LookupError(f"the site has no core node named {target.name} and no endpoint for {service} in the facts")
    address = target.address if target.backend == "ssh" and target.address else str(node["address"])
    return address, int(node["ports"][service])


# --- LUKS2 ----------------------------------------------------------------------------------------------------


# Values of the LUKS2 metadata a report has no use for and should not carry: keyslot salts, the volume key's digest,
# the TPM-sealed blob and its policy (none opens the disk alone; all would help an offline attack on a stolen one).
OMITTED = ("salt", "digest", "tpm2-blob", "tpm2-policy-hash", "tpm2_srk", "tpm2-srk", "tpm2-pubkey")


def header_dump_command(device: str) -> str:
    """A shell command printing the device's LUKS2 metadata (JSON), read from a private copy of its header area.

    cryptsetup repairs a damaged header copy in place whenever it reads one; on a copy the device is never written.
    The values named in OMITTED are blanked before anything is printed (the output is recorded as evidence).
    """
    dev = shlex.quote(device)
    blank = shlex.quote(f's/"({"|".join(OMITTED)})":"[^"]*"/"\\1":"[omitted]"/g')
    return (
        "d=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d) && trap 'rm -rf \"$d\"' EXIT && "
        f'dd if={dev} of="$d/header" bs=1M count={HEADER_COPY_MIB} status=none && '
        'cryptsetup luksDump --disable-locks --dump-json-metadata "$d/header" > "$d/meta" && '
        f'sed -E {blank} "$d/meta"'
    )


def luks_summary(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the checks judge, from `cryptsetup luksDump --dump-json-metadata` (no salts, digests or blobs)."""
    return {
        "segments": [
            {k: s.get(k) for k in ("type", "encryption", "sector_size", "offset")}
            for s in (meta.get("segments") or {}).values()
        ],
        "keyslots": {
            slot: {
                "type": s.get("type"),
                "key_bits": int(s.get("key_size") or 0) * 8,
                "kdf": (s.get("kdf") or {}).get("type"),
            }
            for slot, s in sorted((meta.get("keyslots") or {}).items())
        },
        "tokens": {
            token: {k: t.get(k) for k in ("type", "keyslots", "tpm2-pcrs", "tpm2-pcr-bank", "tpm2-pin")}
            for token, t in sorted((meta.get("tokens") or {}).items())
        },
        "requirements": ((meta.get("config") or {}).get("requirements") or {}).get("mandatory", []),
    }


def token_slots(summary: Mapping[str, Any], kind: str | None = None) -> set[str]:
    return {
        str(slot)
        for token in summary["tokens"].values()
        if kind is None or token.get("type") == kind
        for slot in token.get("keyslots") or []
    }


def luks_problems(summary: Mapping[str, Any], *, tpm2_slots_exempt_from_kdf: bool) -> list[str]:
    """Why the header is not LUKS2 AES-256-XTS with argon2id keyslots (empty: it is).

    tpm2_slots_exempt_from_kdf: a slot a systemd-tpm2 token owns keeps systemd's minimal PBKDF2 (its secret is 256
    random bits that exist only inside the TPM's unseal: edge_image/DESIGN.md, First boot, step 3).
    """
    problems: list[str] = []
    segments = summary["segments"]
    crypt = [s for s in segments if s.get("type") == "crypt"]
    if len(segments) != 1 or len(crypt) != 1:
        problems.append(f"segments {[s.get('type') for s in segments]}, expected exactly one crypt segment")
    for segment in crypt:
        if segment.get("encryption") != LUKS_CIPHER:
            problems.append(f"data encrypted with {segment.get('encryption')}, not {LUKS_CIPHER}")
    slots = {k: v for k, v in summary["keyslots"].items() if v.get("type") == "luks2"}
    if not slots:
        problems.append("no luks2 keyslot, so the volume key size cannot be read")
    for slot, info in slots.items():
        if info["key_bits"] != LUKS_KEY_BITS:
            problems.append(f"keyslot {slot} holds a {info['key_bits']}-bit key, not {LUKS_KEY_BITS} (AES-256-XTS)")
    exempt = token_slots(summary, TPM2_TOKEN) if tpm2_slots_exempt_from_kdf else set()
    for slot, info in slots.items():
        if slot not in exempt and info.get("kdf") != KDF:
            problems.append(f"keyslot {slot} uses {info.get('kdf')}, not {KDF}")
    if summary["requirements"] or any(v.get("type") == "reencrypt" for v in summary["keyslots"].values()):
        problems.append(f"an unfinished re-encryption is recorded ({summary['requirements']})")
    return problems


def pcr_list(value: Any) -> list[int]:
    """A token's or a profile's PCR list ([7], or systemd's older "7+11" spelling) as sorted integers."""
    if isinstance(value, str):
        return sorted(int(p) for p in value.split("+") if p.strip())
    return sorted(int(p) for p in value or [])


def unit_wanted_by(unit_text: str) -> list[str]:
    """The targets a unit's [Install] section names in WantedBy= (what `systemctl enable` links it into)."""
    wanted: list[str] = []
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Install]" and line.startswith("WantedBy="):
            wanted.extend(line.removeprefix("WantedBy=").split())
    return wanted


def unit_value(unit_text: str, key: str) -> str | None:
    """The first `key=value` of a unit file's [Service] section (User, WorkingDirectory, ...)."""
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Service]" and line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip() or None
    return None


def exec_start(unit_text: str) -> list[str]:
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("ExecStart=") and line != "ExecStart=":
            return shlex.split(line.removeprefix("ExecStart=").lstrip("-@:+!"))
    return []


def unit_dir_link(unit_dir: str, target_name: str, unit: str) -> str:
    return str(PurePosixPath(unit_dir) / f"{target_name}.wants" / unit)
