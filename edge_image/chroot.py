"""A root tree made ready for commands inside it (pip, dracut, systemctl enable, the pyinfra deploy).

The only mounts a build makes: proc, sys, dev and dev/pts bind mounts, tmpfs on /run and /tmp, and read-only bind
mounts of build inputs (the wheelhouse). They are undone on every exit path, innermost first, and the tree is
checked to hold no mount afterwards, so a failed build never leaves the build machine's /dev inside a tarball.
`policy-rc.d` keeps package scripts from starting services in the chroot.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from edge_image.errors import ImageError
from edge_image.tools import run

POLICY_RC = "usr/sbin/policy-rc.d"


def _mount(args: Sequence[str | Path], stack: ExitStack, target: Path) -> None:
    run(["mount", *args, target], what=f"mounting {target}")
    stack.callback(_unmount, target)


def _unmount(target: Path) -> None:
    result = subprocess.run(["umount", str(target)], capture_output=True, check=False)
    if result.returncode != 0:
        # Something still holds it (a daemon a package started): detach it now, it goes once released.
        subprocess.run(["umount", "--lazy", str(target)], capture_output=True, check=False)


def mounts_under(tree: Path) -> list[str]:
    """Mount points at or below tree, from /proc/self/mountinfo (octal escapes decoded)."""
    root = str(tree.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == root or point.startswith(root + "/"):
            found.append(point)
    return found


@contextmanager
def prepared(tree: Path, binds: Mapping[Path, str] | None = None) -> Iterator[Path]:
    """The tree with the chroot mounts; `binds` maps host directories to read-only paths inside the tree."""
    tree = tree.resolve()
    if not (tree / "usr" / "bin").is_dir():
        raise ImageError(f"{tree} is not a root tree (no usr/bin)")
    if mounts_under(tree):
        raise ImageError(f"{tree} already has mounts under it: {', '.join(mounts_under(tree))}")
    policy = tree / POLICY_RC
    with ExitStack() as stack:
        stack.callback(_check_clean, tree)  # registered first, so it runs last: after every unmount
        policy.write_text("#!/bin/sh\n# membria image build: no service starts inside the chroot\nexit 101\n")
        policy.chmod(0o755)
        stack.callback(policy.unlink, missing_ok=True)
        _mount(["-t", "proc", "proc"], stack, tree / "proc")
        _mount(["--rbind", "--make-rslave", "/sys"], stack, tree / "sys")
        _mount(["--bind", "/dev"], stack, tree / "dev")
        _mount(["--bind", "/dev/pts"], stack, tree / "dev" / "pts")
        _mount(["-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs"], stack, tree / "run")
        _mount(["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs"], stack, tree / "tmp")
        for host, inside in (binds or {}).items():
            target = tree / inside.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            _mount(["--bind", host], stack, target)
            run(["mount", "-o", "remount,bind,ro", target], what=f"making {target} read-only")
        yield tree


def _check_clean(tree: Path) -> None:
    left = mounts_under(tree)
    if left:
        raise ImageError(f"mounts left under {tree} after the build: {', '.join(left)}", hint="umount -R them")


def run_in(
    tree: Path, argv: Sequence[str], *, what: str, env: Mapping[str, str] | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a command inside a prepared tree (chroot), with a clean, fixed environment."""
    base = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    return run(["chroot", str(tree), *argv], what=what, env={**base, **(env or {})}, stdin=stdin, clean_env=True)


def unmount_all(tree: Path) -> None:
    """Last resort after a crash: detach every mount under tree, deepest first."""
    for point in sorted(mounts_under(tree), key=len, reverse=True):
        _unmount(Path(point))
    if os.path.ismount(tree):
        _unmount(tree)
