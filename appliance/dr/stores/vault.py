"""Vault / OpenBao's DR: see appliance/dr/DESIGN.md, row `vault`.

A backup is a raft snapshot (`sys/storage/raft/snapshot`), stored as it comes: it is not wrapped with our
data key, because that key lives in Vault and wrapping would make a lost Vault unrecoverable. Vault's
barrier key encrypts it, and only the seal opens that. The object still gets SSE, object lock, a replica
copy that is read back, and a sha256 checked on restore. There is no continuous shipping: the RPO is one
backup run (1 h by default).

Sums: one entry, `snapshot`: the number of KV v2 secrets and a sha256 over the sorted (mount, path, current
version) of every one, read through the API. They are equal on a faithful restore.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import hvac.exceptions
import requests

from appliance.dr.objects import DrBucket
from appliance.dr.stores.base import Place, Progress, ShipBatch, Store, StoreBackup, TableSum
from appliance.errors import CheckFailed, ServiceError

SNAPSHOT_FILE = "raft.snap"
SNAPSHOT_FORMAT = "openbao-raft-snapshot"  # in the object's metadata: raw, not our encrypted format
RESTORE_TIMEOUT_S = 120.0
_BLOCK = 1 << 20
_VaultErrors = (hvac.exceptions.VaultError, requests.exceptions.RequestException)


class VaultStore(Store):
    name = "vault"

    def backup(
        self, bucket: DrBucket, place: Place, prefix: str, previous: StoreBackup | None, progress: Progress
    ) -> StoreBackup:
        client = place.vault()
        if client is None:
            raise CheckFailed("vault: this place has no Vault to back up")
        key = prefix + SNAPSHOT_FILE
        with tempfile.TemporaryDirectory(prefix="membria-dr-vault-") as tmp:
            snapshot = Path(tmp) / SNAPSHOT_FILE
            # The sums are read through the API, the snapshot separately: a write in between would make them
            # disagree, so both are read until the sums before and after the snapshot agree.
            for _attempt in range(3):
                before = kv_sums(client)
                source_time = time.time()
                sha, size = _take_snapshot(client, snapshot)
                after = kv_sums(client)
                if before == after:
                    break
                progress("vault: secrets changed during the snapshot; taking it again")
            else:
                raise ServiceError("vault: the secrets kept changing during three snapshots in a row; try again")
            progress(f"vault: raft snapshot, {size} bytes")
            version = bucket.put_raw(key, snapshot, sha256=sha, meta={"membria-format": SNAPSHOT_FORMAT})
        return StoreBackup(
            store=self.name,
            objects={key: ""},  # "": not ours (not wrapped); the sha256 is in `extra`
            sums=after,
            watermark={"snapshot_time": source_time},
            source_time=source_time,
            extra={"snapshot_key": key, "sha256": sha, "bytes": size, "version_id": version},
        )

    def changes(self, place: Place, watermark: dict[str, Any] | None, workdir: Path) -> ShipBatch | None:
        return None  # snapshots only (DESIGN.md)

    def restore(self, bucket: DrBucket, backup: StoreBackup, target: Place, workdir: Path, progress: Progress) -> None:
        key, sha = str(backup.extra["snapshot_key"]), str(backup.extra["sha256"])
        workdir.mkdir(parents=True, exist_ok=True)
        snapshot = workdir / "vault-raft.snap"
        try:
            bucket.get_raw(key, snapshot, sha256=sha)
            client = target.vault()
            if client is None:
                progress("vault: the target has no Vault of its own; the snapshot's checksum was verified")
                return
            progress(f"vault: restoring the raft snapshot ({snapshot.stat().st_size} bytes)")
            try:
                with snapshot.open("rb") as body:
                    client.sys.force_restore_raft_snapshot(body)
            except _VaultErrors as exc:
                raise ServiceError(f"vault: the target refused the snapshot {key}: {_first_line(exc)}") from None
        finally:
            snapshot.unlink(missing_ok=True)
        # The target now holds the source's data, its tokens included: the target's own token is gone.
        client.token = _source_token(target)
        _wait_answering(client)

    def apply(self, shipment: Path, target: Place) -> int:
        return 0  # nothing is ever shipped

    def can_compare(self, place: Place) -> bool:
        return place.vault() is not None

    def sums(self, place: Place) -> dict[str, TableSum]:
        client = place.vault()
        return {} if client is None else kv_sums(client)


# -- the snapshot object: raw, on both targets ---------------------------------------------------------------


def _take_snapshot(client: hvac.Client, dest: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    try:
        response = client.sys.take_raft_snapshot()
        response.raise_for_status()
        with dest.open("wb") as out:
            for block in response.iter_content(_BLOCK):
                digest.update(block)
                out.write(block)
                size += len(block)
    except _VaultErrors as exc:
        raise ServiceError(f"vault: the raft snapshot failed: {_first_line(exc)}") from None
    if size == 0:
        raise ServiceError("vault: the raft snapshot came back empty")
    return digest.hexdigest(), size


# -- after a restore ----------------------------------------------------------------------------------------------


def _source_token(target: Place) -> str:
    """A token valid on the source: the restored data only knows the source's tokens. Both kinds of place
    (the site, a scratch target) carry the site's `Backends`, whose Vault client holds one."""
    backends = getattr(target, "backends", None)
    if backends is None:
        raise CheckFailed("vault: the restore target does not name its source site, so no token fits it")
    token = backends.vault().token
    if not token:
        raise CheckFailed("vault: the source site's Vault client has no token for the restored Vault")
    return str(token)


def _wait_answering(client: hvac.Client, timeout: float = RESTORE_TIMEOUT_S) -> None:
    """Until the restored Vault is unsealed and accepts the source's token (it reloads for a few seconds)."""
    deadline = time.monotonic() + timeout
    detail = "no answer"
    while time.monotonic() < deadline:
        try:
            if client.sys.is_sealed():
                detail = "sealed (was the snapshot made under another seal key?)"
            else:
                client.auth.token.lookup_self()
                return
        except hvac.exceptions.Forbidden:
            detail = "the source's token is refused"
        except _VaultErrors as exc:
            detail = _first_line(exc)
        time.sleep(0.5)
    raise ServiceError(f"vault: the restored Vault did not answer within {timeout:.0f}s: {detail}")


# -- sums -------------------------------------------------------------------------------------------------------


def kv_mounts(client: hvac.Client) -> list[str]:
    """The KV v2 mounts (without the trailing slash), sorted."""
    try:
        listed = client.sys.list_mounted_secrets_engines()
    except _VaultErrors as exc:
        raise ServiceError(f"vault: cannot list the secrets engines: {_first_line(exc)}") from None
    mounts = listed.get("data", listed)
    return sorted(
        path.rstrip("/")
        for path, info in mounts.items()
        if isinstance(info, dict)
        and info.get("type") == "kv"
        and str((info.get("options") or {}).get("version")) == "2"
    )


def kv_versions(client: hvac.Client) -> list[tuple[str, str, int]]:
    """(mount, path, current version) of every KV v2 secret, sorted."""
    out: list[tuple[str, str, int]] = []
    kv = client.secrets.kv.v2
    for mount in kv_mounts(client):
        folders = [""]
        while folders:
            folder = folders.pop()
            try:
                keys = kv.list_secrets(path=folder, mount_point=mount)["data"]["keys"]
            except hvac.exceptions.InvalidPath:
                continue  # an empty mount or folder
            except _VaultErrors as exc:
                raise ServiceError(f"vault: cannot list {mount}/{folder}: {_first_line(exc)}") from None
            for name in keys:
                path = folder + name
                if name.endswith("/"):
                    folders.append(path)
                    continue
                try:
                    meta = kv.read_secret_metadata(path=path, mount_point=mount)["data"]
                except _VaultErrors as exc:
                    raise ServiceError(
                        f"vault: cannot read the metadata of {mount}/{path}: {_first_line(exc)}"
                    ) from None
                out.append((mount, path, int(meta["current_version"])))
    return sorted(out)


def kv_sums(client: hvac.Client) -> dict[str, TableSum]:
    versions = kv_versions(client)
    digest = hashlib.sha256()
    for mount, path, version in versions:
        digest.update(f"{mount}\x1f{path}\x1f{version}\x1e".encode())
    return {"snapshot": TableSum(len(versions), digest.hexdigest())}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
