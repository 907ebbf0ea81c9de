"""The shipped catalog and its CIS reference list: the catalog loads, every CIS reference of a control is an
automated Level 1 recommendation of the list, the list is well formed, and every core control of sections 1-3
and 7 has a known-bad state in tests/audit_breaks_system.py (the hosts tier applies them)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from appliance.audit import catalog
from tests.audit_breaks_system import BREAKS

pytestmark = pytest.mark.unit

SYSTEM_SECTIONS = {"1", "2", "3", "7"}


@pytest.fixture(scope="module")
def shipped() -> catalog.Catalog:
    return catalog.load()


def _section(control: catalog.Control) -> str | None:
    refs = control.refs(catalog.CIS)
    return refs[0].split(".", 1)[0] if refs else None


def test_the_shipped_catalog_loads(shipped: catalog.Catalog) -> None:
    assert shipped.controls
    assert shipped.control("CIS-7.1.1").check == "test_cis_files.py::test_etc_passwd_permissions"


def test_every_cis_reference_is_in_the_reference_list(shipped: catalog.Catalog) -> None:
    known = {r.id for r in shipped.cis.recommendations}
    unknown = sorted({ref for c in shipped.controls for ref in c.refs(catalog.CIS)} - known)
    assert not unknown


def test_the_reference_list_is_well_formed(shipped: catalog.Catalog) -> None:
    ids = [r.id for r in shipped.cis.recommendations]
    assert not [i for i, n in Counter(ids).items() if n > 1], "duplicate recommendation ids"
    assert all(re.fullmatch(r"[1-7](\.[0-9]+){1,4}", i) for i in ids), "a recommendation id that is not numeric"
    assert all(r.title.strip() for r in shipped.cis.recommendations)
    assert 200 <= len(ids) <= 260  # about 230 automated Level 1 - Server recommendations
    # Level 2 only and Manual recommendations are not in the denominator.
    for excluded in ("1.1.1.6", "1.1.1.10", "1.2.1.1", "2.1.22", "3.1.1", "3.2.1", "5.1.8", "5.2.4", "7.1.13"):
        assert excluded not in ids, excluded


def test_control_ids_follow_their_cis_reference(shipped: catalog.Catalog) -> None:
    for control in shipped.controls:
        if control.id.startswith("CIS-"):
            assert control.refs(catalog.CIS) == [control.id.removeprefix("CIS-")], control.id


def test_every_break_names_a_control(shipped: catalog.Catalog) -> None:
    known = {c.id for c in shipped.controls}
    assert not sorted(set(BREAKS) - known)
    assert all(command.strip() for command in BREAKS.values())


def test_every_system_core_control_has_a_break(shipped: catalog.Catalog) -> None:
    system = [c.id for c in shipped.for_kind("core") if c.id.startswith("CIS-") and _section(c) in SYSTEM_SECTIONS]
    assert len(system) >= 35
    assert not sorted(set(system) - set(BREAKS))


def test_system_breaks_keep_ssh_alone() -> None:
    for control, command in BREAKS.items():
        for forbidden in ("sshd", "/etc/ssh", "pam.d", "authorized_keys", "/root/.ssh", "passwd -l root"):
            assert forbidden not in command, f"{control}: {forbidden}"
