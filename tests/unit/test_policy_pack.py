"""The CrossGuard pack (stacks/policy): every rule passes a good resource and fails a bad one, directly through
`validate()` and once through the pack's own analyzer servicer (the engine's protobuf deserialisation), and its
default bounds are the appliance's own. `PolicyPack` is never constructed: it starts a gRPC server and blocks."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from pulumi.runtime.proto import analyzer_pb2
from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    StackValidationArgs,
)
from pulumi_policy.policy import _NotApplicableError, _PolicyAnalyzerServicer

from stacks.policy import membria_policies as mp

pytestmark = pytest.mark.unit

PACK_DIR = Path(mp.__file__).parent
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"  # the engine's unknown-string sentinel at preview
SECRET_SIG = {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270"}

BUCKET = "aws:s3/bucket:Bucket"
VERSIONING = "aws:s3/bucketVersioning:BucketVersioning"
LOCK = "aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration"
SSE = "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
PAB = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
ACL = "aws:s3/bucketAcl:BucketAcl"
POLICY = "aws:s3/bucketPolicy:BucketPolicy"


def urn(type_: str, name: str) -> str:
    return f"urn:pulumi:lab::membria-dr::membria:dr:DrBuckets${type_}::{name}"


def _opts() -> PolicyResourceOptions:
    return PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])


def check(policy: Any, type_: str, props: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> list[str]:
    """The messages `policy` reports for one resource, through its public `validate`."""
    reported: list[str] = []
    args = ResourceValidationArgs(type_, props, urn(type_, "r"), "r", _opts(), None, config)
    policy.validate(args, lambda message, _urn=None: reported.append(message))
    return reported


# -- the S3 bucket set a DR target declares ------------------------------------------------------------------------

# Spelled out, not mp.PUBLIC_ACCESS_FLAGS: a flag dropped from the pack must fail a test.
ACCESS_FLAGS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
FULL_ACCESS_BLOCK = dict.fromkeys(ACCESS_FLAGS, True)


def bucket_set(name: str = "dr-primary", *, skip: str | None = None) -> list[tuple[str, dict[str, Any], str]]:
    """(type, props, urn) for a bucket and its configuration resources, `skip` left out. The children's `bucket`
    input is unknown (preview): only their property dependencies name the bucket."""
    resources = [
        (BUCKET, {"bucket": name, "objectLockEnabled": True}, urn(BUCKET, name)),
        (VERSIONING, {"bucket": UNKNOWN, "versioningConfiguration": {"status": "Enabled"}}, urn(VERSIONING, name)),
        (LOCK, {"bucket": UNKNOWN, "rule": {"defaultRetention": {"mode": "GOVERNANCE", "days": 30}}}, urn(LOCK, name)),
        (
            SSE,
            {"bucket": UNKNOWN, "rules": [{"applyServerSideEncryptionByDefault": {"sseAlgorithm": "AES256"}}]},
            urn(SSE, name),
        ),
        (PAB, {"bucket": UNKNOWN, **FULL_ACCESS_BLOCK}, urn(PAB, name)),
    ]
    return [r for r in resources if r[0] != skip]


def as_policy_resources(
    resources: Sequence[tuple[str, Mapping[str, Any], str]], bucket_urn: str | None = None
) -> list[PolicyResource]:
    """What the analyzer builds for AnalyzeStack: children depend on `bucket_urn` through their `bucket` input."""
    built = [
        PolicyResource(type_, props, u, u.rsplit("::", 1)[1], _opts(), None, None, [], {})
        for type_, props, u in resources
    ]
    by_urn = {r.urn: r for r in built}
    for resource in built:
        if resource.resource_type != BUCKET and bucket_urn in by_urn:
            resource.property_dependencies["bucket"] = [by_urn[bucket_urn]]
    return built


def check_stack(resources: list[PolicyResource], config: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    reported: list[tuple[str, str]] = []
    mp.S3_BUCKET_COMPLETE.validate(
        StackValidationArgs(resources, config), lambda message, u=None: reported.append((message, u or ""))
    )
    return reported


# -- s3-bucket-object-lock -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", sorted(mp.BUCKET))
def test_object_lock_passes_a_locked_bucket(type_: str) -> None:
    assert check(mp.S3_BUCKET_OBJECT_LOCK, type_, {"bucket": "b", "objectLockEnabled": True}) == []


@pytest.mark.parametrize("props", [{"bucket": "b"}, {"bucket": "b", "objectLockEnabled": False}])
@pytest.mark.parametrize("type_", sorted(mp.BUCKET))  # the deprecated BucketV2 alias is checked too
def test_object_lock_fails_a_bucket_without_it(type_: str, props: dict[str, Any]) -> None:
    assert check(mp.S3_BUCKET_OBJECT_LOCK, type_, props) == [
        "the bucket must be created with objectLockEnabled=true (it cannot be turned on later)"
    ]


# -- s3-versioning-enabled -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", sorted(mp.VERSIONING))
def test_versioning_passes_enabled(type_: str) -> None:
    assert check(mp.S3_VERSIONING_ENABLED, type_, {"versioningConfiguration": {"status": "Enabled"}}) == []


@pytest.mark.parametrize("config", [{"status": "Suspended"}, {"status": "Disabled"}, {}])
@pytest.mark.parametrize("type_", sorted(mp.VERSIONING))
def test_versioning_fails_anything_else(type_: str, config: dict[str, str]) -> None:
    reported = check(mp.S3_VERSIONING_ENABLED, type_, {"versioningConfiguration": config})
    assert reported == [f"versioningConfiguration.status is {config.get('status')!r}; object lock needs 'Enabled'"]


# -- s3-object-lock-retention --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "retention",
    [{"mode": "GOVERNANCE", "days": 1}, {"mode": "COMPLIANCE", "days": 36500}, {"mode": "GOVERNANCE", "days": 30.0}],
)
@pytest.mark.parametrize("type_", sorted(mp.LOCK_CONFIGURATION))
def test_retention_passes_a_bounded_default(type_: str, retention: dict[str, Any]) -> None:
    assert check(mp.S3_OBJECT_LOCK_RETENTION, type_, {"rule": {"defaultRetention": retention}}) == []


@pytest.mark.parametrize(
    ("retention", "expected"),
    [
        ({"mode": "OFF", "days": 30}, "defaultRetention.mode is 'OFF'; expected one of GOVERNANCE, COMPLIANCE"),
        ({"mode": "GOVERNANCE", "days": 0}, "defaultRetention.days is 0; expected 1..36500"),
        ({"mode": "GOVERNANCE", "days": 36501}, "defaultRetention.days is 36501; expected 1..36500"),
        ({"mode": "GOVERNANCE", "days": 1.5}, "defaultRetention.days is 1.5; expected 1..36500"),
        ({"mode": "GOVERNANCE", "days": 30, "years": 1}, "defaultRetention.years is set; give the retention in days"),
        ({"mode": "GOVERNANCE", "years": 1}, "defaultRetention.days is None; expected 1..36500"),
    ],
)
def test_retention_fails_out_of_bounds(retention: dict[str, Any], expected: str) -> None:
    assert expected in check(mp.S3_OBJECT_LOCK_RETENTION, LOCK, {"rule": {"defaultRetention": retention}})


def test_retention_fails_a_lock_configuration_without_a_default() -> None:
    assert check(mp.S3_OBJECT_LOCK_RETENTION, LOCK, {"bucket": "b", "objectLockEnabled": "Enabled"}) == [
        "no rule.defaultRetention: objects would be written without a retention"
    ]


# -- s3-encryption -------------------------------------------------------------------------------------------------


def sse(*algorithms: str) -> dict[str, Any]:
    return {"rules": [{"applyServerSideEncryptionByDefault": {"sseAlgorithm": a}} for a in algorithms]}


@pytest.mark.parametrize("type_", sorted(mp.SSE_CONFIGURATION))
@pytest.mark.parametrize("algorithm", ["AES256", "aws:kms"])
def test_encryption_passes_aes_and_kms(type_: str, algorithm: str) -> None:
    assert check(mp.S3_ENCRYPTION, type_, sse(algorithm)) == []


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        (sse("AES256", "none"), ["sseAlgorithm 'none' is not one of AES256, aws:kms"]),
        ({"rules": []}, ["no encryption rule: objects would be stored unencrypted"]),
        ({"rules": [{"bucketKeyEnabled": True}]}, ["sseAlgorithm None is not one of AES256, aws:kms"]),
    ],
)
def test_encryption_fails_other_algorithms(props: dict[str, Any], expected: list[str]) -> None:
    assert check(mp.S3_ENCRYPTION, SSE, props) == expected


def test_encryption_checks_a_buckets_inline_configuration() -> None:
    inline = {
        "serverSideEncryptionConfiguration": {"rule": {"applyServerSideEncryptionByDefault": {"sseAlgorithm": "x"}}}
    }
    assert check(mp.S3_ENCRYPTION, BUCKET, inline) == ["sseAlgorithm 'x' is not one of AES256, aws:kms"]
    assert check(mp.S3_ENCRYPTION, BUCKET, {"objectLockEnabled": True}) == []  # none inline: s3-bucket-complete's job


def test_encryption_allow_client_side_only_waives_without_hiding() -> None:
    # A rule cannot lower its own enforcement level: it stops blocking and names what it waived.
    with pytest.raises(_NotApplicableError) as waived:
        check(mp.S3_ENCRYPTION, SSE, sse("none"), {"allowClientSideOnly": True})
    assert waived.value.reason == "allowClientSideOnly (advisory): sseAlgorithm 'none' is not one of AES256, aws:kms"
    assert check(mp.S3_ENCRYPTION, SSE, sse("AES256"), {"allowClientSideOnly": True}) == []
    assert check(mp.S3_ENCRYPTION, SSE, sse("none"), {"allowClientSideOnly": False}) != []


# -- s3-no-public-access -------------------------------------------------------------------------------------------


def bucket_policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"bucket": "b", "policy": json.dumps({"Version": "2012-10-17", "Statement": list(statements)})}


AGENT = {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:user/agent"}, "Action": "s3:GetObject"}
DENY_ALL = {"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObjectVersion"}


@pytest.mark.parametrize(
    ("type_", "props"),
    [
        (PAB, FULL_ACCESS_BLOCK),
        (BUCKET, {"bucket": "b", "acl": "private"}),
        (BUCKET, {"bucket": "b"}),
        (ACL, {"bucket": "b", "acl": "private"}),
        (
            ACL,
            {
                "accessControlPolicy": {
                    "grants": [{"grantee": {"type": "CanonicalUser", "id": "x"}, "permission": "FULL_CONTROL"}]
                }
            },
        ),
        (POLICY, bucket_policy(AGENT, DENY_ALL)),
        (POLICY, {"bucket": "b", "policy": json.dumps({"Statement": AGENT})}),  # a lone statement object
    ],
)
def test_no_public_access_passes_private_buckets(type_: str, props: dict[str, Any]) -> None:
    assert check(mp.S3_NO_PUBLIC_ACCESS, type_, props) == []


@pytest.mark.parametrize("flag", ACCESS_FLAGS)
def test_no_public_access_needs_all_four_block_flags(flag: str) -> None:
    for value in (False, None):
        props = {**FULL_ACCESS_BLOCK, flag: value}
        assert check(mp.S3_NO_PUBLIC_ACCESS, PAB, props) == [f"the public access block must set {flag} to true"]


@pytest.mark.parametrize("acl", mp.PUBLIC_ACLS)
@pytest.mark.parametrize("type_", [BUCKET, ACL, "aws:s3/bucketAclV2:BucketAclV2"])
def test_no_public_access_fails_public_acls(type_: str, acl: str) -> None:
    assert check(mp.S3_NO_PUBLIC_ACCESS, type_, {"bucket": "b", "acl": acl}) == [
        f"acl {acl!r} makes the bucket readable by others"
    ]


def test_no_public_access_fails_a_grant_to_all_users() -> None:
    uri = "http://acs.amazonaws.com/groups/global/AllUsers"
    props = {"accessControlPolicy": {"grants": [{"grantee": {"type": "Group", "uri": uri}, "permission": "READ"}]}}
    assert check(mp.S3_NO_PUBLIC_ACCESS, ACL, props) == [f"a grant to {uri} makes the bucket readable by others"]


@pytest.mark.parametrize("principal", ["*", {"AWS": "*"}, {"AWS": ["arn:aws:iam::1:root", "*"]}])
def test_no_public_access_fails_an_allow_to_everyone(principal: Any) -> None:
    statement = {"Sid": "Open", "Effect": "Allow", "Principal": principal, "Action": "s3:GetObject"}
    assert check(mp.S3_NO_PUBLIC_ACCESS, POLICY, bucket_policy(AGENT, statement)) == [
        'statement(s) Open Allow Principal "*"'
    ]


def test_no_public_access_fails_a_policy_that_is_not_json() -> None:
    assert check(mp.S3_NO_PUBLIC_ACCESS, POLICY, {"bucket": "b", "policy": "{not json"}) == [
        "the bucket policy is not a JSON object"
    ]


# -- s3-bucket-complete --------------------------------------------------------------------------------------------


def test_bucket_complete_passes_a_full_set_matched_by_property_dependencies() -> None:
    resources = bucket_set()
    assert check_stack(as_policy_resources(resources, resources[0][2])) == []


@pytest.mark.parametrize(
    ("skip", "what"),
    [
        (VERSIONING, "a BucketVersioning"),
        (LOCK, "a BucketObjectLockConfiguration"),
        (SSE, "a BucketServerSideEncryptionConfiguration"),
        (PAB, "a BucketPublicAccessBlock"),
    ],
)
def test_bucket_complete_fails_a_missing_part(skip: str, what: str) -> None:
    resources = bucket_set(skip=skip)
    assert check_stack(as_policy_resources(resources, urn(BUCKET, "dr-primary"))) == [
        (f"bucket dr-primary lacks {what}", urn(BUCKET, "dr-primary"))
    ]


def test_bucket_complete_does_not_count_another_buckets_parts() -> None:
    # The replica's parts depend on the replica: the primary (no parts of its own) fails.
    replica = bucket_set("dr-replica")
    resources = [
        *as_policy_resources(replica, replica[0][2]),
        *as_policy_resources(bucket_set("dr-primary")[:1]),
    ]
    reported = check_stack(resources)
    assert [u for _, u in reported] == [urn(BUCKET, "dr-primary")]


def test_bucket_complete_matches_a_known_literal_bucket_name_without_dependencies() -> None:
    named = [(t, {**p, "bucket": "dr-primary"}, u) for t, p, u in bucket_set()]
    assert check_stack(as_policy_resources(named)) == []
    other = [(t, {**p, "bucket": "elsewhere"} if t != BUCKET else p, u) for t, p, u in bucket_set()]
    assert len(check_stack(as_policy_resources(other))) == 1


def test_bucket_complete_allow_client_side_only_drops_sse() -> None:
    resources = as_policy_resources(bucket_set(skip=SSE), urn(BUCKET, "dr-primary"))
    assert check_stack(resources, {"allowClientSideOnly": True}) == []
    assert check_stack(resources, {"allowClientSideOnly": False}) != []


# -- pki-ttl-bounds ------------------------------------------------------------------------------------------------

ROOT_CERT = "vault:pkiSecret/secretBackendRootCert:SecretBackendRootCert"
SIGN = "vault:pkiSecret/secretBackendRootSignIntermediate:SecretBackendRootSignIntermediate"
ROLE = "vault:pkiSecret/secretBackendRole:SecretBackendRole"
MOUNT = "vault:index/mount:Mount"
APPROLE = "vault:appRole/authBackendRole:AuthBackendRole"
GOOD_APPROLE = {"roleName": "core-1", "tokenMaxTtl": 86400, "secretIdTtl": 3600, "secretIdNumUses": 3}


@pytest.mark.parametrize(
    ("type_", "props"),
    [
        (ROOT_CERT, {"ttl": "87600h"}),
        (SIGN, {"ttl": "43800h"}),
        (SIGN, {"ttl": 3600}),
        (MOUNT, {"path": "pki", "type": "pki", "maxLeaseTtlSeconds": 87600 * 3600}),
        (MOUNT, {"path": "pki_int", "type": "pki", "maxLeaseTtlSeconds": 43800 * 3600}),
        (MOUNT, {"path": "pki", "type": "pki"}),  # unset: the system maximum (768h)
        (MOUNT, {"path": "kv", "type": "kv-v2", "maxLeaseTtlSeconds": 10**10}),  # not a CA
        (ROLE, {"name": "edge-device", "ttl": "168h", "maxTtl": "720h", "serverFlag": False, "clientFlag": True}),
        (ROLE, {"name": "core", "ttl": "24h", "maxTtl": "720h", "serverFlag": True, "clientFlag": True}),
        (ROLE, {"name": "llm", "ttl": "24h", "maxTtl": "72h", "serverFlag": True, "clientFlag": False}),
        (APPROLE, GOOD_APPROLE),
        (APPROLE, {**GOOD_APPROLE, "tokenMaxTtl": "24h", "secretIdTtl": "30m", "secretIdNumUses": 1.0}),
    ],
)
def test_pki_bounds_pass(type_: str, props: dict[str, Any]) -> None:
    assert check(mp.PKI_TTL_BOUNDS, type_, props) == []


@pytest.mark.parametrize(
    ("type_", "props", "expected"),
    [
        (ROOT_CERT, {"ttl": "87601h"}, "root CA ttl '87601h' exceeds 87600h"),
        (ROOT_CERT, {}, "root CA ttl is not set (Vault would use the mount or system maximum)"),
        (SIGN, {"ttl": "43801h"}, "intermediate ttl '43801h' exceeds 43800h"),
        (
            MOUNT,
            {"path": "pki_int", "type": "pki", "maxLeaseTtlSeconds": 43801 * 3600},
            "pki mount 'pki_int' maxLeaseTtlSeconds 157683600 exceeds 43800h",
        ),
        (
            MOUNT,
            {"path": "pki", "type": "pki", "maxLeaseTtlSeconds": 87601 * 3600},
            "pki mount 'pki' maxLeaseTtlSeconds 315363600 exceeds 87600h",
        ),
        (ROLE, {"name": "x", "ttl": "24h", "maxTtl": "721h"}, "role 'x' maxTtl '721h' exceeds 720h"),
        (ROLE, {"name": "x", "ttl": "48h", "maxTtl": "24h"}, "role 'x' ttl '48h' exceeds its maxTtl '24h'"),
        (ROLE, {"name": "x", "ttl": "24h"}, "role 'x' maxTtl is not set (Vault would use the mount or system maximum)"),
        (
            ROLE,
            {"name": "llm", "ttl": "24h", "maxTtl": "96h", "serverFlag": True, "clientFlag": False},
            "server role 'llm' maxTtl '96h' exceeds 72h",
        ),
        (
            ROLE,
            {"name": "x", "ttl": "forever", "maxTtl": "24h"},
            'role \'x\' ttl \'forever\' is not a TTL (expected e.g. "24h", "30m", "86400" or seconds as a number)',
        ),
        (APPROLE, {**GOOD_APPROLE, "tokenMaxTtl": 86401}, "AppRole 'core-1' tokenMaxTtl 86401 exceeds 24h"),
        (APPROLE, {**GOOD_APPROLE, "tokenMaxTtl": 0}, "AppRole 'core-1' tokenMaxTtl is 0 (the system maximum)"),
        (APPROLE, {**GOOD_APPROLE, "secretIdTtl": 3601}, "AppRole 'core-1' secretIdTtl 3601 exceeds 1h"),
        (
            APPROLE,
            {**GOOD_APPROLE, "secretIdTtl": 0},
            "AppRole 'core-1' secretIdTtl is 0: secret ids would never expire",
        ),
        (
            APPROLE,
            {k: v for k, v in GOOD_APPROLE.items() if k != "secretIdNumUses"},
            "AppRole 'core-1' secretIdNumUses is None: a secret id must have a limited number of uses (> 0)",
        ),
        (
            APPROLE,
            {**GOOD_APPROLE, "secretIdNumUses": 0},
            "AppRole 'core-1' secretIdNumUses is 0: a secret id must have a limited number of uses (> 0)",
        ),
    ],
)
def test_pki_bounds_fail(type_: str, props: dict[str, Any], expected: str) -> None:
    assert expected in check(mp.PKI_TTL_BOUNDS, type_, props)


def test_pki_bounds_come_from_the_policy_config() -> None:
    root = {"ttl": "90000h"}
    assert check(mp.PKI_TTL_BOUNDS, ROOT_CERT, root) != []
    assert check(mp.PKI_TTL_BOUNDS, ROOT_CERT, root, {"rootMaxTtl": "100000h"}) == []
    mount = {"path": "ca2", "type": "pki", "maxLeaseTtlSeconds": 50000 * 3600}
    assert check(mp.PKI_TTL_BOUNDS, MOUNT, mount) == []  # not an intermediate path: the root bound
    assert check(mp.PKI_TTL_BOUNDS, MOUNT, mount, {"intermediateMounts": ["ca2"]}) != []
    with pytest.raises(ValueError, match="rootMaxTtl='soon' is not a TTL"):
        check(mp.PKI_TTL_BOUNDS, ROOT_CERT, root, {"rootMaxTtl": "soon"})


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("24h", 86400),
        ("30m", 1800),
        ("45s", 45),
        ("86400", 86400),
        (" 86400 ", 86400),
        (86400, 86400),
        (86400.0, 86400),  # a protobuf number
        ("1h30m", 5400),
        ("7d", 604800),
        (0, 0),
    ],
)
def test_ttl_seconds_parses(value: Any, seconds: int) -> None:
    assert mp.ttl_seconds(value) == seconds


@pytest.mark.parametrize("value", ["forever", "", "24x", "h", "24h!", "-5", True, 1.5, None, ["24h"]])
def test_ttl_seconds_refuses(value: Any) -> None:
    assert mp.ttl_seconds(value) is None


# -- through the pack's own analyzer (the engine's wire format) ----------------------------------------------------


def servicer() -> Any:
    return _PolicyAnalyzerServicer("membria", "0.0.1", mp.POLICIES, mp.EnforcementLevel.MANDATORY)


def analyze(type_: str, props: dict[str, Any], name: str = "b") -> list[Any]:
    request = analyzer_pb2.AnalyzeRequest(type=type_, urn=urn(type_, name), name=name)
    request.properties.update(props)
    return list(servicer().Analyze(request, None).diagnostics)


def test_analyzer_fails_an_unlocked_bucket_and_passes_a_locked_one() -> None:
    failed = analyze(BUCKET, {"bucket": "b", "objectLockEnabled": False, "acl": "public-read"})
    assert sorted((d.policyName, d.enforcementLevel) for d in failed) == [
        ("s3-bucket-object-lock", analyzer_pb2.MANDATORY),
        ("s3-no-public-access", analyzer_pb2.MANDATORY),
    ]
    assert "objectLockEnabled=true" in failed[0].message
    # A secret envelope, as the engine sends a secret input, is unwrapped before the rule sees it.
    locked = {"bucket": "b", "objectLockEnabled": {**SECRET_SIG, "value": True}, "forceDestroy": False}
    assert analyze(BUCKET, locked) == []


def test_analyzer_reads_protobuf_numbers_and_nested_lists() -> None:
    # Struct numbers are doubles (30 -> 30.0); lists arrive as the analyzer's list proxies.
    assert analyze(LOCK, {"rule": {"defaultRetention": {"mode": "COMPLIANCE", "days": 30}}}) == []
    assert [d.policyName for d in analyze(LOCK, {"rule": {"defaultRetention": {"mode": "COMPLIANCE", "days": 0}}})] == [
        "s3-object-lock-retention"
    ]
    assert analyze(SSE, sse("AES256")) == []
    assert [d.policyName for d in analyze(SSE, sse("AES256", "none"))] == ["s3-encryption"]
    assert [d.policyName for d in analyze(APPROLE, {**GOOD_APPROLE, "secretIdNumUses": 0})] == ["pki-ttl-bounds"]
    [long_secret_id] = analyze(APPROLE, {**GOOD_APPROLE, "secretIdTtl": 7200})
    assert long_secret_id.message.endswith("AppRole 'core-1' secretIdTtl 7200 exceeds 1h")  # not 7200.0


def test_analyzer_stack_matches_parts_by_property_dependencies_at_preview() -> None:
    def stack(skip: str | None) -> analyzer_pb2.AnalyzeStackRequest:
        request = analyzer_pb2.AnalyzeStackRequest()
        for type_, props, u in bucket_set(skip=skip):
            resource = request.resources.add(type=type_, urn=u, name=u.rsplit("::", 1)[1])
            resource.properties.update(props)
            if type_ != BUCKET:
                resource.propertyDependencies["bucket"].urns.append(urn(BUCKET, "dr-primary"))
        return request

    assert list(servicer().AnalyzeStack(stack(None), None).diagnostics) == []
    [missing] = servicer().AnalyzeStack(stack(PAB), None).diagnostics
    assert (missing.policyName, missing.urn, missing.enforcementLevel) == (
        "s3-bucket-complete",
        urn(BUCKET, "dr-primary"),
        analyzer_pb2.MANDATORY,
    )
    assert missing.message.endswith("bucket dr-primary lacks a BucketPublicAccessBlock")


def recorded(resources: list[tuple[str, dict[str, Any], str]]) -> list[mp.RecordedResource]:
    bucket = next(u for t, _, u in resources if t == BUCKET)
    return [(t, p, u, u.rsplit("::", 1)[1], {} if t == BUCKET else {"bucket": [bucket]}) for t, p, u in resources]


def test_violations_helper_lists_only_mandatory_findings() -> None:
    assert mp.violations(recorded(bucket_set())) == []
    assert mp.violations(recorded(bucket_set(skip=SSE))) == [
        f"s3-bucket-complete: {urn(BUCKET, 'dr-primary')}: {mp.S3_BUCKET_COMPLETE.description}\n"
        "bucket dr-primary lacks a BucketServerSideEncryptionConfiguration"
    ]
    # The policy config the CLI would send: the stack rule's waiver, or the engine's own enforcement level.
    assert mp.violations(recorded(bucket_set(skip=SSE)), {"s3-bucket-complete": {"allowClientSideOnly": True}}) == []
    bad = [*bucket_set(), (SSE, sse("none"), urn(SSE, "extra"))]
    assert [v.split(":")[0] for v in mp.violations(recorded(bad))] == ["s3-encryption"]
    assert mp.violations(recorded(bad), {"s3-encryption": {"enforcementLevel": "advisory"}}) == []
    advisory = mp.diagnostics(recorded(bad), {"s3-encryption": {"enforcementLevel": "advisory"}})
    assert [(d.policyName, d.enforcementLevel, d.urn) for d in advisory] == [
        ("s3-encryption", analyzer_pb2.ADVISORY, urn(SSE, "extra"))
    ]
    assert mp.violations(recorded(bad), {"s3-encryption": {"allowClientSideOnly": True}}) == []


def test_violations_helper_leaves_preview_unknowns_advisory() -> None:
    unknown_lock = [
        (BUCKET, {"bucket": "b", "objectLockEnabled": "1c4a061d-8072-4f0a-a4cb-0ff528b18fe7"}, "u", "b", {})
    ]
    found = mp.diagnostics(unknown_lock)
    assert any("can't be known during preview" in d.message for d in found)
    assert [v for v in mp.violations(unknown_lock) if "s3-bucket-object-lock" in v] == []


def test_analyzer_info_lists_every_policy_and_its_config() -> None:
    info = _PolicyAnalyzerServicer(
        "membria", "0.0.1", mp.POLICIES, mp.EnforcementLevel.MANDATORY, mp.INITIAL_CONFIG
    ).GetAnalyzerInfo(None, None)
    assert [p.name for p in info.policies] == [
        "s3-bucket-object-lock",
        "s3-versioning-enabled",
        "s3-object-lock-retention",
        "s3-encryption",
        "s3-no-public-access",
        "s3-bucket-complete",
        "pki-ttl-bounds",
    ]
    assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.MANDATORY}
    schemas = {p.name: set(p.configSchema.properties) for p in info.policies if p.configSchema.properties}
    assert schemas == {
        "s3-encryption": {"allowClientSideOnly"},
        "s3-bucket-complete": {"allowClientSideOnly"},
        "pki-ttl-bounds": set(mp.PKI_BOUNDS_DEFAULTS),
    }
    assert info.initialConfig["pki-ttl-bounds"].properties["rootMaxTtl"] == "87600h"


# -- the pack and the appliance agree ------------------------------------------------------------------------------


def test_default_bounds_are_the_appliances_constants() -> None:
    from appliance import pki
    from appliance.core.vault_access import NODE_PKI_ROLES, AppRoleLimits

    roles = [*pki.ROLES.values(), *NODE_PKI_ROLES]
    assert mp.ttl_seconds(mp.ROOT_MAX_TTL) == pki.ttl_seconds(pki.ROOT_TTL)
    assert mp.ttl_seconds(mp.INTERMEDIATE_MAX_TTL) == pki.ttl_seconds(pki.INTERMEDIATE_TTL)
    assert mp.ttl_seconds(mp.ROLE_MAX_TTL) == max(pki.ttl_seconds(r.max_ttl) for r in roles)
    server_only = [r for r in roles if r.server and not r.client]
    assert server_only  # otherwise the server bound pins nothing
    assert mp.ttl_seconds(mp.SERVER_ROLE_MAX_TTL) == max(pki.ttl_seconds(r.max_ttl) for r in server_only)
    limits = AppRoleLimits()
    assert mp.APPROLE_TOKEN_MAX_TTL == pki.ttl_seconds(limits.token_max_ttl)
    assert mp.APPROLE_SECRET_ID_MAX_TTL == pki.ttl_seconds(limits.secret_id_ttl)
    assert mp.INTERMEDIATE_MOUNTS == (pki.DEFAULT_INT_MOUNT,)


def test_the_appliances_own_values_pass_the_bounds() -> None:
    from appliance import pki
    from appliance.core.vault_access import NODE_PKI_ROLES, AppRoleLimits

    limits = AppRoleLimits()
    resources: list[tuple[str, dict[str, Any]]] = [
        (ROOT_CERT, {"ttl": pki.ROOT_TTL}),
        (SIGN, {"ttl": pki.INTERMEDIATE_TTL}),
        (MOUNT, {"path": pki.DEFAULT_ROOT_MOUNT, "type": "pki", "maxLeaseTtlSeconds": pki.ttl_seconds(pki.ROOT_TTL)}),
        (
            MOUNT,
            {"path": pki.DEFAULT_INT_MOUNT, "type": "pki", "maxLeaseTtlSeconds": pki.ttl_seconds(pki.INTERMEDIATE_TTL)},
        ),
        (
            APPROLE,
            {
                "roleName": "core-1",
                "tokenTtl": pki.ttl_seconds(limits.token_ttl),
                "tokenMaxTtl": pki.ttl_seconds(limits.token_max_ttl),
                "secretIdTtl": pki.ttl_seconds(limits.secret_id_ttl),
                "secretIdNumUses": limits.secret_id_num_uses,
            },
        ),
    ]
    resources += [
        (ROLE, {"name": r.name, "ttl": r.ttl, "maxTtl": r.max_ttl, "serverFlag": r.server, "clientFlag": r.client})
        for r in [*pki.ROLES.values(), *NODE_PKI_ROLES]
    ]
    assert {type_ for type_, _ in resources} == {ROOT_CERT, SIGN, MOUNT, APPROLE, ROLE}
    assert [(t, p, check(mp.PKI_TTL_BOUNDS, t, p)) for t, p in resources if check(mp.PKI_TTL_BOUNDS, t, p)] == []


# -- the pack's files ----------------------------------------------------------------------------------------------


def test_type_tokens_are_the_sdks() -> None:
    # The tokens the wheels register (each resource's super().__init__), so a rename in an SDK bump shows here.
    # find_spec locates the packages without importing them (pulumi_aws takes seconds to import).
    aws_spec, vault_spec = importlib.util.find_spec("pulumi_aws"), importlib.util.find_spec("pulumi_vault")
    assert aws_spec and aws_spec.origin and vault_spec and vault_spec.origin
    aws, vault = Path(aws_spec.origin).parent / "s3", Path(vault_spec.origin).parent
    s3 = "".join(path.read_text() for path in aws.glob("bucket*.py"))
    for token in sorted(
        mp.BUCKET
        | mp.VERSIONING
        | mp.LOCK_CONFIGURATION
        | mp.SSE_CONFIGURATION
        | mp.PUBLIC_ACCESS_BLOCK
        | mp.BUCKET_ACL
        | mp.BUCKET_POLICY
    ):
        assert f"'{token}'" in s3, token
    for file, token in {
        "mount.py": mp.VAULT_MOUNT,
        "pkisecret/secret_backend_root_cert.py": mp.VAULT_ROOT_CERT,
        "pkisecret/secret_backend_root_sign_intermediate.py": mp.VAULT_SIGN_INTERMEDIATE,
        "pkisecret/secret_backend_role.py": mp.VAULT_PKI_ROLE,
        "approle/auth_backend_role.py": mp.VAULT_APPROLE_ROLE,
    }.items():
        assert f"'{token}'" in (vault / file).read_text(), file


def test_main_builds_the_pack_from_membria_policies() -> None:
    # Read, not run: PolicyPack(...) would start the analyzer's server and block.
    tree = ast.parse((PACK_DIR / "__main__.py").read_text())
    [call] = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "PolicyPack"]
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
    assert keywords == {
        "name": "membria_policies.PACK_NAME",
        "enforcement_level": "EnforcementLevel.MANDATORY",
        "policies": "membria_policies.POLICIES",
        "initial_config": "membria_policies.INITIAL_CONFIG",
    }
    assert 'importlib.import_module("membria_policies")' in (PACK_DIR / "__main__.py").read_text()
    assert mp.PACK_NAME == "membria"
    assert all(p.enforcement_level == mp.EnforcementLevel.MANDATORY for p in mp.POLICIES)
    yaml_text = (PACK_DIR / "PulumiPolicy.yaml").read_text()
    assert "name: python" in yaml_text and "virtualenv: ../../.venv" in yaml_text and "toolchain: pip" in yaml_text
    pins = (PACK_DIR / "requirements.txt").read_text().split()
    assert {"pulumi-policy==1.21.0", "pulumi==3.272.0", "protobuf==5.29.6"} <= set(pins)


def test_membria_policies_imports_alone_as_the_cli_loads_it(tmp_path: Path) -> None:
    # The CLI puts the pack directory on sys.path; a published pack has no `appliance` or `stacks` beside it.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import membria_policies as m; "
        "assert len(m.POLICIES) == 7; "
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('appliance', 'stacks')); "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(PACK_DIR)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
