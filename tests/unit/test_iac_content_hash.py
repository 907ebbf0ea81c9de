"""The core node's content hash (stacks/DESIGN.md §3): what a node's apply depends on changes it, and nothing
else does, so `pulumi preview` shows an update exactly when the roles would do something new."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.iac.content_hash import core_node_hash, tree_digest
from appliance.site import load_site

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LAB = (REPO / "examples" / "lab.yaml").read_text()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A site whose files (rbac, roles, vars) are copies this test may change."""
    shutil.copytree(REPO / "roles", tmp_path / "roles")
    shutil.copy(REPO / "examples" / "rbac.yaml", tmp_path / "rbac.yaml")
    (tmp_path / "site.yaml").write_text(LAB.replace("policy_file: examples/rbac.yaml", "policy_file: rbac.yaml"))
    (tmp_path / "vars.yaml").write_text("all: {base_ntp_servers: [ntp.example]}\n")
    return tmp_path


def _hash(workdir: Path, *, vars_file: str | None = "vars.yaml", tags: list[str] | None = None) -> str:
    site_file = workdir / "site.yaml"
    cwd = Path.cwd()
    os.chdir(workdir)  # the site's relative paths resolve against the working directory, as in `core apply`
    try:
        return core_node_hash(
            load_site(site_file),
            "core-1",
            site_file=site_file,
            vars_file=Path(vars_file) if vars_file else None,
            tags=tags,
            roles_root=workdir / "roles",
        )
    finally:
        os.chdir(cwd)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_deterministic_and_prefixed(workdir: Path) -> None:
    first = _hash(workdir)
    assert first == _hash(workdir)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64


def test_comments_and_formatting_in_the_site_file_do_not_count(workdir: Path) -> None:
    before = _hash(workdir)
    _edit(workdir / "site.yaml", "site:\n", "# a new comment\nsite:   # and another\n")
    assert _hash(workdir) == before


def _flip_a_role_byte(workdir: Path) -> None:
    path = workdir / "roles" / "base" / "tasks" / "main.yml"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _make_a_role_file_executable(workdir: Path) -> None:
    path = workdir / "roles" / "base" / "tasks" / "main.yml"
    path.chmod(path.stat().st_mode | 0o111)


CHANGES: dict[str, Callable[[Path], None]] = {
    "a role's byte": _flip_a_role_byte,
    "a role file's mode": _make_a_role_file_executable,
    "the node's hardware": lambda w: _edit(w / "site.yaml", "ram_gb: 24", "ram_gb: 32"),
    "the rbac file": lambda w: _edit(w / "rbac.yaml", "\n", "\n# changed\n"),
    "the vars": lambda w: _edit(w / "vars.yaml", "ntp.example", "ntp2.example"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_input_changes_the_hash(workdir: Path, change: str) -> None:
    before = _hash(workdir)
    CHANGES[change](workdir)
    assert _hash(workdir) != before


def test_the_tags_change_it_but_not_their_order(workdir: Path) -> None:
    assert _hash(workdir, tags=["base"]) != _hash(workdir)
    assert _hash(workdir, tags=["base", "gateway"]) == _hash(workdir, tags=["gateway", "base"])


def test_an_empty_vars_file_is_no_vars_file(workdir: Path) -> None:
    before = _hash(workdir, vars_file=None)
    (workdir / "vars.yaml").write_text("all: {}\n")
    assert _hash(workdir) == before


def test_tree_digest_sees_a_renamed_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    before = tree_digest(tmp_path)
    (tmp_path / "a").rename(tmp_path / "b")
    assert tree_digest(tmp_path) != before
