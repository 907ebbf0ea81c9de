"""CoreNode: one core node provisioned by the roles, as a Pulumi dynamic resource (stacks/DESIGN.md §2).

The provider only translates between Pulumi's types and `appliance.iac.core_node`, where the logic lives. It has
no attributes: dill pickles it by reference into the `__provider` input, so the state holds no client and no
token (and `stacks` must be installed where the provider host runs, which `pip install -e .` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

from appliance.iac import core_node


class CoreNodeProvider(ResourceProvider):
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = [CheckFailure(prop, reason) for prop, reason in core_node.check(news)]
        return CheckResult(news, failures)

    def create(self, props: dict[str, Any]) -> CreateResult:
        return CreateResult(core_node.resource_id(props), core_node.apply(props))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(core_node.apply(news))

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changes, replaces = core_node.diff(olds, news)
        return DiffResult(changes=changes, replaces=replaces)

    def delete(self, _id: str, _props: dict[str, Any]) -> None:
        """Nothing: `pulumi destroy` never deprovisions a rack node (its AppRole belongs to VaultPki)."""

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """Nothing read back (read is not functional for dynamic providers): `pulumi refresh` changes nothing."""
        return ReadResult(id_, props)


@dataclass
class CoreNodeArgs:
    site_file: pulumi.Input[str]  # absolute
    workdir: pulumi.Input[str]  # absolute: the site file's relative paths resolve against it
    node: pulumi.Input[str]
    state_dir: pulumi.Input[str]  # absolute
    content_hash: pulumi.Input[str]  # appliance.iac.content_hash.core_node_hash at program time
    vars_file: pulumi.Input[str] | None = None
    bundle: pulumi.Input[str] | None = None
    tags: pulumi.Input[list[str]] | None = None


class CoreNode(Resource, module="membria", name="CoreNode"):
    recap: pulumi.Output[dict[str, int]]
    changes: pulumi.Output[int]
    events_path: pulumi.Output[str]

    def __init__(self, name: str, args: CoreNodeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        # The outputs as None inputs: Pulumi makes an attribute of every property it is given. vars(), not
        # asdict(): asdict deep-copies, and an Output must stay the same object.
        outputs = {"recap": None, "changes": None, "events_path": None}
        super().__init__(CoreNodeProvider(), name, {**vars(args), **outputs}, opts)
