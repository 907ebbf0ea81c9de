"""The DR stack under Pulumi's mocks: per target, the buckets are declared exactly as `appliance dr init` wants
them (the same appliance functions), with the agent's policy, through a provider that points at the target and
holds its credentials only as secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pulumi.runtime.mocks import MockCallArgs

from appliance.backends import s3_target_spec
from appliance.dr.access import backup_agent_policy, with_principal
from appliance.dr.setup import PUBLIC_ACCESS_BLOCK, wanted_lifecycle, wanted_lock, wanted_sse
from appliance.errors import BadInput, MissingEnvironment
from appliance.lab.state import LabState
from appliance.site import Site, load_site
from stacks.components.config import StackSettings
from stacks.dr import program
from tests.conftest import REPO
from tests.unit.pulumi_harness import (
    CANARY_ACCESS_KEY,
    CANARY_SECRET_KEY,
    CANARY_VAULT_TOKEN,
    MembriaMocks,
    RecordingMonitor,
    Registered,
    is_secret_envelope,
    leaks,
    recorded,
    run_program,
)

pytestmark = pytest.mark.unit

CANARY_SECRET_ID = "canary-approle-secret-id-9a7e"
CANARIES = [CANARY_ACCESS_KEY, CANARY_SECRET_KEY, CANARY_VAULT_TOKEN, CANARY_SECRET_ID]
S3 = "aws:s3/"
PROVIDER = "pulumi:providers:aws"


class KvMocks(MembriaMocks):
    """The KV invoke answers with the field names the appliance reads (`Backends.s3`), canary values."""

    def call(self, args: MockCallArgs) -> dict[str, Any]:
        answer = super().call(args)
        if args.token == "vault:kv/getSecretV2:getSecretV2":
            data = {"access_key": CANARY_ACCESS_KEY, "secret_key": CANARY_SECRET_KEY}
            answer.update(data=data, data_json=json.dumps(data))
        return answer


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A lab state directory with what `appliance lab up` leaves: OpenBao's root token and CA."""
    secrets = tmp_path / "secrets"
    (secrets / "openbao-tls").mkdir(parents=True)
    (secrets / "openbao-root-token").write_text(CANARY_VAULT_TOKEN + "\n")
    (secrets / "openbao-tls" / "vault-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    return tmp_path


@pytest.fixture(autouse=True)
def approle_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMBRIA_VAULT_SECRET_ID", CANARY_SECRET_ID)  # rack.yaml's secret_id_env


def site_of(name: str) -> Site:
    return load_site(REPO / "examples" / f"{name}.yaml")


def run(
    name: str, state_dir: Path, *, preview: bool = False, site: Site | None = None, **kwargs: Any
) -> tuple[dict[str, Any], RecordingMonitor, KvMocks]:
    site = site or site_of(name)
    settings = StackSettings(REPO / "examples" / f"{name}.yaml", REPO, state_dir)
    mocks = KvMocks()
    exports, monitor = run_program(lambda: program.build(settings, site, **kwargs), mocks=mocks, preview=preview)
    return exports, monitor, mocks


def child(monitor: RecordingMonitor, type_: str, name: str) -> Registered:
    return monitor.one(S3 + type_, name)


def uses(resource: Registered, provider: Registered) -> bool:
    return resource.provider.startswith(provider.urn + "::")


def check_target(monitor: RecordingMonitor, site: Site, target: str, state_dir: Path) -> None:
    dr, spec = site.dr, s3_target_spec(site, target, LabState(state_dir))
    provider = monitor.one(PROVIDER, f"dr-s3-{target}")
    raw = provider.raw
    assert json.loads(raw["endpoints"]) == [{"s3": spec.endpoint, "iam": spec.endpoint, "sts": spec.endpoint}]
    assert raw["region"] == spec.region
    for flag in (
        "s3UsePathStyle",
        "skipCredentialsValidation",
        "skipRequestingAccountId",
        "skipMetadataApiCheck",
        "skipRegionValidation",
    ):
        assert raw[flag] == "true", flag  # provider config travels as strings
    assert is_secret_envelope(raw["accessKey"]) and raw["accessKey"]["value"] == CANARY_ACCESS_KEY
    assert is_secret_envelope(raw["secretKey"]) and raw["secretKey"]["value"] == CANARY_SECRET_KEY

    bucket = monitor.one(S3 + "bucket:Bucket", f"dr-{target}")
    assert bucket.protect and uses(bucket, provider)
    assert bucket.inputs["bucket"] == spec.bucket
    assert bucket.inputs["objectLockEnabled"] is True and bucket.inputs["forceDestroy"] is False

    def of_bucket(type_: str, suffix: str) -> Registered:
        found = child(monitor, type_, f"dr-{target}-{suffix}")
        assert uses(found, provider) and found.property_dependencies["bucket"] == [bucket.urn]
        return found

    versioning = of_bucket("bucketVersioning:BucketVersioning", "versioning")
    assert versioning.inputs["versioningConfiguration"] == {"status": "Enabled"}

    lock = of_bucket("bucketObjectLockConfiguration:BucketObjectLockConfiguration", "lock").inputs
    retention = lock["rule"]["defaultRetention"]
    wanted = wanted_lock(dr)
    assert lock["objectLockEnabled"] == wanted["ObjectLockEnabled"]
    assert {"Mode": retention["mode"], "Days": int(retention["days"])} == wanted["Rule"]["DefaultRetention"]
    assert "years" not in retention

    sse = wanted_sse(dr)
    sse_name = f"dr-{target}-sse"
    declared = [
        r
        for r in monitor.of_type(S3 + "bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
        if r.name == sse_name
    ]
    if sse is None:
        assert declared == []
    else:
        (found,) = declared
        assert found.property_dependencies["bucket"] == [bucket.urn]
        algorithms = [r["applyServerSideEncryptionByDefault"]["sseAlgorithm"] for r in found.inputs["rules"]]
        assert algorithms == [r["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] for r in sse["Rules"]]

    lifecycle = of_bucket("bucketLifecycleConfiguration:BucketLifecycleConfiguration", "lifecycle")
    (rule,) = lifecycle.inputs["rules"]
    assert {
        "ID": rule["id"],
        "Status": rule["status"],
        "Filter": {"Prefix": rule["filter"]["prefix"]},
        "NoncurrentVersionExpiration": {"NoncurrentDays": int(rule["noncurrentVersionExpiration"]["noncurrentDays"])},
    } == wanted_lifecycle(dr)
    assert versioning.urn in lifecycle.dependencies

    block = of_bucket("bucketPublicAccessBlock:BucketPublicAccessBlock", "public-access").inputs
    assert {
        "BlockPublicAcls": block["blockPublicAcls"],
        "IgnorePublicAcls": block["ignorePublicAcls"],
        "BlockPublicPolicy": block["blockPublicPolicy"],
        "RestrictPublicBuckets": block["restrictPublicBuckets"],
    } == PUBLIC_ACCESS_BLOCK


@pytest.mark.parametrize("preview", [False, True])
def test_lab_targets_as_dr_init_wants_with_a_user_policy(state_dir: Path, preview: bool) -> None:
    exports, monitor, mocks = run("lab", state_dir, preview=preview, agent_user="membria-dr")
    site = site_of("lab")
    for target in ("primary", "replica"):
        check_target(monitor, site, target, state_dir)
        spec = s3_target_spec(site, target, LabState(state_dir))
        policy = monitor.one("aws:iam/userPolicy:UserPolicy", f"dr-{target}-agent-policy")
        assert policy.inputs["user"] == "membria-dr"
        assert json.loads(policy.inputs["policy"]) == backup_agent_policy(site.dr, spec.bucket)
        assert uses(policy, monitor.one(PROVIDER, f"dr-s3-{target}"))
        assert json.loads(exports["agent_policy_json"].value[target]) == backup_agent_policy(site.dr, spec.bucket)
    assert monitor.of_type(S3 + "bucketPolicy:BucketPolicy") == []
    assert monitor.of_type(S3 + "bucketReplicationConfig:BucketReplicationConfig") == []  # app mode
    assert exports["replication_mode"].value == "app"
    # The KV invoke read each target's credentials where the appliance reads them.
    kv = [(c.args["mount"], c.args["name"]) for c in mocks.calls if c.token.startswith("vault:kv/getSecretV2")]
    assert sorted(kv) == [("secret", "membria/s3-primary"), ("secret", "membria/s3-replica")]
    vault = monitor.one("pulumi:providers:vault", "vault")
    assert is_secret_envelope(vault.raw["token"]) and vault.raw["token"]["value"] == CANARY_VAULT_TOKEN
    assert vault.raw["skipChildToken"] == "true" and vault.raw["address"] == "https://127.0.0.1:8200"
    assert leaks(recorded(monitor), CANARIES) == []
    assert leaks({k: e.value for k, e in exports.items()}, CANARIES) == []


@pytest.mark.parametrize("preview", [False, True])
def test_rack_targets_with_a_bucket_policy(state_dir: Path, preview: bool) -> None:
    principal = "arn:aws:iam::000000000000:user/membria-dr"
    exports, monitor, _ = run("rack", state_dir, preview=preview, agent_principal=principal)
    site = site_of("rack")
    assert site.dr.object_lock.mode == "compliance"  # the rack's lock differs from the lab's: both are covered
    for target in ("primary", "replica"):
        check_target(monitor, site, target, state_dir)
        spec = s3_target_spec(site, target, None)
        policy = child(monitor, "bucketPolicy:BucketPolicy", f"dr-{target}-agent-policy")
        wanted = with_principal(backup_agent_policy(site.dr, spec.bucket), principal)
        assert json.loads(policy.inputs["policy"]) == wanted
        assert policy.property_dependencies["bucket"] == [monitor.one(S3 + "bucket:Bucket", f"dr-{target}").urn]
        assert exports["buckets"].value[target] == {
            "name": spec.bucket,
            "arn": f"arn:aws:s3:::{spec.bucket}",
            "endpoint": spec.endpoint,
        }
    assert monitor.of_type("aws:iam/userPolicy:UserPolicy") == []
    # The AppRole login (provider config travels as JSON) is a secret as a whole: it holds the secret id.
    login = monitor.one("pulumi:providers:vault", "vault").raw["authLogin"]
    assert is_secret_envelope(login)
    assert json.loads(login["value"]) == {
        "path": "auth/approle/login",
        "parameters": {"role_id": "6f1c3a8e-membria-provisioner", "secret_id": CANARY_SECRET_ID},
    }
    assert leaks(recorded(monitor), CANARIES) == []


def test_sse_off_declares_no_encryption_and_no_identity_only_exports_the_policy(state_dir: Path) -> None:
    lab = site_of("lab")
    site = lab.model_copy(update={"dr": lab.dr.model_copy(update={"sse": "off"})})
    exports, monitor, _ = run("lab", state_dir, site=site)
    for target in ("primary", "replica"):
        check_target(monitor, site, target, state_dir)
    assert monitor.of_type(S3 + "bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration") == []
    assert monitor.of_type("aws:iam/userPolicy:UserPolicy") == monitor.of_type(S3 + "bucketPolicy:BucketPolicy") == []
    assert json.loads(exports["agent_policy_json"].value["primary"]) == backup_agent_policy(site.dr, "membria-dr")


@pytest.mark.parametrize("preview", [False, True])
def test_s3_mode_replicates_the_prefix_after_both_versionings(state_dir: Path, preview: bool) -> None:
    role = "arn:aws:iam::000000000000:role/membria-dr-replication"
    exports, monitor, _ = run("lab", state_dir, preview=preview, replication="s3", replication_role_arn=role)
    config = child(monitor, "bucketReplicationConfig:BucketReplicationConfig", "dr-replication")
    assert uses(config, monitor.one(PROVIDER, "dr-s3-primary"))
    assert config.property_dependencies["bucket"] == [monitor.one(S3 + "bucket:Bucket", "dr-primary").urn]
    versionings = {
        child(monitor, "bucketVersioning:BucketVersioning", f"dr-{t}-versioning").urn for t in ("primary", "replica")
    }
    assert versionings <= set(config.dependencies)
    assert config.inputs["role"] == role
    (rule,) = config.inputs["rules"]
    assert rule["destination"]["bucket"] == "arn:aws:s3:::membria-dr-replica"
    assert rule["filter"] == {"prefix": "membria/"} and rule["status"] == "Enabled"
    assert rule["deleteMarkerReplication"] == {"status": "Disabled"}
    assert exports["replication_mode"].value == "s3"


def test_s3_mode_is_refused_across_two_services_and_without_a_role(state_dir: Path) -> None:
    with pytest.raises(BadInput, match="different S3 services"):
        run("rack", state_dir, replication="s3", replication_role_arn="arn:aws:iam::1:role/r")
    with pytest.raises(BadInput, match="replicationRoleArn"):
        run("lab", state_dir, replication="s3")
    with pytest.raises(BadInput, match="unknown DR replication mode"):
        run("lab", state_dir, replication="both")


def test_vault_credentials_must_be_at_hand(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMBRIA_VAULT_SECRET_ID")
    with pytest.raises(MissingEnvironment, match="MEMBRIA_VAULT_SECRET_ID"):
        run("rack", state_dir)
    (state_dir / "secrets" / "openbao-root-token").unlink()
    with pytest.raises(MissingEnvironment, match="OpenBao is not running"):
        run("lab", state_dir)
