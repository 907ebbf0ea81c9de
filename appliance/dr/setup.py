"""`appliance dr init`: the data key in Vault and the S3 side of both targets, set up idempotently.

Per target: the bucket exists with object lock (which also turns versioning on), a default retention
(the site's mode and days, so even an object written by another tool is locked), server-side encryption
by default where the endpoint offers it, and a lifecycle rule that expires old versions once they are
no longer current (the lock still protects them until their retention ends). Each step reads the
current setting first and changes only what differs; `plan()` says what `apply()` would do.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import botocore.exceptions

from appliance.backends import Backends, S3Spec, S3Target
from appliance.dr.crypto import DataKey
from appliance.dr.objects import s3_errors
from appliance.errors import BadInput, CheckFailed, ServiceError
from appliance.site import Dr

LIFECYCLE_RULE_ID = "membria-dr-noncurrent-versions"
REPLICATION_RULE_ID = "membria-dr-replica"
VERSIONING: dict[str, str] = {"Status": "Enabled"}  # put_bucket_versioning's VersioningConfiguration
# put_public_access_block's PublicAccessBlockConfiguration: a DR bucket is never public. `dr init` leaves it to
# the endpoint's default (MinIO may not implement it); the DR stack declares it.
PUBLIC_ACCESS_BLOCK: dict[str, bool] = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}


@dataclass(frozen=True)
class Step:
    target: str  # "vault", "primary", "replica"
    what: str
    needed: bool  # False: already as wanted


# What `dr init` puts on each bucket, as the S3 API's own shapes. Pure, so the DR stack (stacks/dr) declares
# exactly the same settings without an S3 client.


def wanted_lock(dr: Dr) -> dict[str, Any]:
    """The bucket's default retention (`put_object_lock_configuration`'s ObjectLockConfiguration)."""
    return {
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": dr.object_lock.mode.upper(), "Days": dr.object_lock.days}},
    }


def wanted_lifecycle(dr: Dr) -> dict[str, Any]:
    """The one lifecycle rule (an element of `put_bucket_lifecycle_configuration`'s Rules)."""
    return {
        "ID": LIFECYCLE_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": f"{dr.prefix}/"},
        "NoncurrentVersionExpiration": {"NoncurrentDays": dr.noncurrent_version_days},
    }


def wanted_sse(dr: Dr) -> dict[str, Any] | None:
    """Default bucket encryption (`put_bucket_encryption`'s ServerSideEncryptionConfiguration), None when
    the site turned SSE off."""
    if dr.sse == "off":
        return None
    return {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}


def wanted_replication(dr: Dr, *, role_arn: str, destination_arn: str) -> dict[str, Any]:
    """S3-native replication of the DR prefix to the replica bucket (`put_bucket_replication`'s
    ReplicationConfiguration). Deletes are not replicated: the replica is the copy that survives them."""
    return {
        "Role": role_arn,
        "Rules": [
            {
                "ID": REPLICATION_RULE_ID,
                "Priority": 1,
                "Status": "Enabled",
                "Filter": {"Prefix": f"{dr.prefix}/"},
                "Destination": {"Bucket": destination_arn},
                "DeleteMarkerReplication": {"Status": "Disabled"},
            }
        ],
    }


def check_s3_replication(primary: S3Spec, replica: S3Spec | None) -> None:
    """S3 replicates only between buckets of one service: refuse `s3` mode otherwise (the appliance's own
    replica write, `app` mode, works across services)."""
    if replica is None:
        raise BadInput("S3 replication needs a replica target, and the site has none")
    if primary.endpoint != replica.endpoint:
        raise BadInput(
            f"S3 replication cannot copy from {primary.endpoint} to {replica.endpoint}: they are different S3 services",
            hint="use replication mode `app` (the appliance writes both targets), or put both buckets on one endpoint",
        )


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class DrSetup:
    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self.site = backends.site
        self.policy: Dr = backends.site.dr

    def targets(self) -> list[tuple[str, S3Target]]:
        out = [("primary", self.backends.s3("primary"))]
        if self.site.services.s3.replica is not None:
            out.append(("replica", self.backends.s3("replica")))
        return out

    # -- the data key ----------------------------------------------------------------------------------

    def _has_key(self) -> bool:
        try:
            return "key_b64" in self.backends.read_secret(self.policy.encryption_key_vault_path)
        except ServiceError:
            return False

    # -- the buckets -----------------------------------------------------------------------------------

    def _bucket_exists(self, target: S3Target) -> bool:
        try:
            with s3_errors(target, f"looking for bucket {target.bucket}"):
                target.client.head_bucket(Bucket=target.bucket)
        except ServiceError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and _code(cause) in {
                "404",
                "NoSuchBucket",
                "NotFound",
            }:
                return False
            raise
        return True

    def _lock_config(self, target: S3Target) -> dict[str, Any] | None:
        try:
            with s3_errors(target, f"reading the object lock of {target.bucket}"):
                config: dict[str, Any] = target.client.get_object_lock_configuration(Bucket=target.bucket)
        except ServiceError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and "ObjectLock" in _code(cause):
                return None
            raise
        return config.get("ObjectLockConfiguration")

    def _lock_matches(self, lock: dict[str, Any]) -> bool:
        """Compare what matters: some endpoints add `Years: 0` next to `Days`."""
        retention = lock.get("Rule", {}).get("DefaultRetention", {})
        return (
            lock.get("ObjectLockEnabled") == "Enabled"
            and retention.get("Mode") == self.policy.object_lock.mode.upper()
            and retention.get("Days") == self.policy.object_lock.days
            and not retention.get("Years")
        )

    def _lifecycle_ok(self, target: S3Target) -> bool:
        try:
            with s3_errors(target, f"reading the lifecycle of {target.bucket}"):
                rules = target.client.get_bucket_lifecycle_configuration(Bucket=target.bucket).get("Rules", [])
        except ServiceError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and _code(cause) == "NoSuchLifecycleConfiguration":
                return False
            raise
        wanted = wanted_lifecycle(self.policy)
        for rule in rules:
            if rule.get("ID") == LIFECYCLE_RULE_ID:
                days = rule.get("NoncurrentVersionExpiration", {}).get("NoncurrentDays")
                return bool(
                    rule.get("Status") == "Enabled" and days == wanted["NoncurrentVersionExpiration"]["NoncurrentDays"]
                )
        return False

    def _sse_ok(self, target: S3Target) -> bool | None:
        """True: default SSE set; False: not set; None: the endpoint does not offer it."""
        if self.policy.sse == "off":
            return True
        try:
            target.client.get_bucket_encryption(Bucket=target.bucket)
            return True
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "ServerSideEncryptionConfigurationNotFoundError":
                return False
            if _code(exc) in {"NotImplemented", "501"}:
                return None
            raise ServiceError(f"S3 at {target.endpoint} refused reading the encryption of {target.bucket}") from exc

    def plan(self) -> list[Step]:
        steps = [Step("vault", f"data key at {self.policy.encryption_key_vault_path}", not self._has_key())]
        for name, target in self.targets():
            if not self._bucket_exists(target):
                steps.append(Step(name, f"create bucket {target.bucket} with object lock and versioning", True))
                steps.append(Step(name, "default retention " + self._describe_lock(), True))
                steps.append(Step(name, "default encryption AES256 (where offered)", self.policy.sse != "off"))
                steps.append(
                    Step(name, f"lifecycle: old versions expire after {self.policy.noncurrent_version_days} days", True)
                )
                continue
            lock = self._lock_config(target)
            if lock is None or lock.get("ObjectLockEnabled") != "Enabled":
                raise CheckFailed(
                    f"bucket {target.bucket} at {target.endpoint} exists without object lock",
                    hint="object lock can only be enabled when a bucket is created: name a new bucket in the site file",
                )
            steps.append(Step(name, "default retention " + self._describe_lock(), not self._lock_matches(lock)))
            sse = self._sse_ok(target)
            if sse is not None:
                steps.append(Step(name, "default encryption AES256", not sse))
            steps.append(
                Step(
                    name,
                    f"lifecycle: old versions expire after {self.policy.noncurrent_version_days} days",
                    not self._lifecycle_ok(target),
                )
            )
        return steps

    def _describe_lock(self) -> str:
        return f"{self.policy.object_lock.mode} {self.policy.object_lock.days} days"

    def apply(self) -> list[Step]:
        """Do what plan() lists as needed; returns the steps taken."""
        done: list[Step] = []
        if not self._has_key():
            key = DataKey.generate()
            self.backends.write_secret(
                self.policy.encryption_key_vault_path,
                {"key_b64": base64.b64encode(key.key).decode(), "algorithm": "AES-256-GCM"},
            )
            done.append(Step("vault", f"data key at {self.policy.encryption_key_vault_path}", True))
        for name, target in self.targets():
            client, bucket = target.client, target.bucket
            if not self._bucket_exists(target):
                with s3_errors(target, f"creating bucket {bucket}"):
                    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
                done.append(Step(name, f"create bucket {bucket} with object lock and versioning", True))
            with s3_errors(target, f"configuring bucket {bucket}"):
                client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=dict(VERSIONING))
                lock = self._lock_config(target)
                if lock is None or lock.get("ObjectLockEnabled") != "Enabled":
                    raise CheckFailed(
                        f"bucket {bucket} at {target.endpoint} exists without object lock",
                        hint="object lock can only be enabled when a bucket is created: name a new bucket",
                    )
                if not self._lock_matches(lock):
                    client.put_object_lock_configuration(
                        Bucket=bucket, ObjectLockConfiguration=wanted_lock(self.policy)
                    )
                    done.append(Step(name, "default retention " + self._describe_lock(), True))
                if self._sse_ok(target) is False:
                    client.put_bucket_encryption(
                        Bucket=bucket,
                        ServerSideEncryptionConfiguration=wanted_sse(self.policy),
                    )
                    done.append(Step(name, "default encryption AES256", True))
                if not self._lifecycle_ok(target):
                    client.put_bucket_lifecycle_configuration(
                        Bucket=bucket, LifecycleConfiguration={"Rules": [wanted_lifecycle(self.policy)]}
                    )
                    done.append(
                        Step(
                            name,
                            f"lifecycle: old versions expire after {self.policy.noncurrent_version_days} days",
                            True,
                        )
                    )
        return done
