"""Edge enrollment for real (edge_image/DESIGN.md, "Enrollment protocol"): `appliance edge enroll-token` mints a
one-device Vault token on the lab's OpenBao, and the lab's gateway enrolls with it over TLS without a client
certificate: recovery key escrowed in KV, certificate signed by the site PKI, token revoked, reply replayable.

The `lab` fixture's site has no edge profiles (its tests play devices themselves), so the CLI gets a copy of
the site file with examples/lab.yaml's profiles back, pointing at the same lab state.
"""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ruamel.yaml import YAML

from appliance.errors import ServiceError
from appliance.lab.services import OpenBao
from edge_image import flash
from tests.conftest import EXAMPLES, REPO, example_data, write_site
from tests.integration.conftest import GatewayLab, audit_rows_until

pytestmark = pytest.mark.integration

HEADER = "Membria-Enrollment-Token"
PROFILE = "engineering-laptop"  # departments: [engineering]


@pytest.fixture(scope="module")
def site_file(lab: GatewayLab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data: dict[str, Any] = YAML(typ="safe").load(lab.site_file.read_text())
    profiles = example_data()["edge_profiles"]
    for profile in profiles:
        if "routing" in profile:
            profile["routing"]["taxonomy_file"] = str(EXAMPLES / "taxonomy.yaml")
    data["edge_profiles"] = profiles
    return write_site(tmp_path_factory.mktemp("enroll") / "site.yaml", data)


def cli(site_file: Path, lab: GatewayLab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "edge",
            *args,
            "--site",
            str(site_file),
            "--state-dir",
            str(lab.state.root),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def mint(site_file: Path, lab: GatewayLab, device: str, out: Path, ttl: str = "72h") -> dict[str, Any]:
    done = cli(site_file, lab, "enroll-token", "--profile", PROFILE, "--device", device, "--ttl", ttl, "-o", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["token"] not in done.stdout + done.stderr  # the token goes to the file only
    return doc


def csr_for(cn: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def body_for(lab: GatewayLab, device: str, *, cn: str | None = None) -> dict[str, Any]:
    return {
        "device": device,
        "csr_pem": csr_for(cn or f"{device}.{lab.site.site.domain}"),
        "recovery_key": "-".join(secrets.token_hex(4) for _ in range(8)),
        "luks_uuid": str(uuid.uuid4()),
        "tpm2_pcrs": [7],
        "image_id": "membria-edge-test-1",
    }


def enroll(lab: GatewayLab, token: str | None, body: dict[str, Any]) -> httpx.Response:
    headers = {HEADER: token} if token is not None else {}
    with lab.client(None) as client:  # no client certificate: the laptop has none yet
        return client.post("/v1/enroll", json=body, headers=headers)


def vault_as(lab: GatewayLab, token: str) -> hvac.Client:
    """A client of the lab's OpenBao holding `token` (as a thief of enroll.json would)."""
    bao = OpenBao(lab.site, lab.state)
    return hvac.Client(url=bao.endpoint, token=token, verify=str(bao.ca_file), timeout=10)


def device_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def test_enroll_end_to_end_and_idempotent_replay(lab: GatewayLab, site_file: Path, tmp_path: Path) -> None:
    device = device_name("lt")
    out = tmp_path / "enroll.json"
    doc = mint(site_file, lab, device, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert doc["format"] == 1 and doc["device"] == device and doc["site"] == lab.site.site.name
    assert doc["gateways"] and doc["expires_at"].endswith("Z")
    record = lab.backends.read_secret(f"membria/edge/devices/{device}")
    assert record["accessor"] and doc["token"] not in json.dumps(record)

    body = body_for(lab, device)
    response = enroll(lab, doc["token"], body)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert doc["token"] not in response.text
    assert reply["escrow"] == {"path": f"secret/membria/edge/recovery/{device}", "version": 1}

    # The certificate: CN device.domain, OU the profile's department, issued by the intermediate, which the root signed.
    cert = x509.load_pem_x509_certificate(reply["certificate_pem"].encode())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == f"{device}.{lab.site.site.domain}"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == ["engineering"]
    site_cas = x509.load_pem_x509_certificates(lab.ca.read_bytes())
    issuer = next(c for c in site_cas if c.subject == cert.issuer)
    cert.verify_directly_issued_by(issuer)
    root = next(c for c in site_cas if c.subject == issuer.issuer)
    issuer.verify_directly_issued_by(root)
    assert any(c.subject == issuer.subject for c in x509.load_pem_x509_certificates(reply["ca_chain_pem"].encode()))

    # The recovery key is in Vault, and the admin command prints it.
    shown = cli(site_file, lab, "recovery-key", "--device", device)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == body["recovery_key"]
    escrow = lab.backends.read_secret(f"membria/edge/recovery/{device}")
    assert escrow["luks_uuid"] == body["luks_uuid"] and escrow["tpm2_pcrs"] == [7]

    # The token was revoked: another body with it is refused; the same body is answered from the store.
    assert enroll(lab, doc["token"], body_for(lab, device)).status_code == 401
    again = enroll(lab, doc["token"], body)
    assert again.status_code == 200 and again.json() == reply
    assert again.headers.get("Idempotent-Replayed") == "true"
    client = vault_as(lab, doc["token"])
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.token.lookup_self()

    # One audit row per request, naming the device; never the token or the recovery key.
    def enrolls(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if r["route"] == "/v1/enroll"]

    def allowed(rows: list[dict[str, Any]]) -> bool:
        return any(r["status"] == 200 and r["decision"] == "allow" for r in enrolls(rows))

    rows = enrolls(audit_rows_until(lab, allowed))
    assert allowed(rows), rows
    dump = json.dumps(rows, default=str)
    assert doc["token"] not in dump and body["recovery_key"] not in dump


def test_resolve_goes_into_the_token_file_that_flash_accepts(lab: GatewayLab, site_file: Path, tmp_path: Path) -> None:
    """--resolve NAME=ADDR: checked, canonical (lower-case name, compressed IPv6) in FILE's `resolve`; a bad one is
    refused (exit 2) before any token is minted."""
    device, domain = device_name("lt"), lab.site.site.domain
    out = tmp_path / "enroll.json"
    done = cli(site_file, lab, "enroll-token", "--profile", PROFILE, "--device", device, "-o", str(out),
               "--resolve", f"Gateway.{domain}=127.0.0.1", "--resolve", f"core.{domain}=fd00:0::0002")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    assert doc["token"] not in done.stdout + done.stderr
    assert list(doc) == ["format", "site", "device", "token", "expires_at", "gateways", "resolve"]
    assert doc["resolve"] == {f"gateway.{domain}": "127.0.0.1", f"core.{domain}": "fd00::2"}
    assert f"gateway.{domain} 127.0.0.1" in " ".join(done.stdout.split())  # rich may wrap the line
    checked = flash.load_enrollment(out, site=lab.site.site.name)  # what `edge flash --enrollment` will take
    assert checked.device == device and checked.data == out.read_bytes()

    other, bad_out = device_name("lt"), tmp_path / "bad.json"
    bad = cli(site_file, lab, "enroll-token", "--profile", PROFILE, "--device", other, "-o", str(bad_out),
              "--resolve", f"gateway.{domain}=10.0.0.999")  # fmt: skip
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "not an IPv4 or IPv6 address" in " ".join(bad.stderr.split()) and "Traceback" not in bad.stderr
    assert not bad_out.exists()
    with pytest.raises(ServiceError, match="no secret"):
        lab.backends.read_secret(f"membria/edge/devices/{other}")


def test_recovery_key_of_an_unenrolled_device_exits_1(lab: GatewayLab, site_file: Path) -> None:
    done = cli(site_file, lab, "recovery-key", "--device", device_name("never"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_bad_device_name_is_bad_input(lab: GatewayLab, site_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    done = cli(site_file, lab, "enroll-token", "--profile", PROFILE, "--device", "Bad_Name", "-o", str(out))
    assert done.returncode == 2 and not out.exists() and "Traceback" not in done.stderr


def test_token_for_another_device_is_403(lab: GatewayLab, site_file: Path, tmp_path: Path) -> None:
    device_a, device_b = device_name("lta"), device_name("ltb")
    doc = mint(site_file, lab, device_a, tmp_path / "a.json")
    response = enroll(lab, doc["token"], body_for(lab, device_b))
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "wrong_device"
    # The refusal did not spend the token's right: device A still enrolls with it.
    assert enroll(lab, doc["token"], body_for(lab, device_a)).status_code == 200


def test_csr_name_mismatch_is_400(lab: GatewayLab, site_file: Path, tmp_path: Path) -> None:
    device = device_name("lt")
    doc = mint(site_file, lab, device, tmp_path / "t.json")
    response = enroll(lab, doc["token"], body_for(lab, device, cn=f"someone-else.{lab.site.site.domain}"))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "csr_name_mismatch"


def test_expired_token_is_401(lab: GatewayLab, site_file: Path, tmp_path: Path) -> None:
    device = device_name("lt")
    doc = mint(site_file, lab, device, tmp_path / "t.json", ttl="2s")
    time.sleep(4)
    response = enroll(lab, doc["token"], body_for(lab, device))
    assert response.status_code == 401, response.text
    assert doc["token"] not in response.text


def test_revoked_token_is_401(lab: GatewayLab, site_file: Path, tmp_path: Path) -> None:
    device = device_name("lt")
    doc = mint(site_file, lab, device, tmp_path / "t.json")
    done = cli(site_file, lab, "enroll-token", "--device", device, "--revoke")
    assert done.returncode == 0, done.stdout + done.stderr
    assert enroll(lab, doc["token"], body_for(lab, device)).status_code == 401


def test_no_token_is_401_and_other_routes_still_need_a_certificate(lab: GatewayLab) -> None:
    response = enroll(lab, None, body_for(lab, "lt-nobody"))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    with lab.client(None) as client:
        refused = client.get("/v1/knowledge/documents", params={"department": "engineering"})
        assert refused.status_code == 401
        # An enrollment token is no credential anywhere else.
        assert client.get("/metrics", headers={HEADER: "s.whatever-token-value"}).status_code == 401


def test_the_token_policy_restricts_what_it_can_do(lab: GatewayLab, site_file: Path, tmp_path: Path) -> None:
    device, other = device_name("lt"), device_name("lto")
    doc = mint(site_file, lab, device, tmp_path / "t.json")
    client = vault_as(lab, doc["token"])
    domain = lab.site.site.domain
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version(
            path=f"membria/edge/recovery/{other}", mount_point="secret", raise_on_deleted_version=True
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.create_or_update_secret(
            path=f"membria/edge/recovery/{other}", secret={"recovery_key": "x"}, mount_point="secret"
        )
    # Signing is pinned to the device's own name (allowed_parameters), whatever the CSR says...
    sign = "/v1/pki_int/sign/edge-device--engineering"
    with pytest.raises(hvac.exceptions.Forbidden):
        client.adapter.post(sign, json={"csr": csr_for(f"{other}.{domain}"), "common_name": f"{other}.{domain}"})
    with pytest.raises(hvac.exceptions.Forbidden):  # a parameter outside allowed_parameters
        client.adapter.post(
            sign, json={"csr": csr_for(f"{device}.{domain}"), "common_name": f"{device}.{domain}", "alt_names": "x.y"}
        )
    # ...and the role ignores the CSR's own subject and SANs (use_csr_common_name/use_csr_sans false).
    signed = client.adapter.post(sign, json={"csr": csr_for(f"{other}.{domain}"), "common_name": f"{device}.{domain}"})
    cert = x509.load_pem_x509_certificate(signed["data"]["certificate"].encode())
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [f"{device}.{domain}"]
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    except x509.ExtensionNotFound:
        sans = []
    assert f"{other}.{domain}" not in sans
