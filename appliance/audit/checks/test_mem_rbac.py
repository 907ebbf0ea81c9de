"""MEM-RBAC-DENY: the RBAC policy the node's gateway enforces denies by default.

The policy is the file the gateway's own configuration names, read from the node and validated with the runtime's
model (`runtime.common.rbac`, what the gateway loads at start). Default-deny is then tried, not assumed: identities
no binding names (a user, a device and a service with a fresh CN, without an OU and with an OU the site does not
have) ask for every action, on no department and on each department: the runtime's `decide` must refuse every
one. A binding that matches a whole kind with a role reaching departments regardless of the caller's OU (or a
non-department action such as audit_read) is what makes this fail. The file must also be root's and not writable
by the gateway's user.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, get_args

from appliance.audit.checks import membria_support as mem
from appliance.audit.targets import TargetSpec
from runtime.common.identity import Identity, Kind
from runtime.common.rbac import ACTIONS, Policy, decide, load_policy
from runtime.common.yamldoc import InvalidFile


def _probes(policy: Policy) -> list[Identity]:
    unknown_ou = f"audit-probe-ou-{secrets.token_hex(3)}"
    while unknown_ou in policy.departments:  # pragma: no cover - a random name the site happens to use
        unknown_ou = f"audit-probe-ou-{secrets.token_hex(3)}"
    return [
        Identity(subject=f"membria-audit-probe-{secrets.token_hex(4)}", kind=kind, departments=ous, auth="mtls")
        for kind in get_args(Kind)
        for ous in ((), (unknown_ou,))
    ]


def test_rbac_policy_denies_by_default(host: Any, target: TargetSpec, evidence: Any) -> None:
    config_path, config = mem.gateway_config(host, target)
    policy_path = str(config.get("rbac_policy") or "")
    assert policy_path, f"{config_path} names no rbac_policy"
    text = mem.read_text(host, policy_path)
    assert text is not None, f"the gateway's RBAC policy {policy_path} (from {config_path}) is missing"
    with tempfile.TemporaryDirectory(prefix="membria-audit-rbac-") as tmp:
        copy = Path(tmp) / PurePosixPath(policy_path).name
        copy.write_text(text)
        try:
            policy = load_policy(copy)
        except InvalidFile as exc:
            raise AssertionError(
                f"{policy_path} is not a valid policy: {exc.message.replace(str(copy), policy_path)}"
            ) from None
    allowed: list[str] = []
    tried = 0
    for probe in _probes(policy):
        for action in ACTIONS:
            for departments in ((), *((d,) for d in policy.departments)):
                tried += 1
                decision = decide(policy, probe, action, departments)
                if decision.allowed:
                    who = f"a {probe.kind} no binding names" + (
                        f" (OU {probe.departments[0]})" if probe.departments else ""
                    )
                    on = f" on {departments[0]}" if departments else ""
                    allowed.append(f"{who} may {action}{on} through role {decision.role}")
    f = host.file(policy_path)
    owner, mode = f.user, f.mode
    evidence.add(
        f"runtime.common.rbac.decide over {policy_path}: identities no binding names, every action",
        json.dumps(
            {
                "departments": policy.departments,
                "roles": [r.name for r in policy.roles],
                "decisions_tried": tried,
                "allowed": sorted(set(allowed)),
            },
            indent=1,
        ),
        0,
    )
    problems = [f"{policy_path} does not deny by default: " + "; ".join(sorted(set(allowed)))] if allowed else []
    if owner != "root" or mode & 0o022:
        problems.append(f"{policy_path} is {owner}'s with mode {mode:04o}: only root may change the policy")
    assert not problems, "; ".join(problems)
