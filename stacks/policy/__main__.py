"""The pack's entry point, run by the Pulumi CLI with this directory on sys.path.

`PolicyPack` starts the analyzer's gRPC server and blocks: tests import `membria_policies` instead.
"""

import importlib

from pulumi_policy import EnforcementLevel, PolicyPack

# A top-level module beside this file (the CLI's sys.path), not `stacks.policy.membria_policies`: the pack can be
# published without the repo. importlib, because type checkers see this file as part of the `stacks` package.
membria_policies = importlib.import_module("membria_policies")

PolicyPack(
    name=membria_policies.PACK_NAME,
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=membria_policies.POLICIES,
    initial_config=membria_policies.INITIAL_CONFIG,
)
