"""Small root trees the audit's chroot checks can run in: real programs from this (Debian 12) machine.

testinfra's chroot backend runs every command as `chroot ROOT /bin/sh -c ...`, so a synthetic tree needs a shell
and the few programs the checks and testinfra's probes use (uname, cat, stat, test, readlink, ...). They are copied
from this machine with the shared libraries `ldd` names, into a merged-/usr layout like Debian's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

# What testinfra's probes and the checks' file reads run (sh is dash, as on Debian).
BASE_PROGRAMS = ("cat", "stat", "uname", "readlink", "realpath", "ls", "grep", "true")
# What reading a LUKS2 header through the shell takes (membria_support.header_dump_command).
LUKS_PROGRAMS = ("dd", "mktemp", "rm", "sed", "cryptsetup")
MEMBRIA_GID = 991


def _libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    found = []
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/"):
                found.append(Path(word))
    return found


def _copy(src: Path, root: Path) -> None:
    dest = root / str(src).lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copy2(src.resolve(), dest)


def shell_tree(root: Path, programs: Iterable[str] = BASE_PROGRAMS, *, membria_group: bool = True) -> None:
    """A merged-/usr tree with /bin/sh (dash), the programs and their libraries, /etc/passwd|group|os-release."""
    for top in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", "tmp", "var/lib", "root"):
        (root / top).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    for link in ("bin", "sbin", "lib", "lib64"):
        if not (root / link).is_symlink():
            (root / link).symlink_to(f"usr/{link}")
    binaries = [Path("/usr/bin/dash")]
    for name in programs:
        path = shutil.which(name)
        assert path, f"{name} is not installed on this machine"
        binaries.append(Path(path))
    for binary in binaries:
        real = binary.resolve()
        where = "usr/sbin" if "/sbin/" in str(binary) else "usr/bin"
        dest = root / where / binary.name
        shutil.copy2(real, dest)
        for lib in _libraries(real):
            _copy(lib, root)
    (root / "usr/bin/sh").unlink(missing_ok=True)
    (root / "usr/bin/sh").symlink_to("dash")
    shutil.copy2("/etc/os-release", root / "etc/os-release")
    group = ["root:x:0:"] + ([f"membria:x:{MEMBRIA_GID}:"] if membria_group else [])
    (root / "etc/group").write_text("\n".join(group) + "\n")
    passwd = ["root:x:0:0:root:/root:/bin/sh"]
    if membria_group:
        passwd.append(f"membria:x:{MEMBRIA_GID}:{MEMBRIA_GID}:Membria:/var/lib/membria:/usr/sbin/nologin")
    (root / "etc/passwd").write_text("\n".join(passwd) + "\n")


def copy_in(root: Path, *paths: str) -> None:
    """Files of this machine at the same place in the tree (a binary's libraries are not followed)."""
    for path in paths:
        _copy(Path(path), root)


def devices(root: Path) -> None:
    """/dev/null and /dev/urandom (cryptsetup's RNG and its shell redirections want them)."""
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    for name, minor in (("null", 3), ("zero", 5), ("urandom", 9), ("random", 8)):
        node = dev / name
        if not node.exists():
            os.mknod(node, 0o666 | 0o020000, os.makedev(1, minor))
