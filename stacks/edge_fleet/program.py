"""The edge fleet's graph: an EdgeImage per profile, whose content hash makes `pulumi preview` show a rebuild
whenever the profile, the model, the image recipe or the agent's code changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulumi

from appliance.edge import spec as edge_spec
from appliance.errors import BadInput
from appliance.iac.edge_image import edge_image_hash
from appliance.site import Site
from stacks.components.config import StackSettings
from stacks.components.edge_image import EdgeImage, EdgeImageArgs


def build(
    settings: StackSettings, site: Site, *, profiles: list[str] | None = None, output_root: Path
) -> dict[str, pulumi.Output[Any]]:
    """One EdgeImage per profile (default: every edge profile of the site); exports {profile: sha256} and paths."""
    names = profiles if profiles is not None else [p.name for p in site.edge_profiles]
    state_dir = settings.resolved_state_dir(site)
    images: dict[str, EdgeImage] = {}
    previous: EdgeImage | None = None
    for name in names:
        edge_spec.profile(site, name)  # an unknown profile fails the program, with the site's profile names
        args = EdgeImageArgs(
            site_file=str(settings.site_file),
            workdir=str(settings.workdir),
            profile=name,
            output_root=str(output_root),
            state_dir=str(state_dir),
            content_hash=edge_image_hash(site, name, workdir=settings.workdir),
        )
        # One build at a time: each takes both cores and gigabytes of work tree, the portable llama.cpp wheel is
        # compiled once into an unlocked cache, and the provider host's chdir is process-wide.
        opts = pulumi.ResourceOptions(depends_on=[previous] if previous else None)
        images[name] = previous = EdgeImage(f"image-{name}", args, opts)
    exports = {"sha256": "sha256", "image_paths": "image_path", "versions": "version"}  # export: output
    return {
        export: pulumi.Output.from_input({name: getattr(image, output) for name, image in images.items()})
        for export, output in exports.items()
    }


def parse_profiles(raw: str | None) -> list[str] | None:
    """`membria:profiles` as a YAML list (its JSON text here) or `a,b`; unset means every profile."""
    if not raw:
        return None
    value = json.loads(raw) if raw.lstrip().startswith("[") else raw.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInput(f"membria:profiles must be a list of profile names, not {raw!r}")
    return [v.strip() for v in value if v.strip()]


def main() -> None:
    config = pulumi.Config("membria")
    settings = StackSettings.from_config(config)
    output_root = (settings.workdir / config.require("outputRoot")).resolve()
    exports = build(
        settings, settings.load_site(), profiles=parse_profiles(config.get("profiles")), output_root=output_root
    )
    for key, value in exports.items():
        pulumi.export(key, value)
