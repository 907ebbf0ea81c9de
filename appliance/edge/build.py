"""`appliance edge build`: a site's edge profile -> a signed laptop image (the steps; edge_image does each one).

Order: signing key and CA chain from Vault first (a missing key fails in a second, not after twenty minutes), the
agent's wheelhouse, the Debian rootfs (cached), the model file, the pyinfra deploy over the chroot, the boot files,
the SBOM and the file listing, then the offline assembly. The work tree lives beside OUT (it holds gigabytes) and is
removed on every exit path.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance import __version__
from appliance.backends import Backends
from appliance.bundle import sbom
from appliance.bundle import wheels as bundle_wheels
from appliance.edge import keys, wheelhouse
from appliance.edge import spec as edge_spec
from appliance.errors import BadInput
from appliance.lab.state import LabState
from appliance.pki import Pki
from appliance.site import Site
from edge_image import boot, chroot, deploy_runner, rootfs
from edge_image.build import BuildSpec, Reporter, assemble
from edge_image.manifest import ImageManifest, ModelFileRecord, PackageRecord, WheelRecord
from edge_image.spec import ImageSpec
from runtime.common.signed_manifest import hash_file, sign

MIB = 1 << 20
LISTING = "rootfs.sha256sums"
SBOM = "sbom.cdx.json"


@dataclass
class Built:
    manifest: ImageManifest
    seconds: float
    stages: dict[str, float]


def _ca_chain(site: Site, state_dir: Path | None) -> str:
    state = LabState.at(state_dir or site.lab.state_dir) if site.embedded["vault"] else None
    return Pki.for_site(site, Backends(site, state).vault()).ca_chain_pem()


def _model_source(site: Site, prof_path: Path | None) -> Path:
    """The GGUF on this machine: the profile's own file, else the packaged Gemma (assembled from its wheel)."""
    if prof_path is not None:
        if not prof_path.is_file():
            raise BadInput(
                f"the profile's model.path {prof_path} is not a file on this machine",
                hint="the build copies it into the image at the same path",
            )
        return prof_path
    from appliance.lab.model import ensure_gemma

    return ensure_gemma()


def plan(site: Site, profile_name: str, *, ca_pem: str = "(from Vault at build time)") -> tuple[ImageSpec, Path]:
    """The image spec and the model file, without touching Vault or the network (for --dry-run)."""
    prof = edge_spec.profile(site, profile_name)
    model = _model_source(site, prof.model.path)
    model_path = edge_spec.model_file_in_image(prof, model.name)
    return edge_spec.image_spec(site, prof, version=__version__, ca_pem=ca_pem, model_path=model_path), model


def listing(tree: Path, out: Path) -> None:
    """Every regular file of the root tree: sha256, size, mode, uid:gid, path (what an auditor compares against)."""
    with out.open("w") as handle:
        for dirpath, dirnames, filenames in os.walk(tree):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):
                    continue
                digest = hash_file(path).sha256
                rel = "/" + path.relative_to(tree).as_posix()
                handle.write(
                    f"{digest}  {st.st_size}  {stat.S_IMODE(st.st_mode):04o}  {st.st_uid}:{st.st_gid}  {rel}\n"
                )


def _sbom(
    spec: ImageSpec, packages: list[PackageRecord], debs: dict[str, tuple[str, int]], wheel_dir: Path,
    models: list[ModelFileRecord], created: datetime,
) -> str:  # fmt: skip
    components: list[sbom.Component] = []
    for p in packages:
        sha, size = debs.get(p.name, ("", 0))
        if not sha:
            continue  # a package without its .deb (none expected): listed in the manifest, not hashable here
        components.append(sbom.Component("deb", p.name, p.version, f"deb/{p.name}_{p.arch}", sha, size,
                                         f"pkg:deb/debian/{p.name}@{p.version}?arch={p.arch}", "Debian"))  # fmt: skip
    for path in sorted(wheel_dir.glob("*.whl")):
        w = bundle_wheels.parse_wheel_name(path.name)
        entry = hash_file(path)
        source = "built from this checkout" if w.name == "membria-appliance" else "PyPI"
        components.append(sbom.Component("wheel", w.name, w.version, f"wheels/{path.name}", entry.sha256, entry.size,
                                         f"pkg:pypi/{w.name}@{w.version}", source))  # fmt: skip
    for m in models:
        components.append(sbom.Component("model", Path(m.path).name, "", m.path, m.sha256, m.size, None, "model file"))
    document = sbom.sbom_document(f"membria-edge-{spec.site}-{spec.profile}", spec.version, components, created=created)
    sbom.validate(document)
    return document


def build(
    site: Site,
    profile_name: str,
    out: Path,
    *,
    state_dir: Path | None,
    report: Reporter,
    log: Callable[[str], None],
) -> Built:
    started = time.monotonic()
    stages: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        now = time.monotonic()
        stages[name] = round(now - since, 1)
        return now

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} already exists", hint="choose a new output directory (images are never overwritten)")
    key = keys.signing_key(site, state_dir)
    ca_pem = _ca_chain(site, state_dir)
    image_spec, model = plan(site, profile_name, ca_pem=ca_pem)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    tree = work / "root"
    try:
        t = time.monotonic()
        report.step("the edge agent's wheelhouse (pinned, hashed)")
        wheel_dir = work / "wheelhouse"
        wheel_list = wheelhouse.build(wheel_dir, log)
        t = stage("wheelhouse", t)

        report.step(f"Debian {image_spec.debian_suite} rootfs ({len(image_spec.all_packages)} packages, cached)")
        tar = rootfs.rootfs_tar(image_spec.all_packages, image_spec.debian_suite, progress=log)
        rootfs.unpack(tar, tree)
        debs = rootfs.deb_files(tree)
        t = stage("rootfs", t)

        model_in_image = Path(image_spec.agent["model"]["path"])
        target = tree / model_in_image.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, target)
        target.chmod(0o644)
        model_entry = hash_file(target)
        models = [ModelFileRecord(path=str(model_in_image), sha256=model_entry.sha256, size=model_entry.size)]

        report.step("configuring the system (pyinfra over the chroot)")
        luks_uuid = str(uuid.uuid4())
        boot.configure(tree, luks_uuid=luks_uuid, tpm2_pcrs=image_spec.tpm2_pcrs)
        result = deploy_runner.run_deploy(tree, image_spec, wheel_dir, on_line=log)
        report.detail(f"{result.operations} operations, {result.changed} changed, {result.seconds:.0f} s")
        t = stage("deploy", t)

        report.step("kernel, initrd (dracut) and systemd-boot")
        esp_tree = work / "esp"
        esp_tree.mkdir()
        with chroot.prepared(tree):
            kernel, initrd, kver = boot.make_boot_files(tree, esp_tree)
        t = stage("boot files", t)

        packages = [PackageRecord(name=n, version=v, arch=a) for n, v, a in rootfs.installed_packages(tree)]
        created = datetime.now(UTC).replace(microsecond=0)
        (work / SBOM).write_text(_sbom(image_spec, packages, debs, wheel_dir, models, created))
        rootfs.drop_deb_files(tree)
        listing(tree, work / LISTING)
        t = stage("sbom and listing", t)

        build_spec = BuildSpec(
            site=image_spec.site,
            profile=image_spec.profile,
            version=image_spec.version,
            debian_suite=image_spec.debian_suite,
            root_size=image_spec.root_size_mb * MIB,
            esp_size=image_spec.esp_size_mb * MIB,
            tpm2_pcrs=tuple(image_spec.tpm2_pcrs),
            kernel=kernel,
            initrd=initrd,
            kernel_version=kver,
            luks_uuid=luks_uuid,
            packages=tuple(packages),
            wheels=tuple(WheelRecord(name=w.name, version=w.version) for w in wheel_list),
            models=tuple(models),
        )
        manifest = assemble(
            build_spec,
            tree,
            esp_tree,
            out,
            signer=lambda data: sign(data, key),
            report=report,
            extras={SBOM: work / SBOM, LISTING: work / LISTING},
        )
        stage("assembly", t)
        return Built(manifest, round(time.monotonic() - started, 1), stages)
    finally:
        chroot.unmount_all(tree)
        shutil.rmtree(work, ignore_errors=True)
