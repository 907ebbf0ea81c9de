"""Debian packages with their full dependency closure, and the flat repository index the node installs from.

apt runs against a private root (its own sources, lists and an empty dpkg status), so the closure is
computed from nothing rather than from what the build machine happens to have installed, and the build
machine's own apt state is never touched. `apt-get download` checks every .deb against the signed index.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

from appliance.bundle.needs import AptSource
from appliance.errors import BadInput, MissingEnvironment

INST_LINE = re.compile(r"^Inst (\S+) \((\S+) ")


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str
    file: str  # name of the .deb inside debs/


class PrivateApt:
    """apt-get confined to `root`: `update`, `closure` and `download` never read or write /var/lib/apt."""

    def __init__(self, root: Path, sources: tuple[AptSource, ...]) -> None:
        self.root = root
        self.sources = sources

    def _options(self) -> list[str]:
        return [
            "-o",
            f"Dir={self.root}",
            "-o",
            f"Dir::State::status={self.root}/var/lib/dpkg/status",
            "-o",
            "APT::Architecture=amd64",
            "-o",
            "APT::Architectures=amd64",
            "-o",
            "Debug::NoLocking=1",
            "-o",
            "Acquire::Languages=none",
            "-o",
            "Acquire::Retries=3",
        ]

    def _apt(self, *args: str, cwd: Path | None = None) -> str:
        argv = ["apt-get", "-q", *self._options(), *args]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
        if result.returncode != 0:
            detail = "\n".join(result.stderr.strip().splitlines()[-6:])
            raise MissingEnvironment(f"apt-get {args[0]} failed ({result.returncode}): {detail}")
        return result.stdout

    def prepare(self) -> None:
        """The private tree, its sources (keys fetched where a source names a URL) and `apt-get update`."""
        if not shutil.which("apt-get"):
            raise MissingEnvironment("apt-get is missing: build bundles on Debian 12")
        for sub in ("etc/apt/sources.list.d", "etc/apt/preferences.d", "etc/apt/apt.conf.d", "etc/apt/keyrings"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/lib/dpkg"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "var/lib/dpkg/status").write_text("")
        for source in self.sources:
            keyring = source.keyring or self._fetch_key(source)
            if not Path(keyring).is_file():
                raise MissingEnvironment(
                    f"{source.name}: keyring {keyring} is missing", hint="apt-get install debian-archive-keyring"
                )
            (self.root / f"etc/apt/sources.list.d/{source.name}.sources").write_text(source.deb822(keyring))
        self._apt("update")

    def _fetch_key(self, source: AptSource) -> str:
        assert source.key_url is not None
        target = self.root / "etc/apt/keyrings" / f"{source.name}.asc"
        try:
            response = httpx.get(source.key_url, timeout=30, follow_redirects=True)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise MissingEnvironment(
                f"{source.name}: cannot fetch the repository key {source.key_url}: {exc}",
                hint=f"build where {source.uris[0]} is reachable, or leave the part out with --skip {source.name}",
            ) from None
        target.write_bytes(response.content)
        return str(target)

    def closure(self, packages: tuple[str, ...]) -> list[tuple[str, str]]:
        """(name, version) of every package an install of `packages` needs on a system with nothing installed."""
        out = self._apt("install", "--simulate", "--no-install-recommends", *packages)
        found = [m.groups() for m in map(INST_LINE.match, out.splitlines()) if m]
        if not found:
            raise BadInput(f"apt resolved nothing for {', '.join(packages)}")
        return [(name.split(":", 1)[0], version) for name, version in found]

    def download(self, pinned: list[tuple[str, str]], dest: Path) -> list[Deb]:
        """`apt-get download name=version` into dest; returns what landed (name, version, arch, file)."""
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        self._apt("download", *[f"{name}={version}" for name, version in pinned], cwd=dest)
        debs = []
        for path in sorted(set(dest.glob("*.deb")) - before):
            name, _version, arch = path.stem.split("_", 2)
            debs.append(Deb(name, _field(path, "Version"), arch, path.name))
        return debs


def _field(deb: Path, name: str) -> str:
    result = subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def _ftparchive(args: list[str], cwd: Path) -> bytes:
    result = subprocess.run(["apt-ftparchive", *args], capture_output=True, cwd=cwd, check=False)
    if result.returncode != 0:
        raise MissingEnvironment(f"apt-ftparchive {args[0]} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def write_index(debs_dir: Path) -> list[Path]:
    """A flat repository index over every .deb in debs_dir (Packages, Packages.gz and a Release with their
    hashes and a date, which apt wants even from a trusted local repository); returns the index files."""
    if not shutil.which("apt-ftparchive"):
        raise MissingEnvironment("apt-ftparchive is missing", hint="apt-get install apt-utils")
    listing = _ftparchive(["packages", "."], debs_dir)
    packages = debs_dir / "Packages"
    packages.write_bytes(listing)
    compressed = debs_dir / "Packages.gz"
    # mtime 0: the same packages give the same bytes, so a rebuilt bundle's index checksum is stable.
    with compressed.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(listing)
    release = debs_dir / "Release"
    release.write_bytes(
        _ftparchive(["-o", "APT::FTPArchive::Release::Origin=Membria bundle", "release", "."], debs_dir)
    )
    return [packages, compressed, release]
