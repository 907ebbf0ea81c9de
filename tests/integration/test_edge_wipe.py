"""Remote wipe for real (edge_image/DESIGN.md, "Wipe"): `appliance edge wipe` against the lab's OpenBao puts an
enrolled laptop on the wipe list (KV, check-and-set) and revokes its certificate; the lab's gateway answers that
revoked certificate on `/v1/device/commands` and its ack only, and the laptop's guard (one poll) acks and erases
the keyslots of a LUKS2 partition file. Enrollment goes through the real `POST /v1/enroll` (test_edge_enrollment's
fixture and helpers); the lab renders the list and the CRL for its gateway on every `edge wipe`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.edge import wipe
from appliance.lab import bootstrap
from appliance.lab.runtime_services import wipe_list_path
from edge_image import luks
from edge_image.device import guard
from edge_image.device import wipe as device_wipe
from runtime.common.tls import TlsFiles
from tests.conftest import REPO
from tests.integration.conftest import GatewayLab, audit_rows_until
from tests.integration.test_edge_enrollment import cli, device_name, enroll, mint, site_file  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

COMMANDS = "/v1/device/commands"
ACK_ROUTE = "/v1/device/commands/{command_id}/ack"


def enrolled(lab: GatewayLab, site_file: Path, tmp_path: Path, prefix: str) -> tuple[str, TlsFiles]:  # noqa: F811
    """A laptop enrolled through the gateway as first boot does it; its name and certificate files."""
    device = device_name(prefix)
    doc = mint(site_file, lab, device, tmp_path / f"{device}-enroll.json")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{device}.{lab.site.site.domain}")]))
        .sign(key, hashes.SHA256())
    )
    body = {
        "device": device,
        "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "recovery_key": "-".join(secrets.token_hex(4) for _ in range(8)),
        "luks_uuid": str(uuid.uuid4()),
        "tpm2_pcrs": [7],
        "image_id": "membria-edge-test-1",
    }
    response = enroll(lab, doc["token"], body)
    assert response.status_code == 200, response.text
    cert_file, key_file = tmp_path / f"{device}.crt", tmp_path / f"{device}.key"
    cert_file.write_text(response.json()["certificate_pem"])
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return device, TlsFiles(cert=cert_file, key=key_file, ca=lab.ca)


def wipe_cli(site_file: Path, lab: GatewayLab, device: str, *args: str) -> subprocess.CompletedProcess[str]:  # noqa: F811
    return cli(site_file, lab, "wipe", "--device", device, *args)


def listed(lab: GatewayLab) -> dict[str, dict[str, str]]:
    data, _ = wipe.read_list(lab.backends.vault(), lab.backends.kv_mount)
    devices: dict[str, dict[str, str]] = data["devices"]
    return devices


def certificates(lab: GatewayLab, device: str) -> list[wipe.DeviceCertificate]:
    return wipe.device_certificates(lab.backends.vault(), lab.pki.int_mount, f"{device}.{lab.site.site.domain}")


def commands(lab: GatewayLab, who: str | TlsFiles) -> httpx.Response:
    with lab.client(who) as client:
        return client.get(COMMANDS)


def test_wipe_lists_and_revokes_and_the_revoked_laptop_gets_its_command_there_only(
    lab: GatewayLab,
    site_file: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    device, tls = enrolled(lab, site_file, tmp_path, "wp")
    assert commands(lab, tls).json() == {"commands": []}
    with lab.client(tls) as client:
        assert client.get("/metrics").status_code == 200

    # --dry-run shows and changes nothing; without --yes and without a TTY it refuses (exit 2).
    dry = wipe_cli(site_file, lab, device, "--reason", "stolen at the airport", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "dry run" in dry.stdout and "revoke" in dry.stdout
    unconfirmed = wipe_cli(site_file, lab, device, "--reason", "stolen at the airport")
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stdout + unconfirmed.stderr
    assert "Traceback" not in unconfirmed.stderr
    assert device not in listed(lab) and [c.revoked for c in certificates(lab, device)] == [False]

    done = wipe_cli(site_file, lab, device, "--reason", "stolen at the airport", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    entry = listed(lab)[device]
    assert entry["reason"] == "stolen at the airport" and entry["id"].startswith("wipe-")
    assert entry["requested_at"].endswith("Z") and entry["requested_by"]
    assert [c.revoked for c in certificates(lab, device)] == [True]
    rendered = json.loads(wipe_list_path(lab.state).read_text())
    assert rendered["devices"][device]["id"] == entry["id"]  # the lab played the Vault agent

    # The revoked certificate is answered on the command routes ...
    response = commands(lab, tls)
    assert response.status_code == 200, response.text
    assert response.json() == {"commands": [{"id": entry["id"], "action": "wipe", "reason": "stolen at the airport"}]}
    with lab.client(tls) as client:
        assert client.post(f"{COMMANDS}/wipe-not-mine/ack").status_code == 404
        acked = client.post(f"{COMMANDS}/{entry['id']}/ack", json={"status": "wiping"})
        assert acked.status_code == 200, acked.text
        assert acked.json() == {"id": entry["id"], "acknowledged": True}
        # ... and refused everywhere else.
        for refused in (
            client.get("/metrics"),
            client.post("/v1/embeddings", json={"model": lab.model, "input": "hello"}),
            client.get("/v1/knowledge/documents", params={"department": "engineering"}),
        ):
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "certificate_revoked"

    def allowed_and_refused(rows: list[dict[str, Any]]) -> bool:
        acks = [r for r in rows if r["route"] == ACK_ROUTE]
        return any(
            r["status"] == 200 and r["decision"] == "allow" and entry["id"] in r["reason"] for r in acks
        ) and any(r["status"] == 404 for r in acks)

    rows = audit_rows_until(lab, allowed_and_refused)
    assert allowed_and_refused(rows), [r for r in rows if r["route"] == ACK_ROUTE]

    # Again: nothing changes (same command id, same list version), exit 0 without asking.
    _, version = wipe.read_list(lab.backends.vault(), lab.backends.kv_mount)
    again = wipe_cli(site_file, lab, device, "--reason", "another reason")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stdout
    assert listed(lab)[device] == entry
    assert wipe.read_list(lab.backends.vault(), lab.backends.kv_mount)[1] == version


def test_devices_not_listed_get_nothing_and_other_identities_are_refused(
    lab: GatewayLab,
    site_file: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    device, tls = enrolled(lab, site_file, tmp_path, "nl")
    assert commands(lab, tls).json() == {"commands": []}
    assert commands(lab, "eng-laptop").json() == {"commands": []}  # a device certificate outside <name>.<domain>

    forbidden = commands(lab, "alice")  # a user
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    with lab.client(None) as client:
        assert client.get(COMMANDS).status_code == 401
        token = lab.token("monitoring", ["engineering"])  # a service token is no device either
        assert client.get(COMMANDS, headers={"Authorization": f"Bearer {token}"}).status_code == 401
    with lab.client("alice") as client:
        assert client.post(f"{COMMANDS}/wipe-x/ack").status_code == 403

    # A revoked device that is not on the wipe list stays refused on these routes too.
    cert = lab.issue("edge-device", f"{device_name('rv')}.{lab.site.site.domain}", "engineering")
    files = lab.files(cert, "revoked-unlisted")
    lab.pki.revoke(cert.serial_number)
    bootstrap.write_crl(lab.state, lab.pki)
    refused = commands(lab, files)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "certificate_revoked"
    assert device not in listed(lab)


def test_two_operators_never_lose_each_others_entry(lab: GatewayLab) -> None:
    client, kv = lab.backends.vault(), lab.backends.kv_mount
    first, second = device_name("cas-a"), device_name("cas-b")
    reads: list[int] = []

    def change(data: dict[str, Any]) -> dict[str, Any] | None:
        reads.append(1)
        if len(reads) == 1:  # the other operator writes between our read and our write
            wipe.update_list(client, kv, lambda d: wipe.with_entry(d, second, {"id": "wipe-b"}))
        return wipe.with_entry(data, first, {"id": "wipe-a"})

    _, version, changed = wipe.update_list(client, kv, change)
    assert changed and len(reads) == 2  # Vault refused the stale write; the change was made again on top
    devices = listed(lab)
    assert devices[first] == {"id": "wipe-a"} and devices[second] == {"id": "wipe-b"}
    with pytest.raises(wipe.CasConflict):
        wipe.write_list(client, kv, {"devices": {}}, version - 1)
    assert first in listed(lab)
    wipe.update_list(client, kv, lambda d: wipe.without_entry(d, first))
    wipe.update_list(client, kv, lambda d: wipe.without_entry(d, second))


def test_the_lab_renders_what_vault_holds_not_what_it_wrote(lab: GatewayLab, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another operator lists a device after our write and before our render: the file shows both (a render of
    our own write would drop theirs until the next wipe)."""
    ours, theirs = device_name("ours"), device_name("theirs")
    real_update = wipe.update_list

    def update_then_another_operator(*args: Any, **kwargs: Any) -> tuple[dict[str, Any], int, bool]:
        result = real_update(*args, **kwargs)
        real_update(args[0], args[1], lambda d: wipe.with_entry(d, theirs, {"id": "wipe-theirs"}))
        return result

    monkeypatch.setattr(wipe, "update_list", update_then_another_operator)
    wanted = wipe.plan(lab.site, device=ours, reason="lost", state_dir=lab.state.root)
    wipe.request(lab.site, wanted, state_dir=lab.state.root)
    monkeypatch.undo()
    rendered = json.loads(wipe_list_path(lab.state).read_text())["devices"]
    assert {ours, theirs} <= set(rendered)
    for device in (ours, theirs):
        wipe.cancel(lab.site, device=device, state_dir=lab.state.root)
    assert not {ours, theirs} & set(json.loads(wipe_list_path(lab.state).read_text())["devices"])


def test_concurrent_wipes_and_cancel_through_the_cli(
    lab: GatewayLab,
    site_file: Path,  # noqa: F811
) -> None:
    devices = [device_name("par"), device_name("par")]
    argv = [sys.executable, "-m", "appliance", "edge", "wipe", "--reason", "lost", "--yes",
            "--site", str(site_file), "--state-dir", str(lab.state.root)]  # fmt: skip
    running = [
        subprocess.Popen([*argv, "--device", d], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for d in devices
    ]
    for proc in running:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, out + err
        assert "none issued" in out  # never enrolled: listed all the same
    assert set(devices) <= set(listed(lab))
    rendered = json.loads(wipe_list_path(lab.state).read_text())["devices"]
    assert set(devices) <= set(rendered)

    dry = wipe_cli(site_file, lab, devices[0], "--cancel", "--dry-run")
    assert dry.returncode == 0 and "would take" in dry.stdout and devices[0] in listed(lab)
    assert wipe_cli(site_file, lab, devices[0], "--cancel", "--reason", "x").returncode == 2
    for device in devices:
        done = wipe_cli(site_file, lab, device, "--cancel")
        assert done.returncode == 0 and "taken off" in done.stdout, done.stdout + done.stderr
    assert not set(devices) & set(listed(lab))
    assert not set(devices) & set(json.loads(wipe_list_path(lab.state).read_text())["devices"])
    again = wipe_cli(site_file, lab, devices[0], "--cancel")
    assert again.returncode == 0 and "not on the wipe list" in again.stdout
    bad = wipe_cli(site_file, lab, "Bad_Name", "--reason", "x", "--yes")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    no_reason = wipe_cli(site_file, lab, devices[0], "--yes")
    assert no_reason.returncode == 2 and "Traceback" not in no_reason.stderr


@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="needs cryptsetup (the laptop's LUKS2 volume)")
def test_the_guard_acks_and_wipes_the_luks_volume(
    lab: GatewayLab,
    site_file: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    device, tls = enrolled(lab, site_file, tmp_path, "gd")
    partition = tmp_path / "root.luks"
    with partition.open("wb") as fh:
        fh.truncate(luks.LuksParams().data_offset + 8 * 1024 * 1024)
    recovery = os.urandom(32).hex().encode()
    luks.luks_format(partition, volume_key=os.urandom(64), passphrase=recovery)
    edge_json = tmp_path / "edge.json"  # the agent's settings file, as enrollment writes it (guard reads a part)
    edge_json.write_text(
        json.dumps({"device": device, "gateways": [lab.url], "tls": {k: str(v) for k, v in vars(tls).items()}})
    )
    conf = guard.load_config(edge_json)
    wipe_file = partial(device_wipe.wipe, device=partition, power_off=False)

    quiet = guard.poll_once(conf, wipe=wipe_file)  # not listed: nothing happens
    assert quiet.gateway == lab.url and quiet.commands == [] and quiet.wiped == []
    assert luks.opens(partition, recovery)

    done = wipe_cli(site_file, lab, device, "--reason", "left in a taxi", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    entry = listed(lab)[device]

    # A dead gateway first: the guard moves on to the next.
    conf = guard.GuardConfig(gateways=["https://127.0.0.1:9", lab.url], tls=conf.tls)
    result = guard.poll_once(conf, wipe=wipe_file)
    assert result.gateway == lab.url
    assert [c.id for c in result.commands] == [entry["id"]] and result.acked == [entry["id"]]
    (wiped,) = result.wiped
    assert wiped.device == partition and wiped.reason == "left in a taxi" and wiped.keyslots_erased == ("0",)
    assert luks.read_header(partition).keyslots == {} and not luks.opens(partition, recovery)

    def ours(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if r["route"] == ACK_ROUTE and entry["id"] in r["reason"]]

    rows = ours(audit_rows_until(lab, ours))
    assert [r["status"] for r in rows] == [200]
