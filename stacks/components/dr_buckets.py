"""DrBuckets: the DR targets' S3 side as Pulumi resources (stacks/DESIGN.md §2 "DrBuckets").

What each bucket holds comes from the appliance (`appliance.dr.setup.wanted_*`, the agent policy from
`appliance.dr.access`, where the target is from `appliance.backends.s3_target_spec`), so `appliance dr init`
run afterwards finds every bucket step already as wanted. The Vault data key is not declared here: it would
land in the stack's state. The S3 credentials are read by an invoke (never stored in state) and passed to
the provider as secrets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pulumi
import pulumi_aws as aws
import pulumi_vault as vault

from appliance.backends import S3_ACCESS_KEY_FIELD, S3_SECRET_KEY_FIELD, S3Spec, s3_target_spec
from appliance.dr.access import backup_agent_policy, with_principal
from appliance.dr.setup import (
    PUBLIC_ACCESS_BLOCK,
    VERSIONING,
    check_s3_replication,
    wanted_lifecycle,
    wanted_lock,
    wanted_replication,
    wanted_sse,
)
from appliance.errors import BadInput
from appliance.lab.state import LabState
from appliance.site import Dr, Site

ReplicationMode = Literal["app", "s3"]
REPLICATION_MODES = ("app", "s3")


def target_specs(site: Site, state_dir: Path) -> list[S3Spec]:
    """The site's targets, primary first (LabState without prepare(): nothing is written)."""
    state = LabState(state_dir)
    names = ["primary"] + (["replica"] if site.services.s3.replica is not None else [])
    return [s3_target_spec(site, name, state) for name in names]


def _secret_field(data: pulumi.Output[Any], key: str) -> pulumi.Output[str]:
    """One field of the KV data, kept secret: the invoke's result may not be marked secret by itself."""
    value: pulumi.Output[str] = data.apply(lambda fields: str(fields[key]))
    return pulumi.Output.secret(value)


@dataclass(frozen=True)
class _Made:
    """What one target got: its bucket, versioning (replication waits on it), provider and agent policy."""

    spec: S3Spec
    provider: aws.Provider
    bucket: aws.s3.Bucket
    versioning: aws.s3.BucketVersioning
    policy_json: str


class DrBuckets(pulumi.ComponentResource):
    buckets: pulumi.Output[dict[str, dict[str, str]]]
    agent_policy_json: pulumi.Output[dict[str, str]]
    replication_mode: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        site: Site,
        *,
        state_dir: Path,
        replication: str = "app",
        agent_user: str | None = None,
        agent_principal: str | None = None,
        replication_role_arn: str | None = None,
        vault_provider: pulumi.ProviderResource | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("membria:dr:DrBuckets", name, None, opts)
        if replication not in REPLICATION_MODES:
            raise BadInput(
                f"unknown DR replication mode {replication!r}: expected one of {', '.join(REPLICATION_MODES)}"
            )
        specs = target_specs(site, state_dir)
        if replication == "s3":
            check_s3_replication(specs[0], specs[1] if len(specs) > 1 else None)
            if not replication_role_arn:
                raise BadInput("S3 replication needs the IAM role S3 replicates as (membria:replicationRoleArn)")
        self._base, self._dr, self._vault = name, site.dr, vault_provider
        made = {spec.target: self._target(spec, agent_user, agent_principal) for spec in specs}
        if replication == "s3":
            self._replication(made["primary"], made["replica"], replication_role_arn or "")

        self.buckets = pulumi.Output.from_input(
            {
                target: {"name": m.bucket.bucket, "arn": m.bucket.arn, "endpoint": m.spec.endpoint}
                for target, m in made.items()
            }
        )
        self.agent_policy_json = pulumi.Output.from_input({target: m.policy_json for target, m in made.items()})
        self.replication_mode = pulumi.Output.from_input(replication)
        self.register_outputs(
            {
                "buckets": self.buckets,
                "agent_policy_json": self.agent_policy_json,
                "replication_mode": self.replication_mode,
            }
        )

    # -- one target ------------------------------------------------------------------------------------

    def _aws_provider(self, spec: S3Spec) -> aws.Provider:
        secret = vault.kv.get_secret_v2_output(
            mount=spec.kv_mount,
            name=spec.credentials_path,
            opts=pulumi.InvokeOutputOptions(provider=self._vault, parent=self),
        )
        data: pulumi.Output[Any] = secret.data
        return aws.Provider(
            f"{self._base}-s3-{spec.target}",
            region=spec.region,
            endpoints=[aws.ProviderEndpointArgs(s3=spec.endpoint, iam=spec.endpoint, sts=spec.endpoint)],
            s3_use_path_style=True,
            skip_credentials_validation=True,
            skip_requesting_account_id=True,
            skip_metadata_api_check=True,
            skip_region_validation=True,
            access_key=_secret_field(data, S3_ACCESS_KEY_FIELD),
            secret_key=_secret_field(data, S3_SECRET_KEY_FIELD),
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _target(self, spec: S3Spec, agent_user: str | None, agent_principal: str | None) -> _Made:
        dr, prefix = self._dr, f"{self._base}-{spec.target}"
        provider = self._aws_provider(spec)
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        bucket = aws.s3.Bucket(
            prefix,
            bucket=spec.bucket,
            object_lock_enabled=True,  # only possible at creation
            force_destroy=False,
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(protect=True)),
        )
        versioning = aws.s3.BucketVersioning(
            f"{prefix}-versioning",
            bucket=bucket.id,
            versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(status=VERSIONING["Status"]),
            opts=child,
        )
        after_versioning = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[versioning]))
        lock = wanted_lock(dr)
        retention = lock["Rule"]["DefaultRetention"]
        aws.s3.BucketObjectLockConfiguration(
            f"{prefix}-lock",
            bucket=bucket.id,
            object_lock_enabled=lock["ObjectLockEnabled"],
            rule=aws.s3.BucketObjectLockConfigurationRuleArgs(
                default_retention=aws.s3.BucketObjectLockConfigurationRuleDefaultRetentionArgs(
                    mode=retention["Mode"], days=retention["Days"]
                )
            ),
            opts=after_versioning,
        )
        sse = wanted_sse(dr)
        if sse is not None:
            aws.s3.BucketServerSideEncryptionConfiguration(
                f"{prefix}-sse",
                bucket=bucket.id,
                rules=[
                    aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                        apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                            sse_algorithm=rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"]
                        )
                    )
                    for rule in sse["Rules"]
                ],
                opts=child,
            )
        rule = wanted_lifecycle(dr)
        aws.s3.BucketLifecycleConfiguration(
            f"{prefix}-lifecycle",
            bucket=bucket.id,
            rules=[
                aws.s3.BucketLifecycleConfigurationRuleArgs(
                    id=rule["ID"],
                    status=rule["Status"],
                    filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=rule["Filter"]["Prefix"]),
                    noncurrent_version_expiration=aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
                        noncurrent_days=rule["NoncurrentVersionExpiration"]["NoncurrentDays"]
                    ),
                )
            ],
            opts=after_versioning,  # a lifecycle on noncurrent versions presumes versioning
        )
        aws.s3.BucketPublicAccessBlock(
            f"{prefix}-public-access",
            bucket=bucket.id,
            block_public_acls=PUBLIC_ACCESS_BLOCK["BlockPublicAcls"],
            ignore_public_acls=PUBLIC_ACCESS_BLOCK["IgnorePublicAcls"],
            block_public_policy=PUBLIC_ACCESS_BLOCK["BlockPublicPolicy"],
            restrict_public_buckets=PUBLIC_ACCESS_BLOCK["RestrictPublicBuckets"],
            opts=child,
        )
        document = self._agent_policy(prefix, spec, bucket, dr, agent_user, agent_principal, child)
        return _Made(spec, provider, bucket, versioning, document)

    def _agent_policy(
        self,
        prefix: str,
        spec: S3Spec,
        bucket: aws.s3.Bucket,
        dr: Dr,
        agent_user: str | None,
        agent_principal: str | None,
        child: pulumi.ResourceOptions,
    ) -> str:
        """The agent's least-privilege policy: on the user where the endpoint has IAM, else on the bucket."""
        policy = backup_agent_policy(dr, spec.bucket)
        if agent_user:
            document = json.dumps(policy, sort_keys=True)
            aws.iam.UserPolicy(
                f"{prefix}-agent-policy", name=f"membria-dr-{spec.bucket}", user=agent_user, policy=document, opts=child
            )
        elif agent_principal:
            document = json.dumps(with_principal(policy, agent_principal), sort_keys=True)
            aws.s3.BucketPolicy(f"{prefix}-agent-policy", bucket=bucket.id, policy=document, opts=child)
        else:
            document = json.dumps(policy, sort_keys=True)  # exported for whoever attaches it by hand
        return document

    def _replication(self, primary: _Made, replica: _Made, role_arn: str) -> None:
        dr = self._dr

        def rules(destination_arn: str) -> list[aws.s3.BucketReplicationConfigRuleArgs]:
            config = wanted_replication(dr, role_arn=role_arn, destination_arn=destination_arn)
            return [
                aws.s3.BucketReplicationConfigRuleArgs(
                    id=rule["ID"],
                    priority=rule["Priority"],
                    status=rule["Status"],
                    filter=aws.s3.BucketReplicationConfigRuleFilterArgs(prefix=rule["Filter"]["Prefix"]),
                    destination=aws.s3.BucketReplicationConfigRuleDestinationArgs(bucket=rule["Destination"]["Bucket"]),
                    delete_marker_replication=aws.s3.BucketReplicationConfigRuleDeleteMarkerReplicationArgs(
                        status=rule["DeleteMarkerReplication"]["Status"]
                    ),
                )
                for rule in config["Rules"]
            ]

        aws.s3.BucketReplicationConfig(
            f"{self._base}-replication",
            bucket=primary.bucket.id,
            role=role_arn,
            rules=replica.bucket.arn.apply(rules),
            # S3 refuses replication unless both buckets are versioned.
            opts=pulumi.ResourceOptions(
                parent=self,
                provider=primary.provider,
                depends_on=[primary.versioning, replica.versioning],
            ),
        )
