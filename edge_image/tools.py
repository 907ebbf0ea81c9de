"""Running the Debian tools the image is made with: a missing tool names its package, a failure shows its stderr."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from edge_image.errors import ImageError, ImageMissingTool

# Which Debian package provides each tool (`make test` and `make lab` install them).
PACKAGES = {
    "cryptsetup": "cryptsetup-bin",
    "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mdir": "mtools",
    "mmd": "mtools",
    "bmaptool": "bmap-tools",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "cpio": "cpio",
    "blkdiscard": "util-linux",
    "losetup": "util-linux",
    "zstd": "zstd",
    "mmdebstrap": "mmdebstrap",
    "chroot": "coreutils",
    "mount": "mount",
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
    env: Mapping[str, str] | None = None,
    clean_env: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool with its output captured; a failure raises ImageError saying what was being done.

    `env` is merged over the current environment (mtools wants MTOOLS_SKIP_CHECK, for one); with clean_env it is
    the whole environment (commands inside a chroot must not see the build machine's venv or proxies).
    """
    args = [str(a) for a in argv]
    args[0] = require(args[0])
    full_env = dict(env or {}) if clean_env else ({**os.environ, **env} if env is not None else None)
    result = subprocess.run(args, input=stdin, capture_output=True, check=False, cwd=cwd, env=full_env)
    if result.returncode not in ok_codes:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise ImageError(f"{what} failed ({Path(args[0]).name} exit {result.returncode}): " + " / ".join(tail))
    return result
