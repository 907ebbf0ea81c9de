"""What an audit looks at, and how testinfra reaches it.

- a core node from the site's inventory: testinfra's ssh backend with the site's key and the known-hosts
  file `core apply` keeps (a changed host key is refused); sudo when the SSH user is not root;
- an image's root filesystem: the chroot backend on a directory (an edge image is decrypted and mounted
  read-only by `appliance/audit/image_root.py` first);
- this machine: the local backend (a laptop auditing itself, or a core node run by hand).

The spec travels as JSON to the pytest process of its target; it carries no secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.audit.catalog import Kind

Backend = Literal["ssh", "chroot", "local"]


class TargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="how the report names it: the node name, the image, the host name")
    kind: Kind
    backend: Backend
    address: str | None = None
    user: str | None = None
    port: int = 22
    identity_file: str | None = None
    known_hosts: str | None = None
    root: str | None = Field(default=None, description="the chroot directory (chroot backend)")
    image: str | None = Field(default=None, description="the image directory, for checks of the image file itself")
    facts: dict[str, Any] = Field(
        default_factory=dict, description="what checks compare against, from the site (paths, ports, targets)"
    )
    control_dir: str | None = Field(
        default=None, description="a private directory for the SSH connection's master socket (set by the runner)"
    )

    @property
    def sudo(self) -> bool:
        return self.backend == "ssh" and self.user not in (None, "root")

    @property
    def running(self) -> bool:
        """A live system (services, sockets, kernel state), not files on a disk."""
        return self.backend != "chroot"

    def testinfra_host(self) -> Any:
        import testinfra

        if self.backend == "chroot":
            return testinfra.get_host(str(self.root), connection="chroot")
        if self.backend == "local":
            return testinfra.get_host("local://")
        # LogLevel=ERROR: a login banner (CIS 1.6) must not land in every evidence item's stderr.
        extra = "-o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR"
        if self.known_hosts:
            extra += f" -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={self.known_hosts}"
        return testinfra.get_host(
            f"ssh://{self.user}@{self.address}:{self.port}",
            ssh_identity_file=self.identity_file,
            ssh_extra_args=extra,
            sudo=self.sudo,
            # One SSH connection for all of a target's commands: without a ControlPath, testinfra's
            # ControlMaster=auto shares nothing and every command pays a full handshake.
            controlpath=f"{self.control_dir}/ssh-master" if self.control_dir else None,
        )

    def describe(self) -> str:
        if self.backend == "ssh":
            return f"{self.user}@{self.address}:{self.port} (ssh)"
        if self.backend == "chroot":
            return f"{self.root} (chroot, read-only)"
        return "this machine (local)"


def ssh_target(
    name: str,
    address: str,
    user: str,
    identity_file: Path,
    *,
    port: int = 22,
    known_hosts: Path | None = None,
    facts: dict[str, Any] | None = None,
) -> TargetSpec:
    return TargetSpec(
        name=name,
        kind="core",
        backend="ssh",
        address=address,
        user=user,
        port=port,
        identity_file=str(identity_file),
        known_hosts=str(known_hosts) if known_hosts else None,
        facts=facts or {},
    )


def chroot_target(
    name: str, root: Path, *, kind: Kind = "image", image: Path | None = None, facts: dict[str, Any] | None = None
) -> TargetSpec:
    return TargetSpec(
        name=name,
        kind=kind,
        backend="chroot",
        root=str(root),
        image=str(image) if image else None,
        facts=facts or {},
    )


def local_target(name: str, kind: Kind, facts: dict[str, Any] | None = None) -> TargetSpec:
    return TargetSpec(name=name, kind=kind, backend="local", facts=facts or {})
