"""First boot of an edge laptop (edge_image/DESIGN.md, "First boot"): own volume key, TPM2, escrow, certificate.

Two units run it, each step idempotent with its state in /var/lib/membria/firstboot/, so a power cut anywhere
resumes where it stopped:

- `membria-reencrypt.service` (`python -m edge_image.device.firstboot reencrypt`), early and before anything makes a
  secret (SSH host keys): `cryptsetup reencrypt` gives the laptop a volume key of its own (every flashed laptop starts
  with the image's), then the partition, the LUKS mapping and ext4 grow to the disk.
- `membria-enroll.service` (`... enroll`), after the network: TPM2 binding (`systemd-cryptenroll --tpm2-pcrs`), a
  recovery key (argon2id slot, the key kept in memory only), `POST /v1/enroll` with the one-time token from the ESP
  (escrow + device certificate), then the bootstrap slot and the first-boot files on the ESP are destroyed.

The bootstrap key is public by design (it sits in the first-boot cpio on the ESP); every keyslot it opens is gone when
enrollment ends, and only slots that a systemd token (tpm2 or recovery) accounts for remain.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_image import esp, tools
from edge_image.errors import ImageBadInput, ImageError
from edge_image.luks import private_dir
from runtime.common import atomic

MAPPING = "root"  # rd.luks.name=<uuid>=root
ENROLL_HEADER = "Membria-Enrollment-Token"
NORMAL_ENTRIES = "membria-*"  # systemd-boot glob: the kernel entries, never the first-boot one
FIRST_BOOT_ENTRY = "firstboot-membria.conf"
TPM2_TOKEN = "systemd-tpm2"  # noqa: S105 - a LUKS2 token type, not a secret
RECOVERY_TOKEN = "systemd-recovery"  # noqa: S105
_PERMANENT = (400, 401, 403, 404, 409, 413, 422)  # the gateway's answer will not change by retrying


@dataclass(frozen=True)
class Paths:
    """Where first boot reads and writes; tests point these into a temporary tree."""

    state: Path = Path("/var/lib/membria/firstboot")
    esp: Path = Path("/efi")
    etc: Path = Path("/etc/membria")
    hosts: Path = Path("/etc/hosts")
    hostname: Path = Path("/etc/hostname")

    @property
    def enroll_json(self) -> Path:
        return self.esp / "membria" / "enroll.json"

    @property
    def cpio(self) -> Path:
        return self.esp / "membria" / "bootstrap.cpio"

    @property
    def tls(self) -> Path:
        return self.etc / "tls"

    @property
    def edge_json(self) -> Path:
        return self.etc / "edge.json"

    def marker(self, name: str) -> Path:
        return self.state / name


# --- small helpers -------------------------------------------------------------------------------------------------


def say(text: str) -> None:
    """One line to the journal (and the console: the units set StandardOutput=journal+console)."""
    print(f"membria-firstboot: {text}", flush=True)


def mark(paths: Paths, name: str, content: str = "") -> None:
    paths.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(paths.marker(name), content.encode(), 0o600)


def write_atomic(path: Path, data: bytes, mode: int, group: str | None = None) -> None:
    """runtime.common.atomic's write (a power cut leaves the old file or the new), then the group if named."""
    atomic.write_bytes(path, data, mode=mode)
    if group is not None:
        with contextlib.suppress(KeyError):
            os.chown(path, 0, grp.getgrnam(group).gr_gid)


def luks_device(mapping: str = MAPPING, dev_root: Path = Path("/dev"), sys_root: Path = Path("/sys")) -> Path:
    """The partition under /dev/mapper/<mapping> (its dm device's only slave)."""
    dm = (dev_root / "mapper" / mapping).resolve()
    slaves = sorted(p.name for p in (sys_root / "block" / dm.name / "slaves").iterdir())
    if len(slaves) != 1:
        raise ImageError(f"/dev/mapper/{mapping} ({dm.name}) has {len(slaves)} backing devices, expected one")
    return dev_root / slaves[0]


def header(device: Path) -> dict[str, Any]:
    """The LUKS2 metadata as cryptsetup reports it (keyslots, tokens, segments, config)."""
    out = tools.run(["cryptsetup", "luksDump", "--dump-json-metadata", device], what=f"reading {device}'s LUKS header")
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def tokens_of(meta: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [t for t in meta.get("tokens", {}).values() if t.get("type") == kind]


def reencrypt_pending(meta: dict[str, Any]) -> bool:
    """An interrupted re-encryption: LUKS2 marks it as a mandatory requirement and keeps a `reencrypt` keyslot."""
    mandatory = meta.get("config", {}).get("requirements", {}).get("mandatory", [])
    return any(str(r).startswith("online-reencrypt") for r in mandatory) or any(
        s.get("type") == "reencrypt" for s in meta.get("keyslots", {}).values()
    )


def unaccounted_slots(meta: dict[str, Any]) -> list[int]:
    """Keyslots no systemd token accounts for: the bootstrap slot (and nothing else, on a laptop we enrolled)."""
    owned = {int(k) for t in meta.get("tokens", {}).values() for k in t.get("keyslots", [])}
    return sorted(
        int(k) for k, s in meta.get("keyslots", {}).items() if s.get("type") == "luks2" and int(k) not in owned
    )


@contextlib.contextmanager
def bootstrap_key_file(paths: Paths) -> Iterator[Path]:
    """The bootstrap key from the first-boot cpio, in a private tmpfs file removed afterwards."""
    try:
        archive = paths.cpio.read_bytes()
    except OSError as exc:
        raise ImageError(f"{paths.cpio}: cannot read the bootstrap key ({exc.strerror}); is the ESP mounted?") from exc
    key = esp.cpio_member(archive, esp.BOOTSTRAP_KEY_PATH)
    with private_dir() as tmp:
        path = tmp / "bootstrap.key"
        write_atomic(path, key, 0o600)
        yield path


def _run_visible(argv: list[str], what: str) -> None:
    """A long step whose own progress should reach the journal/console as it happens."""
    say(what)
    result = subprocess.run(argv, check=False)
    if result.returncode != 0:
        raise ImageError(f"{what} failed ({argv[0]} exit {result.returncode})")


# --- step 1: the laptop's own volume key -----------------------------------------------------------------------


def reencrypt(paths: Paths, device: Path, key_file: Path, *, active_name: str | None = MAPPING) -> bool:
    """`cryptsetup reencrypt` to a new volume key (online through `active_name`; None: offline, device unmapped).

    False when done before. An interrupted run (power cut) is resumed with --resume-only: LUKS2 recovers its
    hotzone from the checksums when the device is activated, then re-encryption carries on.
    """
    if paths.marker("reencrypted").exists():
        return False
    meta = header(device)
    argv = ["cryptsetup", "reencrypt", "--batch-mode", "--key-file", str(key_file)]
    if reencrypt_pending(meta):
        argv.append("--resume-only")
        what = "resuming the interrupted re-encryption"
    else:
        # The same cipher and sector size as the image, a fresh 512-bit key; the bootstrap slot is re-wrapped (its
        # PBKDF barely matters: the key is public and the slot is destroyed when enrollment succeeds).
        argv += ["--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", "4096"]
        argv += ["--resilience", "checksum", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4"]
        argv += ["--pbkdf-memory", "65536"]
        what = "re-encrypting the disk with this laptop's own volume key"
    argv += ["--active-name", active_name] if active_name else ["--force-offline-reencrypt", str(device)]
    _run_visible(argv, what)
    if reencrypt_pending(header(device)):
        raise ImageError("cryptsetup finished but the header still records a re-encryption in progress")
    mark(paths, "reencrypted")
    return True


def mapped_sectors(partition_bytes: int, meta: dict[str, Any]) -> int:
    """The mapping's size in 512-byte units: the partition after the data offset, in whole encryption sectors."""
    segment = meta["segments"]["0"]
    sector = int(segment.get("sector_size", 512))
    usable = partition_bytes - int(segment["offset"])
    if usable <= 0:
        raise ImageError(f"the partition ({partition_bytes} bytes) ends before the LUKS data offset")
    return usable // sector * sector // 512


GPT_TAIL_SECTORS = 33  # the backup GPT at the disk's end: 32 sectors of entries and its header
ALIGN_SECTORS = 2048  # 1 MiB: the grown partition ends on a boundary the 4096-byte LUKS sectors divide


def grown_size(disk_sectors: int, start: int, size: int) -> int | None:
    """The partition's new size in 512-byte sectors (to the disk's end, whole MiB), or None when already there.

    Not growpart's "as far as possible": that end is rarely a multiple of 4096 bytes, and dm-crypt then refuses to
    map the LUKS2 segment (its size is the partition's, "dynamic"), so the next boot could not open the disk.
    """
    target = (disk_sectors - GPT_TAIL_SECTORS - start) // ALIGN_SECTORS * ALIGN_SECTORS
    return target if target > size else None


def grow(device: Path, key_file: Path, *, mapping: str = MAPPING, sys_root: Path = Path("/sys")) -> None:
    """Partition, LUKS mapping and ext4 to the whole disk (all three online; a no-op when already grown)."""
    part = sys_root / "class" / "block" / device.name
    number = (part / "partition").read_text().strip()
    disk_dir = part.resolve().parent
    disk = Path("/dev") / disk_dir.name
    start, size = (int((part / name).read_text()) for name in ("start", "size"))
    target = grown_size(int((disk_dir / "size").read_text()), start, size)
    if target is not None:
        # sfdisk moves the backup GPT to the disk's new end as it writes; partx tells the kernel (BLKPG), as growpart
        # does, since the partition is in use and the disk cannot be re-read.
        tools.run(
            ["sfdisk", "--no-reread", "--no-tell-kernel", "--force", "-N", number, disk],
            stdin=f"{start},{target}\n".encode(),
            what=f"growing {device.name} to the end of {disk}",
        )
        tools.run(["partx", "--update", "--nr", number, disk], what=f"telling the kernel {device.name}'s new size")
        size = target
    sectors = mapped_sectors(size * 512, header(device))
    tools.run(
        ["cryptsetup", "resize", "--key-file", key_file, "--size", str(sectors), mapping],
        what=f"resizing /dev/mapper/{mapping}",
    )
    tools.run(["resize2fs", f"/dev/mapper/{mapping}"], what="growing the root filesystem")


# --- step 2: TPM2 and the recovery key ---------------------------------------------------------------------------


def _ask_new_pin() -> str:
    """The user chooses the TPM PIN at first boot (image.tpm2_pin); asked twice through systemd's agent."""
    for _ in range(3):
        first, again = (
            tools.run(["systemd-ask-password", "--timeout=0", f"{prompt}:"], what="asking for the TPM PIN")
            .stdout.decode()
            .rstrip("\n")
            for prompt in ("Choose a PIN to unlock this laptop", "Type the PIN again")
        )
        if first and first == again:
            return first
        say("the PINs differ or are empty; again")
    raise ImageError("no TPM PIN was chosen")


def enroll_tpm2(device: Path, key_file: Path, pcrs: list[int], *, pin: bool = False) -> bool:
    """Seal a key slot to this laptop's TPM2 under the PCR policy; False when a TPM2 token exists already."""
    if tokens_of(header(device), TPM2_TOKEN):
        return False
    argv = ["systemd-cryptenroll", f"--unlock-key-file={key_file}", "--tpm2-device=auto"]
    argv.append(f"--tpm2-pcrs={'+'.join(str(p) for p in pcrs)}")
    env = None
    if pin:
        argv.append("--tpm2-with-pin=yes")
        env = {"NEWPIN": _ask_new_pin()}
    say(f"binding the disk to this laptop's TPM2 (PCRs {'+'.join(str(p) for p in pcrs) or 'none'})")
    tools.run([*argv, device], what="enrolling the TPM2", env=env)
    if not pin:
        # Unseal once before the bootstrap slot may go: a binding that cannot open the disk must not be the only way.
        tools.run(
            ["cryptsetup", "open", "--test-passphrase", "--token-only", "--token-type", TPM2_TOKEN, device],
            what="checking that the TPM2 unseals the disk",
        )
    return True


def new_recovery_key(device: Path, key_file: Path) -> str:
    """A fresh recovery key (systemd's format) in an argon2id slot; any earlier, unescrowed one is wiped first.

    The key exists only in this process's memory until the gateway has escrowed it in Vault.
    """
    if tokens_of(header(device), RECOVERY_TOKEN):
        tools.run(
            ["systemd-cryptenroll", f"--unlock-key-file={key_file}", "--wipe-slot=recovery", device],
            what="wiping a recovery key that was never escrowed",
        )
    out = tools.run(
        ["systemd-cryptenroll", f"--unlock-key-file={key_file}", "--recovery-key", device],
        what="making the recovery key",
    )
    key = out.stdout.decode().strip()
    tokens = tokens_of(header(device), RECOVERY_TOKEN)
    if not key or len(tokens) != 1 or len(tokens[0].get("keyslots", [])) != 1:
        raise ImageError("systemd-cryptenroll made no usable recovery key slot")
    slot = str(tokens[0]["keyslots"][0])
    # systemd gives the slot a minimal PBKDF2 (its key is already 256 bits of randomness); a person types this key,
    # so it gets the image's PBKDF: argon2id, cryptsetup's own benchmark on this laptop.
    convert = ["cryptsetup", "luksConvertKey", "--batch-mode", "--key-slot", slot, "--pbkdf", "argon2id"]
    tools.run(
        [*convert, "--key-file", "-", str(device)],
        what="moving the recovery slot to argon2id",
        stdin=key.encode(),
    )
    return key


# --- step 3: enrollment with the gateway -------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrollment:
    """`membria/enroll.json` on the ESP, written by `appliance edge enroll-token` and `edge flash --enrollment`."""

    device: str
    token: str = field(repr=False)
    gateways: list[str]
    resolve: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> Enrollment:
        try:
            data = json.loads(path.read_text())
            return cls(
                device=str(data["device"]),
                token=str(data["token"]),
                gateways=[str(g).rstrip("/") for g in data.get("gateways") or []],
                resolve={str(k): str(v) for k, v in (data.get("resolve") or {}).items()},
            )
        except FileNotFoundError:
            raise ImageBadInput(
                f"{path}: no enrollment file; flash the laptop with `appliance edge flash --enrollment FILE`"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ImageBadInput(f"{path}: not an enrollment file ({type(exc).__name__})") from None


def add_hosts(hosts: Path, resolve: dict[str, str]) -> None:
    """Names the laptop cannot resolve yet (a lab, the boot test), from the enrollment file."""
    if not resolve:
        return
    text = hosts.read_text() if hosts.exists() else ""
    known = {w for line in text.splitlines() for w in line.split("#")[0].split()[1:]}
    extra = [f"{addr}\t{name}\n" for name, addr in sorted(resolve.items()) if name not in known]
    if extra:
        head = text if not text or text.endswith("\n") else text + "\n"
        write_atomic(hosts, (head + "".join(extra)).encode(), 0o644)


def device_key_and_csr(paths: Paths, fqdn: str) -> str:
    """The device's EC P-256 key (kept across retries, 0640 root:membria) and a CSR for CN=fqdn."""
    key_path = paths.tls / "device.key"
    if key_path.exists():
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ImageError(f"{key_path} is not an EC key")
        key = loaded
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(key_path, pem, 0o640, group="membria")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class EnrollRefused(ImageError):
    """The gateway answered and said no: retrying with the same token cannot help."""


def post_enrollment(gateway: str, ca: Path, token: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """`POST /v1/enroll` over TLS 1.3, the gateway checked against the CA baked into the image (never the ESP's)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with httpx.Client(verify=context, timeout=timeout) as client:
        response = client.post(f"{gateway}/v1/enroll", json=body, headers={ENROLL_HEADER: token})
    if response.status_code in _PERMANENT:
        try:
            detail = response.json().get("error", {}).get("message") or response.text[:200]
        except ValueError:
            detail = response.text[:200]
        raise EnrollRefused(f"{gateway} refused the enrollment ({response.status_code}): {detail}")
    if response.status_code != 200:
        raise ImageError(f"{gateway} answered {response.status_code}")
    reply: dict[str, Any] = response.json()
    if not isinstance(reply.get("certificate_pem"), str):
        raise ImageError(f"{gateway} answered without a certificate")
    return reply


def enroll_with_retries(
    gateways: list[str],
    ca: Path,
    token: str,
    body: dict[str, Any],
    *,
    attempts: int | None = None,
    backoff: float = 5.0,
    backoff_max: float = 300.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Every gateway in turn, then wait (doubling up to backoff_max) and again; a refusal ends it at once."""
    delay, attempt = backoff, 0
    while True:
        attempt += 1
        for gateway in gateways:
            try:
                return post_enrollment(gateway, ca, token, body)
            except EnrollRefused:
                raise
            except (httpx.HTTPError, ImageError, ValueError) as exc:
                say(f"attempt {attempt}: {gateway}: {type(exc).__name__}: {str(exc)[:200]}")
        if attempts is not None and attempt >= attempts:
            raise ImageError(f"no gateway answered after {attempt} attempts ({', '.join(gateways)})")
        say(f"no gateway reachable; next attempt in {delay:.0f} s")
        sleep(delay)
        delay = min(delay * 2, backoff_max)


def write_identity(paths: Paths, device: str, fqdn: str, gateways: list[str], reply: dict[str, Any]) -> None:
    """The certificate, the agent's settings (/etc/membria/edge.json) and the hostname."""
    cert = paths.tls / "device.crt"
    write_atomic(cert, (reply["certificate_pem"].rstrip("\n") + "\n").encode(), 0o644)
    profile = json.loads((paths.etc / "edge-profile.json").read_text())
    settings = {
        **profile,
        "device": device,
        "gateways": gateways,
        "tls": {"cert": str(cert), "key": str(paths.tls / "device.key"), "ca": str(paths.tls / "ca.pem")},
    }
    write_atomic(paths.edge_json, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode(), 0o640, "membria")
    write_atomic(paths.hostname, f"{device}\n".encode(), 0o644)
    if paths.hosts.exists():
        lines = paths.hosts.read_text().splitlines()
        lines = [f"127.0.1.1\t{fqdn} {device}" if ln.startswith("127.0.1.1") else ln for ln in lines]
        write_atomic(paths.hosts, ("\n".join(lines) + "\n").encode(), 0o644)


# --- step 4: no way back in with the bootstrap key -----------------------------------------------------------


def finish(paths: Paths, device: Path) -> list[int]:
    """Destroy every slot no token accounts for (the bootstrap slot), mark first boot done, clear the ESP.

    Refuses while the TPM2 or the recovery token is missing: the bootstrap slot is then the only way in. The order
    survives a power cut anywhere: the normal (TPM2) entry becomes the default first, since the first-boot entry
    can only ask for a passphrase once its key is gone; the bootstrap cpio goes last, after `done`, since an
    unfinished run needs it again (after `done` the units no longer start, and the key opens nothing).
    """
    meta = header(device)
    for kind in (TPM2_TOKEN, RECOVERY_TOKEN):
        if not tokens_of(meta, kind):
            raise ImageError(f"the header has no {kind} token: the bootstrap slot stays")
    loader = paths.esp / "loader"
    write_atomic(loader / "loader.conf", esp.loader_conf(NORMAL_ENTRIES).encode(), 0o644)
    (loader / "entries" / FIRST_BOOT_ENTRY).unlink(missing_ok=True)
    os.sync()
    killed = unaccounted_slots(meta)
    for slot in killed:
        tools.run(["cryptsetup", "luksKillSlot", "--batch-mode", device, str(slot)], what=f"destroying keyslot {slot}")
    left = unaccounted_slots(header(device))
    if left:
        raise ImageError(f"keyslots {left} are still there after luksKillSlot")
    mark(paths, "done")
    for path in (paths.cpio, paths.enroll_json):
        path.unlink(missing_ok=True)
    os.sync()
    return killed


# --- the two units --------------------------------------------------------------------------------------------


def run_reencrypt(paths: Paths) -> None:
    if paths.marker("done").exists():
        return
    device = luks_device()
    with bootstrap_key_file(paths) as key_file:
        if not reencrypt(paths, device, key_file):
            say("re-encrypted before")
        grow(device, key_file)
    say("the disk has its own volume key and fills the drive")


def escrow_and_certify(
    paths: Paths, device: Path, key_file: Path, enrollment: Enrollment, *, attempts: int | None = None
) -> dict[str, Any]:
    """A recovery key, escrowed through the gateway with the one-time token, and the device certificate in return.

    Writes the certificate, /etc/membria/edge.json and the hostname, then the `escrowed` marker; the recovery key
    never touches the disk (a crash before the marker makes a new one next time).
    """
    image = json.loads((paths.etc / "image.json").read_text())
    recovery = new_recovery_key(device, key_file)
    fqdn = f"{enrollment.device}.{image['domain']}"
    body = {
        "device": enrollment.device,
        "csr_pem": device_key_and_csr(paths, fqdn),
        "recovery_key": recovery,
        "luks_uuid": luks_uuid(device),
        "tpm2_pcrs": [int(p) for p in image.get("tpm2_pcrs", [7])],
        "image_id": f"{image['site']}/{image['profile']}/{image['version']}",
    }
    del recovery
    gateways = enrollment.gateways or list(image.get("gateways", []))
    say(f"enrolling as {fqdn} through {', '.join(gateways)}")
    reply = enroll_with_retries(gateways, paths.tls / "ca.pem", enrollment.token, body, attempts=attempts)
    body.clear()
    write_identity(paths, enrollment.device, fqdn, gateways, reply)
    escrow = reply.get("escrow") or {}
    mark(paths, "escrowed", json.dumps({"path": escrow.get("path"), "version": escrow.get("version")}))
    return reply


def run_enroll(paths: Paths, *, attempts: int | None = None) -> None:
    if paths.marker("done").exists():
        say("enrolled before")
        return
    if not paths.marker("reencrypted").exists():
        raise ImageError("the disk still has the image's volume key; membria-reencrypt.service must run first")
    image = json.loads((paths.etc / "image.json").read_text())
    device = luks_device()
    enrollment: Enrollment | None = None
    if not paths.marker("escrowed").exists():
        enrollment = Enrollment.read(paths.enroll_json)
        add_hosts(paths.hosts, enrollment.resolve)
    with bootstrap_key_file(paths) as key_file:
        enroll_tpm2(device, key_file, [int(p) for p in image.get("tpm2_pcrs", [7])], pin=bool(image.get("tpm2_pin")))
        if enrollment is not None:
            escrow_and_certify(paths, device, key_file, enrollment, attempts=attempts)
            with contextlib.suppress(OSError, ImageError):
                tools.run(["hostname", enrollment.device], what="setting the hostname")
    killed = finish(paths, device)
    say(f"enrolled; bootstrap keyslot(s) {killed or 'already'} destroyed, first-boot files removed from the ESP")


def luks_uuid(device: Path) -> str:
    return tools.run(["cryptsetup", "luksUUID", device], what="reading the LUKS UUID").stdout.decode().strip()


# --- units -----------------------------------------------------------------------------------------------------

_PYTHON = "/opt/membria/runtime/bin/python"
_COMMON = [
    "Type=oneshot",
    "RemainAfterExit=yes",
    "StandardOutput=journal+console",
    "StandardError=journal+console",
    "TimeoutStartSec=infinity",
    "UMask=0077",
]
UNITS = {
    "membria-reencrypt.service": "\n".join(
        [
            "# membria edge image: first boot, step 1 (edge_image.device.firstboot): this laptop's own volume key",
            "[Unit]",
            "Description=Membria first boot: re-encrypt the disk with this laptop's own key",
            "DefaultDependencies=no",
            "After=local-fs.target",
            "Requires=local-fs.target",
            "RequiresMountsFor=/efi /var/lib/membria /opt/membria",
            "# Before anything makes a secret that would otherwise be written under the image's shared key.",
            "Before=sysinit.target ssh.service systemd-random-seed.service membria-enroll.service shutdown.target",
            "Conflicts=shutdown.target",
            "ConditionPathExists=!/var/lib/membria/firstboot/done",
            "",
            "[Service]",
            *_COMMON,
            f"ExecStart={_PYTHON} -m edge_image.device.firstboot reencrypt",
            "",
            "[Install]",
            "WantedBy=sysinit.target",
        ]
    )
    + "\n",
    "membria-enroll.service": "\n".join(
        [
            "# membria edge image: first boot, step 2 (edge_image.device.firstboot): TPM2, escrow, certificate",
            "[Unit]",
            "Description=Membria first boot: enroll this laptop (TPM2, recovery key escrow, device certificate)",
            "After=network-online.target membria-reencrypt.service",
            "Wants=network-online.target",
            "Requires=membria-reencrypt.service",
            "Before=membria-edge-agent.service membria-edge-guard.service",
            "ConditionPathExists=!/var/lib/membria/firstboot/done",
            "",
            "[Service]",
            *_COMMON,
            f"ExecStart={_PYTHON} -m edge_image.device.firstboot enroll",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
        ]
    )
    + "\n",
}
ENABLED = ("membria-reencrypt.service", "membria-enroll.service")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="membria-firstboot",
        description="First boot of a Membria laptop: re-encrypt with its own key, then enroll (TPM2, recovery key "
        "escrow, device certificate) and destroy the bootstrap slot. Run by membria-reencrypt.service and "
        "membria-enroll.service; every step is idempotent.",
    )
    parser.add_argument("step", choices=("reencrypt", "enroll", "status"))
    args = parser.parse_args(argv)
    paths = Paths()
    try:
        if args.step == "reencrypt":
            run_reencrypt(paths)
        elif args.step == "enroll":
            run_enroll(paths)
        else:
            done = [m for m in ("reencrypted", "escrowed", "done") if paths.marker(m).exists()]
            print(json.dumps({"steps_done": done}))
    except ImageBadInput as exc:
        say(f"error: {exc}")
        return 2
    except ImageError as exc:
        say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
