"""`bundle build`: everything a site's core nodes install, in one signed directory.

Layout (see DESIGN.md beside this file)::

    BUNDLE/manifest.json      what is inside and the sha256 of every other file
    BUNDLE/manifest.sig       Ed25519 signature over manifest.json (key from Vault)
    BUNDLE/sbom.cdx.json      CycloneDX SBOM: every .deb, wheel and model file
    BUNDLE/site.yaml          the site file it was built for
    BUNDLE/debs/              .debs, full dependency closure + Packages, Packages.gz, Release (a flat repository)
    BUNDLE/wheels/            wheels + requirements.txt (runtime) [+ vllm-requirements.txt], pinned by sha256

The tree is built beside the target under a temporary name and renamed into place only when complete
and signed: an interrupted build never leaves something that looks like a bundle.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import __version__
from appliance.bundle import apt, sbom, wheels
from appliance.bundle.manifest import (
    MANIFEST,
    SIGNATURE,
    DebRecord,
    FileEntry,
    Manifest,
    ModelRecord,
    NeedRecord,
    WheelRecord,
    hash_file,
    sign,
    walk,
)
from appliance.bundle.needs import DEBIAN_SUITE, Need, site_needs
from appliance.bundle.verify import SITE_COPY
from appliance.errors import BadInput
from appliance.site import Site

REQUIREMENTS = {"runtime": "requirements.txt", "vllm": "vllm-requirements.txt"}


class Reporter:
    """Progress for a long build; the CLI shows it with rich, tests pass this silent one."""

    def step(self, text: str) -> None:
        pass

    def detail(self, text: str) -> None:
        pass

    def hashing(self, total: int) -> Callable[[int], None]:
        return lambda _n: None


@dataclass
class Built:
    path: Path
    manifest: Manifest
    seconds: float
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # part -> (files, bytes)


def plan(site: Site, skip: set[str]) -> list[Need]:
    """The parts for the site; unknown --skip groups are refused before anything is fetched."""
    needs = site_needs(site)
    unknown = sorted(skip - {n.group for n in needs})
    if unknown:
        raise BadInput(
            f"--skip {', '.join(unknown)}: the site's bundle has no such part",
            hint=f"its parts: {', '.join(n.group for n in needs)}",
        )
    return needs


def _read_indexes(needs: list[Need], skip: set[str], work: Path, report: Reporter) -> dict[str, apt.PrivateApt]:
    """Every apt part's index first: an unreachable repository fails the build before anything is downloaded."""
    out = {}
    for need in needs:
        if need.kind != "apt" or need.group in skip:
            continue
        report.step(f"{need.group}: reading the package index ({', '.join(s.name for s in need.sources)})")
        out[need.group] = apt.PrivateApt(work / f"apt-{need.group}", need.sources)
        out[need.group].prepare()
    return out


def _fetch_apt(
    need: Need, private: apt.PrivateApt, debs_dir: Path, have: set[tuple[str, str]], report: Reporter
) -> list[DebRecord]:
    closure = private.closure(need.items)
    todo = [pkg for pkg in closure if pkg not in have]
    report.step(f"{need.group}: downloading {len(todo)} of {len(closure)} packages (full dependency closure)")
    got = private.download(todo, debs_dir) if todo else []
    have.update((d.name, d.version) for d in got)
    return [
        DebRecord(name=d.name, version=d.version, arch=d.arch, file=f"debs/{d.file}", group=need.group) for d in got
    ]


def _fetch_wheels(need: Need, work: Path, wheels_dir: Path, report: Reporter) -> list[WheelRecord]:
    report.step(f"{need.group}: building wheels for {len(need.items)} requirement(s) and their closure")
    scratch = work / f"wheels-{need.group}"
    built = wheels.build(need.items, scratch, report.detail)
    for wheel in built:
        target = wheels_dir / wheel.file
        if not target.exists():
            shutil.move(scratch / wheel.file, target)
    wheels.write_requirements(wheels_dir, built, REQUIREMENTS[need.group])
    return [WheelRecord(name=w.name, version=w.version, file=f"wheels/{w.file}", group=need.group) for w in built]


def _components(root: Path, manifest: Manifest, files: dict[str, tuple[str, int]]) -> list[sbom.Component]:
    out: list[sbom.Component] = []
    for d in manifest.debs:
        sha, size = files[d.file]
        purl = f"pkg:deb/debian/{d.name}@{d.version}?arch={d.arch}"
        out.append(sbom.Component("deb", d.name, d.version, d.file, sha, size, purl, f"Debian ({d.group})"))
    for w in manifest.wheels:
        sha, size = files[w.file]
        source = "built from this checkout" if w.name == "membria-appliance" else f"PyPI ({w.group})"
        out.append(
            sbom.Component("wheel", w.name, w.version, w.file, sha, size, f"pkg:pypi/{w.name}@{w.version}", source)
        )
    for m in manifest.models:
        out.append(
            sbom.Component(
                "model",
                Path(m.member).name,
                "",
                f"{m.wheel}#{m.member}",
                m.sha256,
                m.size,
                None,
                f"inside wheel {m.wheel}",
            )
        )
    return out


def build(
    site_file: Path,
    site: Site,
    out: Path,
    key: Ed25519PrivateKey,
    *,
    skip: set[str] | None = None,
    report: Reporter | None = None,
) -> Built:
    report = report or Reporter()
    skip = skip or set()
    needs = plan(site, skip)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} already exists", hint="choose another -o, or remove it first")
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix="membria-bundle-"))
    try:
        debs_dir, wheels_dir = staging / "debs", staging / "wheels"
        debs_dir.mkdir()
        wheels_dir.mkdir()
        debs: list[DebRecord] = []
        wheel_records: list[WheelRecord] = []
        have: set[tuple[str, str]] = set()
        indexes = _read_indexes(needs, skip, work, report)
        for need in needs:
            if need.group in skip:
                report.step(f"{need.group}: left out (--skip); the bundle will not verify as complete")
            elif need.kind == "apt":
                debs += _fetch_apt(need, indexes[need.group], debs_dir, have, report)
            else:
                wheel_records += _fetch_wheels(need, work, wheels_dir, report)
        report.step("indexing the Debian packages (flat repository)")
        apt.write_index(debs_dir)
        report.step("hashing the model files inside their wheels")
        models = [
            ModelRecord(package=m.package, wheel=f"wheels/{m.wheel}", member=m.member, sha256=m.sha256, size=m.size)
            for m in wheels.model_files(wheels_dir, [wheels.parse_wheel_name(Path(w.file).name) for w in wheel_records])
        ]
        shutil.copyfile(site_file, staging / SITE_COPY)
        needs_records = [
            NeedRecord(group=n.group, kind=n.kind, items=list(n.items), why=n.why, included=n.group not in skip)
            for n in needs
        ]
        draft = Manifest(
            site=site.site.name,
            site_file=str(site_file),
            appliance_version=__version__,
            created_at=datetime.now(UTC).replace(microsecond=0),
            debian_suite=DEBIAN_SUITE,
            needs=needs_records,
            debs=debs,
            wheels=wheel_records,
            models=models,
            files={},
        )
        report.step("hashing every file")
        hashed = _hash_tree(staging, report)
        sbom_text = sbom.sbom_document(
            f"membria-bundle-{site.site.name}",
            __version__,
            _components(staging, draft, {k: (v.sha256, v.size) for k, v in hashed.items()}),
            created=draft.created_at,
        )
        (staging / "sbom.cdx.json").write_text(sbom_text)
        hashed["sbom.cdx.json"] = hash_file(staging / "sbom.cdx.json")
        manifest = draft.model_copy(update={"files": dict(sorted(hashed.items()))})
        data = manifest.to_bytes()
        report.step("signing the manifest (Ed25519, key from Vault)")
        (staging / MANIFEST).write_bytes(data)
        (staging / SIGNATURE).write_bytes(sign(data, key))
        if out.exists():
            out.rmdir()  # an empty directory the user made for it
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Built(out, manifest, time.monotonic() - started, sizes(out, manifest))


def _hash_tree(root: Path, report: Reporter) -> dict[str, FileEntry]:
    rels = list(walk(root))
    advance = report.hashing(sum((root / r).stat().st_size for r in rels))
    return {str(rel): hash_file(root / rel, advance) for rel in rels}


def sizes(root: Path, manifest: Manifest) -> dict[str, tuple[int, int]]:
    """(files, bytes) per top-level part, and the total, for the size summary."""
    out: dict[str, tuple[int, int]] = {}
    for rel, entry in manifest.files.items():
        part = rel.split("/", 1)[0] if "/" in rel else "metadata"
        count, total = out.get(part, (0, 0))
        out[part] = (count + 1, total + entry.size)
    extra = sum((root / name).stat().st_size for name in (MANIFEST, SIGNATURE))
    count, total = out.get("metadata", (0, 0))
    out["metadata"] = (count + 2, total + extra)
    out["total"] = (sum(c for c, _ in out.values()), sum(b for _, b in out.values()))
    return out
