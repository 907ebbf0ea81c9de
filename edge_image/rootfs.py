"""The image's Debian base: an mmdebstrap rootfs as a tarball, cached by suite, package list and build options.

Built once per distinct package list (a few minutes), then unpacked for every image build (seconds). The cache is
shared between processes: a flock serialises builders, so parallel test workers or two terminals build it once, and
only a complete tarball ever carries its final name (mmdebstrap writes `.partial.tar`, renamed when it exits 0).
The tarball is generic: nothing in it depends on a site, a profile or the machine that built it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from edge_image.errors import ImageBadInput, ImageError
from edge_image.spec import DEBIAN_SUITE
from edge_image.tools import require, run
from runtime.common.file_lock import exclusive

CACHE_DIR = Path(os.environ.get("MEMBRIA_EDGE_CACHE", "/var/cache/membria/edge"))

# Kept small: no man pages, info, translations or documentation (the copyright files stay: the SBOM and the licences
# point at them). dpkg applies these to every package it unpacks, including the essential set mmdebstrap extracts.
_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/lintian/*",
)
_APT_OPTIONS = ('Acquire::Languages "none"',)  # no Translation-* indexes: nothing here reads descriptions
# The kernel's postinst runs /etc/kernel/postinst.d/dracut, which makes /boot/initrd.img-<kver> with Debian's
# defaults: not the initrd that boots (boot.py builds that one with the image's dracut drop-in, which does not exist
# yet at this point), and 40 MB plus a minute of build time wasted. That hook exits at once when INITRD=No is in its
# environment (mmdebstrap passes the caller's environment down to dpkg); the customize hook removes whatever another
# generator might still have left, so no cached tarball ever carries one.
_ENV = {"INITRD": "No"}
_HOOKS = ('--customize-hook=rm -f "$1"/boot/initrd.img-*',)
# apt's package lists stay in the tarball: they are Debian's signed index, holding each installed .deb's sha256 and
# size for the SBOM (deb_files); the build drops them once read (drop_deb_files). The .debs themselves are not kept.
_SKIPS = ("--skip=cleanup/apt/lists",)
_LISTS = "var/lib/apt/lists"

_UNKNOWN = re.compile(
    r"^E: (?:Unable to locate package (?P<a>\S+)"
    r"|Package '(?P<b>[^']+)' has no installation candidate"
    r"|Couldn't find any package by (?:glob|regex) '(?P<c>[^']+)')",
    re.MULTILINE,
)
_TAIL_LINES = 15
_DPKG_FORMAT = "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"


def _quiet(_text: str) -> None:
    pass


def _options() -> list[str]:
    return [
        "--variant=minbase",
        *(f"--dpkgopt={option}" for option in _DPKG_OPTIONS),
        *(f"--aptopt={option}" for option in _APT_OPTIONS),
        *_HOOKS,
        *_SKIPS,
    ]


def tar_path(packages: Sequence[str], suite: str = DEBIAN_SUITE) -> Path:
    """Where the tarball for this package list lives; the options are in the key, so changing them rebuilds it."""
    key = "\n".join([suite, *_options(), *sorted(set(packages))])
    return CACHE_DIR / f"{suite}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.tar"


def rootfs_tar(packages: Sequence[str], suite: str = DEBIAN_SUITE, *, progress: Callable[[str], None] = _quiet) -> Path:
    """The cached rootfs tarball holding `packages` (and their dependencies), built by mmdebstrap if absent."""
    target = tar_path(packages, suite)
    if target.exists():
        return target  # only a complete tarball has this name: no need to wait behind another list's build
    with exclusive(CACHE_DIR / ".lock"):
        if target.exists():
            return target
        mmdebstrap = require("mmdebstrap")
        progress(f"building the Debian {suite} rootfs with mmdebstrap (once; cached in {CACHE_DIR})")
        partial = target.with_suffix(".partial.tar")
        partial.unlink(missing_ok=True)  # left by a build that was killed
        include = [f"--include={','.join(sorted(set(packages)))}"] if packages else []
        args = [*_options(), *include, suite, str(partial)]
        try:
            # A dry run first (about 10 s: apt's indexes and resolution only): a misspelt or uninstallable package
            # fails here, not after a minute of unpacking the essential set.
            progress("checking that apt can resolve the package list (mmdebstrap --simulate)")
            _run_mmdebstrap([mmdebstrap, "--simulate", *args], suite, progress)
            _run_mmdebstrap([mmdebstrap, *args], suite, progress)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.rename(target)
    return target


def _run_mmdebstrap(argv: list[str], suite: str, progress: Callable[[str], None]) -> None:
    """Run mmdebstrap, passing its `I:` lines to progress; a failure names unknown packages or shows the tail."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    errors: list[str] = []
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        errors="replace", env={**os.environ, **_ENV},
    ) as proc:  # fmt: skip
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith("E: "):
                errors.append(line)
            elif line.startswith("I: "):
                progress(line[3:])
    if proc.returncode == 0:
        return
    unknown = sorted({next(name for name in match.groups() if name) for match in _UNKNOWN.finditer("\n".join(errors))})
    if unknown:
        raise ImageBadInput(
            f"no such Debian package in {suite}: {', '.join(unknown)}",
            hint="check the names (apt-cache policy NAME on a Debian machine) in the profile's packages",
        )
    raise ImageError(
        f"mmdebstrap failed (exit {proc.returncode}): " + " / ".join(tail),
        hint="a network or mirror problem shows above; the cache holds nothing from this attempt",
    )


def unpack(tar: Path, dest: Path) -> None:
    """Unpack a rootfs tarball into dest (absent or empty), keeping owners, modes, xattrs and ACLs exactly."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ImageBadInput(f"{dest} is not empty", hint="unpack into a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        run(
            ["tar", "--extract", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "-p",
             "-f", tar, "-C", dest],
            what=f"unpacking {tar} into {dest}",
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def installed_packages(tree: Path) -> list[tuple[str, str, str]]:
    """(name, version, architecture) of every package dpkg has fully installed in the tree, sorted."""
    admindir = tree / "var" / "lib" / "dpkg"
    if not (admindir / "status").is_file():
        raise ImageBadInput(f"{tree} has no dpkg database ({admindir}/status)")
    result = run(
        ["dpkg-query", f"--admindir={admindir}", "-W", "-f", _DPKG_FORMAT],
        what=f"listing the packages installed in {tree}",
    )
    found = []
    for line in result.stdout.decode().splitlines():
        status, name, version, arch = line.split("\t")
        if status.strip() == "ii":  # not removed-with-config (rc) or half-installed ones
            found.append((name, version, arch))
    return sorted(found)


def kernel_version(tree: Path) -> str:
    """The version of the one kernel installed in the tree (its directory under lib/modules)."""
    # Merged /usr (bookworm and later): the real directory; lib/modules is a symlink into it.
    modules = tree / "usr" / "lib" / "modules"
    if not modules.is_dir() and not (tree / "lib").is_symlink():
        modules = tree / "lib" / "modules"
    versions = sorted(p.name for p in modules.iterdir() if p.is_dir()) if modules.is_dir() else []
    if len(versions) != 1:
        raise ImageError(
            f"{tree} must hold exactly one kernel, found {len(versions)} in {modules}: {', '.join(versions) or 'none'}"
        )
    return versions[0]


def _stanzas(path: Path) -> Iterator[dict[str, str]]:
    """The fields deb_files needs from each stanza of an apt Packages list."""
    wanted = ("Package", "Version", "Architecture", "SHA256", "Size")
    fields: dict[str, str] = {}
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line == "\n":
                if fields:
                    yield fields
                fields = {}
            elif not line[0].isspace():
                name, _, value = line.partition(":")
                if name in wanted:
                    fields[name] = value.strip()
    if fields:
        yield fields


def deb_files(tree: Path) -> dict[str, tuple[str, int]]:
    """Package name -> (sha256, size) of the .deb each installed package came from, from the apt lists in the tree.

    The lists are the Debian archive's index that apt verified (InRelease signature) and checked every download
    against, so these are the exact .deb files installed, without keeping the files.
    """
    lists = sorted((tree / _LISTS).glob("*_Packages"))
    if not lists:
        raise ImageError(
            f"{tree / _LISTS} holds no Packages lists (already dropped, or a tarball from an older cache)",
            hint=f"remove the old tarballs from {CACHE_DIR} to rebuild",
        )
    installed = {(name, version, arch): name for name, version, arch in installed_packages(tree)}
    found: dict[str, tuple[str, int]] = {}
    for path in lists:
        for stanza in _stanzas(path):
            key = (stanza.get("Package", ""), stanza.get("Version", ""), stanza.get("Architecture", ""))
            if key in installed and "SHA256" in stanza:
                found[key[0]] = (stanza["SHA256"], int(stanza.get("Size", "0")))
    return found


def drop_deb_files(tree: Path) -> None:
    """Remove apt's package lists from the tree (read by deb_files; stale on the laptop, whose apt fetches its own)."""
    for path in (tree / _LISTS).iterdir():
        if path.is_file() and path.name != "lock":
            path.unlink()
