"""The laptop's side of enrollment (edge_image.device.firstboot) against the lab's real gateway and OpenBao.

On a LUKS2 partition file made like the image's: the recovery key goes into an argon2id slot, is escrowed through
`POST /v1/enroll` with a token minted by `appliance edge enroll-token`, and the certificate, key and agent settings
that come back are what the edge agent loads. The TPM2 binding and the online steps run in the qemu boot tier.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from ruamel.yaml import YAML

from appliance.edge import spec
from appliance.site import Site
from edge_image import esp, luks
from edge_image.device import firstboot
from edge_image.device.firstboot import Enrollment, EnrollRefused, Paths
from runtime.edge.settings import EdgeSettings
from tests.integration.conftest import GatewayLab
from tests.integration.test_edge_enrollment import PROFILE, device_name, mint, site_file  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


def laptop(tmp_path: Path, lab: GatewayLab, site_file: Path) -> tuple[Path, bytes, Paths]:  # noqa: F811
    """A partition file with the bootstrap slot, an ESP tree and /etc/membria as the image's deploy leaves them."""
    partition = tmp_path / "root.luks"
    with partition.open("wb") as fh:
        fh.truncate(luks.LuksParams().data_offset + 8 * luks.MIB)
    bootstrap = os.urandom(32).hex().encode()
    luks.luks_format(partition, volume_key=os.urandom(64), passphrase=bootstrap)
    paths = Paths(state=tmp_path / "state", esp=tmp_path / "esp", etc=tmp_path / "etc", hosts=tmp_path / "hosts",
                  hostname=tmp_path / "hostname")  # fmt: skip
    paths.cpio.parent.mkdir(parents=True)
    paths.cpio.write_bytes(esp.bootstrap_cpio(bootstrap))
    paths.tls.mkdir(parents=True)
    (paths.tls / "ca.pem").write_bytes(lab.ca.read_bytes())
    site = Site.model_validate(YAML(typ="safe").load(site_file.read_text()))
    prof = spec.profile(site, PROFILE)
    settings = spec.agent_settings(site, prof, "/var/lib/membria/models/model.gguf")
    (paths.etc / "edge-profile.json").write_text(json.dumps(settings))
    image = {"site": site.site.name, "profile": PROFILE, "version": "test", "domain": site.site.domain,
             "gateways": [lab.url], "tpm2_pcrs": [7], "tpm2_pin": False}  # fmt: skip
    (paths.etc / "image.json").write_text(json.dumps(image))
    paths.hosts.write_text("127.0.0.1\tlocalhost\n127.0.1.1\tmembria-edge\n")
    return partition, bootstrap, paths


def enrollment_for(lab: GatewayLab, site_file: Path, tmp_path: Path, device: str) -> Enrollment:  # noqa: F811
    doc: dict[str, Any] = mint(site_file, lab, device, tmp_path / "enroll.json")
    return Enrollment(device=device, token=doc["token"], gateways=[lab.url], resolve={})


def test_laptop_escrows_its_recovery_key_and_gets_its_certificate(
    lab: GatewayLab,
    site_file: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    partition, bootstrap, paths = laptop(tmp_path, lab, site_file)
    device = device_name("fb")
    enrollment = enrollment_for(lab, site_file, tmp_path, device)
    with firstboot.bootstrap_key_file(paths) as key_file:
        reply = firstboot.escrow_and_certify(paths, partition, key_file, enrollment, attempts=1)
    assert reply["escrow"]["path"].endswith(f"membria/edge/recovery/{device}")
    assert json.loads(paths.marker("escrowed").read_text())["version"] == 1

    # The escrowed key opens the disk; the UUID recorded with it is this disk's.
    escrow = lab.backends.read_secret(f"membria/edge/recovery/{device}")
    assert luks.opens(partition, escrow["recovery_key"].encode())
    assert escrow["luks_uuid"] == firstboot.luks_uuid(partition)
    assert escrow["image_id"] == f"{lab.site.site.name}/{PROFILE}/test"
    assert luks.opens(partition, bootstrap)  # until finish, which needs the TPM2 token as well

    # The certificate is for this device's key and name; the agent accepts the settings written for it.
    cert = x509.load_pem_x509_certificate((paths.tls / "device.crt").read_bytes())
    key = serialization.load_pem_private_key((paths.tls / "device.key").read_bytes(), password=None)
    assert cert.public_key() == key.public_key()
    fqdn = f"{device}.{lab.site.site.domain}"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == fqdn
    assert (paths.tls / "device.key").stat().st_mode & 0o777 == 0o640
    settings = EdgeSettings.model_validate_json(paths.edge_json.read_text())
    assert settings.device == device and settings.gateways == [lab.url]
    assert settings.tls.cert == paths.tls / "device.crt"
    assert paths.hostname.read_text() == f"{device}\n"
    assert f"127.0.1.1\t{fqdn} {device}" in paths.hosts.read_text()


def test_a_spent_token_is_refused_at_once_not_retried(
    lab: GatewayLab,
    site_file: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    partition, _, paths = laptop(tmp_path, lab, site_file)
    device = device_name("fb")
    enrollment = enrollment_for(lab, site_file, tmp_path, device)
    with firstboot.bootstrap_key_file(paths) as key_file:
        firstboot.escrow_and_certify(paths, partition, key_file, enrollment, attempts=1)
        escrowed = lab.backends.read_secret(f"membria/edge/recovery/{device}")["recovery_key"]
        # The token is revoked once used: the gateway's 401 ends enrollment at once (no retry loop), so the unit
        # fails loudly instead of waiting forever.
        body = {
            "device": device,
            "csr_pem": firstboot.device_key_and_csr(paths, f"{device}.{lab.site.site.domain}"),
            "recovery_key": "a-recovery-key-never-escrowed",
            "luks_uuid": firstboot.luks_uuid(partition),
            "tpm2_pcrs": [7],
            "image_id": "again",
        }
        sleeps: list[float] = []
        with pytest.raises(EnrollRefused, match="401"):
            firstboot.enroll_with_retries(
                [lab.url], paths.tls / "ca.pem", enrollment.token, body, attempts=5, sleep=sleeps.append
            )
        assert sleeps == []
    assert luks.opens(partition, escrowed.encode())
