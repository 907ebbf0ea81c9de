"""What every stack reads from its Pulumi config (namespace `membria`), as plain values.

Paths are made absolute against the project directory the CLI runs the program in: a site file's relative
paths resolve against `workdir` (the checkout, normally `../..`), and the dynamic providers run in another
process, so nothing may depend on the cwd there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi

from appliance.site import Site, load_site


@dataclass(frozen=True)
class StackSettings:
    site_file: Path
    workdir: Path
    state_dir: Path | None  # None: the site's own `lab.state_dir`

    @classmethod
    def from_config(cls, config: pulumi.Config | None = None, project_dir: Path | None = None) -> StackSettings:
        config = config or pulumi.Config("membria")
        base = (project_dir or Path.cwd()).resolve()
        workdir = (base / (config.get("workdir") or "../..")).resolve()
        state = config.get("stateDir")
        return cls(
            site_file=(workdir / config.require("siteFile")).resolve(),
            workdir=workdir,
            state_dir=(workdir / state).resolve() if state else None,
        )

    def load_site(self) -> Site:
        return load_site(self.site_file)

    def resolved_state_dir(self, site: Site) -> Path:
        return self.state_dir or (self.workdir / site.lab.state_dir).resolve()
