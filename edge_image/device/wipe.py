"""`membria-edge-wipe --yes-destroy-all-data`: make the laptop's disk unreadable, then power off at once
(edge_image/DESIGN.md, "Wipe").

Run as `python -m edge_image.device.wipe --yes-destroy-all-data` by the guard (a wipe command from the gateway)
or by a local admin. Steps:

1. find the LUKS2 partition behind the device-mapper mapping `root` (sysfs: the dm device whose `dm/name` is
   `root`, its one slave; `cryptsetup status root` as a fallback);
2. `cryptsetup luksErase --batch-mode DEV`: every keyslot is wiped (TPM2, recovery key, anything else), then
   each token left behind (`systemd-tpm2`, `systemd-recovery`) is removed: nothing in the header opens the
   volume any more, the escrowed recovery key included;
3. `cryptsetup luksDump --dump-json-metadata DEV` must show no keyslot and no token, else exit 1 and no power-off
   (the guard retries on its next poll while the command is still listed);
4. sync, then power off through `/proc/sysrq-trigger` (`o`): no orderly shutdown, so the volume key, which
   dm-crypt still holds in RAM, is gone within a second.

`wipe(reason, device=..., power_off=False)` is the test entry: a LUKS2 file, no power-off. Exit codes: 0 done
(never seen when powering off), 1 the erase did not take, 2 bad input (no `--yes-destroy-all-data`, not LUKS),
3 missing environment (not root, no cryptsetup, no `root` mapping). Stdlib only (the laptop's wheelhouse).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("membria.edge.wipe")

ROOT_MAPPING = "root"  # rd.luks.name=<uuid>=root on the kernel command line (edge_image/esp.py)
SYSRQ_TRIGGER = Path("/proc/sysrq-trigger")
CONFIRM_FLAG = "--yes-destroy-all-data"


class WipeError(Exception):
    """A wipe that could not run or did not take; `exit_code` follows the house rule (1, 2 or 3)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class WipeResult:
    device: Path
    reason: str
    keyslots_erased: tuple[str, ...]
    tokens_removed: tuple[str, ...]
    seconds: float


def _cryptsetup() -> str:
    found = shutil.which("cryptsetup") or next(
        (p for p in ("/usr/sbin/cryptsetup", "/sbin/cryptsetup") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise WipeError("cryptsetup is not installed", exit_code=3)
    return found


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([_cryptsetup(), *args], capture_output=True, text=True, timeout=120, check=False)
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise WipeError(f"cryptsetup {args[0]} failed ({done.returncode}): {detail[-1] if detail else 'no output'}")
    return done


def find_root_device(mapping: str = ROOT_MAPPING, *, sys_root: Path = Path("/sys")) -> Path:
    """The block device under the dm-crypt mapping `mapping` (e.g. /dev/nvme0n1p2)."""
    for dm in sorted((sys_root / "block").glob("dm-*")):
        try:
            name = (dm / "dm" / "name").read_text().strip()
        except OSError:
            continue
        if name != mapping:
            continue
        slaves = sorted(p.name for p in (dm / "slaves").iterdir()) if (dm / "slaves").is_dir() else []
        if len(slaves) != 1:
            raise WipeError(f"mapping {mapping} ({dm.name}) has {len(slaves)} backing devices, expected one", 3)
        try:
            uuid = (dm / "dm" / "uuid").read_text().strip()
        except OSError:
            uuid = ""
        if uuid and not uuid.startswith("CRYPT-LUKS"):
            raise WipeError(f"mapping {mapping} ({dm.name}) is not a LUKS volume (dm uuid {uuid})", 3)
        return Path("/dev") / slaves[0]
    if sys_root == Path("/sys"):  # a real system: ask cryptsetup as well (it reads the same kernel state)
        done = _run("status", mapping, check=False)
        for line in done.stdout.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "device" and value.strip():
                return Path(value.strip())
    raise WipeError(f"no dm-crypt mapping named {mapping!r}: is this the laptop's encrypted root?", 3)


def luks_metadata(device: Path) -> dict[str, Any]:
    """The LUKS2 header's JSON area (`luksDump --dump-json-metadata`)."""
    done = _run("luksDump", "--dump-json-metadata", str(device))
    try:
        data: dict[str, Any] = json.loads(done.stdout)
    except ValueError as exc:
        raise WipeError(f"cryptsetup printed no JSON header for {device}: {exc}") from None
    return data


def wipe(
    reason: str,
    *,
    device: Path | None = None,
    power_off: bool = True,
    mapping: str = ROOT_MAPPING,
    sysrq: Path = SYSRQ_TRIGGER,
) -> WipeResult:
    """Erase every keyslot and token of the LUKS2 volume (`device`, else the one behind `mapping`), check that
    none is left, sync, and (unless `power_off=False`) power off at once."""
    started = time.monotonic()
    if device is None:
        if os.geteuid() != 0:
            raise WipeError("wiping the laptop's disk needs root", exit_code=3)
        device = find_root_device(mapping)
    if not device.exists():
        raise WipeError(f"{device}: no such device or file", exit_code=2)
    if _run("isLuks", "--type", "luks2", str(device), check=False).returncode != 0:
        raise WipeError(f"{device} is not a LUKS2 volume", exit_code=2)
    log.warning("WIPE of %s requested: %s", device, reason)
    before = luks_metadata(device)
    keyslots = tuple(sorted((before.get("keyslots") or {}).keys()))
    _run("luksErase", "--batch-mode", str(device))
    tokens = tuple(sorted((luks_metadata(device).get("tokens") or {}).keys(), key=int))
    for token in tokens:  # luksErase leaves tokens (systemd-tpm2's sealed blob) with no keyslot: remove them too
        _run("token", "remove", "--token-id", token, str(device))
    after = luks_metadata(device)
    if after.get("keyslots") or after.get("tokens"):
        raise WipeError(
            f"{device} still has keyslots {sorted(after.get('keyslots') or {})} and tokens "
            f"{sorted(after.get('tokens') or {})} after luksErase"
        )
    os.sync()
    result = WipeResult(device, reason, keyslots, tokens, time.monotonic() - started)
    log.warning("%s: %d keyslot(s) and %d token(s) destroyed", device, len(keyslots), len(tokens))
    if power_off:
        power_off_now(sysrq)
    return result


def power_off_now(sysrq: Path = SYSRQ_TRIGGER) -> None:
    """Power off without an orderly shutdown: the kernel's sysrq `o`; `systemctl poweroff -ff` if that fails."""
    try:
        with sysrq.open("w") as trigger:
            trigger.write("o")
    except OSError as exc:
        log.error("sysrq power-off failed (%s); forcing systemctl poweroff", exc)
    time.sleep(5)  # sysrq `o` returns before the machine is off; should we still be here, force it another way
    subprocess.run(["systemctl", "poweroff", "--force", "--force"], check=False, timeout=30)
    raise WipeError("the machine did not power off after the wipe", exit_code=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="membria-edge-wipe",
        description="Destroy every LUKS keyslot of this laptop's encrypted root (cryptsetup luksErase), then power "
        "off at once. Nothing on the disk can be read afterwards, not even with the escrowed recovery key.",
    )
    parser.add_argument(CONFIRM_FLAG, dest="confirmed", action="store_true", help="required: there is no undo")
    parser.add_argument("--reason", default="local admin", help="why (logged)")
    parser.add_argument("--device", type=Path, help="the LUKS2 device or file (default: the one behind /)")
    parser.add_argument(
        "--no-power-off", action="store_true", help="stay up afterwards (the volume key stays in RAM: tests only)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not args.confirmed:
        print(f"membria-edge-wipe: refusing without {CONFIRM_FLAG} (this destroys all data)", file=sys.stderr)
        return 2
    try:
        result = wipe(args.reason, device=args.device, power_off=not args.no_power_off)
    except WipeError as exc:
        print(f"membria-edge-wipe: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{result.device}: {len(result.keyslots_erased)} keyslot(s), {len(result.tokens_removed)} token(s) destroyed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
