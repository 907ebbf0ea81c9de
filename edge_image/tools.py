"""Running the Debian tools the image is made with: a missing tool names its package, a failure shows its stderr."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from edge_image.errors import ImageError, ImageMissingTool

# Which Debian package provides each tool (`make test` and `make lab` install them).
PACKAGES = {
    "cryptsetup": "cryptsetup-bin",
    "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mdir": "mtools",
    "bmaptool": "bmap-tools",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "cpio": "cpio",
    "blkdiscard": "util-linux",
    "losetup": "util-linux",
    "zstd": "zstd",
}


def require(tool: str) -> str:
    """The tool's full path, or ImageMissingTool naming the package that provides it."""
    found = shutil.which(tool) or next(
        (str(Path(d) / tool) for d in ("/usr/sbin", "/sbin") if (Path(d) / tool).is_file()), None
    )
    if found is None:
        package = PACKAGES.get(tool, tool)
        raise ImageMissingTool(f"`{tool}` is not installed", hint=f"apt-get install {package} (or run `make test`)")
    return found


def run(
    argv: Sequence[str | Path],
    *,
    what: str,
    stdin: bytes | None = None,
    ok_codes: Sequence[int] = (0,),
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool with its output captured; a failure raises ImageError saying what was being done."""
    args = [str(a) for a in argv]
    args[0] = require(args[0])
    result = subprocess.run(args, input=stdin, capture_output=True, check=False, cwd=cwd)
    if result.returncode not in ok_codes:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise ImageError(f"{what} failed ({Path(args[0]).name} exit {result.returncode}): " + " / ".join(tail))
    return result
