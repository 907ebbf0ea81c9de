"""Edge image figures: build time per stage, image size (raw / mapped / allocated / zstd), and `edge flash` against
`dd` of the same image to the same kind of target, measured in the same run.

Build: the lab site's `engineering-laptop` profile through `appliance.edge.build` against a lab OpenBao started
here (its own state, free ports); whether the rootfs tarball and the portable llama.cpp wheel were already cached
is recorded (cold vs warm). `--image DIR` skips the build and measures an existing one.

Flash vs dd, for each target kind (a fresh sparse file on the build's filesystem; a loop device over a file there,
when loop devices work), `--rounds` alternating rounds (default 3), page cache dropped before each run:
- flash: `edge_image.flash.flash` (discard, bmaptool copy of the mapped ranges, final sync, read-back of every
  range); write MB/s = mapped bytes / copy time; effective MB/s = raw image bytes / (copy + read-back) time;
- dd: `dd if=IMG of=TARGET bs=4M conv=fsync` (every byte, no verification); MB/s = raw bytes / time.
Medians are printed and written to bench/results/edge_image.json. Needs root.

    .venv/bin/python bench/edge_image.py [--image DIR] [--rounds 3] [--out bench/results/edge_image.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.edge import build as builder  # noqa: E402
from appliance.edge import keys, wheelhouse  # noqa: E402
from appliance.site import Site  # noqa: E402
from edge_image import bmap, flash, rootfs  # noqa: E402
from edge_image.build import Reporter  # noqa: E402
from edge_image.manifest import ImageManifest  # noqa: E402
from tests.integration.vault_support import bootstrapped_vault  # noqa: E402

console = Console()
if not console.is_terminal:
    console = Console(width=160)
MB = 1_000_000
PROFILE = "engineering-laptop"


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def build_lab_image(work: Path) -> tuple[Path, dict[str, Any]]:
    with bootstrapped_vault(work / "lab") as backends:
        site: Site = backends.site
        spec, _ = builder.plan(site, PROFILE)
        cached = {
            "rootfs": rootfs.tar_path(spec.all_packages, spec.debian_suite).exists(),
            "portable_llama": any(wheelhouse.PORTABLE_CACHE.glob("llama_cpp_python-*.whl")),
        }
        keys.keygen(site, None)
        out = work / "out"
        console.print(f"building the {PROFILE} image (rootfs cached: {cached['rootfs']})")
        built = builder.build(site, PROFILE, out, state_dir=None, report=Reporter(), log=lambda _l: None)
    return out, {"seconds": built.seconds, "stages": built.stages, "cached": cached}


def sizes(out: Path, manifest: ImageManifest) -> dict[str, Any]:
    image = out / manifest.image
    block_map = bmap.parse(out / manifest.bmap)
    started = time.monotonic()
    zstd = subprocess.run(["sh", "-c", f"zstd -T2 -3 -c {image} | wc -c"], capture_output=True, text=True, check=True)
    return {
        "raw_bytes": image.stat().st_size,
        "mapped_bytes": block_map.mapped_bytes,
        "allocated_bytes": image.stat().st_blocks * 512,
        "zstd_bytes": int(zstd.stdout.strip()),
        "zstd_seconds": round(time.monotonic() - started, 1),
    }


def _loop(backing: Path, size: int) -> str | None:
    with backing.open("wb") as handle:
        handle.truncate(size)
    result = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def one_flash(image: Path, bmap_path: Path, target: Path) -> dict[str, float]:
    report = flash.flash(image, bmap_path, target, discard=True)
    total = report.copy_seconds + report.readback_seconds
    return {
        "copy_seconds": report.copy_seconds,
        "readback_seconds": report.readback_seconds,
        "write_mb_s": report.mapped_bytes / MB / report.copy_seconds,
        "effective_mb_s": report.image_size / MB / total,
    }


def one_dd(image: Path, target: Path) -> dict[str, float]:
    started = time.monotonic()
    subprocess.run(["dd", f"if={image}", f"of={target}", "bs=4M", "conv=fsync", "status=none"], check=True)
    seconds = time.monotonic() - started
    return {"copy_seconds": seconds, "write_mb_s": image.stat().st_size / MB / seconds}


def compare(out: Path, manifest: ImageManifest, rounds: int, scratch: Path) -> dict[str, Any]:
    image, bmap_path = out / manifest.image, out / manifest.bmap
    size = image.stat().st_size
    results: dict[str, Any] = {}
    for kind in ("file", "loop"):
        runs: dict[str, list[dict[str, float]]] = {"flash": [], "dd": []}
        dropped = True
        for _ in range(rounds):
            for tool in ("flash", "dd"):
                backing = scratch / f"{kind}-{tool}.raw"
                backing.unlink(missing_ok=True)
                device: str | None = None
                if kind == "loop":
                    device = _loop(backing, size)
                    if device is None:
                        break
                target = Path(device) if device else backing
                dropped = drop_caches() and dropped
                try:
                    runs[tool].append(one_flash(image, bmap_path, target) if tool == "flash" else one_dd(image, target))
                finally:
                    if device:
                        subprocess.run(["losetup", "-d", device], check=False)
                    backing.unlink(missing_ok=True)
        if not runs["flash"] or not runs["dd"]:
            results[kind] = {"skipped": "no loop device could be attached"}
            continue
        med = {
            tool: {key: round(statistics.median(r[key] for r in values), 2) for key in values[0]}
            for tool, values in runs.items()
        }
        med["flash_over_dd_time"] = round(
            (med["flash"]["copy_seconds"] + med["flash"]["readback_seconds"]) / med["dd"]["copy_seconds"], 2
        )
        med["caches_dropped"] = dropped
        results[kind] = med
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="measure this existing build (its output directory)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "edge_image.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/edge_image.py needs root (mmdebstrap, chroot, loop devices)")
    work = Path(tempfile.mkdtemp(prefix="membria-bench-edge-", dir="/var/tmp"))
    try:
        build_figures: dict[str, Any] | None = None
        out = args.image
        if out is None:
            out, build_figures = build_lab_image(work)
        manifest = ImageManifest.model_validate_json((out / "manifest.json").read_text())
        size_figures = sizes(out, manifest)
        flash_figures = compare(out, manifest, args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "build": build_figures,
        "sizes": size_figures,
        "flash_vs_dd": flash_figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if build_figures:
        table = Table(title=f"build of {PROFILE} ({build_figures['seconds']:.0f} s; cached {build_figures['cached']})")
        table.add_column("stage")
        table.add_column("s", justify="right")
        for name, seconds in build_figures["stages"].items():
            table.add_row(name, f"{seconds:.0f}")
        console.print(table)
    sizes_table = Table(title="image size")
    for column in ("raw", "mapped", "allocated", "zstd -3"):
        sizes_table.add_column(column, justify="right")
    sizes_table.add_row(
        *(f"{size_figures[k] / MB:.0f} MB" for k in ("raw_bytes", "mapped_bytes", "allocated_bytes", "zstd_bytes"))
    )
    console.print(sizes_table)
    flash_table = Table(title=f"flash vs dd (median of {args.rounds})")
    for column in ("target", "flash write MB/s", "flash effective MB/s", "read-back s", "dd MB/s", "flash/dd time"):
        flash_table.add_column(column, justify="right")
    for kind, figures in flash_figures.items():
        if "skipped" in figures:
            flash_table.add_row(kind, figures["skipped"], "", "", "", "")
            continue
        f, d = figures["flash"], figures["dd"]
        row = [f"{f['write_mb_s']:.0f}", f"{f['effective_mb_s']:.0f}", f"{f['readback_seconds']:.1f}"]
        flash_table.add_row(kind, *row, f"{d['write_mb_s']:.0f}", f"{figures['flash_over_dd_time']:.2f}")
    console.print(flash_table)
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
