"""DrBuckets' declaration on real moto S3 servers with IAM enforced (stacks/DESIGN.md §5, risk 8).

No Pulumi CLI or pulumi-aws plugin can run here, so a small applier stands in for the plugin: it turns the
mocked DrBuckets inputs (as the engine would receive them) into the boto3 calls they mean, through a client
built from the declared aws.Provider (its endpoint, region and the keys it got from the KV invoke). Then:
`appliance dr init`'s plan finds every bucket step already as wanted (parity), and the agent's policy lets
the DR code (DrBucket, ClickHouse's BACKUP) work while it refuses what would undo the lock.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import requests
import yaml
from botocore.config import Config
from pulumi.runtime.mocks import MockCallArgs

from appliance.backends import Backends, S3Target
from appliance.dr.crypto import DataKey
from appliance.dr.objects import DrBucket
from appliance.dr.setup import DrSetup, wanted_replication
from appliance.errors import ServiceError
from appliance.site import ExternalS3, Site
from stacks.components.dr_buckets import DrBuckets
from tests.conftest import REPO
from tests.integration.dr_support import S3Endpoint, endpoint_pair
from tests.unit.pulumi_harness import MembriaMocks, RecordingMonitor, Registered, run_program

pytestmark = pytest.mark.integration

AGENT = "membria-dr-agent"
DR = {"object_lock": {"mode": "governance", "days": 2}, "sse": "AES256", "noncurrent_version_days": 30}
ROLE = "arn:aws:iam::123456789012:role/membria-dr-replication"


@dataclass(frozen=True)
class Keys:
    access: str
    secret: str


def s3_client(url: str, keys: Keys, service: str = "s3", region: str = "us-east-1") -> Any:
    return boto3.client(
        service,
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=keys.access,
        aws_secret_access_key=keys.secret,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


@contextlib.contextmanager
def unauthenticated(endpoint: S3Endpoint) -> Iterator[None]:
    """moto lets requests through unsigned while its count lasts: for IAM set-up only. Afterwards an endpoint
    with auth enforces again from the first request; one without stays open."""
    reset = f"{endpoint.url}/moto-api/reset-auth"
    answer = requests.post(reset, data=b"1000000", timeout=10)
    answer.raise_for_status()
    previous = float(answer.json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])
    try:
        yield
    finally:
        again = b"0" if math.isfinite(previous) else b"inf"
        requests.post(reset, data=again, timeout=10).raise_for_status()


def site_on(primary: str, replica: str, bucket: str) -> Site:
    """rack.yaml with its two external targets moved onto the given endpoints, and a short governance lock (so
    the test can show an administrator may still bypass it where the agent may not)."""
    data = yaml.safe_load((REPO / "examples" / "rack.yaml").read_text())
    data["services"]["s3"] = {
        "primary": {"backend": "external", "url": primary, "bucket": bucket, "credentials_vault_path": "dr/primary"},
        "replica": {"backend": "external", "url": replica, "bucket": bucket + "-r", "credentials_vault_path": "dr/rep"},
    }
    data["dr"] = {**data["dr"], **DR}
    return Site.model_validate(data)


class CredsMocks(MembriaMocks):
    """The KV invoke answers with the administrator's keys of each endpoint (what `dr init` runs with)."""

    def __init__(self, by_path: dict[str, Keys]) -> None:
        super().__init__()
        self.by_path = by_path

    def call(self, args: MockCallArgs) -> dict[str, Any]:
        answer = super().call(args)
        if args.token == "vault:kv/getSecretV2:getSecretV2":
            keys = self.by_path[args.args["name"]]
            answer["data"] = {"access_key": keys.access, "secret_key": keys.secret}
        return answer


def declare(site: Site, admin: dict[str, Keys], tmp: Path, **kwargs: Any) -> RecordingMonitor:
    def build() -> dict[str, Any]:
        return {"buckets": DrBuckets("dr", site, state_dir=tmp, **kwargs).buckets}

    _, monitor = run_program(build, mocks=CredsMocks(admin))
    return monitor


# --- the stand-in for the pulumi-aws plugin -------------------------------------------------------------------


def _lock(i: dict[str, Any]) -> dict[str, Any]:
    retention = i["rule"]["defaultRetention"]
    rule = {"DefaultRetention": {"Mode": retention["mode"], "Days": int(retention["days"])}}
    return {"ObjectLockConfiguration": {"ObjectLockEnabled": i["objectLockEnabled"], "Rule": rule}}


def _sse(i: dict[str, Any]) -> dict[str, Any]:
    rules = [
        {
            "ApplyServerSideEncryptionByDefault": {
                "SSEAlgorithm": r["applyServerSideEncryptionByDefault"]["sseAlgorithm"]
            }
        }
        for r in i["rules"]
    ]
    return {"ServerSideEncryptionConfiguration": {"Rules": rules}}


def _lifecycle(i: dict[str, Any]) -> dict[str, Any]:
    rules = [
        {
            "ID": r["id"],
            "Status": r["status"],
            "Filter": {"Prefix": r["filter"]["prefix"]},
            "NoncurrentVersionExpiration": {"NoncurrentDays": int(r["noncurrentVersionExpiration"]["noncurrentDays"])},
        }
        for r in i["rules"]
    ]
    return {"LifecycleConfiguration": {"Rules": rules}}


def _block(i: dict[str, Any]) -> dict[str, Any]:
    names = {"blockPublicAcls", "ignorePublicAcls", "blockPublicPolicy", "restrictPublicBuckets"}
    return {"PublicAccessBlockConfiguration": {n[0].upper() + n[1:]: i[n] for n in names}}


def _replication(i: dict[str, Any]) -> dict[str, Any]:
    rules = [
        {
            "ID": r["id"],
            "Priority": int(r["priority"]),
            "Status": r["status"],
            "Filter": {"Prefix": r["filter"]["prefix"]},
            "Destination": {"Bucket": r["destination"]["bucket"]},
            "DeleteMarkerReplication": {"Status": r["deleteMarkerReplication"]["status"]},
        }
        for r in i["rules"]
    ]
    return {"ReplicationConfiguration": {"Role": i["role"], "Rules": rules}}


# (type, boto3 method, inputs -> arguments besides Bucket), in the order the engine's dependencies give.
APPLY: list[tuple[str, str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("aws:s3/bucket:Bucket", "create_bucket", lambda i: {"ObjectLockEnabledForBucket": i["objectLockEnabled"]}),
    (
        "aws:s3/bucketVersioning:BucketVersioning",
        "put_bucket_versioning",
        lambda i: {"VersioningConfiguration": {"Status": i["versioningConfiguration"]["status"]}},
    ),
    ("aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration", "put_object_lock_configuration", _lock),
    (
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
        "put_bucket_encryption",
        _sse,
    ),
    (
        "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
        "put_bucket_lifecycle_configuration",
        _lifecycle,
    ),
    ("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", "put_public_access_block", _block),
    ("aws:s3/bucketPolicy:BucketPolicy", "put_bucket_policy", lambda i: {"Policy": i["policy"]}),
    ("aws:s3/bucketReplicationConfig:BucketReplicationConfig", "put_bucket_replication", _replication),
]


def client_for(monitor: RecordingMonitor, resource: Registered, service: str) -> Any:
    """A boto3 client as the declared provider of `resource` would be configured."""
    provider = monitor.by_urn(resource.provider.rsplit("::", 1)[0])
    endpoints = json.loads(provider.inputs["endpoints"])[0]
    keys = Keys(provider.raw["accessKey"]["value"], provider.raw["secretKey"]["value"])  # inside their envelopes
    return s3_client(endpoints[service], keys, service, provider.inputs["region"])


def apply_declared(monitor: RecordingMonitor, endpoints: dict[str, S3Endpoint]) -> list[str]:
    """Make what the mocked resources declare; returns `type name` of each resource applied."""
    done = []
    for type_, method, arguments in APPLY:
        for resource in monitor.of_type(type_):
            if type_.endswith(":Bucket"):
                name = resource.inputs["bucket"]
            else:  # the bucket input is the Bucket's id: follow the dependency to its name
                (bucket_urn,) = resource.property_dependencies["bucket"]
                name = monitor.by_urn(bucket_urn).inputs["bucket"]
            getattr(client_for(monitor, resource, "s3"), method)(Bucket=name, **arguments(resource.inputs))
            done.append(f"{type_} {resource.name}")
    for policy in monitor.of_type("aws:iam/userPolicy:UserPolicy"):
        iam = client_for(monitor, policy, "iam")
        endpoint = next(e for e in endpoints.values() if e.url == iam.meta.endpoint_url)
        with unauthenticated(endpoint):  # the admin's keys are S3-only; the engine's would be IAM admin's
            iam.put_user_policy(
                UserName=policy.inputs["user"], PolicyName=policy.inputs["name"], PolicyDocument=policy.inputs["policy"]
            )
        done.append(f"aws:iam/userPolicy:UserPolicy {policy.name}")
    return done


class VaultlessBackends(Backends):
    """`dr init`'s view of the site: the real `Backends.s3()` (on `s3_target_spec`), with 'Vault' a dict that
    holds each target's administrator keys where the site names them, and a data key."""

    def __init__(self, site: Site, admin: dict[str, Keys]) -> None:
        super().__init__(site)
        self.secrets: dict[str, dict[str, Any]] = {site.dr.encryption_key_vault_path: {"key_b64": "x"}}
        for name, keys in admin.items():
            spec = site.services.s3.primary if name == "primary" else site.services.s3.replica
            assert isinstance(spec, ExternalS3)
            self.secrets[spec.credentials_vault_path] = {"access_key": keys.access, "secret_key": keys.secret}

    def read_secret(self, path: str) -> dict[str, Any]:
        if path not in self.secrets:
            raise ServiceError(f"no secret at {path}")
        return self.secrets[path]

    def write_secret(self, path: str, data: dict[str, Any]) -> None:
        self.secrets[path] = data


# --- fixtures ----------------------------------------------------------------------------------------------------


@dataclass
class Applied:
    site: Site
    endpoints: dict[str, S3Endpoint]
    admin: dict[str, Keys]  # per target
    agent: Keys  # on the primary (IAM enforced there)
    monitor: RecordingMonitor
    done: list[str]

    def targets(self, keys: dict[str, Keys]) -> dict[str, S3Target]:
        out = {}
        for name, endpoint in self.endpoints.items():
            spec = self.site.services.s3.primary if name == "primary" else self.site.services.s3.replica
            assert spec is not None
            out[name] = S3Target(s3_client(endpoint.url, keys[name]), spec.bucket, endpoint.url)
        return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Endpoint, S3Endpoint]]:
    with endpoint_pair(tmp_path_factory.mktemp("moto"), auth=True) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def applied(pair: tuple[S3Endpoint, S3Endpoint], tmp_path_factory: pytest.TempPathFactory) -> Applied:
    primary, replica = pair
    site = site_on(primary.url, replica.url, f"dr-{uuid.uuid4().hex[:8]}")
    admin = {"primary": Keys(primary.access_key, primary.secret_key), "replica": Keys("test", "test")}
    agent = {}
    for name, endpoint in (("primary", primary), ("replica", replica)):
        iam = s3_client(endpoint.url, admin[name], "iam")
        with unauthenticated(endpoint):
            iam.create_user(UserName=AGENT)
            key = iam.create_access_key(UserName=AGENT)["AccessKey"]
        agent[name] = Keys(key["AccessKeyId"], key["SecretAccessKey"])
    by_path = {"dr/primary": admin["primary"], "dr/rep": admin["replica"]}
    monitor = declare(site, by_path, tmp_path_factory.mktemp("state"), agent_user=AGENT)
    done = apply_declared(monitor, {"primary": primary, "replica": replica})
    return Applied(site, {"primary": primary, "replica": replica}, admin, agent["primary"], monitor, done)


def denied(call: Callable[[], Any]) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


# --- parity ------------------------------------------------------------------------------------------------------


def test_dr_init_finds_every_bucket_step_already_as_wanted(applied: Applied) -> None:
    assert len(applied.done) == 2 * 7  # bucket, versioning, lock, SSE, lifecycle, public access, user policy
    backends = VaultlessBackends(applied.site, applied.admin)
    steps = DrSetup(backends).plan()
    for target in ("primary", "replica"):
        mine = {step.what.split(" ")[0] for step in steps if step.target == target}
        assert mine == {"default", "lifecycle:"}, steps  # retention, encryption, lifecycle all checked
        assert len([s for s in steps if s.target == target]) == 3
    assert [step for step in steps if step.needed] == []
    assert DrSetup(backends).apply() == []
    assert backends.s3("replica").endpoint == applied.endpoints["replica"].url
    backends.secrets["dr/rep"].pop("secret_key")
    with pytest.raises(ServiceError, match="replica credentials in Vault lack secret_key"):
        backends.s3("replica")


def test_dr_init_on_fresh_buckets_makes_the_same_configuration(applied: Applied) -> None:
    """DrSetup.apply (on the shared wanted_* functions) and the declaration read back alike."""
    fresh_site = site_on(
        applied.endpoints["primary"].url, applied.endpoints["replica"].url, f"dr-{uuid.uuid4().hex[:8]}"
    )
    backends = VaultlessBackends(fresh_site, applied.admin)
    del backends.secrets[fresh_site.dr.encryption_key_vault_path]
    taken = DrSetup(backends).apply()
    assert len(taken) == 1 + 2 * 4  # the data key; per target: bucket, retention, encryption, lifecycle
    assert "key_b64" in backends.secrets[fresh_site.dr.encryption_key_vault_path]
    for target in ("primary", "replica"):
        ours, theirs = applied.targets(applied.admin)[target], backends.s3(target)

        def read(t: S3Target) -> list[Any]:
            c, b = t.client, t.bucket
            return [
                c.get_bucket_versioning(Bucket=b)["Status"],
                c.get_object_lock_configuration(Bucket=b)["ObjectLockConfiguration"],
                c.get_bucket_encryption(Bucket=b)["ServerSideEncryptionConfiguration"]["Rules"],
                c.get_bucket_lifecycle_configuration(Bucket=b)["Rules"],
            ]

        assert read(ours) == read(theirs)
        block = ours.client.get_public_access_block(Bucket=ours.bucket)["PublicAccessBlockConfiguration"]
        assert block == dict.fromkeys(block, True) and len(block) == 4


def test_s3_replication_is_applied_only_on_one_endpoint(pair: tuple[S3Endpoint, S3Endpoint], tmp_path: Path) -> None:
    primary, _ = pair
    site = site_on(primary.url, primary.url, f"dr-{uuid.uuid4().hex[:8]}")
    admin = Keys(primary.access_key, primary.secret_key)
    monitor = declare(
        site, {"dr/primary": admin, "dr/rep": admin}, tmp_path, replication="s3", replication_role_arn=ROLE
    )
    done = apply_declared(monitor, {"primary": primary})
    assert done[-1].startswith("aws:s3/bucketReplicationConfig")
    source = site.services.s3.primary.bucket
    destination = f"arn:aws:s3:::{source}-r"
    got = s3_client(primary.url, admin).get_bucket_replication(Bucket=source)["ReplicationConfiguration"]
    wanted = wanted_replication(site.dr, role_arn=ROLE, destination_arn=destination)
    assert got["Role"] == wanted["Role"]
    (rule,) = got["Rules"]
    # moto answers every rule's Filter as {"Prefix": ""} whatever was put: the prefix is checked in the unit test.
    expected = {k: v for k, v in wanted["Rules"][0].items() if k != "Filter"}
    assert {k: rule[k] for k in expected} == expected


# --- the agent's policy ------------------------------------------------------------------------------------------


def agent_bucket(applied: Applied) -> DrBucket:
    targets = applied.targets({"primary": applied.agent, "replica": applied.admin["replica"]})
    return DrBucket(targets["primary"], targets["replica"], DataKey.generate(), applied.site.dr, site_name="acme")


def test_the_agent_writes_and_reads_through_the_dr_bucket(applied: Applied) -> None:
    bucket = agent_bucket(applied)
    data = b"shipment: rows 1..100\n" * 500
    stored = bucket.put_bytes("ship/state/000000000001.bin", data)
    assert stored.version_id
    assert bucket.get_bytes("ship/state/000000000001.bin") == data
    assert bucket.get_bytes("ship/state/000000000001.bin", target="replica") == data
    assert bucket.list("ship/") == ["ship/state/000000000001.bin"] and bucket.exists("ship/state/000000000001.bin")
    assert bucket.sse_supported()  # GetEncryptionConfiguration is allowed: SSE is asked for, not silently dropped
    head = bucket.primary.client.head_object(
        Bucket=bucket.primary.bucket, Key=bucket.full_key("ship/state/000000000001.bin")
    )
    assert head["ObjectLockMode"] == "GOVERNANCE" and head["ServerSideEncryption"] == "AES256"


def test_the_agent_cannot_undo_the_lock_or_reach_elsewhere(applied: Applied) -> None:
    bucket = agent_bucket(applied)
    agent, name = bucket.primary.client, bucket.primary.bucket
    admin = s3_client(applied.endpoints["primary"].url, applied.admin["primary"])
    v1 = bucket.put_bytes("backups/b1/manifest.json", b"{}").version_id
    v2 = bucket.put_bytes("backups/b2/manifest.json", b"{}").version_id
    full1, full2 = bucket.full_key("backups/b1/manifest.json"), bucket.full_key("backups/b2/manifest.json")

    # A delete only hides the object (a marker); removing that marker is a version delete: denied.
    marker = agent.delete_object(Bucket=name, Key=full1)["VersionId"]
    assert denied(lambda: agent.delete_object(Bucket=name, Key=full1, VersionId=marker)) == "AccessDenied"
    assert (
        denied(lambda: agent.delete_object(Bucket=name, Key=full1, VersionId=v1, BypassGovernanceRetention=True))
        == "AccessDenied"
    )
    # The same calls with the administrator's keys pass: the refusal is the policy's, not the lock's.
    admin.delete_object(Bucket=name, Key=full1, VersionId=marker)
    admin.delete_object(Bucket=name, Key=full2, VersionId=v2, BypassGovernanceRetention=True)

    rules = {"Rules": [{"ID": "x", "Status": "Enabled", "Filter": {"Prefix": ""}, "Expiration": {"Days": 1}}]}
    assert (
        denied(lambda: agent.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration=rules))
        == "AccessDenied"
    )
    lock = {"ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}}
    assert (
        denied(lambda: agent.put_object_lock_configuration(Bucket=name, ObjectLockConfiguration=lock)) == "AccessDenied"
    )
    assert denied(lambda: agent.put_bucket_policy(Bucket=name, Policy="{}")) == "AccessDenied"
    assert denied(lambda: agent.put_object(Bucket=name, Key="outside-the-prefix", Body=b"x")) == "AccessDenied"
    other = f"other-{uuid.uuid4().hex[:8]}"
    admin.create_bucket(Bucket=other)
    assert denied(lambda: agent.put_object(Bucket=other, Key="membria/x", Body=b"x")) == "AccessDenied"
    assert denied(lambda: agent.list_objects_v2(Bucket=other)) == "AccessDenied"
    admin.put_object(Bucket=other, Key="membria/y", Body=b"y")
    assert denied(lambda: agent.get_object(Bucket=other, Key="membria/y")) == "AccessDenied"


# --- ClickHouse's own BACKUP with the agent's keys (risk 8) ------------------------------------------------------


def _clickhouse_backup(url: str, keys: tuple[str, str], bucket: str, dr: dict[str, Any], path: str) -> list[str]:
    """In a fresh process (chDB admits one per path): audit rows, then a full and an incremental BACKUP."""
    from appliance.dr.stores.audit_db import AuditDbStore
    from appliance.site import Dr
    from runtime.common.audit import client_factory
    from runtime.gateway.audit_writer import AuditWriter

    class Place:
        def audit_db(self) -> Any:
            return client_factory(f"chdb://{path}")()

    writer = AuditWriter.for_dsn(f"chdb://{path}", pseudonym_key=b"k" * 32).start()
    for i in range(20):
        writer.submit({"request_id": f"r{i}", "subject": "a@acme.example", "departments": ["engineering"],
                       "route": "/v1/chat/completions", "method": "POST", "model": "m", "decision": "allow",
                       "prompt_tokens": i, "latency_ms": 1.0, "status": 200})  # fmt: skip
    writer.close()
    target = S3Target(s3_client(url, Keys(*keys)), bucket, url)
    dr_bucket = DrBucket(target, None, DataKey(b"k" * 32), Dr.model_validate(dr), site_name="acme")
    store, place = AuditDbStore(), Place()
    first = store.backup(dr_bucket, place, "backups/c1/audit_db/", None, lambda _: None)  # type: ignore[arg-type]
    store.backup(dr_bucket, place, "backups/c2/audit_db/", first, lambda _: None)  # type: ignore[arg-type]
    return dr_bucket.list("backups/")


def test_clickhouse_backup_works_with_the_agent_keys(applied: Applied, tmp_path: Path) -> None:
    """ClickHouse removes its own `.lock` object when a BACKUP finishes: without s3:DeleteObject it fails."""
    spec = applied.site.services.s3.primary
    args = (applied.endpoints["primary"].url, (applied.agent.access, applied.agent.secret), spec.bucket, DR)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        keys = pool.submit(_clickhouse_backup, *args, str(tmp_path / "chdb")).result(timeout=300)
    assert "backups/c1/audit_db/native/.backup" in keys and "backups/c2/audit_db/native/.backup" in keys
    assert not [k for k in keys if k.endswith("/.lock")]  # removed by ClickHouse itself, with DeleteObject
