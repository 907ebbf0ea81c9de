"""The lab's DR shipper: `appliance dr ship` as a supervised lab process, as the `dr_agent` role runs it
under systemd on a core node."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from appliance.lab.services import EmbeddedService, Health
from appliance.lab.state import LabState
from appliance.site import Site
from runtime.common import atomic


class DrShipper(EmbeddedService):
    name = "dr-shipper"
    start_timeout = 90.0  # the first pass ships everything there is

    @property
    def port(self) -> int:
        return 0  # no listener

    @property
    def endpoint(self) -> str:
        return f"every {self.site.dr.ship_interval_seconds} s"

    def port_taken(self) -> bool:
        return False

    @property
    def site_file(self) -> Path:
        return self.state.root / "config" / "dr-shipper-site.json"

    @property
    def heartbeat_file(self) -> Path:
        from appliance.backends import Backends
        from appliance.dr.status import heartbeat_path

        return heartbeat_path(Backends(self.site, self.state))

    def prepare(self) -> None:
        # The process reads the site as the lab has it (JSON is YAML), so it never depends on the caller's file.
        atomic.write_text(self.site_file, json.dumps(self.site.model_dump(mode="json"), indent=1))

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "appliance",
            "dr",
            "ship",
            "--site",
            str(self.site_file),
            "--state-dir",
            str(self.state.root),
        ]

    def check(self) -> Health:
        try:
            beats = json.loads(self.heartbeat_file.read_text())
        except (OSError, ValueError):
            beats = None
        return heartbeat_health(self.name, self.endpoint, beats, self.site.dr.ship_interval_seconds)


def heartbeat_health(name: str, endpoint: str, beats: dict[str, Any] | None, interval_s: float) -> Health:
    """Every shipped store had a pass without error within three intervals (the shipper's heartbeat file)."""
    from appliance.dr.stores import SHIPPED

    if not beats:
        return Health(name, False, "no pass finished yet", endpoint)
    stale = 3 * interval_s + 30
    problems = []
    for store in SHIPPED:
        beat = beats.get(store) or {}
        if beat.get("error"):
            problems.append(f"{store}: {beat['error']}")
        elif time.time() - float(beat.get("checked_at", 0)) > stale:
            problems.append(f"{store}: no pass for over {stale:.0f} s")
    if problems:
        return Health(name, False, "; ".join(problems), endpoint)
    return Health(name, True, "shipping " + ", ".join(SHIPPED), endpoint)


def dr_services(site: Site, state: LabState) -> list[EmbeddedService]:
    """The lab's shipper process; with `lab.core: host` the core node's `dr_agent` timer ships instead."""
    return [DrShipper(site, state)] if site.lab.dr_shipper and site.lab.core == "processes" else []
