"""Waivers: an accepted failure, with who accepted it, why, and until when.

A waiver turns a failing (or erroring) result of its control into `waived` until its expiry date; after
that it waives nothing and the report lists it as expired. `hosts` narrows it to named targets.
A malformed file is bad input (exit 2) with the file, the YAML path and the line.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.audit.catalog import CONTROL_ID, Catalog
from runtime.common.yamldoc import FileIssue, InvalidFile, load_model


class Waiver(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, str_strip_whitespace=True)

    control: str = Field(pattern=CONTROL_ID, description="the control id, e.g. CIS-5.1.20 or MEM-EDGE-LUKS2")
    justification: str = Field(min_length=10, description="why the failure is accepted")
    approver: str = Field(min_length=1, description="who accepted it (name or e-mail)")
    expires: date = Field(description="the last day it waives (YYYY-MM-DD)")
    hosts: list[str] = Field(default_factory=list, description="targets it covers; empty = every target")

    @field_validator("expires", mode="before")
    @classmethod
    def _iso_date(cls, value: object) -> object:
        # YAML gives a date for 2027-01-31 and a string for "2027-01-31"; both mean the same day.
        if isinstance(value, str):
            try:
                return date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"not a date (YYYY-MM-DD): {value!r}") from None
        return value

    def active(self, today: date) -> bool:
        return today <= self.expires

    def covers(self, control: str, target: str) -> bool:
        return self.control == control and (not self.hosts or target in self.hosts)


class WaiverFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    waivers: list[Waiver] = Field(default_factory=list)


def load(path: Path, catalog: Catalog) -> list[Waiver]:
    """The waivers in `path`; an unknown control id is an error too (a typo must not waive nothing quietly)."""
    waivers = load_model(path, WaiverFile).waivers
    known = {c.id for c in catalog.controls}
    issues = [
        FileIssue(f"waivers[{i}].control", None, f"no control {w.control} in the catalog")
        for i, w in enumerate(waivers)
        if w.control not in known
    ]
    if issues:
        raise InvalidFile(path, issues)
    return waivers


def find(waivers: list[Waiver], control: str, target: str, today: date) -> Waiver | None:
    for waiver in waivers:
        if waiver.covers(control, target) and waiver.active(today):
            return waiver
    return None
