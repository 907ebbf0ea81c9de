"""The EdgeImage provider's pure parts: the content hash (what makes `pulumi preview` show a rebuild), check, diff,
the refusal when the inputs moved between preview and up, and the provider's pickle (what the provider host loads).
Adopting and building real images is tests/image/test_stack_provider_edge_image.py."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pulumi.dynamic.dynamic import serialize_provider

from appliance import signing_keys
from appliance.errors import BadInput, CheckFailed
from appliance.iac import edge_image
from appliance.iac.edge_image import CHECKOUT, CODE_TREES, build_or_adopt, check, diff, edge_image_hash, image_dir
from appliance.site import Site, load_site
from stacks.components.edge_image import EdgeImageProvider
from tests.conftest import EXAMPLES, lab_site_data, write_site

pytestmark = pytest.mark.unit

PROFILE = "engineering-laptop"


def _site(tmp_path: Path, change: Any = None, name: str = "site.yaml") -> tuple[Path, Site]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = lab_site_data(tmp_path / "state")
    if change is not None:
        change(data)
    path = write_site(tmp_path / name, data)
    return path, load_site(path)


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    path, site = _site(tmp_path)
    assert site.edge is not None
    signing_keys.write_public(Ed25519PrivateKey.generate(), site.edge.signing.public_key_file)
    return path


def _props(path: Path, /, **changes: Any) -> dict[str, Any]:
    site_file = path
    site = load_site(site_file)
    props = {
        "site_file": str(site_file),
        "workdir": str(CHECKOUT),
        "profile": PROFILE,
        "output_root": str(site_file.parent / "images"),
        "state_dir": str(site_file.parent / "state"),
        "content_hash": edge_image_hash(site, PROFILE, workdir=CHECKOUT),
        "__provider": "pickled",
    }
    props.update(changes)
    return props


# --- the hash ------------------------------------------------------------------------------------------------


def test_the_hash_is_deterministic_and_per_profile(tmp_path: Path) -> None:
    path, site = _site(tmp_path)
    first = edge_image_hash(site, PROFILE)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first)
    assert edge_image_hash(load_site(path), PROFILE) == first
    assert edge_image_hash(site, "sales-laptop") != first
    # Another lab: other state dir, other ports (Vault's among them), same image.
    assert edge_image_hash(_site(tmp_path / "other")[1], PROFILE) == first


def _profile(data: dict[str, Any], name: str = PROFILE) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in data["edge_profiles"] if p["name"] == name)
    return found


CHANGES = {
    "domain": lambda d: d["site"].update(domain="other.example"),
    "tpm pin": lambda d: _profile(d).update(image={"tpm2_pin": True}),
    "departments": lambda d: _profile(d).update(departments=["engineering", "sales"]),
    "theta": lambda d: _profile(d)["routing"].update(theta=0.3),
    "extra package": lambda d: _profile(d).update(extra_packages=["vim"]),
    "root size": lambda d: _profile(d).update(image={"root_size_mb": 8192}),
    "user": lambda d: _profile(d).update(image={"users": [{"name": "tech", "ssh_public_keys": ["ssh-ed25519 AAAA"]}]}),
    "gateways": lambda d: d["edge"].update(gateways=["https://gw.example:9443"]),
}


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_the_hash_changes_with_the_profile_and_the_site(tmp_path: Path, what: str) -> None:
    _, site = _site(tmp_path)
    _, changed = _site(tmp_path, CHANGES[what], name="changed.yaml")
    assert edge_image_hash(changed, PROFILE) != edge_image_hash(site, PROFILE)


def test_another_profile_vault_and_the_ca_do_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, site = _site(tmp_path)
    before = edge_image_hash(site, PROFILE)

    def change(d: dict[str, Any]) -> None:
        _profile(d, "sales-laptop")["extra_packages"] = ["vim"]
        d["lab"]["ports"]["openbao"] += 2
        d["edge"]["signing"]["signing_key_vault_path"] = "membria/another-key"

    _, changed = _site(tmp_path, change, name="changed.yaml")

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("the hash asked Vault or assembled the model")

    import appliance.edge.build
    import appliance.lab.model

    monkeypatch.setattr(appliance.edge.build, "_ca_chain", forbidden)
    monkeypatch.setattr(appliance.edge.keys, "signing_key", forbidden)
    monkeypatch.setattr(appliance.lab.model, "ensure_gemma", forbidden)
    monkeypatch.setenv("VAULT_ADDR", "https://127.0.0.1:1")
    monkeypatch.setenv("VAULT_TOKEN", "hvs.not-used")
    assert edge_image_hash(changed, PROFILE) == before


def test_the_hash_changes_with_the_code(tmp_path: Path) -> None:
    _, site = _site(tmp_path)
    code = tmp_path / "code"
    for tree in CODE_TREES:
        shutil.copytree(CHECKOUT / tree, code / tree, ignore=shutil.ignore_patterns("__pycache__"))
    original = edge_image_hash(site, PROFILE)
    assert edge_image_hash(site, PROFILE, code_root=code) == original  # exactly these trees, wherever they lie
    (code / "runtime/edge/extra.py").write_text("# a new module\n")
    assert edge_image_hash(site, PROFILE, code_root=code) != original
    (code / "runtime/edge/extra.py").unlink()
    script = code / "edge_image/build.py"
    script.chmod(0o755)
    assert edge_image_hash(site, PROFILE, code_root=code) != original
    script.chmod(0o644)
    script.write_bytes(script.read_bytes().replace(b"SPARE = 0.15", b"SPARE = 0.16"))
    assert edge_image_hash(site, PROFILE, code_root=code) != original


def test_the_taxonomy_and_a_profile_model_file_count(tmp_path: Path) -> None:
    taxonomy = tmp_path / "taxonomy.yaml"
    shutil.copyfile(EXAMPLES / "taxonomy.yaml", taxonomy)
    model = tmp_path / "model.gguf"

    def own(d: dict[str, Any]) -> None:
        _profile(d)["routing"]["taxonomy_file"] = str(taxonomy)
        _profile(d)["model"]["path"] = str(model)

    _, site = _site(tmp_path, own)
    missing = edge_image_hash(site, PROFILE)  # no model file on this machine: still computable (the build refuses)
    model.write_bytes(b"GGUF" * 100)
    present = edge_image_hash(site, PROFILE)
    model.write_bytes(b"GGUF" * 101)
    assert len({missing, present, edge_image_hash(site, PROFILE)}) == 3
    before = edge_image_hash(site, PROFILE)
    taxonomy.write_text(taxonomy.read_text() + "\n# another line\n")
    assert edge_image_hash(site, PROFILE) != before


def test_relative_paths_resolve_against_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def relative(d: dict[str, Any]) -> None:
        _profile(d)["routing"]["taxonomy_file"] = "examples/taxonomy.yaml"

    _, site = _site(tmp_path, relative)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match="taxonomy_file"):
        edge_image_hash(site, PROFILE)
    assert Path.cwd() == tmp_path
    assert edge_image_hash(site, PROFILE, workdir=CHECKOUT) == edge_image_hash(_site(tmp_path / "abs")[1], PROFILE)
    assert Path.cwd() == tmp_path  # restored


# --- check ---------------------------------------------------------------------------------------------------


def test_check_accepts_good_inputs(site_file: Path) -> None:
    assert check(_props(site_file)) == []


def _bad_site(site_file: Path) -> dict[str, Any]:
    bad = site_file.parent / "bad.yaml"
    bad.write_text(site_file.read_text().replace("edge_profiles:", "edge_profilez:"))
    return {"site_file": str(bad)}


BAD: dict[str, tuple[Callable[[Path], dict[str, Any]], str, str]] = {
    "unknown profile": (lambda f: {"profile": "no-such-laptop"}, "profile", "no edge profile 'no-such-laptop'"),
    "invalid site file": (_bad_site, "site_file", "edge_profilez"),
    "missing input": (lambda f: {"state_dir": ""}, "state_dir", "required"),
    "relative output root": (lambda f: {"output_root": "images"}, "output_root", "not absolute"),
    "output root under a file": (
        lambda f: {"output_root": str(f / "images")},
        "output_root",
        "is not a directory",
    ),
    "not a digest": (lambda f: {"content_hash": "abc"}, "content_hash", "sha256"),
    "no workdir": (lambda f: {"workdir": str(f.parent / "nowhere")}, "workdir", "not a directory"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_check_failures(site_file: Path, case: str) -> None:
    change, prop, reason = BAD[case]
    failures = check(_props(site_file, **change(site_file)))
    assert [p for p, _ in failures] == [prop], failures
    assert reason in failures[0][1]


def test_check_without_the_public_key(site_file: Path) -> None:
    site = load_site(site_file)
    assert site.edge is not None
    site.edge.signing.public_key_file.unlink()
    [(prop, reason)] = check(_props(site_file))
    assert prop == "site_file" and "signing key" in reason


def test_check_needs_root_only_to_build(site_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    props = _props(site_file)
    [(prop, reason)] = check(props)
    assert prop == "output_root" and "needs root" in reason and "MissingEnvironment" in reason
    target = image_dir(Path(props["output_root"]), PROFILE, props["content_hash"])
    target.mkdir(parents=True)
    (target / "manifest.json").write_text("{}")  # an image to adopt: create checks it, nothing is built
    assert check(props) == []


# --- diff ----------------------------------------------------------------------------------------------------


DIFFS = {
    "nothing": ({}, False, []),
    "content hash": ({"content_hash": "sha256:" + "0" * 64}, True, []),
    "output root": ({"output_root": "/srv/images"}, True, []),
    "profile": ({"profile": "sales-laptop"}, True, ["profile"]),
    "site file path": ({"site_file": "/elsewhere/site.yaml"}, False, []),
    "state dir": ({"state_dir": "/elsewhere/state"}, False, []),
    "workdir": ({"workdir": "/elsewhere"}, False, []),
    "provider pickle": ({"__provider": "another pickle"}, False, []),
}


@pytest.mark.parametrize("case", sorted(DIFFS))
def test_diff_truth_table(case: str) -> None:
    change, changes, replaces = DIFFS[case]
    news = {
        "site_file": "/srv/site.yaml",
        "workdir": "/srv",
        "profile": PROFILE,
        "output_root": "/srv/out",
        "state_dir": "/srv/state",
        "content_hash": "sha256:" + "a" * 64,
        "__provider": "pickle",
    }
    # olds are the old outputs: the inputs echoed plus what the build computed
    olds = {**copy.deepcopy(news), "sha256": "b" * 64, "image_path": "/srv/out/x.img", "build_seconds": None}
    olds.update(change)
    found = diff(olds, news)
    assert (found.changes, found.replaces) == (changes, replaces)
    result = EdgeImageProvider().diff("lab/x", olds, news)
    assert (result.changes, result.replaces, result.delete_before_replace) == (changes, replaces, False)


# --- create refusals that need no image tools ----------------------------------------------------------------


def test_create_refuses_when_the_inputs_moved_since_preview(site_file: Path) -> None:
    props = _props(site_file, content_hash="sha256:" + "0" * 64)
    with pytest.raises(CheckFailed, match="changed between preview and up"):
        build_or_adopt(props)
    assert not Path(props["output_root"]).exists()  # nothing built, nothing adopted


def test_create_refuses_an_unsigned_image_and_keeps_it(site_file: Path) -> None:
    props = _props(site_file)
    target = image_dir(Path(props["output_root"]), PROFILE, props["content_hash"])
    target.mkdir(parents=True)
    (target / "manifest.json").write_text('{"site": "lab"}')
    with pytest.raises(CheckFailed, match="cannot be adopted") as caught:
        EdgeImageProvider().create(props)
    assert "move" in str(caught.value) and str(target) in str(caught.value)
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json"]  # evidence is never removed


def test_image_dir_uses_the_digest() -> None:
    assert image_dir(Path("/out"), "p", "sha256:" + "0123456789ab" + "f" * 52) == Path("/out/p-0123456789ab")


# --- the provider as the provider host loads it ---------------------------------------------------------------


def test_the_provider_pickle_loads_by_reference_elsewhere(site_file: Path) -> None:
    provider = EdgeImageProvider()
    assert vars(provider) == {}
    blob = serialize_provider(provider)
    assert len(blob) < 400  # by reference: a module and a class name, no code, no client, no token
    script = (
        "import base64, sys, dill\n"
        "p = dill.loads(base64.b64decode(sys.stdin.read()))\n"
        "print(type(p).__module__, type(p).__qualname__, vars(p))\n"
        "print(p.diff('lab/a', {'profile': 'a'}, {'profile': 'b'}).replaces)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], input=blob, capture_output=True, text=True, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["stacks.components.edge_image EdgeImageProvider {}", "['profile']"]


def test_the_provider_check_names_the_property(site_file: Path) -> None:
    props = _props(site_file, profile="no-such-laptop")
    result = EdgeImageProvider().check({}, props)
    assert result.inputs == props
    assert [(f.property, "no-such-laptop" in f.reason) for f in result.failures] == [("profile", True)]
    assert edge_image.check(_props(site_file)) == []
