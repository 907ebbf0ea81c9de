"""Bundle parts for removable media: split, check every part, join into the identical tree, refuse bad tars."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from appliance.bundle.parts import MIN_PART_SIZE, join, parse_size, split
from appliance.errors import BadInput, CheckFailed

pytestmark = pytest.mark.unit

MiB = 1024**2
NAME = "demo-bundle"


def _make_bundle(root: Path) -> Path:
    bundle = root / NAME
    files = {
        "manifest.json": (b'{"a": 1}\n', 0o644),
        "debs/openssh-server_9.2p1_amd64.deb": (os.urandom(2 * MiB + 12345), 0o644),  # bigger than a part
        "scripts/install.sh": (b"#!/bin/sh\necho hi\n", 0o755),
        "keys/private/secret.key": (b"k" * 100, 0o600),
        "empty.txt": (b"", 0o644),
    }
    for rel, (data, mode) in files.items():
        path = bundle / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, (1_700_000_000, 1_700_000_000))
    (bundle / "empty-dir").mkdir()
    (bundle / "keys" / "private").chmod(0o700)
    return bundle


def _tree(root: Path) -> dict[str, tuple[str, int, bytes | None, int]]:
    out: dict[str, tuple[str, int, bytes | None, int]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        data = None if kind == "dir" else path.read_bytes()
        mtime = int(st.st_mtime) if kind == "file" else 0  # directory mtimes are checked separately
        out[path.relative_to(root).as_posix()] = (kind, stat.S_IMODE(st.st_mode), data, mtime)
    return out


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return _make_bundle(tmp_path / "src")


def test_split_then_join_gives_the_identical_tree(bundle: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    seen: list[tuple[int, int]] = []
    written = split(bundle, media, MIN_PART_SIZE, progress=lambda done, total: seen.append((done, total)))
    manifest_path = media / f"{NAME}.parts.json"
    assert written[-1] == manifest_path
    parts = written[:-1]
    assert [p.name for p in parts] == [f"{NAME}.tar.{i:03d}" for i in range(len(parts))]
    assert len(parts) == 3
    doc = json.loads(manifest_path.read_text())
    assert doc["format"] == 1
    assert doc["bundle"] == NAME
    assert doc["part_size"] == MIN_PART_SIZE
    assert doc["total_size"] == sum(p.stat().st_size for p in parts)
    assert all(p.stat().st_size <= MIN_PART_SIZE for p in parts)
    whole = b"".join(p.read_bytes() for p in parts)
    assert hashlib.sha256(whole).hexdigest() == doc["tar_sha256"]
    for entry, path in zip(doc["parts"], parts, strict=True):
        assert entry == {"file": path.name, "size": path.stat().st_size, "sha256": _sha(path)}
    assert seen[-1] == (doc["total_size"], doc["total_size"])

    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        members = tar.getmembers()
    assert members[0].name == NAME
    assert all(m.name == NAME or m.name.startswith(NAME + "/") for m in members)
    assert {(m.uid, m.gid) for m in members} == {(0, 0)}
    assert [m.name for m in members] == sorted(m.name for m in members)  # pre-order of sorted names

    out = tmp_path / "out"
    joined_progress: list[tuple[int, int]] = []
    result = join(manifest_path, out, progress=lambda d, t: joined_progress.append((d, t)))
    assert result == out / NAME
    assert _tree(result) == _tree(bundle)
    assert stat.S_IMODE((result / "keys" / "private").stat().st_mode) == 0o700
    assert joined_progress[-1] == (2 * doc["total_size"], 2 * doc["total_size"])
    assert sorted(p.name for p in out.iterdir()) == [NAME]  # no temporary directory left


def test_join_accepts_the_first_part(bundle: Path, tmp_path: Path) -> None:
    split(bundle, tmp_path / "media", MIN_PART_SIZE)
    result = join(tmp_path / "media" / f"{NAME}.tar.000", tmp_path / "out")
    assert _tree(result) == _tree(bundle)


def test_split_is_deterministic(bundle: Path, tmp_path: Path) -> None:
    split(bundle, tmp_path / "a", 4 * MiB)
    split(bundle, tmp_path / "b", 4 * MiB)
    a = json.loads((tmp_path / "a" / f"{NAME}.parts.json").read_text())
    b = json.loads((tmp_path / "b" / f"{NAME}.parts.json").read_text())
    assert a == b
    assert len(a["parts"]) == 1


def test_flipped_byte_in_a_part_is_named_and_nothing_is_unpacked(bundle: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    split(bundle, media, MIN_PART_SIZE)
    part = media / f"{NAME}.tar.001"
    data = bytearray(part.read_bytes())
    data[1000] ^= 0xFF
    part.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckFailed, match=rf"{NAME}\.tar\.001.*corrupt"):
        join(media / f"{NAME}.parts.json", out)
    assert list(out.iterdir()) == []


def test_missing_part_is_named(bundle: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    split(bundle, media, MIN_PART_SIZE)
    (media / f"{NAME}.tar.002").unlink()
    with pytest.raises(CheckFailed, match=rf"{NAME}\.tar\.002 is missing"):
        join(media / f"{NAME}.parts.json", tmp_path / "out")
    assert not (tmp_path / "out" / NAME).exists()


def test_truncated_part_is_named(bundle: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    split(bundle, media, MIN_PART_SIZE)
    part = media / f"{NAME}.tar.000"
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(CheckFailed, match=rf"{NAME}\.tar\.000 is {MIN_PART_SIZE - 1} bytes"):
        join(media / f"{NAME}.parts.json", tmp_path / "out")


def test_join_refuses_an_existing_target(bundle: Path, tmp_path: Path) -> None:
    split(bundle, tmp_path / "media", MIN_PART_SIZE)
    (tmp_path / "out" / NAME).mkdir(parents=True)
    with pytest.raises(BadInput, match="already exists"):
        join(tmp_path / "media" / f"{NAME}.parts.json", tmp_path / "out")


def test_split_refuses_existing_parts_with_a_hint(bundle: Path, tmp_path: Path) -> None:
    split(bundle, tmp_path / "media", MIN_PART_SIZE)
    before = sorted(p.name for p in (tmp_path / "media").iterdir())
    with pytest.raises(BadInput, match="already holds parts") as info:
        split(bundle, tmp_path / "media", MIN_PART_SIZE)
    assert info.value.hint is not None and "remove" in info.value.hint
    assert sorted(p.name for p in (tmp_path / "media").iterdir()) == before


def test_split_refuses_a_small_part_size(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="1 MiB"):
        split(bundle, tmp_path / "media", MIN_PART_SIZE - 1)


def test_split_refuses_output_inside_the_bundle(bundle: Path) -> None:
    with pytest.raises(BadInput, match="inside the bundle"):
        split(bundle, bundle / "parts", MIN_PART_SIZE)


def test_split_refuses_symlinks(bundle: Path, tmp_path: Path) -> None:
    (bundle / "link").symlink_to("/etc/passwd")
    with pytest.raises(BadInput, match="not a regular file"):
        split(bundle, tmp_path / "media", MIN_PART_SIZE)


def test_interrupted_split_leaves_no_parts_file(bundle: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"

    def stop(done: int, total: int) -> None:
        if done > MIN_PART_SIZE:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        split(bundle, media, MIN_PART_SIZE, progress=stop)
    assert list(media.iterdir()) == []
    split(bundle, media, MIN_PART_SIZE)  # and a new run is not refused


# --- hostile tars ----------------------------------------------------------------------------------------


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def _write_parts(media: Path, name: str, whole: bytes, *, tar_sha256: str | None = None) -> Path:
    """Parts and a matching parts file for arbitrary tar bytes, as split would write them."""
    media.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(whole), MIN_PART_SIZE):
        chunk = whole[i : i + MIN_PART_SIZE]
        file = f"{name}.tar.{i // MIN_PART_SIZE:03d}"
        (media / file).write_bytes(chunk)
        parts.append({"file": file, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    doc = {
        "format": 1,
        "bundle": name,
        "part_size": MIN_PART_SIZE,
        "total_size": len(whole),
        "tar_sha256": tar_sha256 or hashlib.sha256(whole).hexdigest(),
        "parts": parts,
    }
    path = media / f"{name}.parts.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("name", "attrs"),
    [
        ("../evil", {}),
        ("evil-bundle/../evil", {}),
        ("evil-bundle/../../evil", {}),
        ("/tmp/evil", {}),
        ("other/evil", {}),
        ("evil-bundle/link", {"type": tarfile.SYMTYPE, "linkname": "../../evil"}),
        ("evil-bundle/hard", {"type": tarfile.LNKTYPE, "linkname": "evil-bundle/ok.txt"}),
        ("evil-bundle/dev", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
    ],
)
def test_hostile_member_is_refused_and_nothing_is_written(tmp_path: Path, name: str, attrs: dict[str, object]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, "evil-bundle", type=tarfile.DIRTYPE, mode=0o755)
        _member(tar, "evil-bundle/big.bin", os.urandom(MIN_PART_SIZE + 5000))  # so it spans two parts
        _member(tar, "evil-bundle/ok.txt", b"fine")
        _member(tar, name, b"pwned", **attrs)
    manifest = _write_parts(tmp_path / "media", "evil-bundle", buf.getvalue())
    assert (tmp_path / "media" / "evil-bundle.tar.001").exists()
    out = tmp_path / "deep" / "out"
    with pytest.raises(CheckFailed, match="refusing tar member"):
        join(manifest, out)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "deep" / "evil").exists()
    assert not Path("/tmp/evil").exists() or Path("/tmp/evil").read_bytes() != b"pwned"


def test_tar_hash_mismatch_leaves_nothing(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, "b", type=tarfile.DIRTYPE, mode=0o755)
        _member(tar, "b/f", b"data")
    manifest = _write_parts(tmp_path / "media", "b", buf.getvalue(), tar_sha256="0" * 64)
    out = tmp_path / "out"
    with pytest.raises(CheckFailed, match="sha256"):
        join(manifest, out)
    assert list(out.iterdir()) == []


def test_parts_file_cannot_point_elsewhere(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _member(tar, "b", type=tarfile.DIRTYPE, mode=0o755)
    manifest = _write_parts(tmp_path / "media", "b", buf.getvalue())
    doc = json.loads(manifest.read_text())
    doc["parts"][0]["file"] = "../b.tar.000"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(BadInput, match=r"should be b\.tar\.000"):
        join(manifest, tmp_path / "out")
    doc["parts"][0]["file"] = "b.tar.000"
    doc["bundle"] = "../b"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(BadInput, match="plain directory name"):
        join(manifest, tmp_path / "out")


def test_join_refuses_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"")
    with pytest.raises(BadInput):
        join(tmp_path / "x.zip", tmp_path / "out")
    with pytest.raises(BadInput, match="no such parts file"):
        join(tmp_path / "x.tar.000", tmp_path / "out")


# --- sizes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4700000000", 4_700_000_000),
        ("4G", 4 * 1024**3),
        ("4g", 4 * 1024**3),
        ("700M", 700 * 1024**2),
        ("1.5GiB", 1536 * 1024**2),
        ("2 MiB", 2 * 1024**2),
        ("64K", 65536),
        ("1T", 1024**4),
        ("4GB", 4 * 1000**3),
        ("4.7GB", 4_700_000_000),
        ("700MB", 700_000_000),
        ("512b", 512),
        (" 1M ", 1024**2),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "4X", "1.2.3M", "four gigs", "4 G B", "1e9"])
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(BadInput, match="not a size"):
        parse_size(text)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
