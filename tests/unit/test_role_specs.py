"""Every role is complete and documents itself: the files the issue asks for, and every variable of its
defaults typed and described in meta/argument_specs.yml (what `ansible-doc -t role` shows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROLES_DIR = Path(__file__).resolve().parents[2] / "roles"
ROLES = [
    "base",
    "runtime",
    "nvidia",
    "vault_agent",
    "clickhouse",
    "milvus",
    "llm",
    "core_server",
    "gateway",
    "monitoring",
    "dr_agent",
]
ANSIBLE_TYPES = {"str", "int", "float", "bool", "list", "dict", "path", "raw", "bytes", "bits", "jsonarg", "json"}


def _load(path: Path) -> object:
    return yaml.safe_load(path.read_text()) or {}


def test_the_play_runs_every_role_in_order() -> None:
    play = _load(ROLES_DIR / "playbooks" / "core.yml")
    assert isinstance(play, list)
    assert [entry["role"] for entry in play[0]["roles"]] == ROLES
    assert all(entry["tags"] == [entry["role"]] for entry in play[0]["roles"])


@pytest.mark.parametrize("role", ROLES)
def test_role_has_its_parts(role: str) -> None:
    root = ROLES_DIR / role
    for part in ("defaults/main.yml", "meta/argument_specs.yml", "tasks/main.yml", "handlers/main.yml"):
        assert (root / part).is_file(), f"{role}: {part} is missing"
    assert any((root / "templates").glob("*.j2")), f"{role}: no templates"


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_typed_and_described(role: str) -> None:
    defaults = _load(ROLES_DIR / role / "defaults" / "main.yml")
    specs = _load(ROLES_DIR / role / "meta" / "argument_specs.yml")
    assert isinstance(defaults, dict) and isinstance(specs, dict)
    options = specs["argument_specs"]["main"].get("options", {})
    missing = sorted(set(defaults) - set(options))
    assert not missing, f"{role}: defaults without an argument spec: {missing}"
    for name, option in options.items():
        assert option.get("type") in ANSIBLE_TYPES, f"{role}.{name}: type {option.get('type')!r}"
        description = option.get("description")
        assert description and str(description).strip(), f"{role}.{name}: no description"
        assert name.startswith(role + "_") or name.startswith("membria_"), f"{role}.{name}: not prefixed"
