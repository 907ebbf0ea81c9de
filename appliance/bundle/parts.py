"""Split a bundle directory into fixed-size tar parts for removable media, and join them back safely.

`split` streams one uncompressed tar (sorted members, uid/gid 0, modes and mtimes kept) straight into
`<name>.tar.000`, `.001`, ... and writes `<name>.parts.json` last, atomically: a run cut short leaves no
parts file, so a half-written set is never mistaken for a whole one. `join` checks every part's size and
sha256 before it unpacks a byte, unpacks into a hidden directory beside the target and renames it into
place only when the whole tar's sha256 matches too.

Python 3.11.2 (Debian 12) predates tarfile's extraction filters, so `join` unpacks members itself with the
rules of the 'data' filter made stricter still: only regular files and directories, every name confined to
`<bundle>/` (no absolute paths, no '..'), no set-id bits, no group/other write. Nothing it writes is a link,
so nothing can be redirected outside the temporary directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeGuard

from appliance.bundle.manifest import hash_file
from appliance.errors import BadInput, CheckFailed
from runtime.common import atomic

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

FORMAT = 1
MIN_PART_SIZE = 1024**2
_CHUNK = 1024**2
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PART_NAME = re.compile(r"(?P<bundle>.+)\.tar\.\d{3,}")
_UNITS = {
    "": 1,
    "b": 1,
    **{u: 1024**i for i, p in enumerate("kmgt", 1) for u in (p, p + "i", p + "ib")},
    **{p + "b": 1000**i for i, p in enumerate("kmgt", 1)},
}


def parse_size(text: str) -> int:
    """'4G', '700M', '1.5GiB', '4700000000' -> bytes: K/M/G/T and KiB/MiB/... are 1024-based, KB/MB/GB/TB 1000-based."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise BadInput(f"not a size: {text!r}", hint="e.g. 4G, 700M, 1.5GiB, 4700MB or a number of bytes")
    try:
        return int(Decimal(m.group(1)) * _UNITS[unit])
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only plain decimals
        raise BadInput(f"not a size: {text!r}") from exc


def split(bundle_dir: Path, out_dir: Path, part_size: int, progress: Progress | None = None) -> list[Path]:
    """Write bundle_dir as tar parts `<name>.tar.NNN` of at most part_size bytes, then `<name>.parts.json`.

    Refuses (BadInput) a part_size under 1 MiB, an out_dir inside the bundle, and an out_dir that already holds
    parts or a parts file of this name. Progress counts tar bytes written. Returns the parts, then the parts file.
    """
    if part_size < MIN_PART_SIZE:
        raise BadInput(f"part size {part_size} bytes is under the 1 MiB minimum", hint="e.g. --part-size 4G")
    bundle_dir, out_dir = Path(bundle_dir).resolve(), Path(out_dir)  # resolved: `split .` still has a name
    if not bundle_dir.is_dir():
        raise BadInput(f"{bundle_dir}: not a directory")
    name = bundle_dir.name
    if out_dir.resolve().is_relative_to(bundle_dir):
        raise BadInput(f"{out_dir}: the parts cannot go inside the bundle they are made from")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = _existing_parts(out_dir, name)
    if stale:
        raise BadInput(
            f"{out_dir} already holds parts of {name} ({', '.join(p.name for p in stale[:3])}"
            f"{', ...' if len(stale) > 3 else ''})",
            hint=f"remove {name}.tar.* and {name}.parts.json there first, or choose another output directory",
        )
    members = list(_members(bundle_dir, name))
    total = _tar_size(info for info, _ in members)
    writer = _PartWriter(out_dir, name, part_size, _Meter(total, progress))
    try:
        with tarfile.open(
            fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT, encoding=_ENCODING, errors=_ERRORS, bufsize=_CHUNK
        ) as tar:
            for info, path in members:
                if info.isreg():
                    with path.open("rb") as fh:
                        if os.fstat(fh.fileno()).st_size != info.size:
                            raise CheckFailed(f"{path} changed while the bundle was being split")
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
        writer.finish()
        if writer.done != total:
            raise CheckFailed(f"{bundle_dir}: tar came out {writer.done} bytes, expected {total}")
        _fsync_dir(out_dir)
    except BaseException:
        writer.abort()
        raise
    manifest = out_dir / f"{name}.parts.json"
    document = {
        "format": FORMAT,
        "bundle": name,
        "part_size": part_size,
        "total_size": writer.done,
        "tar_sha256": writer.tar_hash.hexdigest(),
        "parts": writer.parts,
    }
    try:
        atomic.write_text(manifest, json.dumps(document, indent=2) + "\n")
    except BaseException:
        writer.abort()
        raise
    return [*writer.paths, manifest]


def join(parts_json: Path, out_parent: Path, progress: Progress | None = None) -> Path:
    """Check every part, then unpack the bundle to out_parent/<bundle>; returns that directory.

    parts_json may also be the first part (`X.tar.000`). CheckFailed names the first missing, short or corrupt
    part before anything is unpacked, and any unsafe member (link, device, absolute or '..' name, outside
    `<bundle>/`) or a whole-tar sha256 mismatch; nothing half-unpacked is left behind. BadInput when the target
    already exists or the parts file is not one. Progress covers both passes: total is twice the tar size.
    """
    manifest_path = _manifest_path(Path(parts_json))
    bundle, total, tar_sha, parts = _load_manifest(manifest_path)
    out_parent = Path(out_parent)
    target = out_parent / bundle
    if target.exists() or target.is_symlink():
        raise BadInput(f"{target} already exists", hint="move it away first, or join into another directory")
    paths = [manifest_path.parent / p["file"] for p in parts]
    meter = _Meter(2 * total, progress)
    for path, part in zip(paths, parts, strict=True):
        _check_part(path, part["size"], part["sha256"], meter)
    out_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle}.", suffix=".joining", dir=out_parent))
    reader = _PartReader(paths, meter)
    try:
        with reader:
            _unpack(reader, tmp, bundle)
            reader.drain()
        if reader.done != total or reader.tar_hash.hexdigest() != tar_sha:
            raise CheckFailed(f"{bundle}: the joined tar does not match its sha256 (a part changed while joining?)")
        if not (tmp / bundle).is_dir() or (tmp / bundle).is_symlink():
            raise CheckFailed(f"{bundle}: the tar holds no {bundle}/ directory")
        if target.exists() or target.is_symlink():
            raise BadInput(f"{target} already exists", hint="something created it while the parts were joined")
        (tmp / bundle).rename(target)
        tmp.rmdir()
        _fsync_dir(out_parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --- split helpers ---------------------------------------------------------------------------------------


def _existing_parts(out_dir: Path, name: str) -> list[Path]:
    pattern = re.compile(re.escape(name) + r"\.(tar\.\d{3,}|parts\.json)")
    return sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))


def _members(bundle_dir: Path, name: str) -> Iterator[tuple[tarfile.TarInfo, Path]]:
    """Pre-order walk, entries sorted by name: the same tree always gives the same tar."""
    yield _info(bundle_dir, name), bundle_dir
    for entry in sorted(bundle_dir.iterdir(), key=lambda p: p.name):
        arcname = f"{name}/{entry.name}"
        if entry.is_dir() and not entry.is_symlink():
            yield from _members(entry, arcname)
        else:
            yield _info(entry, arcname), entry


def _info(path: Path, arcname: str) -> tarfile.TarInfo:
    st = path.lstat()
    info = tarfile.TarInfo(arcname)
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
    else:
        # join accepts only files and directories, so refuse here rather than ship an unjoinable set.
        raise BadInput(f"{path}: not a regular file or directory", hint="a bundle holds only files and directories")
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _tar_size(infos: Iterator[tarfile.TarInfo]) -> int:
    """The exact tar size, known before writing so progress has a true total and parts a true count."""
    size = 0
    for info in infos:
        size += len(info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS))
        if info.isreg():
            size += -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    size += 2 * tarfile.BLOCKSIZE  # end-of-archive marker
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _Meter:
    """Calls progress at most once per MiB, and always at the end."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._last = 0

    def add(self, n: int) -> None:
        self.done += n
        if self._progress and (self.done - self._last >= _CHUNK or self.done >= self.total):
            self._last = self.done
            self._progress(self.done, self.total)


class _PartWriter(io.BufferedIOBase):
    """A write-only stream that cuts itself into part files, hashing each part and the whole."""

    def __init__(self, out_dir: Path, name: str, part_size: int, meter: _Meter) -> None:
        super().__init__()
        self._out_dir, self._bundle, self._part_size, self._meter = out_dir, name, part_size, meter
        self.paths: list[Path] = []
        self.parts: list[dict[str, Any]] = []
        self.tar_hash = hashlib.sha256()
        self.done = 0
        self._fh: io.BufferedWriter | None = None
        self._part_hash = hashlib.sha256()
        self._part_len = 0

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        length = len(view)
        while view:
            fh = self._fh or self._next()
            chunk = view[: self._part_size - self._part_len]
            fh.write(chunk)
            self._part_hash.update(chunk)
            self.tar_hash.update(chunk)
            self._part_len += len(chunk)
            view = view[len(chunk) :]
            if self._part_len == self._part_size:
                self._close_part()
        self.done += length
        self._meter.add(length)
        return length

    def finish(self) -> None:
        if self._fh is not None:
            self._close_part()

    def abort(self) -> None:
        """Remove every part this run created: an interrupted split leaves nothing that looks usable."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for path in self.paths:
            path.unlink(missing_ok=True)

    def _next(self) -> io.BufferedWriter:
        path = self._out_dir / f"{self._bundle}.tar.{len(self.paths):03d}"
        self.paths.append(path)
        self._fh = path.open("xb")  # exclusive: never overwrite a part that appeared meanwhile
        self._part_hash = hashlib.sha256()
        self._part_len = 0
        return self._fh

    def _close_part(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        self.parts.append({"file": self.paths[-1].name, "size": self._part_len, "sha256": self._part_hash.hexdigest()})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- join helpers ----------------------------------------------------------------------------------------


def _manifest_path(given: Path) -> Path:
    if given.name.endswith(".parts.json"):
        path = given
    elif m := _PART_NAME.fullmatch(given.name):
        path = given.with_name(f"{m['bundle']}.parts.json")
    else:
        raise BadInput(f"{given}: expected a <bundle>.parts.json file or a first part <bundle>.tar.000")
    if not path.is_file():
        raise BadInput(f"{path}: no such parts file", hint="it is written beside the parts by `appliance bundle split`")
    return path


def _load_manifest(path: Path) -> tuple[str, int, str, list[dict[str, Any]]]:
    def bad(why: str) -> BadInput:
        return BadInput(f"{path}: not a usable parts file: {why}")

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(str(exc)) from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT}")
    bundle, part_size, total = doc.get("bundle"), doc.get("part_size"), doc.get("total_size")
    tar_sha, parts = doc.get("tar_sha256"), doc.get("parts")
    if not isinstance(bundle, str) or bundle in ("", ".", "..") or "/" in bundle or "\0" in bundle:
        raise bad(f"bundle name {bundle!r} is not a plain directory name")
    if not _is_count(part_size) or part_size < 1 or not _is_count(total):
        raise bad("part_size and total_size must be positive integers")
    if not isinstance(tar_sha, str) or not _SHA256.fullmatch(tar_sha):
        raise bad("tar_sha256 is not 64 hex digits")
    if not isinstance(parts, list) or not parts:
        raise bad("no parts listed")
    for i, part in enumerate(parts):
        expected = f"{bundle}.tar.{i:03d}"
        # Names are fixed by position, so a parts file cannot point join at any other path.
        if not isinstance(part, dict) or part.get("file") != expected:
            raise bad(f"part {i} should be {expected}")
        size, sha = part.get("size"), part.get("sha256")
        last = i == len(parts) - 1
        if not _is_count(size) or not (0 < size <= part_size if last else size == part_size):
            raise bad(f"{expected}: size {size!r} does not fit part_size {part_size}")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise bad(f"{expected}: sha256 is not 64 hex digits")
    if sum(p["size"] for p in parts) != total:
        raise bad("the parts' sizes do not add up to total_size")
    return bundle, total, tar_sha, parts


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_part(path: Path, size: int, sha256: str, meter: _Meter) -> None:
    if not path.is_file():
        raise CheckFailed(f"part {path.name} is missing", hint=f"copy it next to {path.parent}/*.parts.json")
    actual = path.stat().st_size
    if actual != size:
        raise CheckFailed(f"part {path.name} is {actual} bytes, expected {size}", hint="copy it again from the source")
    if hash_file(path, meter.add).sha256 != sha256:
        raise CheckFailed(f"part {path.name} is corrupt: its sha256 does not match", hint="copy it again")


class _PartReader(io.BufferedIOBase):
    """A read-only stream over the parts in order, hashing the whole tar as it goes."""

    def __init__(self, paths: list[Path], meter: _Meter) -> None:
        super().__init__()
        self._paths = list(paths)
        self._fh: io.BufferedReader | None = None
        self._meter = meter
        self.tar_hash = hashlib.sha256()
        self.done = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        want = _CHUNK if size is None or size < 0 else size
        out = bytearray()
        while len(out) < want:
            if self._fh is None:
                if not self._paths:
                    break
                self._fh = self._paths.pop(0).open("rb")
            chunk = self._fh.read(want - len(out))
            if not chunk:
                self._fh.close()
                self._fh = None
                continue
            out += chunk
        self.tar_hash.update(out)
        self.done += len(out)
        self._meter.add(len(out))
        return bytes(out)

    def drain(self) -> None:
        """Read past the tar's end-of-archive padding, so the hash covers every byte of every part."""
        while self.read(_CHUNK):
            pass

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        super().close()


def _unpack(reader: _PartReader, dest: Path, bundle: str) -> None:
    dirs: list[tuple[Path, tarfile.TarInfo]] = []
    seen: set[PurePosixPath] = set()
    try:
        with tarfile.open(
            fileobj=reader, mode="r|", encoding=_ENCODING, errors=_ERRORS, errorlevel=2, bufsize=_CHUNK
        ) as tar:
            for member in tar:
                rel = _safe_name(member, bundle)
                if rel in seen:
                    raise CheckFailed(f"{bundle}: {member.name!r} appears twice in the tar")
                seen.add(rel)
                path = dest.joinpath(*rel.parts)
                if member.isdir():
                    path.mkdir(parents=True, exist_ok=True)
                    dirs.append((path, member))
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has a data stream
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                _set_attrs(path, member)
    except tarfile.TarError as exc:
        raise CheckFailed(f"{bundle}: the joined tar is unreadable: {exc}") from exc
    # Directories last and deepest first, as tar does: writing files into them would change their mtime.
    for path, member in reversed(dirs):
        _set_attrs(path, member)


def _safe_name(member: tarfile.TarInfo, bundle: str) -> PurePosixPath:
    """The member's path below dest, or CheckFailed: only files and dirs, only inside <bundle>/."""
    name = member.name
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.parts[0] != bundle:
        raise CheckFailed(f"{bundle}: refusing tar member {name!r}: outside {bundle}/")
    if not (member.isreg() or member.isdir()):
        raise CheckFailed(f"{bundle}: refusing tar member {name!r}: not a regular file or directory")
    return rel


def _set_attrs(path: Path, member: tarfile.TarInfo) -> None:
    # As tarfile's 'data' filter: no set-id or sticky bits, no group/other write, the owner can read and write.
    mode = stat.S_IMODE(member.mode) & 0o755 | stat.S_IRUSR | stat.S_IWUSR
    if member.isdir():
        mode |= stat.S_IXUSR
    os.chmod(path, mode)
    os.utime(path, (member.mtime, member.mtime))
