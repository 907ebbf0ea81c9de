"""The embedded lab, for real: OpenBao, moto's S3 server, llama.cpp on Gemma, Milvus Lite and chDB."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.backends import Backends
from appliance.errors import BadInput, MissingEnvironment
from appliance.lab import lifecycle, process
from appliance.lab.state import LabState
from appliance.pki import Pki
from appliance.site import Site
from tests.conftest import REPO, lab_site_data, write_site

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, LabState]]:
    root = tmp_path_factory.mktemp("lab")
    site = Site.model_validate(lab_site_data(root / "state"))
    state = LabState.at(site.lab.state_dir)
    try:
        report = lifecycle.up(site, state)
        assert sorted(report.started) == ["core", "dr-shipper", "edge", "gateway", "llm", "openbao", "s3"]
        # The corpus went in through the gateway and the smoke proved the data flow end to end.
        assert report.ingest is not None and report.ingest.files >= 9 and report.ingest.changed == report.ingest.files
        assert [s.name for s in report.smoke] == [
            "answered from engineering",
            "cross-department refused",
            "audit rows visible",
            "edge: local answer",
            "edge: escalated answer",
            "edge: offline, queued and answered locally",
            "edge: delivered after the gateway returned",
        ]
        assert all(s.ok for s in report.smoke), report.smoke
        # The laptop pulled the knowledge the core just loaded, as a patch (it is far under 20 MB).
        assert report.edge_sync is not None and report.edge_sync["pulled"] >= 3 and report.edge_sync["mode"] == "patch"
        yield site, state
    finally:
        lifecycle.down(site, state)


def _pids(state: LabState) -> dict[str, int]:
    names = ("openbao", "s3", "llm", "core", "gateway", "edge", "dr-shipper")
    return {name: rec.pid for name in names if (rec := process.running(state, name))}


def test_up_starts_every_service_and_each_answers_a_real_request(lab: tuple[Site, LabState]) -> None:
    site, state = lab
    health = {h.name: h for h in lifecycle.status(site, state)}
    assert set(health) == {"openbao", "s3", "llm", "core", "gateway", "edge", "dr-shipper", "vectors", "audit_db"}
    assert all(h.ok for h in health.values()), health
    assert "TLS" in health["openbao"].detail


def test_the_lab_shipper_keeps_every_store_within_its_rpo(lab: tuple[Site, LabState]) -> None:
    from appliance.backends import Backends
    from appliance.dr import catalog
    from appliance.dr.objects import DrBucket
    from appliance.dr.status import lags

    site, state = lab
    backends = Backends(site, state)
    bucket = DrBucket.open(backends)
    for store in ("state", "audit_db", "vectors"):  # the first pass shipped what the smoke and the corpus wrote
        head = catalog.read_head(bucket, store)
        assert head is not None and head.items > 0, store
    rows = {r.store: r for r in lags(backends, bucket)}
    for store in ("state", "audit_db", "vectors"):
        assert not rows[store].over_rpo, rows[store]
    assert rows["vault"].over_rpo  # no backup yet: Vault is covered by snapshots only, and none was taken


def test_up_twice_is_a_no_op(lab: tuple[Site, LabState]) -> None:
    site, state = lab
    before = _pids(state)
    report = lifecycle.up(site, state)
    assert not report.changed, (report.started, report.bootstrap, report.ingest)
    assert report.ingest is not None and report.ingest.changed == 0
    assert report.already_running == ["openbao", "s3", "llm", "core", "gateway", "edge", "dr-shipper"]
    assert _pids(state) == before


def test_dr_buckets_have_versioning_and_object_lock(lab: tuple[Site, LabState]) -> None:
    site, state = lab
    for target in ("primary", "replica"):
        s3 = Backends(site, state).s3(target)
        assert s3.client.get_bucket_versioning(Bucket=s3.bucket)["Status"] == "Enabled"
        lock = s3.client.get_object_lock_configuration(Bucket=s3.bucket)["ObjectLockConfiguration"]
        assert lock["ObjectLockEnabled"] == "Enabled"
        # A locked object version cannot be deleted before its retention date.
        put = s3.client.put_object(
            Bucket=s3.bucket,
            Key="probe",
            Body=b"x",
            ObjectLockMode="GOVERNANCE",
            ObjectLockRetainUntilDate=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
        )
        with pytest.raises(s3.client.exceptions.ClientError):
            s3.client.delete_object(Bucket=s3.bucket, Key="probe", VersionId=put["VersionId"])


def test_s3_credentials_live_in_vault_not_in_state(lab: tuple[Site, LabState]) -> None:
    site, state = lab
    secret = Backends(site, state).read_secret("membria/s3-primary")["secret_key"]
    assert len(secret) >= 30
    for path in state.root.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), f"S3 secret leaked into {path}"


def test_pki_issues_short_lived_certificates_that_chain_to_the_site_ca(
    lab: tuple[Site, LabState], tmp_path: Path
) -> None:
    site, state = lab
    pki = Pki.for_site(site, Backends(site, state).vault())
    cert = pki.issue("gateway", f"gateway.{site.site.domain}", alt_names=["localhost"], ip_sans=["127.0.0.1"])
    paths = cert.write(tmp_path, "gateway")
    assert paths["private_key"].stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in repr(cert)

    leaf = x509.load_pem_x509_certificate(cert.certificate.encode())
    chain = x509.load_pem_x509_certificates(pki.ca_chain_pem().encode())
    root = next(c for c in chain if c.subject == c.issuer)
    intermediates = [c for c in chain if c.subject != c.issuer]
    verifier = (
        x509.verification.PolicyBuilder()
        .store(x509.verification.Store([root]))
        .build_server_verifier(x509.DNSName(f"gateway.{site.site.domain}"))
    )
    verifier.verify(leaf, intermediates)  # raises if the chain does not verify
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= dt.timedelta(hours=24, minutes=1)

    device = pki.issue("edge-device", "laptop-0042", ou="engineering")
    subject = x509.load_pem_x509_certificate(device.certificate.encode()).subject
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "engineering"
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "laptop-0042"

    # The private keys never reach the services' logs.
    key_line = cert.private_key.strip().splitlines()[1]
    for log in state.log_dir.iterdir():
        assert key_line not in log.read_text(errors="replace")


def test_pki_refuses_names_outside_the_site_domain_and_unknown_roles(lab: tuple[Site, LabState]) -> None:
    site, state = lab
    pki = Pki.for_site(site, Backends(site, state).vault())
    with pytest.raises(BadInput, match="not allowed"):
        pki.issue("gateway", "gateway.evil.example.com")
    with pytest.raises(BadInput, match="unknown certificate role"):
        pki.issue("superuser", "x")
    # A longer lifetime than the role allows is cut down to the role's maximum, never granted.
    long = pki.issue("gateway", f"gateway.{site.site.domain}", ttl="8760h")
    leaf = x509.load_pem_x509_certificate(long.certificate.encode())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(hours=72, minutes=1)


def test_pki_works_against_an_external_vault_with_approle(
    lab: tuple[Site, LabState], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab's OpenBao stands in for a customer's Vault, reached the external way: URL + CA + AppRole."""
    site, state = lab
    admin = Backends(site, state).vault()
    if "approle/" not in admin.sys.list_auth_methods()["data"]:
        admin.sys.enable_auth_method("approle")
    admin.sys.create_or_update_policy(
        "membria-issuer", 'path "pki_int/issue/*" { capabilities = ["create", "update"] }'
    )
    admin.auth.approle.create_or_update_approle("provisioner", token_policies=["membria-issuer"], token_ttl="10m")
    role_id = admin.auth.approle.read_role_id("provisioner")["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id("provisioner")["data"]["secret_id"]

    from appliance.lab.services import OpenBao

    bao = OpenBao(site, state)
    data = lab_site_data(state.root)
    data["services"]["vault"] = {
        "backend": "external",
        "url": bao.endpoint,
        "ca_file": str(bao.ca_file),
        "auth": {"method": "approle", "role_id": role_id, "secret_id_env": "TEST_SECRET_ID"},
    }
    external = Site.model_validate(data)

    monkeypatch.delenv("TEST_SECRET_ID", raising=False)
    with pytest.raises(MissingEnvironment, match="TEST_SECRET_ID"):
        Backends(external).vault()

    monkeypatch.setenv("TEST_SECRET_ID", secret_id)
    cert = Pki.for_site(external, Backends(external).vault()).issue("core", f"core-1.{site.site.domain}")
    assert "BEGIN CERTIFICATE" in cert.certificate

    monkeypatch.setenv("TEST_SECRET_ID", "not-the-secret-id")
    from appliance.errors import ServiceError

    with pytest.raises(ServiceError, match="refused"):
        Backends(external).vault()


def test_llm_completes_a_prompt(lab: tuple[Site, LabState]) -> None:
    site, state = lab
    llm = Backends(site, state).llm()
    # Gemma 3 270M is a base model: prompt it as a completion, not a chat.
    response = httpx.post(
        f"{llm.base_url}/completions",
        json={"model": llm.model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"].strip()
    assert body["usage"]["completion_tokens"] >= 1


def _edge(site: Site, state: LabState) -> httpx.Client:
    from appliance.lab.edge_agent import EdgeAgentService

    return httpx.Client(base_url=EdgeAgentService(site, state).endpoint, timeout=300)


def _upload_as_admin(site: Site, state: LabState, name: str, text: str) -> None:
    from appliance.lab.runtime_services import Gateway, admin_tls
    from runtime.common.tls import client_context

    with httpx.Client(verify=client_context(admin_tls(state)), timeout=120) as client:
        r = client.post(
            f"{Gateway(site, state).endpoint}/v1/knowledge/documents",
            data={"department": "engineering", "doc_id": name},
            files={"file": (f"{name}.md", text.encode())},
        )
    assert r.status_code == 201, r.text


def test_edge_agent_pulls_new_core_knowledge_and_drops_answers_it_made_stale(lab: tuple[Site, LabState]) -> None:
    site, state = lab
    question = "How often must the oil of compressor C-7 be changed?"
    _upload_as_admin(site, state, "compressor-c7", "# Compressor C-7\n\nChange the C-7 oil every 2000 hours.\n")
    with _edge(site, state) as edge:
        pulled = edge.post("/api/sync").json()
        assert pulled["pulled"] >= 1 and pulled["mode"] == "patch", pulled
        first = edge.post("/api/ask", json={"question": question}).json()
        assert any(s["doc_id"] == "compressor-c7" for s in first["sources"]), first["sources"]
        assert all(s["department"] == "engineering" for s in first["sources"])
        assert edge.post("/api/ask", json={"question": question}).json()["source"] == "cache"

        _upload_as_admin(site, state, "compressor-c7", "# Compressor C-7\n\nChange the C-7 oil every 3000 hours.\n")
        again = edge.post("/api/sync").json()
        assert again["pulled"] >= 1 and again["invalidated_answers"] >= 1, again
        assert edge.post("/api/ask", json={"question": question}).json()["source"] != "cache"
        assert edge.post("/api/sync").json()["pulled"] == 0  # nothing new: an empty patch


def test_edge_cli_against_the_lab(lab: tuple[Site, LabState], tmp_path: Path) -> None:
    site, _ = lab
    site_file = write_site(tmp_path / "site.yaml", site.model_dump(mode="json"))
    status = _cli("edge", "status", "--site", str(site_file))
    assert status.returncode == 0, status.stderr
    assert "lab-laptop-1" in status.stdout and "engineering-laptop" in status.stdout
    ask = _cli("edge", "ask", "What is the discount limit before sales quotes need approval?", "--site", str(site_file))
    assert ask.returncode == 0, ask.stderr
    assert "source: core" in ask.stdout and "cross-department" in ask.stdout
    sync = _cli("edge", "sync", "--site", str(site_file))
    assert sync.returncode == 0 and "pulled" in sync.stdout, sync.stderr


def test_in_process_backends_store_and_query(lab: tuple[Site, LabState], tmp_path: Path) -> None:
    site, state = lab
    backends = Backends(site, state)
    # Milvus Lite admits one process per file and the lab's core server holds the lab's: the factory is
    # exercised on a state directory of its own.
    milvus = Backends(site, LabState.at(tmp_path / "own")).vectors()
    try:
        milvus.create_collection("probe", dimension=4)
        milvus.insert("probe", [{"id": 1, "vector": [1.0, 0.0, 0.0, 0.0]}, {"id": 2, "vector": [0.0, 1.0, 0.0, 0.0]}])
        hits = milvus.search("probe", data=[[0.9, 0.1, 0.0, 0.0]], limit=1)
        assert hits[0][0]["id"] == 1
    finally:
        milvus.drop_collection("probe")
        milvus.close()

    chdb = backends.audit_db()
    try:
        chdb.command("CREATE TABLE IF NOT EXISTS probe (n UInt32) ENGINE = MergeTree ORDER BY n")
        chdb.insert("probe", [[1], [2], [3]], column_names=["n"])
        assert chdb.query("SELECT sum(n) FROM probe").result_rows[0][0] == 6
        chdb.command("DROP TABLE probe")
    finally:
        chdb.close()  # chDB admits one path per process and one process per path: release it


def test_a_dead_service_is_reported_and_repaired_by_up(lab: tuple[Site, LabState]) -> None:
    site, state = lab
    record = process.running(state, "s3")
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)
    process.wait_until(lambda: not record.alive(), timeout=10)
    health = {h.name: h for h in lifecycle.status(site, state)}
    assert not health["s3"].ok and health["s3"].detail == "not running"

    report = lifecycle.up(site, state)
    assert report.started == ["s3"]
    # moto keeps buckets in memory: up recreates them with their lock settings.
    assert any("membria-dr " in step or step.startswith("bucket membria-dr") for step in report.bootstrap)
    assert all(h.ok for h in lifecycle.status(site, state))


def test_port_taken_by_another_program_is_a_clear_environment_error(tmp_path: Path) -> None:
    import socket

    site = Site.model_validate(lab_site_data(tmp_path / "state"))
    state = LabState.at(site.lab.state_dir)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", site.lab.ports.openbao))
        blocker.listen()
        with pytest.raises(MissingEnvironment, match=f"port {site.lab.ports.openbao}"):
            lifecycle.up(site, state)
    assert process.strays(state) == []


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_cli_up_status_down_and_nothing_left_behind(tmp_path: Path) -> None:
    site_file = write_site(tmp_path / "site.yaml", lab_site_data(tmp_path / "state"))
    up = _cli("lab", "up", "--site", str(site_file), timeout=600)
    assert up.returncode == 0, up.stderr
    assert "Traceback" not in up.stdout + up.stderr
    for name in ("openbao", "s3", "llm", "core", "gateway", "edge", "dr-shipper", "vectors", "audit_db"):
        assert name in up.stdout
    assert _cli("lab", "status", "--site", str(site_file)).returncode == 0

    down = _cli("lab", "down", "--site", str(site_file))
    assert down.returncode == 0, down.stderr
    state = LabState.at(tmp_path / "state")
    assert process.strays(state) == []
    assert list(state.run_dir.iterdir()) == []
    after = _cli("lab", "status", "--site", str(site_file))
    assert after.returncode == 1
    assert "not healthy" in after.stderr


def test_a_killed_cli_leaves_no_orphan_after_down(tmp_path: Path) -> None:
    """SIGKILL the CLI in the middle of `up` (OpenBao started, the rest not): `down` finds everything."""
    site_file = write_site(tmp_path / "site.yaml", lab_site_data(tmp_path / "state"))
    state = LabState.at(tmp_path / "state")
    cli = subprocess.Popen(
        [sys.executable, "-m", "appliance", "lab", "up", "--site", str(site_file)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.wait_until(lambda: (state.run_dir / "s3.json").exists(), timeout=60)
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait()
    time.sleep(0.5)
    assert process.strays(state), "the services outlive a killed CLI (they are detached) ..."

    down = _cli("lab", "down", "--site", str(site_file))
    assert down.returncode == 0, down.stderr
    assert process.strays(state) == [], "... and `down` leaves none of them behind"
    marker = str(state.root)
    leftovers = []
    for proc in psutil.process_iter():
        try:
            if marker in " ".join(proc.cmdline()) or proc.environ().get(process.MARKER_ENV) == marker:
                leftovers.append(proc)
        except psutil.Error:
            continue
    assert leftovers == []
