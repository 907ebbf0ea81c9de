"""The least-privilege S3 policy of the DR agent's credentials (stacks/DESIGN.md §2 "DrBuckets").

The agent (the shipper, backup, restore, drill; ClickHouse's own BACKUP with the same keys) writes locked
objects and reads them back; it never needs to change a bucket, and it must not be able to destroy what
object lock protects. So: allow exactly the S3 actions appliance/dr uses, on the one bucket and the DR
prefix, and deny explicitly what would undo the lock, should another policy on the same identity allow
it. `dr init` (bucket creation and configuration) runs with an administrator's credentials, not these.
"""

from __future__ import annotations

from typing import Any

from appliance.site import Dr

# Bucket-level reads: listing (DrBucket.list, the audit_db listing, head_bucket), `dr.sse: auto`'s check of
# the default encryption, and what a restore or an auditor inspects.
BUCKET_ACTIONS = (
    "s3:ListBucket",
    "s3:ListBucketVersions",
    "s3:ListBucketMultipartUploads",
    "s3:GetBucketLocation",
    "s3:GetBucketVersioning",
    "s3:GetBucketObjectLockConfiguration",
    "s3:GetEncryptionConfiguration",
)

# Object-level, under `<prefix>/` only. PutObjectRetention: every put carries the lock headers.
# DeleteObject only adds a delete marker in a versioned bucket (the locked version stays): ClickHouse's
# BACKUP removes its own `.lock` object when it finishes (measured, stacks/DESIGN.md §8 risk 8).
# AbortMultipartUpload and ListMultipartUploadParts: ClickHouse uploads large parts in pieces and cleans up
# a failed upload.
OBJECT_ACTIONS = (
    "s3:PutObject",
    "s3:GetObject",
    "s3:GetObjectVersion",
    "s3:GetObjectRetention",
    "s3:PutObjectRetention",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
)

# Denied whatever else allows them: each would let a stolen agent key shorten or lift the protection.
DENIED_ACTIONS = (
    "s3:BypassGovernanceRetention",
    "s3:DeleteObjectVersion",
    "s3:PutBucketObjectLockConfiguration",
    "s3:PutLifecycleConfiguration",
    "s3:PutBucketPolicy",
    "s3:DeleteBucket",
)


def bucket_arn(bucket: str) -> str:
    return f"arn:aws:s3:::{bucket}"


def backup_agent_policy(dr: Dr, bucket: str) -> dict[str, Any]:
    """The IAM policy document (also usable as a bucket policy with a Principal added) for `bucket`."""
    arn = bucket_arn(bucket)
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "DrBucketRead", "Effect": "Allow", "Action": list(BUCKET_ACTIONS), "Resource": [arn]},
            {
                "Sid": "DrObjects",
                "Effect": "Allow",
                "Action": list(OBJECT_ACTIONS),
                "Resource": [f"{arn}/{dr.prefix}/*"],
            },
            {"Sid": "DrKeepLocked", "Effect": "Deny", "Action": list(DENIED_ACTIONS), "Resource": [arn, f"{arn}/*"]},
        ],
    }


def with_principal(policy: dict[str, Any], principal: str) -> dict[str, Any]:
    """The same document as a bucket policy: each statement names the agent (MinIO, Ceph RGW)."""
    return {
        **policy,
        "Statement": [{**statement, "Principal": {"AWS": [principal]}} for statement in policy["Statement"]],
    }
