"""The CIS section 4-6 controls and their known-bad states (tests/audit_breaks_access.py) match the catalog."""

from __future__ import annotations

import pytest

from appliance.audit import catalog
from tests.audit_breaks_access import BREAKS

pytestmark = pytest.mark.unit

SECTIONS = ("4.", "5.", "6.")


def _access_controls() -> list[catalog.Control]:
    return [
        control
        for control in catalog.load().for_kind("core")
        if any(ref.startswith(SECTIONS) for ref in control.refs(catalog.CIS))
    ]


def test_every_break_names_a_control() -> None:
    known = {control.id for control in catalog.load().controls}
    unknown = sorted(set(BREAKS) - known)
    assert not unknown, f"breaks for controls the catalog does not have: {unknown}"


def test_every_section_4_to_6_core_control_has_a_break() -> None:
    missing = sorted(control.id for control in _access_controls() if control.id not in BREAKS)
    assert not missing, f"core controls of CIS sections 4-6 without a known-bad state: {missing}"


def test_breaks_are_commands() -> None:
    empty = sorted(control_id for control_id, command in BREAKS.items() if not command.strip())
    assert not empty, f"empty break commands: {empty}"
    assert len(_access_controls()) >= 35
