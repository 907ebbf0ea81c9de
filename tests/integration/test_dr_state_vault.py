"""DR of the `vault` and `state` stores against real components: the lab's OpenBao (raft, static seal) and a
scratch OpenBao restored from its snapshot, a moto S3 server, and SQLite files made by the real sync hub,
replica store and idempotency store."""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from appliance.backends import Backends
from appliance.dr.objects import CorruptObject, DrBucket, MissingObject
from appliance.dr.places import ScratchPlace, SitePlace
from appliance.dr.scratch_vault import ScratchVault
from appliance.dr.stores.base import StoreBackup, TableSum
from appliance.dr.stores.state import StateStore, file_sums
from appliance.dr.stores.vault import VaultStore, _wait_answering
from appliance.errors import CheckFailed, MissingEnvironment, ServiceError
from appliance.lab import process
from appliance.lab.services import OpenBao
from appliance.lab.state import LabState
from appliance.site import Site
from runtime.common.ingest import prepare_document
from runtime.common.replica import ReplicaStore
from runtime.core.sync_hub import SyncHub
from runtime.gateway.idempotency import IdempotencyStore
from tests.conftest import example_data, lab_site_data
from tests.integration.dr_support import S3Endpoint, dr_bucket, endpoint_pair

pytestmark = pytest.mark.integration


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Endpoint, S3Endpoint]]:
    with endpoint_pair(tmp_path_factory.mktemp("moto")) as pair:
        yield pair


@pytest.fixture
def bucket(endpoints: tuple[S3Endpoint, S3Endpoint]) -> DrBucket:
    return dr_bucket(*endpoints)


# --- the lab's OpenBao --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """The lab's OpenBao alone (dev mode on raft with the static seal), started as `lab up` starts it."""
    root = tmp_path_factory.mktemp("bao-lab")
    site = Site.model_validate(lab_site_data(root / "state"))
    state = LabState.at(site.lab.state_dir)
    server = OpenBao(site, state)
    server.prepare()
    record = process.spawn(state, server.name, server.argv(), env=server.env())
    try:
        process.wait_until(lambda: not record.alive() or server.check().ok, timeout=server.start_timeout, interval=0.2)
        health = server.check()
        if not health.ok:
            pytest.fail(f"OpenBao did not start: {health.detail}\n{Path(record.log).read_text()[-3000:]}")
        yield Backends(site, state)
    finally:
        process.stop(state, server.name)


def test_the_lab_openbao_runs_on_raft_with_the_static_seal(bao: Backends) -> None:
    assert bao.state is not None
    server = OpenBao(bao.site, bao.state)
    config = server.config_file.read_text()
    assert 'storage "raft"' in config and f'"{server.raft_dir}"' in config
    assert f'"file://{server.seal_key_file}"' in config
    assert f"https://127.0.0.1:{server.port + 1}" in config  # the cluster listener
    assert server.seal_key_file.stat().st_mode & 0o777 == 0o600
    assert len(server.seal_key_file.read_bytes()) == 32
    # Integrated storage answers its own API (the in-memory dev store has no raft configuration).
    servers = bao.vault().sys.read_raft_config()["data"]["config"]["servers"]
    assert [(s["node_id"], s["leader"]) for s in servers] == [("lab-1", True)]
    assert any(server.raft_dir.iterdir())


def test_prepare_wipes_raft_and_keeps_the_seal_key(tmp_path: Path) -> None:
    site = Site.model_validate(lab_site_data(tmp_path / "state"))
    server = OpenBao(site, LabState.at(site.lab.state_dir))
    server.prepare()
    key = server.seal_key_file.read_bytes()
    (server.raft_dir / "vault.db").write_bytes(b"the previous run")
    server.prepare()
    assert server.seal_key_file.read_bytes() == key
    assert list(server.raft_dir.iterdir()) == []


def test_prepare_refuses_a_taken_cluster_port(tmp_path: Path) -> None:
    data = lab_site_data(tmp_path / "state")
    data["lab"]["ports"]["s3"] = data["lab"]["ports"]["openbao"] + 1
    site = Site.model_validate(data)
    with pytest.raises(MissingEnvironment, match=r"cluster listener.*lab\.ports\.s3"):
        OpenBao(site, LabState.at(site.lab.state_dir)).prepare()
    data = lab_site_data(tmp_path / "state2")
    site = Site.model_validate(data)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", site.lab.ports.openbao + 1))
        sock.listen()
        with pytest.raises(MissingEnvironment, match="taken by another program"):
            OpenBao(site, LabState.at(site.lab.state_dir)).prepare()


# --- the scratch OpenBao ------------------------------------------------------------------------------------


def test_no_scratch_openbao_for_an_external_vault(tmp_path: Path) -> None:
    site = Site.model_validate(example_data("rack.yaml"))
    assert ScratchVault.start(tmp_path / "bao", Backends(site)) is None
    assert not (tmp_path / "bao").exists()


def test_a_scratch_openbao_has_its_own_port_and_token_and_stops(bao: Backends, tmp_path: Path) -> None:
    started = time.monotonic()
    scratch = ScratchVault.start(tmp_path / "bao", bao)
    assert scratch is not None
    try:
        ready = time.monotonic() - started
        assert scratch.port not in {bao.site.lab.ports.openbao, bao.site.lab.ports.openbao + 1}
        client = scratch.client()
        assert client.is_authenticated() and client.token != bao.vault().token
        assert bao.vault().token is not None
        assert not hvac.Client(
            url=scratch.endpoint, token=bao.vault().token, verify=str(scratch.ca_file)
        ).is_authenticated()
        print(f"scratch OpenBao ready after {ready:.1f} s")
    finally:
        scratch.stop()
    assert not scratch.running()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", scratch.port)) != 0


def test_the_scratch_openbao_needs_the_lab_seal_key(tmp_path: Path) -> None:
    site = Site.model_validate(lab_site_data(tmp_path / "state"))
    with pytest.raises(MissingEnvironment, match="seal key"):
        ScratchVault.start(tmp_path / "bao", Backends(site, LabState.at(site.lab.state_dir)))


# --- the vault store ----------------------------------------------------------------------------------------


def _write_secrets(client: hvac.Client) -> None:
    kv = client.secrets.kv.v2
    kv.create_or_update_secret(path="dr-test/app", secret={"password": "one"}, mount_point="secret")
    kv.create_or_update_secret(path="dr-test/app", secret={"password": "two"}, mount_point="secret")
    kv.create_or_update_secret(path="dr-test/deep/nested/key", secret={"k": "v"}, mount_point="secret")
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    if "kv-extra/" not in mounts:
        client.sys.enable_secrets_engine("kv", path="kv-extra", options={"version": "2"})
        client.sys.enable_secrets_engine("kv", path="kv-one", options={"version": "1"})
    deadline = time.monotonic() + 10
    while True:  # a new KV v2 mount upgrades itself for a moment before it takes writes
        try:
            kv.create_or_update_secret(path="other", secret={"x": "1"}, mount_point="kv-extra")
            break
        except hvac.exceptions.InvalidRequest:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    client.secrets.kv.v1.create_or_update_secret(path="legacy", secret={"x": "1"}, mount_point="kv-one")


def test_the_vault_snapshot_restores_into_a_scratch_openbao(bao: Backends, bucket: DrBucket, tmp_path: Path) -> None:
    source = SitePlace(bao)
    _write_secrets(bao.vault())
    store = VaultStore()
    part = store.backup(bucket, source, "backups/b1/vault/", None, quiet)
    assert part.sums == store.sums(source)
    (key,) = part.objects
    assert part.objects[key] == "" and part.extra["snapshot_key"] == key
    assert part.sums["snapshot"].rows >= 3  # the lab's own secrets are there too
    # Stored raw (no client-side layer), on both targets, with the sha256 recorded.
    assert bucket.replica is not None
    for target in (bucket.primary, bucket.replica):
        blob = target.client.get_object(Bucket=target.bucket, Key=bucket.full_key(key))["Body"].read()
        assert hashlib.sha256(blob).hexdigest() == part.extra["sha256"] and not blob.startswith(b"MDR1")
    assert store.changes(source, part.watermark, tmp_path) is None

    place = ScratchPlace(tmp_path / "target", bao)
    try:
        started = time.monotonic()
        store.restore(bucket, StoreBackup.from_wire(part.to_wire()), place, tmp_path / "work", quiet)
        print(f"vault restore into a scratch OpenBao: {time.monotonic() - started:.1f} s")
        restored = place.vault()
        assert restored is not None
        read = restored.secrets.kv.v2.read_secret_version
        assert read(path="dr-test/app", mount_point="secret", raise_on_deleted_version=True)["data"]["data"] == {
            "password": "two"
        }
        assert read(path="other", mount_point="kv-extra", raise_on_deleted_version=True)["data"]["data"] == {"x": "1"}
        assert store.sums(place) == part.sums == store.sums(source)
        assert store.apply(tmp_path / "nothing", place) == 0
    finally:
        place.close()


def test_vault_sums_follow_versions_and_secrets(bao: Backends) -> None:
    store, source = VaultStore(), SitePlace(bao)
    kv = bao.vault().secrets.kv.v2
    kv.create_or_update_secret(path="dr-test/sums", secret={"n": "1"}, mount_point="secret")
    before = store.sums(source)["snapshot"]
    kv.create_or_update_secret(path="dr-test/sums", secret={"n": "2"}, mount_point="secret")
    newer = store.sums(source)["snapshot"]
    assert newer.rows == before.rows and newer.digest != before.digest
    kv.create_or_update_secret(path="dr-test/sums-2", secret={"n": "1"}, mount_point="secret")
    assert store.sums(source)["snapshot"].rows == before.rows + 1


def test_a_corrupt_or_missing_snapshot_is_refused(bao: Backends, bucket: DrBucket, tmp_path: Path) -> None:
    store = VaultStore()
    part = store.backup(bucket, SitePlace(bao), "backups/b2/vault/", None, quiet)
    full = bucket.full_key(part.extra["snapshot_key"])
    client = bucket.primary.client
    blob = bytearray(client.get_object(Bucket=bucket.primary.bucket, Key=full)["Body"].read())
    blob[len(blob) // 2] ^= 0x01
    client.put_object(Bucket=bucket.primary.bucket, Key=full, Body=bytes(blob))  # a new version, one bit off
    place = ScratchPlace(tmp_path / "target", bao)
    try:
        with pytest.raises(CorruptObject, match=full):
            store.restore(bucket, part, place, tmp_path / "work", quiet)
        client.delete_object(Bucket=bucket.primary.bucket, Key=full)  # a delete marker hides every version
        with pytest.raises(MissingObject, match=full):
            store.restore(bucket, part, place, tmp_path / "work", quiet)
        assert place._vault is None  # refused before a scratch OpenBao was even started
    finally:
        place.close()


def test_waiting_for_a_restored_vault_names_a_refused_token(bao: Backends) -> None:
    assert bao.state is not None
    server = OpenBao(bao.site, bao.state)
    stranger = hvac.Client(url=server.endpoint, token="not-a-token", verify=str(server.ca_file))
    with pytest.raises(ServiceError, match="token is refused"):
        _wait_answering(stranger, timeout=1.0)


# --- the state store ------------------------------------------------------------------------------------------


def _site_place(root: Path) -> SitePlace:
    site = Site.model_validate(lab_site_data(root / "state"))
    return SitePlace(Backends(site, LabState.at(site.lab.state_dir)))


def _document(doc_id: str, paragraphs: list[str], department: str = "engineering") -> Any:
    return prepare_document("\n\n".join(paragraphs).encode(), filename=f"{doc_id}.txt", department=department)


def _device_push(hub: SyncHub, device: ReplicaStore, department: str = "engineering") -> None:
    records = [r.to_wire() for r in device.changes_since(hub.store.clock())]
    hub.push(device.replica_id, records, device.clock().to_json(), [department])


def _populate(place: SitePlace, tmp: Path) -> tuple[SyncHub, IdempotencyStore, ReplicaStore]:
    files = place.sqlite_files()
    hub = SyncHub(files["sync-hub"])
    hub.document_replaced(_document("manual", ["Valve VX-55 opens at 3 bar.", "Close it before service."]))
    hub.document_replaced(_document("pricing", ["Discounts need approval."], "sales"))
    device = ReplicaStore(tmp / "laptop.sqlite", "laptop-eng-1")
    device.local_write("chunk", "note-1", department="engineering", payload={"text": "a field note"})
    device.local_write("reasoning", "r-1", department="engineering", payload={"steps": ["a", "b"]})
    device.local_write("lora", "adapter-1", department="engineering", payload={"weights": "local only"})
    _device_push(hub, device)
    idem = IdempotencyStore(files["gateway-idempotency"])
    idem.try_begin("device:laptop-eng-1", "k-1", "h-1")
    idem.complete("device:laptop-eng-1", "k-1", 200, {"answer": "42"})
    return hub, idem, device


def _more_writes(hub: SyncHub, idem: IdempotencyStore, device: ReplicaStore) -> None:
    # A re-upload that drops a chunk (a tombstone), a new document, a device's edit, a new answered key.
    hub.document_replaced(_document("manual", ["Valve VX-55 opens at 4 bar."]))
    hub.document_replaced(_document("faq", ["Who approves travel? Your manager."]))
    device.local_write("chunk", "note-1", department="engineering", payload={"text": "an edited field note"})
    device.local_write("chunk", "note-2", department="engineering", payload={"text": "a second note"})
    _device_push(hub, device)
    idem.try_begin("device:laptop-eng-1", "k-2", "h-2")
    idem.complete("device:laptop-eng-1", "k-2", 200, {"answer": "43"})


def test_state_backup_restores_to_the_same_sums(bucket: DrBucket, tmp_path: Path) -> None:
    source = _site_place(tmp_path / "site")
    hub, idem, device = _populate(source, tmp_path)
    store = StateStore()
    part = store.backup(bucket, source, "backups/b1/state/", None, quiet)
    assert part.extra["missing"] == []
    assert set(part.extra["files"]) == {"sync-hub", "gateway-idempotency"}
    assert part.sums == store.sums(source)
    # one chunk per document (both are short), the device's chunk and its reasoning; its LoRA stays home
    assert part.sums["sync-hub:sync_records"].rows == 4
    assert part.sums["gateway-idempotency:idempotency"].rows == 1
    assert part.watermark["clock"] == hub.store.clock().to_json()

    target = ScratchPlace(tmp_path / "target", source.backends)
    store.restore(bucket, StoreBackup.from_wire(part.to_wire()), target, tmp_path / "work", quiet)
    assert store.sums(target) == part.sums
    restored = SyncHub(target.sqlite_files()["sync-hub"])
    assert restored.store.state_digest() == hub.store.state_digest()
    restored.close()
    assert store.changes(source, part.watermark, tmp_path / "ship") is None  # nothing changed since
    for closable in (hub, idem, device):
        closable.close()


def test_state_shipments_bring_a_restore_up_to_the_source(bucket: DrBucket, tmp_path: Path) -> None:
    source = _site_place(tmp_path / "site")
    hub, idem, device = _populate(source, tmp_path)
    store = StateStore()
    part = store.backup(bucket, source, "backups/b1/state/", None, quiet)
    target = ScratchPlace(tmp_path / "target", source.backends)
    store.restore(bucket, part, target, tmp_path / "work", quiet)

    _more_writes(hub, idem, device)
    assert store.sums(target) != store.sums(source)
    batch = store.changes(source, part.watermark, tmp_path / "ship")
    assert batch is not None
    # 5 records (the re-upload's new chunk and its old one's tombstone, faq, two device notes), the whole
    # documents table (3 rows: manual, pricing, faq) and the idempotency copy (2 rows)
    assert batch.items == 5 + 3 + 2
    assert batch.watermark["clock"] == hub.store.clock().to_json()
    assert store.apply(batch.path, target) == batch.items
    assert store.sums(target) == store.sums(source)
    # The hub's own versions kept their seqs (no re-stamping as if the copy were an older replica).
    restored = SyncHub(target.sqlite_files()["sync-hub"])
    assert restored.store.state_digest() == hub.store.state_digest()
    assert restored.store.counter() == hub.store.counter()
    restored.close()
    assert store.apply(batch.path, target) == batch.items  # applying twice changes nothing
    assert store.sums(target) == store.sums(source)
    assert store.changes(source, batch.watermark, tmp_path / "ship") is None

    # Only the idempotency store changed: the shipment holds its copy and no hub part.
    idem.try_begin("user:alice", "k-3", "h-3")
    batch = store.changes(source, batch.watermark, tmp_path / "ship")
    assert batch is not None and batch.items == 3
    assert store.apply(batch.path, target) == 3
    assert store.sums(target) == store.sums(source)
    for closable in (hub, idem, device):
        closable.close()


def test_a_device_clock_entry_alone_is_shipped(bucket: DrBucket, tmp_path: Path) -> None:
    """A device's LoRA write moves its counter but sends no record: the hub's clock still changes."""
    source = _site_place(tmp_path / "site")
    hub, idem, device = _populate(source, tmp_path)
    store = StateStore()
    part = store.backup(bucket, source, "backups/b1/state/", None, quiet)
    device.local_write("lora", "adapter-2", department="engineering", payload={"weights": "local"})
    _device_push(hub, device)
    batch = store.changes(source, part.watermark, tmp_path / "ship")
    assert batch is not None and batch.items == 0
    target = ScratchPlace(tmp_path / "target", source.backends)
    store.restore(bucket, part, target, tmp_path / "work", quiet)
    store.apply(batch.path, target)
    assert store.sums(target) == store.sums(source)
    for closable in (hub, idem, device):
        closable.close()


def test_state_sums_see_one_altered_row(bucket: DrBucket, tmp_path: Path) -> None:
    source = _site_place(tmp_path / "site")
    closables = _populate(source, tmp_path)
    store = StateStore()
    part = store.backup(bucket, source, "backups/b1/state/", None, quiet)
    target = ScratchPlace(tmp_path / "target", source.backends)
    store.restore(bucket, part, target, tmp_path / "work", quiet)
    with sqlite3.connect(target.sqlite_files()["gateway-idempotency"]) as conn:
        conn.execute("UPDATE idempotency SET replays = replays + 1 WHERE key = 'k-1'")
    after = store.sums(target)
    changed = {k for k in after if after[k] != part.sums[k]}
    assert changed == {"gateway-idempotency:idempotency"}
    assert after["gateway-idempotency:idempotency"].rows == part.sums["gateway-idempotency:idempotency"].rows
    for closable in closables:
        closable.close()


def test_state_restore_refuses_a_target_with_rows(bucket: DrBucket, tmp_path: Path) -> None:
    source = _site_place(tmp_path / "site")
    closables = _populate(source, tmp_path)
    store = StateStore()
    part = store.backup(bucket, source, "backups/b1/state/", None, quiet)
    target = ScratchPlace(tmp_path / "target", source.backends)
    other = IdempotencyStore(target.sqlite_files()["gateway-idempotency"])
    other.try_begin("user:bob", "k-9", "h-9")
    other.close()
    before = store.sums(target)
    with pytest.raises(CheckFailed, match="already holds data"):
        store.restore(bucket, part, target, tmp_path / "work", quiet)
    assert store.sums(target) == before  # nothing written, the hub included
    for closable in closables:
        closable.close()


def test_a_corrupt_state_object_is_refused(bucket: DrBucket, tmp_path: Path) -> None:
    source = _site_place(tmp_path / "site")
    closables = _populate(source, tmp_path)
    store = StateStore()
    part = store.backup(bucket, source, "backups/b1/state/", None, quiet)
    full = bucket.full_key(part.extra["files"]["sync-hub"])
    client = bucket.primary.client
    blob = bytearray(client.get_object(Bucket=bucket.primary.bucket, Key=full)["Body"].read())
    blob[-40] ^= 0x01
    client.put_object(Bucket=bucket.primary.bucket, Key=full, Body=bytes(blob))
    target = ScratchPlace(tmp_path / "target", source.backends)
    with pytest.raises(CorruptObject, match=full):
        store.restore(bucket, part, target, tmp_path / "work", quiet)
    assert not target.sqlite_files()["sync-hub"].exists()
    for closable in closables:
        closable.close()


def test_a_missing_file_is_skipped_then_shipped_whole(bucket: DrBucket, tmp_path: Path) -> None:
    source = _site_place(tmp_path / "site")
    hub = SyncHub(source.sqlite_files()["sync-hub"])
    hub.document_replaced(_document("manual", ["Valve VX-55 opens at 3 bar."]))
    store = StateStore()
    part = store.backup(bucket, source, "backups/b1/state/", None, quiet)
    assert part.extra["missing"] == ["gateway-idempotency"]
    assert not any(key.startswith("gateway-idempotency:") for key in part.sums)
    target = ScratchPlace(tmp_path / "target", source.backends)
    store.restore(bucket, part, target, tmp_path / "work", quiet)
    assert store.sums(target) == store.sums(source)
    idem = IdempotencyStore(source.sqlite_files()["gateway-idempotency"])  # the gateway's first request
    idem.try_begin("user:alice", "k-1", "h-1")
    batch = store.changes(source, part.watermark, tmp_path / "ship")
    assert batch is not None and batch.items == 1
    store.apply(batch.path, target)
    assert store.sums(target) == store.sums(source)
    hub.close()
    idem.close()


def test_a_shipment_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.bin"
    bogus.write_bytes(b"not a tar")
    with pytest.raises(CheckFailed, match="not a state shipment"):
        StateStore().apply(bogus, ScratchPlace(tmp_path / "target", _site_place(tmp_path / "site").backends))


def test_file_sums_cover_shadow_tables_and_value_types(tmp_path: Path) -> None:
    def make(path: Path, value: object) -> dict[str, TableSum]:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE VIRTUAL TABLE docs USING fts5(body)")
            conn.execute("INSERT INTO docs (body) VALUES ('valve VX-55 opens at 3 bar')")
            conn.execute("CREATE TABLE plain (v)")  # no primary key: rowid order
            conn.execute("CREATE TABLE keyed (a TEXT, b INTEGER, PRIMARY KEY (a, b)) WITHOUT ROWID")
            conn.execute("INSERT INTO plain (v) VALUES (?), (?)", (value, b"\x00blob"))
            conn.execute("INSERT INTO keyed VALUES ('x', 2), ('x', 1)")
        conn.close()
        return file_sums(path, "f")

    one = make(tmp_path / "one.sqlite", 1)
    assert "f:docs" not in one  # the virtual table itself
    assert {"f:docs_data", "f:docs_content", "f:docs_idx", "f:plain", "f:keyed"} <= set(one)
    assert one["f:docs_content"].rows == 1 and one["f:keyed"].rows == 2
    text = make(tmp_path / "text.sqlite", "1")  # the same digits as TEXT
    assert text["f:plain"] != one["f:plain"]
    assert {k: v for k, v in text.items() if k != "f:plain"} == {k: v for k, v in one.items() if k != "f:plain"}
