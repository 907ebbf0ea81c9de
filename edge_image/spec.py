"""`ImageSpec`: everything an edge image build needs, as plain data (no site file, no Vault).

`appliance/edge/spec.py` makes one from the site and the profile; the rootfs step, the pyinfra deploy (which gets it
as JSON) and the assembly read only this. Nothing secret is in it: the image holds no secret before first boot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

DEBIAN_SUITE = "bookworm"

# What every edge image installs from Debian (mmdebstrap --variant=minbase adds these to the essential set).
# Boot: kernel, systemd as init, udev, dracut (not initramfs-tools: TPM2 unlock in the initrd needs
# systemd-cryptsetup, see DESIGN.md), systemd-boot. Disk: cryptsetup for first-boot re-encryption,
# the tpm2-tss libraries systemd-cryptenroll loads, growpart. Runtime: Python for the agent's venv, libgomp
# for llama.cpp. Hardening and operations: nftables, auditd, unattended-upgrades, sudo, OpenSSH (keys only).
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "systemd-resolved",
    "systemd-timesyncd",
    "udev",
    "dbus",
    "kmod",
    "linux-image-amd64",
    "dracut",
    "systemd-boot",
    "cryptsetup-bin",
    "libtss2-esys-3.0.2-0",
    "libtss2-mu0",
    "libtss2-rc0",
    "libtss2-tcti-device0",
    "tpm2-tools",
    "cloud-guest-utils",
    "e2fsprogs",
    "python3",
    "python3-venv",
    "libgomp1",
    "ca-certificates",
    "iproute2",
    "nftables",
    "auditd",
    "unattended-upgrades",
    "sudo",
    "openssh-server",
    "zstd",
    "cpio",
)

PackageName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageUser(_Model):
    """A person's login on the laptop: password locked, SSH keys only."""

    name: str = Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    ssh_public_keys: list[str] = Field(default_factory=list)
    sudo: bool = False


class ImageSpec(_Model):
    site: str
    profile: str
    version: str = Field(description="the appliance version the image carries")
    domain: str = Field(description="the site's DNS domain; devices are named <device>.<domain>")
    debian_suite: str = DEBIAN_SUITE
    packages: list[PackageName] = Field(
        default_factory=list, description="Debian packages beyond BASE_PACKAGES (the profile's extras, firmware)"
    )
    root_size_mb: int = Field(default=4096, ge=512)
    esp_size_mb: int = Field(default=512, ge=64)
    tpm2_pcrs: list[int] = Field(default_factory=lambda: [7], min_length=1)
    tpm2_pin: bool = False
    users: list[ImageUser] = Field(default_factory=list)
    sysctl: dict[str, str] = Field(default_factory=dict, description="kernel settings (the core's base role's list)")
    agent: dict[str, Any] = Field(
        description="the edge agent's settings less what enrollment adds (device, gateways, tls): edge-profile.json"
    )
    taxonomy_yaml: str = Field(description="the department vocabulary the agent routes with")
    ca_pem: str = Field(description="the site's CA chain: the only trust anchor for the gateway")
    gateways: list[str] = Field(min_length=1)
    wheel_requirements: str = Field(
        default="requirements.txt", description="in the wheelhouse: name==version --hash=sha256:... per wheel"
    )

    @property
    def all_packages(self) -> list[str]:
        return sorted(set(BASE_PACKAGES) | set(self.packages))

    def to_json_file(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path
