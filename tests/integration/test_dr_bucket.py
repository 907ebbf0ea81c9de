"""The DR bucket against a real moto S3 server: encryption, object lock, the verified replica copy, and the
failures an operator meets (missing or corrupt objects, wrong credentials, the endpoint down)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import botocore.exceptions
import pytest

from appliance.backends import S3Target
from appliance.dr.crypto import DataKey
from appliance.dr.objects import CorruptObject, DrBucket, MissingObject, S3Denied, S3Unavailable
from appliance.site import Dr
from tests.integration.dr_support import Outage, S3Endpoint, dr_bucket, endpoint_pair

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Endpoint, S3Endpoint]]:
    with endpoint_pair(tmp_path_factory.mktemp("moto"), auth=True) as pair:
        yield pair


@pytest.fixture
def bucket(endpoints: tuple[S3Endpoint, S3Endpoint]) -> DrBucket:
    return dr_bucket(*endpoints)


def raw(target: S3Target, full_key: str) -> bytes:
    body: bytes = target.client.get_object(Bucket=target.bucket, Key=full_key)["Body"].read()
    return body


def test_objects_are_encrypted_on_both_targets_and_read_back(bucket: DrBucket) -> None:
    data = b"audit row 1: alice asked about VX-55\n" * 2000
    stored = bucket.put_bytes("backups/b1/state/x.sqlite", data)
    full = bucket.full_key("backups/b1/state/x.sqlite")
    assert full.startswith("membria/test/")
    assert bucket.replica is not None
    for target in (bucket.primary, bucket.replica):
        blob = raw(target, full)
        assert b"alice" not in blob and blob.startswith(b"MDR1")
    assert bucket.get_bytes("backups/b1/state/x.sqlite") == data
    assert bucket.get_bytes("backups/b1/state/x.sqlite", target="replica") == data
    assert stored.size == len(data) and stored.version_id


def test_objects_are_locked_with_the_site_retention(bucket: DrBucket) -> None:
    stored = bucket.put_bytes("ship/state/000000000001-aa.bin", b"x")
    client, name = bucket.primary.client, bucket.primary.bucket
    full = bucket.full_key("ship/state/000000000001-aa.bin")
    # (moto has no GetObjectRetention; HEAD returns the same two fields)
    head = client.head_object(Bucket=name, Key=full, VersionId=stored.version_id)
    assert head["ObjectLockMode"] == "GOVERNANCE"
    days = (head["ObjectLockRetainUntilDate"] - datetime.now(UTC)).days
    assert 28 <= days <= 30
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=name, Key=full, VersionId=stored.version_id)
    assert client.get_bucket_versioning(Bucket=name)["Status"] == "Enabled"


def test_compliance_mode_is_applied_when_the_site_asks(endpoints: tuple[S3Endpoint, S3Endpoint]) -> None:
    b = dr_bucket(endpoints[0])
    b.policy = Dr.model_validate({"object_lock": {"mode": "compliance", "days": 7}})
    stored = b.put_bytes("k", b"x")
    head = b.primary.client.head_object(Bucket=b.primary.bucket, Key=b.full_key("k"), VersionId=stored.version_id)
    assert head["ObjectLockMode"] == "COMPLIANCE"


def test_a_missing_object_is_named(bucket: DrBucket) -> None:
    with pytest.raises(MissingObject, match=r"membria/test/backups/none/manifest.json is missing"):
        bucket.get_bytes("backups/none/manifest.json")


def test_a_corrupted_object_fails_loudly(bucket: DrBucket) -> None:
    bucket.put_bytes("backups/b2/vectors/c.parquet", b"vectors" * 1000)
    full = bucket.full_key("backups/b2/vectors/c.parquet")
    blob = bytearray(raw(bucket.primary, full))
    blob[100] ^= 0xFF  # a bit rot, or an edit by someone with write access
    bucket.primary.client.put_object(Bucket=bucket.primary.bucket, Key=full, Body=bytes(blob))
    with pytest.raises(CorruptObject, match=r"backups/b2/vectors/c\.parquet in the primary bucket is corrupt"):
        bucket.get_bytes("backups/b2/vectors/c.parquet")
    # the replica still has the good copy
    assert bucket.get_bytes("backups/b2/vectors/c.parquet", target="replica") == b"vectors" * 1000


def test_an_object_replaced_by_another_valid_one_fails_its_recorded_checksum(bucket: DrBucket) -> None:
    first = bucket.put_bytes("ship/audit_db/1.bin", b"first")
    bucket.put_bytes("ship/audit_db/1.bin", b"second")  # a new version under the same key
    with pytest.raises(CorruptObject, match="not the recorded"):
        bucket.get_bytes("ship/audit_db/1.bin", expect_sha256=first.sha256)


def test_a_different_data_key_cannot_read(bucket: DrBucket) -> None:
    bucket.put_bytes("k2", b"secret")
    other = DrBucket(bucket.primary, None, DataKey.generate(), bucket.policy, site_name="test")
    with pytest.raises(CorruptObject, match="another data key"):
        other.get_bytes("k2")


def test_the_replica_copy_is_verified_not_assumed(endpoints: tuple[S3Endpoint, S3Endpoint], tmp_path: Path) -> None:
    # A replica that stores something else than it was sent: the read-back catches it.
    b = dr_bucket(*endpoints)
    assert b.replica is not None
    original = b.replica.client

    class Tampering:  # a replica endpoint that corrupts what it stores (the real moto client underneath)
        def __getattr__(self, name: str) -> object:
            return getattr(original, name)

        def put_object(self, **kwargs: object) -> object:
            kwargs["Body"] = b"MDR1" + b"\0" * 64
            kwargs.pop("ChecksumAlgorithm", None)
            return original.put_object(**kwargs)

    b.replica = S3Target(Tampering(), b.replica.bucket, b.replica.endpoint)
    with pytest.raises(CorruptObject, match=r"replica copy .* differs"):
        b.put_bytes("k3", b"data")


def test_wrong_credentials_give_a_clear_error(endpoints: tuple[S3Endpoint, S3Endpoint]) -> None:
    primary = endpoints[0]
    good = dr_bucket(primary)
    bad_client = primary.client(secret_key="not-the-secret")
    bad = DrBucket(S3Target(bad_client, good.primary.bucket, primary.url), None, good.key, good.policy, site_name="t")
    with pytest.raises(S3Denied, match="refused the credentials") as err:
        bad.put_bytes("k", b"x")
    assert "not-the-secret" not in str(err.value)
    unknown = primary.client(access_key="AKIAUNKNOWN000000", secret_key="x")
    with pytest.raises(S3Denied, match="InvalidAccessKeyId"):
        DrBucket(S3Target(unknown, good.primary.bucket, primary.url), None, good.key, good.policy, site_name="t").list(
            ""
        )


def test_endpoint_down_is_unavailable_and_back_up_works(endpoints: tuple[S3Endpoint, S3Endpoint]) -> None:
    primary = endpoints[0]
    outage = Outage(primary.port)
    good = dr_bucket(primary)
    through = S3Target(_client_at(primary, outage.url), good.primary.bucket, outage.url)
    via = DrBucket(through, None, good.key, good.policy, site_name="test")
    via.put_bytes("before", b"1")
    outage.down()
    with pytest.raises(S3Unavailable, match="unreachable"):
        via.put_bytes("during", b"2")
    outage.up()  # the endpoint is back: the same write goes through, and what was there before is intact
    via.put_bytes("during", b"2")
    assert via.get_bytes("before") == b"1" and via.get_bytes("during") == b"2"


def _client_at(endpoint: S3Endpoint, url: str) -> object:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10),
    )
