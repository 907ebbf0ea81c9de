"""The DR agent's least-privilege S3 policy, the pure `wanted_*` shapes `dr init` and the DR stack share, and
where each S3 target is (`s3_target_spec`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from appliance.backends import S3Spec, s3_target_spec
from appliance.dr.access import DENIED_ACTIONS, backup_agent_policy, with_principal
from appliance.dr.setup import (
    LIFECYCLE_RULE_ID,
    check_s3_replication,
    wanted_lifecycle,
    wanted_lock,
    wanted_replication,
    wanted_sse,
)
from appliance.errors import BadInput, MissingEnvironment, ServiceError
from appliance.lab.state import LabState
from appliance.site import Dr, Site, load_site
from tests.conftest import REPO

pytestmark = pytest.mark.unit

# Every S3 call the agent's code makes (appliance/dr outside `dr init`), and the IAM action it needs.
AGENT_CALLS = {
    "put_object": {"s3:PutObject", "s3:PutObjectRetention"},  # every put carries the lock headers
    "get_object": {"s3:GetObject"},
    "head_object": {"s3:GetObject"},
    'get_paginator("list_objects_v2")': {"s3:ListBucket"},
    "get_bucket_encryption": {"s3:GetEncryptionConfiguration"},  # `dr.sse: auto`
}
# ClickHouse's BACKUP/RESTORE with the same keys (measured under moto IAM, stacks/DESIGN.md §8 risk 8).
CLICKHOUSE = {"s3:PutObject", "s3:GetObject", "s3:ListBucket", "s3:DeleteObject", "s3:AbortMultipartUpload"}


def site(name: str) -> Site:
    return load_site(REPO / "examples" / f"{name}.yaml")


def statements(policy: dict[str, Any], effect: str) -> list[dict[str, Any]]:
    return [s for s in policy["Statement"] if s["Effect"] == effect]


def allowed(policy: dict[str, Any], resource: str) -> set[str]:
    return {a for s in statements(policy, "Allow") if resource in s["Resource"] for a in s["Action"]}


def test_the_agent_may_write_and_read_under_the_prefix_only() -> None:
    policy = backup_agent_policy(Dr.model_validate({"prefix": "acme"}), "dr-bucket")
    resources = {r for s in statements(policy, "Allow") for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::dr-bucket", "arn:aws:s3:::dr-bucket/acme/*"}
    objects = allowed(policy, "arn:aws:s3:::dr-bucket/acme/*")
    bucket = allowed(policy, "arn:aws:s3:::dr-bucket")
    for call, actions in AGENT_CALLS.items():
        assert actions <= objects | bucket, f"{call} needs {actions - objects - bucket}"
    assert CLICKHOUSE <= objects | bucket
    assert "s3:ListBucket" in bucket and "s3:PutObject" in objects and "s3:PutObject" not in bucket
    assert not any("*" in action for s in policy["Statement"] for action in s["Action"])


def test_what_would_undo_the_lock_is_denied_and_never_allowed() -> None:
    policy = backup_agent_policy(Dr(), "dr-bucket")
    (deny,) = statements(policy, "Deny")
    assert set(deny["Action"]) == {
        "s3:BypassGovernanceRetention",
        "s3:DeleteObjectVersion",
        "s3:PutBucketObjectLockConfiguration",
        "s3:PutLifecycleConfiguration",
        "s3:PutBucketPolicy",
        "s3:DeleteBucket",
    }
    assert set(deny["Resource"]) == {"arn:aws:s3:::dr-bucket", "arn:aws:s3:::dr-bucket/*"}
    granted = {a for s in statements(policy, "Allow") for a in s["Action"]}
    assert not granted & set(DENIED_ACTIONS)
    assert "s3:DeleteObject" in granted  # only a delete marker in a versioned, locked bucket


def test_the_agent_code_makes_no_s3_call_the_policy_does_not_cover() -> None:
    """A new boto3 call in the agent's code must come with its action here (and in the policy)."""
    agent_code = [p for p in (REPO / "appliance" / "dr").rglob("*.py") if p.name != "setup.py"]
    calls: set[str] = set()
    for path in agent_code:  # S3 clients are always reached as `<target>.client` there
        calls |= set(re.findall(r"\.client\.(get_paginator\(\"\w+\"\)|\w+(?=\())", path.read_text()))
    s3_calls = calls - {"query", "command", "close"}  # `place.client` would be a database client
    assert s3_calls, "the scan found nothing: the pattern is broken"
    assert s3_calls <= set(AGENT_CALLS), f"not in AGENT_CALLS: {s3_calls - set(AGENT_CALLS)}"


def test_as_a_bucket_policy_each_statement_names_the_agent() -> None:
    policy = with_principal(backup_agent_policy(Dr(), "b1"), "arn:aws:iam::1:user/membria-dr")
    assert [s["Principal"] for s in policy["Statement"]] == [{"AWS": ["arn:aws:iam::1:user/membria-dr"]}] * 3
    assert "Principal" not in backup_agent_policy(Dr(), "b1")["Statement"][0]


def test_wanted_shapes_follow_the_site() -> None:
    dr = Dr.model_validate(
        {"object_lock": {"mode": "compliance", "days": 365}, "prefix": "acme", "noncurrent_version_days": 7}
    )
    assert wanted_lock(dr) == {
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 365}},
    }
    assert wanted_lifecycle(dr) == {
        "ID": LIFECYCLE_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": "acme/"},
        "NoncurrentVersionExpiration": {"NoncurrentDays": 7},
    }
    assert wanted_sse(dr) == {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}
    assert wanted_sse(Dr.model_validate({"sse": "off"})) is None
    rule = wanted_replication(dr, role_arn="arn:role", destination_arn="arn:aws:s3:::r")["Rules"][0]
    assert rule["Filter"] == {"Prefix": "acme/"} and rule["Destination"] == {"Bucket": "arn:aws:s3:::r"}
    assert rule["DeleteMarkerReplication"] == {"Status": "Disabled"}


def test_target_specs_of_the_lab_and_the_rack(tmp_path: Path) -> None:
    lab = site("lab")
    state = LabState(tmp_path)
    assert s3_target_spec(lab, "replica", state) == S3Spec(
        "http://127.0.0.1:9000", "us-east-1", "membria-dr-replica", "membria/s3-replica", "secret", "replica"
    )
    rack = site("rack")
    assert s3_target_spec(rack, "replica", None) == S3Spec(
        "https://s3.dr-site.acme.example",
        "eu-central-1",
        "membria-dr-replica",
        "membria/s3-replica",
        "secret",
        "replica",
    )
    with pytest.raises(MissingEnvironment, match="no lab state"):
        s3_target_spec(lab, "primary", None)
    services = rack.services.model_copy(update={"s3": rack.services.s3.model_copy(update={"replica": None})})
    single = rack.model_copy(update={"services": services})
    with pytest.raises(ServiceError, match="no S3 replica target"):
        s3_target_spec(single, "replica", None)


def test_s3_replication_needs_one_endpoint() -> None:
    a = S3Spec("https://s3.a", "us-east-1", "b1", "p", "secret", "primary")
    check_s3_replication(a, S3Spec("https://s3.a", "us-east-1", "b2", "p", "secret", "replica"))
    with pytest.raises(BadInput, match="different S3 services"):
        check_s3_replication(a, S3Spec("https://s3.b", "us-east-1", "b2", "p", "secret", "replica"))
    with pytest.raises(BadInput, match="needs a replica"):
        check_s3_replication(a, None)
