"""Membria's CrossGuard rules: DR buckets that cannot be emptied or made public, and PKI/AppRole TTL bounds.

Imports nothing from `appliance`, so the pack can be published on its own (requirements.txt beside this file);
tests/unit/test_policy_pack.py pins the defaults below to the appliance's constants.

Property names are the engine's camelCase (`objectLockEnabled`), the type tokens pulumi-aws 7.51.1 and
pulumi-vault 7.14.0 register. The deprecated `*V2` S3 tokens are aliases of the current resources and are checked
the same way.

Per-policy config (pulumi-policy 1.21: one object per policy name, holding its `enforcementLevel` and the
properties its `config_schema` declares):
- `s3-encryption.allowClientSideOnly` and `s3-bucket-complete.allowClientSideOnly` (for on-prem endpoints without
  SSE). A rule cannot change its own enforcement level at run time (the analyzer fixes it before calling
  `validate`), so with the flag set `s3-encryption` stops blocking and hands its findings back as the policy's
  "not applicable" reason, and `s3-bucket-complete` no longer asks for an SSE resource.
- `pki-ttl-bounds`: the bounds in `PKI_BOUNDS_DEFAULTS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pulumi.runtime.proto import analyzer_pb2
from pulumi_policy import (
    EnforcementLevel,
    Policy,
    PolicyConfigSchema,
    PolicyResource,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.proxy import UnknownValueError

PACK_NAME = "membria"

# -- type tokens (pulumi_aws/s3/*.py and pulumi_vault/**.py, the strings passed to super().__init__) --------------

BUCKET = frozenset({"aws:s3/bucket:Bucket", "aws:s3/bucketV2:BucketV2"})
VERSIONING = frozenset({"aws:s3/bucketVersioning:BucketVersioning", "aws:s3/bucketVersioningV2:BucketVersioningV2"})
LOCK_CONFIGURATION = frozenset(
    {
        "aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration",
        "aws:s3/bucketObjectLockConfigurationV2:BucketObjectLockConfigurationV2",
    }
)
SSE_CONFIGURATION = frozenset(
    {
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
        "aws:s3/bucketServerSideEncryptionConfigurationV2:BucketServerSideEncryptionConfigurationV2",
    }
)
PUBLIC_ACCESS_BLOCK = frozenset({"aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"})  # no V2 exists
BUCKET_ACL = frozenset({"aws:s3/bucketAcl:BucketAcl", "aws:s3/bucketAclV2:BucketAclV2"})
BUCKET_POLICY = frozenset({"aws:s3/bucketPolicy:BucketPolicy"})  # no V2 exists

VAULT_MOUNT = "vault:index/mount:Mount"
VAULT_ROOT_CERT = "vault:pkiSecret/secretBackendRootCert:SecretBackendRootCert"
VAULT_SIGN_INTERMEDIATE = "vault:pkiSecret/secretBackendRootSignIntermediate:SecretBackendRootSignIntermediate"
VAULT_PKI_ROLE = "vault:pkiSecret/secretBackendRole:SecretBackendRole"
VAULT_APPROLE_ROLE = "vault:appRole/authBackendRole:AuthBackendRole"

# -- defaults ------------------------------------------------------------------------------------------------------

LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
LOCK_MIN_DAYS = 1
LOCK_MAX_DAYS = 36500  # S3's own ceiling for a default retention (100 years)
SSE_ALGORITHMS = ("AES256", "aws:kms")
PUBLIC_ACLS = ("public-read", "public-read-write", "authenticated-read")
PUBLIC_GRANTEE_URIS = (
    "http://acs.amazonaws.com/groups/global/AllUsers",
    "http://acs.amazonaws.com/groups/global/AuthenticatedUsers",
)
PUBLIC_ACCESS_FLAGS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")

ROOT_MAX_TTL = "87600h"  # appliance.pki.ROOT_TTL
INTERMEDIATE_MAX_TTL = "43800h"  # appliance.pki.INTERMEDIATE_TTL
ROLE_MAX_TTL = "720h"  # the longest role max_ttl in appliance.pki.ROLES (edge-device)
SERVER_ROLE_MAX_TTL = "72h"  # server-only roles (vault_access.NODE_PKI_ROLES)
APPROLE_TOKEN_MAX_TTL = 86400  # AppRoleLimits.token_max_ttl ("24h")
APPROLE_SECRET_ID_MAX_TTL = 3600  # AppRoleLimits.secret_id_ttl ("1h")
# A Mount cannot say whether it is a root or an intermediate CA: these paths (appliance.pki.DEFAULT_INT_MOUNT)
# get the intermediate bound, every other pki mount the root bound.
INTERMEDIATE_MOUNTS = ("pki_int",)

PKI_BOUNDS_DEFAULTS: dict[str, Any] = {
    "rootMaxTtl": ROOT_MAX_TTL,
    "intermediateMaxTtl": INTERMEDIATE_MAX_TTL,
    "roleMaxTtl": ROLE_MAX_TTL,
    "serverRoleMaxTtl": SERVER_ROLE_MAX_TTL,
    "approleTokenMaxTtl": APPROLE_TOKEN_MAX_TTL,
    "approleSecretIdMaxTtl": APPROLE_SECRET_ID_MAX_TTL,
    "intermediateMounts": list(INTERMEDIATE_MOUNTS),
}

# What `__main__` hands the pack as initial config (shown by `pulumi policy` and used when nothing overrides it).
INITIAL_CONFIG: dict[str, Any] = {
    "s3-encryption": {"allowClientSideOnly": False},
    "s3-bucket-complete": {"allowClientSideOnly": False},
    "pki-ttl-bounds": dict(PKI_BOUNDS_DEFAULTS),
}

_DURATION_SCHEMA: dict[str, Any] = {
    "type": ["string", "integer"],
    "description": 'a Vault duration: "24h", "30m", "45s", "7d" or seconds',
}
_CLIENT_SIDE_SCHEMA = PolicyConfigSchema(
    properties={
        "allowClientSideOnly": {
            "type": "boolean",
            "default": False,
            "description": "the S3 endpoint has no server-side encryption; data is encrypted by the appliance",
        }
    }
)
_PKI_SCHEMA = PolicyConfigSchema(
    properties={
        "rootMaxTtl": {**_DURATION_SCHEMA, "default": ROOT_MAX_TTL},
        "intermediateMaxTtl": {**_DURATION_SCHEMA, "default": INTERMEDIATE_MAX_TTL},
        "roleMaxTtl": {**_DURATION_SCHEMA, "default": ROLE_MAX_TTL},
        "serverRoleMaxTtl": {**_DURATION_SCHEMA, "default": SERVER_ROLE_MAX_TTL},
        "approleTokenMaxTtl": {**_DURATION_SCHEMA, "default": APPROLE_TOKEN_MAX_TTL},
        "approleSecretIdMaxTtl": {**_DURATION_SCHEMA, "default": APPROLE_SECRET_ID_MAX_TTL},
        "intermediateMounts": {
            "type": "array",
            "items": {"type": "string"},
            "default": list(INTERMEDIATE_MOUNTS),
            "description": "pki mount paths bounded by intermediateMaxTtl",
        },
    }
)

# -- values --------------------------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+)([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def ttl_seconds(value: Any) -> int | None:
    """Seconds in a Vault TTL: 86400, 86400.0 (a protobuf number), "86400", "24h", "30m", "1h30m", "7d".

    None when `value` is none of these (the caller reports it); booleans are not TTLs.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.isdigit():
        return int(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


def _whole(value: Any) -> int | None:
    """An integer property (protobuf numbers arrive as floats); None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _items(value: Any) -> list[Any]:
    """A list property (a `_ListProxy` under the analyzer, a list in direct calls); a lone object as one item."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def _get(props: Any, *path: str) -> Any:
    """props[path[0]][path[1]]..., None where a step is missing or not an object."""
    node = props
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _shown(value: Any) -> str:
    """A value for a message: protobuf numbers arrive as floats, 3600.0 reads as 3600."""
    whole = _whole(value)
    return repr(whole if whole is not None else value)


def _hours(seconds: int) -> str:
    return f"{seconds // 3600}h" if seconds % 3600 == 0 else f"{seconds}s"


def _bound(config: Mapping[str, Any], key: str) -> int:
    """A configured TTL bound in seconds; a config value that is no TTL fails loudly (a pack misconfiguration)."""
    value = config.get(key, PKI_BOUNDS_DEFAULTS[key])
    seconds = ttl_seconds(value)
    if seconds is None:
        raise ValueError(f"pki-ttl-bounds config {key}={value!r} is not a TTL")
    return seconds


# -- S3 resource rules ----------------------------------------------------------------------------------------------


def _object_lock(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type in BUCKET and args.props.get("objectLockEnabled") is not True:
        report("the bucket must be created with objectLockEnabled=true (it cannot be turned on later)", None)


def _versioning(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type not in VERSIONING:
        return
    status = _get(args.props, "versioningConfiguration", "status")
    if status != "Enabled":
        report(f"versioningConfiguration.status is {status!r}; object lock needs 'Enabled'", None)


def _retention(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type not in LOCK_CONFIGURATION:
        return
    retention = _get(args.props, "rule", "defaultRetention")
    if not isinstance(retention, Mapping):
        report("no rule.defaultRetention: objects would be written without a retention", None)
        return
    mode = retention.get("mode")
    if mode not in LOCK_MODES:
        report(f"defaultRetention.mode is {mode!r}; expected one of {', '.join(LOCK_MODES)}", None)
    if retention.get("years") is not None:
        report("defaultRetention.years is set; give the retention in days", None)
    days = _whole(retention.get("days"))
    if days is None or not LOCK_MIN_DAYS <= days <= LOCK_MAX_DAYS:
        report(
            f"defaultRetention.days is {_shown(retention.get('days'))}; expected {LOCK_MIN_DAYS}..{LOCK_MAX_DAYS}",
            None,
        )


def sse_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    """What is wrong with the server-side encryption `props` declares (an SSE resource or a Bucket's inline one)."""
    if resource_type in SSE_CONFIGURATION:
        rules = _items(props.get("rules"))
    elif resource_type in BUCKET and props.get("serverSideEncryptionConfiguration") is not None:
        rules = _items(_get(props, "serverSideEncryptionConfiguration", "rule"))
    else:
        return []
    algorithms = [_get(rule, "applyServerSideEncryptionByDefault", "sseAlgorithm") for rule in rules]
    if not algorithms:
        return ["no encryption rule: objects would be stored unencrypted"]
    return [
        f"sseAlgorithm {algorithm!r} is not one of {', '.join(SSE_ALGORITHMS)}"
        for algorithm in algorithms
        if algorithm not in SSE_ALGORITHMS
    ]


def _encryption(args: ResourceValidationArgs, report: ReportViolation) -> None:
    problems = sse_problems(args.resource_type, args.props)
    if problems and args.get_config().get("allowClientSideOnly") is True:
        # Waived, not hidden: the engine records the findings as this policy's not-applicable reason.
        args.not_applicable("allowClientSideOnly (advisory): " + "; ".join(problems))
    for problem in problems:
        report(problem, None)


def _principal_is_public(principal: Any) -> bool:
    if principal == "*":
        return True
    if isinstance(principal, Mapping):
        return any(value == "*" for value in _items(principal.get("AWS")))
    return False


def _public_policy_statements(policy: Any) -> list[str] | None:
    """Sids (or indexes) of Allow statements open to everyone; None when the policy is no JSON object."""
    if isinstance(policy, str):
        try:
            policy = json.loads(policy)
        except ValueError:
            return None
    if not isinstance(policy, Mapping):
        return None
    found = []
    for index, statement in enumerate(_items(policy.get("Statement"))):
        if (
            isinstance(statement, Mapping)
            and statement.get("Effect") == "Allow"
            and _principal_is_public(statement.get("Principal"))
        ):
            found.append(str(statement.get("Sid", index)))
    return found


def _no_public_access(args: ResourceValidationArgs, report: ReportViolation) -> None:
    props = args.props
    if args.resource_type in PUBLIC_ACCESS_BLOCK:
        off = [flag for flag in PUBLIC_ACCESS_FLAGS if props.get(flag) is not True]
        if off:
            report(f"the public access block must set {', '.join(off)} to true", None)
    if args.resource_type in BUCKET | BUCKET_ACL and props.get("acl") in PUBLIC_ACLS:
        report(f"acl {props.get('acl')!r} makes the bucket readable by others", None)
    if args.resource_type in BUCKET_ACL:
        for grant in _items(_get(props, "accessControlPolicy", "grants")):
            uri = _get(grant, "grantee", "uri")
            if uri in PUBLIC_GRANTEE_URIS:
                report(f"a grant to {uri} makes the bucket readable by others", None)
    if args.resource_type in BUCKET_POLICY:
        public = _public_policy_statements(props.get("policy"))
        if public is None:
            report("the bucket policy is not a JSON object", None)
        elif public:
            report(f'statement(s) {", ".join(public)} Allow Principal "*"', None)


# -- S3 stack rule -------------------------------------------------------------------------------------------------


def _known_bucket_name(resource: PolicyResource) -> str | None:
    try:
        name = resource.props.get("bucket")
    except UnknownValueError:  # preview: the name comes from another resource
        return None
    return name if isinstance(name, str) else None


def _names_bucket(child: PolicyResource, bucket: PolicyResource) -> bool:
    """Whether `child` configures `bucket`: its `bucket` input depends on it (works at preview), or, without a
    dependency (a literal name), both carry the same known bucket name."""
    if any(dep.urn == bucket.urn for dep in child.property_dependencies.get("bucket", [])):
        return True
    name = _known_bucket_name(child)
    return name is not None and name == _known_bucket_name(bucket)


def _bucket_complete(args: StackValidationArgs, report: ReportViolation) -> None:
    wanted = {
        "a BucketVersioning": VERSIONING,
        "a BucketObjectLockConfiguration": LOCK_CONFIGURATION,
        "a BucketPublicAccessBlock": PUBLIC_ACCESS_BLOCK,
    }
    if args.get_config().get("allowClientSideOnly") is not True:
        wanted["a BucketServerSideEncryptionConfiguration"] = SSE_CONFIGURATION
    buckets = [r for r in args.resources if r.resource_type in BUCKET]
    for bucket in buckets:
        missing = [
            what
            for what, types in wanted.items()
            if not any(r.resource_type in types and _names_bucket(r, bucket) for r in args.resources)
        ]
        if missing:
            report(f"bucket {bucket.name} lacks {', '.join(missing)}", bucket.urn)


# -- PKI and AppRole -----------------------------------------------------------------------------------------------


def _ttl_problem(label: str, value: Any, bound: int | None = None, *, required: bool = True) -> str | None:
    if value is None:
        return f"{label} is not set (Vault would use the mount or system maximum)" if required else None
    seconds = ttl_seconds(value)
    if seconds is None:
        return f'{label} {_shown(value)} is not a TTL (expected e.g. "24h", "30m", "86400" or seconds as a number)'
    if bound is not None and seconds > bound:
        return f"{label} {_shown(value)} exceeds {_hours(bound)}"
    return None


def pki_problems(resource_type: str, props: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """TTL problems of one Vault resource under `config` (the pki-ttl-bounds policy config)."""
    problems: list[str | None] = []
    if resource_type == VAULT_ROOT_CERT:
        problems.append(_ttl_problem("root CA ttl", props.get("ttl"), _bound(config, "rootMaxTtl")))
    elif resource_type == VAULT_SIGN_INTERMEDIATE:
        problems.append(_ttl_problem("intermediate ttl", props.get("ttl"), _bound(config, "intermediateMaxTtl")))
    elif resource_type == VAULT_MOUNT and props.get("type") == "pki":
        intermediate = props.get("path") in _items(config.get("intermediateMounts", INTERMEDIATE_MOUNTS))
        key = "intermediateMaxTtl" if intermediate else "rootMaxTtl"
        label = f"pki mount {props.get('path')!r} maxLeaseTtlSeconds"
        # Unset means the system maximum (768h by default), inside both bounds.
        problems.append(_ttl_problem(label, props.get("maxLeaseTtlSeconds"), _bound(config, key), required=False))
    elif resource_type == VAULT_PKI_ROLE:
        problems.extend(_role_problems(props, config))
    elif resource_type == VAULT_APPROLE_ROLE:
        problems.extend(_approle_problems(props, config))
    return [p for p in problems if p]


def _role_problems(props: Mapping[str, Any], config: Mapping[str, Any]) -> list[str | None]:
    name = props.get("name")
    # Vault's defaults: server_flag and client_flag are both true when unset.
    server_only = props.get("serverFlag", True) is True and props.get("clientFlag", True) is False
    bound = _bound(config, "serverRoleMaxTtl" if server_only else "roleMaxTtl")
    kind = "server role" if server_only else "role"
    ttl, max_ttl = props.get("ttl"), props.get("maxTtl")
    problems = [_ttl_problem(f"{kind} {name!r} ttl", ttl), _ttl_problem(f"{kind} {name!r} maxTtl", max_ttl, bound)]
    ttl_s, max_s = ttl_seconds(ttl), ttl_seconds(max_ttl)
    if ttl_s is not None and max_s is not None and ttl_s > max_s:
        problems.append(f"{kind} {name!r} ttl {ttl!r} exceeds its maxTtl {max_ttl!r}")
    return problems


def _approle_problems(props: Mapping[str, Any], config: Mapping[str, Any]) -> list[str | None]:
    name = props.get("roleName")
    token_max = props.get("tokenMaxTtl")
    problems = [_ttl_problem(f"AppRole {name!r} tokenMaxTtl", token_max, _bound(config, "approleTokenMaxTtl"))]
    if ttl_seconds(token_max) == 0:  # 0 is "unset": the system maximum
        problems.append(f"AppRole {name!r} tokenMaxTtl is 0 (the system maximum)")
    secret_ttl = props.get("secretIdTtl")
    problem = _ttl_problem(f"AppRole {name!r} secretIdTtl", secret_ttl, _bound(config, "approleSecretIdMaxTtl"))
    if problem is None and ttl_seconds(secret_ttl) == 0:
        problem = f"AppRole {name!r} secretIdTtl is 0: secret ids would never expire"
    problems.append(problem)
    uses = _whole(props.get("secretIdNumUses"))
    if uses is None or uses <= 0:
        problems.append(
            f"AppRole {name!r} secretIdNumUses is {_shown(props.get('secretIdNumUses'))}: a secret id must have "
            "a limited number of uses (> 0)"
        )
    return problems


def _pki_ttl_bounds(args: ResourceValidationArgs, report: ReportViolation) -> None:
    for problem in pki_problems(args.resource_type, args.props, args.get_config()):
        report(problem, None)


# -- the pack ------------------------------------------------------------------------------------------------------

S3_BUCKET_OBJECT_LOCK = ResourceValidationPolicy(
    name="s3-bucket-object-lock",
    description="DR buckets are created with S3 object lock enabled.",
    validate=_object_lock,
    enforcement_level=EnforcementLevel.MANDATORY,
)
S3_VERSIONING_ENABLED = ResourceValidationPolicy(
    name="s3-versioning-enabled",
    description="DR buckets keep every object version (versioning Enabled, never Suspended).",
    validate=_versioning,
    enforcement_level=EnforcementLevel.MANDATORY,
)
S3_OBJECT_LOCK_RETENTION = ResourceValidationPolicy(
    name="s3-object-lock-retention",
    description=(
        f"The default object lock retention is {' or '.join(LOCK_MODES)} for {LOCK_MIN_DAYS}..{LOCK_MAX_DAYS} days."
    ),
    validate=_retention,
    enforcement_level=EnforcementLevel.MANDATORY,
)
S3_ENCRYPTION = ResourceValidationPolicy(
    name="s3-encryption",
    description=f"Bucket server-side encryption uses {' or '.join(SSE_ALGORITHMS)}.",
    validate=_encryption,
    enforcement_level=EnforcementLevel.MANDATORY,
    config_schema=_CLIENT_SIDE_SCHEMA,
)
S3_NO_PUBLIC_ACCESS = ResourceValidationPolicy(
    name="s3-no-public-access",
    description="DR buckets are never public: full public access block, no public ACL, no Allow to Principal *.",
    validate=_no_public_access,
    enforcement_level=EnforcementLevel.MANDATORY,
)
S3_BUCKET_COMPLETE = StackValidationPolicy(
    name="s3-bucket-complete",
    description=(
        "Every bucket has versioning, an object lock configuration, server-side encryption and a public access block."
    ),
    validate=_bucket_complete,
    enforcement_level=EnforcementLevel.MANDATORY,
    config_schema=_CLIENT_SIDE_SCHEMA,
)
PKI_TTL_BOUNDS = ResourceValidationPolicy(
    name="pki-ttl-bounds",
    description="PKI certificate, role and AppRole lifetimes stay within the appliance's bounds.",
    validate=_pki_ttl_bounds,
    enforcement_level=EnforcementLevel.MANDATORY,
    config_schema=_PKI_SCHEMA,
)

POLICIES: list[Policy] = [
    S3_BUCKET_OBJECT_LOCK,
    S3_VERSIONING_ENABLED,
    S3_OBJECT_LOCK_RETENTION,
    S3_ENCRYPTION,
    S3_NO_PUBLIC_ACCESS,
    S3_BUCKET_COMPLETE,
    PKI_TTL_BOUNDS,
]

# -- running the pack without the CLI ------------------------------------------------------------------------------

# (type token, raw properties as the engine sends them (camelCase, secret envelopes and unknown sentinels allowed),
#  urn, name, property dependencies {input name: [urn, ...]})
RecordedResource = tuple[str, Mapping[str, Any], str, str, Mapping[str, Sequence[str]]]


def analyzer(config: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """The pack's own gRPC servicer (what `PolicyPack` serves), configured as the CLI would, without a server.

    `config`: {policy name: {"enforcementLevel": "advisory"|..., property: value}}. The CLI sends every
    policy's entry with an explicit level; here a policy not named keeps its default.
    """
    from pulumi_policy.policy import _PolicyAnalyzerServicer  # private: the only way in without a gRPC server

    # Any: the servicer's methods are untyped in pulumi-policy 1.21.
    servicer: Any = _PolicyAnalyzerServicer(PACK_NAME, "0.0.1", POLICIES, EnforcementLevel.MANDATORY, INITIAL_CONFIG)
    request = analyzer_pb2.ConfigureAnalyzerRequest()
    for policy in POLICIES:
        entry = dict((config or {}).get(policy.name, {}))
        default = policy.enforcement_level or EnforcementLevel.MANDATORY
        level = EnforcementLevel(entry.pop("enforcementLevel", default.value))
        properties = {**INITIAL_CONFIG.get(policy.name, {}), **entry}
        request.policyConfig[policy.name].enforcementLevel = _PROTO_LEVEL[level]
        if properties:
            request.policyConfig[policy.name].properties.update(properties)
    servicer.Configure(request, None)
    return servicer


_PROTO_LEVEL = {
    EnforcementLevel.ADVISORY: analyzer_pb2.ADVISORY,
    EnforcementLevel.MANDATORY: analyzer_pb2.MANDATORY,
    EnforcementLevel.DISABLED: analyzer_pb2.DISABLED,
    EnforcementLevel.REMEDIATE: analyzer_pb2.REMEDIATE,
}


def diagnostics(
    resources: Iterable[RecordedResource], config: Mapping[str, Mapping[str, Any]] | None = None
) -> list[analyzer_pb2.AnalyzeDiagnostic]:
    """Every diagnostic the pack reports for `resources`: `Analyze` per resource, then `AnalyzeStack` once."""
    servicer = analyzer(config)
    found: list[analyzer_pb2.AnalyzeDiagnostic] = []
    stack = analyzer_pb2.AnalyzeStackRequest()
    for type_, props, urn, name, property_dependencies in resources:
        request = analyzer_pb2.AnalyzeRequest(type=type_, urn=urn, name=name)
        request.properties.update(props)  # a protobuf Struct, as the engine sends it (numbers become floats)
        for diagnostic in servicer.Analyze(request, None).diagnostics:
            diagnostic.urn = diagnostic.urn or urn  # a resource policy reports without one
            found.append(diagnostic)
        resource = stack.resources.add(type=type_, urn=urn, name=name)
        resource.properties.CopyFrom(request.properties)
        for key, urns in property_dependencies.items():
            resource.propertyDependencies[key].urns.extend(urns)
    found.extend(servicer.AnalyzeStack(stack, None).diagnostics)
    return found


def violations(
    resources: Iterable[RecordedResource], config: Mapping[str, Mapping[str, Any]] | None = None
) -> list[str]:
    """The mandatory violations of `resources` as "policy: urn: message" lines; [] when they pass the pack.

    Runs the pack through its own analyzer (the deserialisation the CLI's `--policy-pack` uses). Advisory
    diagnostics, including "can't run during preview" for unknown values, are left out.
    """
    return [
        f"{d.policyName}: {d.urn or '<stack>'}: {d.message}"
        for d in diagnostics(resources, config)
        if d.enforcementLevel == analyzer_pb2.MANDATORY
    ]
