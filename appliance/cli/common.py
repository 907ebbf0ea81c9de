"""Options and loaders shared by the commands that work on a site."""

from __future__ import annotations

from pathlib import Path

import typer

from appliance.lab.state import LabState
from appliance.site import Site

SiteOption = typer.Option(
    Path("examples/lab.yaml"),
    "--site",
    "-s",
    envvar="MEMBRIA_SITE",
    help="The site file (YAML). Env: MEMBRIA_SITE.",
    show_default=True,
)
StateDirOption = typer.Option(
    None,
    "--state-dir",
    envvar="MEMBRIA_STATE_DIR",
    help="Where the lab keeps logs, pid files and data (default: the site's lab.state_dir). Env: MEMBRIA_STATE_DIR.",
)


def load(site_file: Path) -> Site:
    from appliance.site import load_site

    return load_site(site_file)


def lab_state(site: Site, state_dir: Path | None) -> LabState:
    return LabState.at(state_dir or site.lab.state_dir)
