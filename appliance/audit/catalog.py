"""The control catalog: what is checked, why, against which framework, and which role or image step fixes it.

Shipped as YAML inside the package (`controls/`), validated here. Every control names one check, a
pytest-testinfra test in `checks/`; the loader refuses a catalog whose checks do not exist, so a renamed
test cannot silently drop a control.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.common.yamldoc import load_model

CONTROLS_DIR = Path(__file__).with_name("controls")
CHECKS_DIR = Path(__file__).with_name("checks")

CIS = "cis-debian12-l1"
MEMBRIA = "membria"
Framework = Literal["cis-debian12-l1", "membria"]
FRAMEWORK_TITLES: dict[str, str] = {
    CIS: "CIS Debian Linux 12 Benchmark v1.1.0, Level 1",
    MEMBRIA: "Membria appliance controls",
}
Kind = Literal["core", "edge", "image"]
Severity = Literal["low", "medium", "high", "critical"]

CONTROL_ID = r"^(CIS-[0-9]+(\.[0-9]+)+|MEM-[A-Z0-9]+(-[A-Z0-9]+)*)$"
CHECK_ID = r"^test_[a-z0-9_]+\.py::test_[a-z0-9_]+$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, str_strip_whitespace=True)


class FrameworkRef(_Model):
    framework: Framework
    id: str = Field(min_length=1, description="the framework's own id (a CIS recommendation number, a MEM- id)")


class Remediation(_Model):
    """Which role (core nodes) or image step (edge images) makes the control pass."""

    role: str | None = Field(default=None, description="roles/<role>, with the task file where useful")
    image_step: str | None = Field(default=None, description="the edge image build step (edge_image/...)")
    text: str = Field(min_length=1, description="what to do, in a sentence or two")

    @model_validator(mode="after")
    def _names_a_fix(self) -> Remediation:
        if self.role is None and self.image_step is None:
            raise ValueError("a remediation names a role or an image step")
        return self


class Control(_Model):
    id: str = Field(pattern=CONTROL_ID)
    title: str = Field(min_length=1)
    rationale: str = Field(min_length=1)
    severity: Severity
    applies_to: list[Kind] = Field(min_length=1)
    frameworks: list[FrameworkRef] = Field(min_length=1)
    check: str = Field(pattern=CHECK_ID, description="checks/<file>::<test function>")
    remediation: Remediation

    @property
    def check_file(self) -> str:
        return self.check.split("::", 1)[0]

    @property
    def check_function(self) -> str:
        return self.check.split("::", 1)[1]

    def refs(self, framework: str) -> list[str]:
        return [ref.id for ref in self.frameworks if ref.framework == framework]


class ControlFile(_Model):
    controls: list[Control] = Field(min_length=1)


class CisRecommendation(_Model):
    id: str = Field(pattern=r"^[0-9]+(\.[0-9]+)+$")
    title: str = Field(min_length=1)


class CisReference(_Model):
    """The benchmark's automated Level 1 (server) recommendations: the denominator of coverage."""

    benchmark: str = Field(min_length=1)
    recommendations: list[CisRecommendation] = Field(min_length=1)


class Catalog(_Model):
    controls: list[Control]
    cis: CisReference

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        seen: dict[str, str] = {}
        for control in self.controls:
            if control.id in seen:
                raise ValueError(f"control {control.id} is defined twice")
            seen[control.id] = control.check
        checks = [c.check for c in self.controls]
        twice = sorted({c for c in checks if checks.count(c) > 1})
        if twice:
            raise ValueError(f"one check serves one control; used more than once: {', '.join(twice)}")
        known = {r.id for r in self.cis.recommendations}
        for control in self.controls:
            unknown = [ref for ref in control.refs(CIS) if ref not in known]
            if unknown:
                raise ValueError(f"{control.id}: not an automated Level 1 recommendation: {', '.join(unknown)}")
        return self

    def control(self, control_id: str) -> Control:
        for control in self.controls:
            if control.id == control_id:
                return control
        raise KeyError(control_id)

    def for_kind(self, kind: str) -> list[Control]:
        return [c for c in self.controls if kind in c.applies_to]

    def cis_covered(self) -> set[str]:
        return {ref for control in self.controls for ref in control.refs(CIS)}

    def cis_not_covered(self) -> list[CisRecommendation]:
        covered = self.cis_covered()
        return [r for r in self.cis.recommendations if r.id not in covered]

    def digest(self) -> str:
        """Identifies the catalog a report was made with (its YAML and its checks' source)."""
        h = hashlib.sha256()
        for path in sorted([*CONTROLS_DIR.glob("*.yaml"), *CHECKS_DIR.glob("*.py")]):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        return h.hexdigest()


def check_functions(directory: Path = CHECKS_DIR) -> set[str]:
    """Every `test_*` function in the check files, as `file::function` (parsed, not imported)."""
    found: set[str] = set()
    for path in sorted(directory.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                found.add(f"{path.name}::{node.name}")
    return found


def load(controls_dir: Path = CONTROLS_DIR, checks_dir: Path = CHECKS_DIR) -> Catalog:
    """The catalog from its YAML files; every check must exist and every check must serve a control."""
    controls: list[Control] = []
    for path in sorted(controls_dir.glob("controls-*.yaml")):
        controls.extend(load_model(path, ControlFile).controls)
    cis = load_model(controls_dir / "cis-debian12-l1.yaml", CisReference)
    catalog = Catalog(controls=controls, cis=cis)
    functions = check_functions(checks_dir)
    missing = sorted(c.check for c in catalog.controls if c.check not in functions)
    if missing:
        raise ValueError(f"the catalog names checks that do not exist: {', '.join(missing)}")
    orphans = sorted(functions - {c.check for c in catalog.controls})
    if orphans:
        raise ValueError(f"checks no control uses: {', '.join(orphans)}")
    return catalog


@cache
def shipped() -> Catalog:
    return load()
