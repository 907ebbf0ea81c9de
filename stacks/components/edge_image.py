"""EdgeImage: one signed edge image per profile, as a dynamic resource (stacks/DESIGN.md §2).

The provider has no attributes: dill pickles it by reference into the `__provider` input, so the pickle holds no
client and no token, and the provider host imports this module from the installed `stacks` package. All the logic
is in `appliance.iac.edge_image`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    ResourceProvider,
    UpdateResult,
)

from appliance.iac import edge_image

TYPE = "pulumi-python:dynamic/membria:EdgeImage"
OUTPUTS = ("sha256", "image_path", "manifest_sha256", "version", "built_at", "build_seconds")


class EdgeImageProvider(ResourceProvider):
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        return CheckResult(news, [CheckFailure(prop, reason) for prop, reason in edge_image.check(news)])

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        found = edge_image.diff(olds, news)
        return DiffResult(changes=found.changes, replaces=found.replaces, delete_before_replace=False)

    def create(self, props: dict[str, Any]) -> CreateResult:
        outs = edge_image.build_or_adopt(props)
        return CreateResult(edge_image.resource_id(outs), outs)

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(edge_image.build_or_adopt(news))

    def delete(self, _id: str, _props: dict[str, Any]) -> None:
        """Nothing: the image directory stays (images are evidence, audits read them)."""

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        return ReadResult(id_, props)  # `pulumi refresh` changes nothing (read is not functional for dynamic)


@dataclass(frozen=True)
class EdgeImageArgs:
    """Plain absolute paths (the provider host runs in another directory) and the program-time content hash."""

    site_file: str
    workdir: str
    profile: str
    output_root: str
    state_dir: str
    content_hash: str


class EdgeImage(pulumi.dynamic.Resource, module="membria", name="EdgeImage"):
    sha256: pulumi.Output[str]
    image_path: pulumi.Output[str]
    manifest_sha256: pulumi.Output[str]
    version: pulumi.Output[str]
    built_at: pulumi.Output[str]
    build_seconds: pulumi.Output[float | None]

    def __init__(self, name: str, args: EdgeImageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        # A cold build takes 20-25 min on 2 cores; the engine's default would give up first.
        timeouts = pulumi.ResourceOptions(custom_timeouts=pulumi.CustomTimeouts(create="120m", update="120m"))
        props: dict[str, Any] = {**asdict(args), **dict.fromkeys(OUTPUTS)}  # None: declared, so set as attributes
        super().__init__(EdgeImageProvider(), name, props, pulumi.ResourceOptions.merge(timeouts, opts))
