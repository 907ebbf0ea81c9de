"""A throw-away OpenBao for restores: the lab's kind (dev mode, raft, the lab's static seal key), on free
loopback ports, with its own TLS and a new random root token.

A raft snapshot of the site's OpenBao restored into it comes up unsealed, because both share the seal key;
from then on it holds the source's data, tokens included (see `VaultStore.restore`). A site on an external
Vault gets no scratch OpenBao (`start` returns None): its drills only verify the snapshot's checksum.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import hvac

from appliance.backends import Backends
from appliance.errors import MissingEnvironment, ServiceError
from appliance.lab.process import MARKER_ENV
from appliance.lab.services import (
    OpenBao,
    openbao_config,
    openbao_health,
    openbao_server_argv,
    port_free,
)
from runtime.common import atomic

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0


def free_port_pair(host: str = HOST, attempts: int = 50) -> int:
    """A port p with p + 1 free too (dev OpenBao's cluster listener takes the API port + 1)."""
    for _ in range(attempts):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port < 65535 and port_free(host, port) and port_free(host, port + 1):
            return port
    raise MissingEnvironment(f"found no two consecutive free ports on {host} for a scratch OpenBao")


class ScratchVault:
    def __init__(self, root: Path, port: int, token: str, proc: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.port = port
        self._token = token
        self._proc: subprocess.Popen[bytes] | None = proc
        self._client: hvac.Client | None = None

    @property
    def endpoint(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.root / "tls" / "vault-ca.pem"

    @property
    def log_file(self) -> Path:
        return self.root / "openbao.log"

    @classmethod
    def start(cls, root: Path, backends: Backends) -> ScratchVault | None:
        """A fresh OpenBao in `root` (emptied first), answering when this returns; None for an external Vault."""
        if not backends.site.embedded["vault"]:
            return None
        if backends.state is None:
            raise MissingEnvironment("the site's Vault is embedded but no lab state directory was given")
        lab = OpenBao(backends.site, backends.state)
        if not lab.seal_key_file.exists():
            raise MissingEnvironment(
                f"the lab's OpenBao seal key {lab.seal_key_file} is missing: a snapshot could not be unsealed",
                hint="run `appliance lab up` once",
            )
        shutil.rmtree(root, ignore_errors=True)
        raft_dir = root / "raft"
        raft_dir.mkdir(mode=0o700, parents=True)
        (root / "tls").mkdir(mode=0o700)
        port = free_port_pair()
        config = root / "openbao.hcl"
        rendered = openbao_config(
            raft_dir=raft_dir, seal_key_file=lab.seal_key_file, host=HOST, port=port, node_id="dr-scratch"
        )
        atomic.write_text(config, rendered, mode=0o600)
        token = secrets.token_urlsafe(32)
        env = dict(os.environ)
        env["BAO_DEV_ROOT_TOKEN_ID"] = token  # the environment, not argv: the process list shows argv
        env[MARKER_ENV] = str(backends.state.root)  # `lab down` stops it if its caller died
        argv = openbao_server_argv(tls_dir=root / "tls", host=HOST, port=port, config_file=config)
        with (root / "openbao.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        vault = cls(root, port, token, proc)
        try:
            vault._wait_healthy()
        except BaseException:
            vault.stop()
            raise
        return vault

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        detail = "no answer"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise ServiceError("the scratch OpenBao exited during start-up", hint=f"see its log: {self.log_file}")
            if self.ca_file.exists():
                health = openbao_health("scratch-openbao", self.endpoint, self.ca_file, self._token)
                if health.ok:
                    return
                detail = health.detail
            time.sleep(0.2)
        raise ServiceError(
            f"the scratch OpenBao did not become healthy within {START_TIMEOUT_S:.0f}s: {detail}",
            hint=f"see its log: {self.log_file}",
        )

    def client(self) -> hvac.Client:
        """One client for the scratch OpenBao's life: a restore switches its token to the source's."""
        if self._client is None:
            self._client = hvac.Client(url=self.endpoint, token=self._token, verify=str(self.ca_file), timeout=30)
        return self._client

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
