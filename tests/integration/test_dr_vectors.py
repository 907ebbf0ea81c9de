"""The `vectors` DR store for real: a core service (`CoreService`) ingests documents into Milvus Lite with
the packaged embedding model, a moto server holds the encrypted objects, and each restore target is its own
Milvus Lite file (`ScratchPlace`), opened in this process next to the core's.

The source is read as DR reads it in the lab: `SitePlace` -> `Backends.vectors()`, which finds the URI the
running core published next to its Milvus Lite file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from milvus_lite.server_manager import server_manager_instance
from pymilvus import DataType

from appliance.backends import Backends
from appliance.dr.objects import DrBucket
from appliance.dr.places import ScratchPlace, SitePlace
from appliance.dr.stores.base import StoreBackup
from appliance.dr.stores.vectors import VectorsStore
from appliance.errors import BadInput, CheckFailed
from appliance.lab.state import LabState
from appliance.site import Site
from runtime.core.retrieval import Retriever
from runtime.core.service import CoreService
from runtime.core.store import DepartmentStore
from tests.conftest import REPO, free_port, lab_site_data, write_site
from tests.integration.dr_support import S3Endpoint, dr_bucket
from tests.integration.test_core_server import core_settings

pytestmark = pytest.mark.integration

DOCS = {
    ("engineering", "pump-manual.md"): "# Pump manual\n\nPump VX-55 runs at 4 bar. Check its pressure gauge every "
    "shift and log it.\n\n## Seals\n\nReplace the VX-55 mechanical seal every 2000 running hours.",
    ("engineering", "valves.md"): "# Valve guide\n\nValve V-2 must stay closed while the boiler is hot. "
    "Open it only with a permit signed by the shift lead.",
    ("field-ops", "night-shift.md"): "# Night shift\n\nThe night crew patrols the tank farm twice and radios "
    "the control room at 02:00.",
    ("sales", "pricing.md"): "# Pricing\n\nVolume discounts start at 500 units: 4 percent, and 7 percent "
    "from 2000 units. Quotes are valid for 30 days.",
}
COLLECTIONS = {"membria_dept_engineering", "membria_dept_field_ops", "membria_dept_sales"}
LIST_COLLECTIONS = (
    "import json, sys\n"
    "from appliance.backends import Backends\n"
    "from appliance.lab.state import LabState\n"
    "from appliance.site import load_site\n"
    "site = load_site(__import__('pathlib').Path(sys.argv[1]))\n"
    "client = Backends(site, LabState.at(site.lab.state_dir)).vectors()\n"
    "print(json.dumps(sorted(client.list_collections())))\n"
)

store = VectorsStore()


def make_site(root: Path) -> tuple[Site, Path]:
    data = lab_site_data(root / "state")
    return Site.model_validate(data), write_site(root / "site.yaml", data)


def start_core(site: Site, root: Path, **kwargs: Any) -> CoreService:
    """A core service on the site's Milvus Lite file (where `Backends` looks), with no LLM behind it."""
    path = Backends(site, LabState.at(site.lab.state_dir)).milvus_lite_path()
    return CoreService(core_settings(root, "http://127.0.0.1:9/v1", milvus_uri=str(path)), **kwargs)


def list_in_subprocess(site_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LIST_COLLECTIONS, str(site_file)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Site, Path]:
    return make_site(tmp_path_factory.mktemp("dr-vectors-site"))


@pytest.fixture(scope="module")
def core(site: tuple[Site, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreService]:
    service = start_core(site[0], tmp_path_factory.mktemp("dr-vectors-core"))
    for (department, filename), text in DOCS.items():
        service.ingest_file(department, filename, text.encode())
    yield service
    service.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    endpoint = S3Endpoint.start_new(tmp_path_factory.mktemp("dr-vectors-s3"))
    yield endpoint
    endpoint.stop()


@pytest.fixture
def bucket(s3: S3Endpoint) -> DrBucket:
    return dr_bucket(s3)


@pytest.fixture
def source(core: CoreService, site: tuple[Site, Path]) -> SitePlace:
    return SitePlace(Backends(site[0], LabState.at(site[0].lab.state_dir)))


@pytest.fixture
def target(tmp_path: Path, site: tuple[Site, Path]) -> Iterator[ScratchPlace]:
    place = ScratchPlace(tmp_path / "target", Backends(site[0]))
    yield place
    server_manager_instance.release_server(str(place.root / "milvus.db"))  # one Milvus Lite thread per file


def backup_and_restore(bucket: DrBucket, source: SitePlace, target: ScratchPlace, workdir: Path) -> StoreBackup:
    messages: list[str] = []
    part = store.backup(bucket, source, "backups/b1/vectors/", None, messages.append)
    store.restore(bucket, part, target, workdir, messages.append)
    assert len(messages) == 2 * len(part.sums)
    return part


def one_row(place: ScratchPlace | SitePlace, collection: str) -> dict[str, Any]:
    client = place.vectors()
    fields = [f["name"] for f in client.describe_collection(collection)["fields"] if f["name"] != "sparse"]
    rows = client.query(collection, filter="position == 0", output_fields=fields, limit=1)
    return dict(rows[0])


# -- backup and restore --------------------------------------------------------------------------------


def test_backup_then_restore_into_an_empty_target_gives_equal_sums_and_the_same_search(
    core: CoreService, bucket: DrBucket, source: SitePlace, target: ScratchPlace, tmp_path: Path
) -> None:
    part = backup_and_restore(bucket, source, target, tmp_path)
    assert set(part.sums) == COLLECTIONS
    assert part.sums["membria_dept_engineering"].rows >= 3
    assert store.sums(source) == part.sums
    assert store.sums(target) == part.sums
    assert len(part.objects) == 2 * len(COLLECTIONS) and all(len(sha) == 64 for sha in part.objects.values())

    # The Parquet file: every stored field, dense as float32 x 384, and no BM25 output (Milvus computes it).
    data = bucket.get_file("backups/b1/vectors/membria_dept_sales.parquet", tmp_path / "sales.parquet")
    schema = pq.read_schema(data)
    assert "sparse" not in schema.names and {"chunk_id", "text", "lexical", "updated_at"} <= set(schema.names)
    assert schema.field("dense").type == pa.list_(pa.float32(), 384)
    described = bucket.get_json("backups/b1/vectors/membria_dept_sales.schema.json")
    assert [f["name"] for f in described["functions"]] == ["text_bm25"]

    restored = Retriever(DepartmentStore(target.vectors()), core.embedder)
    for query, department in [("VX-55 seal replacement", "engineering"), ("volume discount", "sales")]:
        for mode in ("hybrid", "lexical", "dense"):
            here = [h.chunk_id for h in core.search(query, [department], mode=mode)]
            there = [h.chunk_id for h in restored.search(query, [department], mode=mode)]
            assert here and there[0] == here[0], (query, mode)


def test_restore_refuses_a_target_that_already_has_rows(
    bucket: DrBucket, source: SitePlace, target: ScratchPlace, tmp_path: Path
) -> None:
    part = backup_and_restore(bucket, source, target, tmp_path)
    with pytest.raises(CheckFailed, match="already has rows in Milvus collection membria_dept_engineering"):
        store.restore(bucket, part, target, tmp_path, lambda _: None)


def test_restore_refuses_a_backup_whose_schema_differs_from_the_cores(
    bucket: DrBucket, source: SitePlace, target: ScratchPlace, tmp_path: Path
) -> None:
    part = store.backup(bucket, source, "backups/b2/vectors/", None, lambda _: None)
    key = part.extra["collections"]["membria_dept_sales"]["schema"]
    schema = bucket.get_json(key)
    next(f for f in schema["fields"] if f["name"] == "title")["params"]["max_length"] = 4096
    part.objects[key] = bucket.put_json(key + ".edited", schema).sha256
    part.extra["collections"]["membria_dept_sales"]["schema"] = key + ".edited"
    with pytest.raises(CheckFailed, match=r"membria_dept_sales: the backed-up schema differs.*field title"):
        store.restore(bucket, part, target, tmp_path, lambda _: None)
    assert all(s.rows == 0 for s in store.sums(target).values())  # refused before any row was written

    del part.extra["collections"]["membria_dept_sales"]
    with pytest.raises(CheckFailed, match="lists Milvus collection membria_dept_sales but not its objects"):
        store.restore(bucket, part, target, tmp_path, lambda _: None)


def test_backup_refuses_a_collection_the_core_could_not_recreate(
    bucket: DrBucket, target: ScratchPlace, tmp_path: Path
) -> None:
    client = target.vectors()
    client.create_collection("unrelated", dimension=4)  # outside the prefix: not ours, ignored
    assert store.sums(target) == {}

    client.create_collection("membria_dept_Not_A_Department", dimension=4)
    with pytest.raises(CheckFailed, match="membria_dept_Not_A_Department is not a department collection"):
        store.backup(bucket, target, "backups/b3/vectors/", None, lambda _: None)
    client.drop_collection("membria_dept_Not_A_Department")

    client.create_collection("membria_dept_plain", dimension=4)  # Milvus's quick layout: id, vector
    with pytest.raises(CheckFailed, match="membria_dept_plain has no updated_at field"):
        store.backup(bucket, target, "backups/b3/vectors/", None, lambda _: None)
    client.drop_collection("membria_dept_plain")

    schema = client.create_schema(auto_id=False)
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("updated_at", DataType.INT64)
    schema.add_field("meta", DataType.JSON)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=4)
    index = client.prepare_index_params()
    index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
    client.create_collection("membria_dept_odd", schema=schema, index_params=index)
    client.insert("membria_dept_odd", [{"chunk_id": "a", "updated_at": 1, "meta": {}, "dense": [1.0, 0, 0, 0]}])
    with pytest.raises(CheckFailed, match="membria_dept_odd: field meta of type JSON cannot be backed up"):
        store.backup(bucket, target, "backups/b3/vectors/", None, lambda _: None)


# -- checksums --------------------------------------------------------------------------------------------


def test_sums_differ_when_one_text_or_one_vector_component_differs(
    bucket: DrBucket, source: SitePlace, target: ScratchPlace, tmp_path: Path
) -> None:
    part = backup_and_restore(bucket, source, target, tmp_path)
    original = one_row(target, "membria_dept_field_ops")
    client = target.vectors()

    client.upsert("membria_dept_field_ops", [{**original, "text": original["text"] + " "}])
    changed = store.sums(target)
    assert changed["membria_dept_field_ops"].rows == part.sums["membria_dept_field_ops"].rows
    assert changed["membria_dept_field_ops"].digest != part.sums["membria_dept_field_ops"].digest
    assert {k: v for k, v in changed.items() if k != "membria_dept_field_ops"} == {
        k: v for k, v in part.sums.items() if k != "membria_dept_field_ops"
    }

    dense = np.asarray(original["dense"], dtype=np.float32)
    dense[7] = np.nextafter(dense[7], np.float32(2))  # the smallest change a float32 can make
    client.upsert("membria_dept_field_ops", [{**original, "dense": dense.tolist()}])
    assert store.sums(target)["membria_dept_field_ops"].digest != part.sums["membria_dept_field_ops"].digest

    client.upsert("membria_dept_field_ops", [original])
    assert store.sums(target) == part.sums  # back to the original row: the same digest again


# -- shipping ----------------------------------------------------------------------------------------------


def test_changes_and_apply_follow_upserts_deletes_and_new_or_dropped_departments(
    core: CoreService, bucket: DrBucket, source: SitePlace, target: ScratchPlace, tmp_path: Path
) -> None:
    part = backup_and_restore(bucket, source, target, tmp_path)
    assert store.changes(source, part.watermark, tmp_path) is None  # nothing changed since the backup

    edited = DOCS[("engineering", "valves.md")].replace("closed", "locked closed")
    core.ingest_file("engineering", "valves.md", edited.encode())
    core.delete_document("sales", "pricing")
    core.ingest_file("quality-lab", "samples.md", b"# Samples\n\nEvery batch keeps two retained samples.")
    batch = store.changes(source, part.watermark, tmp_path)
    assert batch is not None and batch.path.is_file() and batch.path.parent == tmp_path
    assert batch.items >= 2 and batch.watermark != part.watermark
    assert store.sums(target) != store.sums(source)
    assert store.apply(batch.path, target) >= batch.items + 1  # rows upserted plus the pricing rows deleted
    assert store.sums(target) == store.sums(source)
    assert "membria_dept_quality_lab" in store.sums(target)
    assert store.changes(source, batch.watermark, tmp_path) is None

    core.store.drop_department("quality-lab")
    second = store.changes(source, batch.watermark, tmp_path)
    assert second is not None and second.items == 0  # only the key lists changed
    store.apply(second.path, target)
    assert store.sums(target) == store.sums(source)
    assert "membria_dept_quality_lab" not in store.sums(target)


def test_an_edit_within_the_watermarks_own_second_is_still_shipped(
    core: CoreService, bucket: DrBucket, source: SitePlace, target: ScratchPlace, tmp_path: Path
) -> None:
    part = backup_and_restore(bucket, source, target, tmp_path)
    row = one_row(source, "membria_dept_field_ops")
    # Same key, same updated_at as the watermark: only the digest of the rows at the watermark tells.
    core.store.client.upsert(
        "membria_dept_field_ops", [{**row, "text": row["text"] + "!", "updated_at": part.watermark["updated_at"]}]
    )
    batch = store.changes(source, part.watermark, tmp_path)
    assert batch is not None and batch.watermark["ids_digest"] == part.watermark["ids_digest"]
    store.apply(batch.path, target)
    assert store.sums(target) == store.sums(source)
    assert store.changes(source, batch.watermark, tmp_path) is None


def test_unreadable_shipments_and_foreign_watermarks_are_refused(
    source: SitePlace, target: ScratchPlace, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all")
    with pytest.raises(CheckFailed, match=r"garbage\.tar is unreadable"):
        store.apply(garbage, target)

    (tmp_path / "evil").write_text("{}")
    escaping = tmp_path / "escaping.tar"
    with tarfile.open(escaping, "w") as tar:
        tar.add(tmp_path / "evil", arcname="../manifest.json")
    with pytest.raises(CheckFailed, match=r"unexpected entry '\.\./manifest\.json'"):
        store.apply(escaping, target)
    assert not (tmp_path.parent / "manifest.json").exists()

    headless = tmp_path / "headless.tar"
    with tarfile.open(headless, "w") as tar:
        tar.add(tmp_path / "evil", arcname="membria_dept_sales.ids.parquet")
    with pytest.raises(CheckFailed, match=r"headless\.tar is unreadable.*manifest\.json"):
        store.apply(headless, target)

    (tmp_path / "manifest.json").write_text(json.dumps({"collections": {"membria_dept_sales": {}}}))
    hollow = tmp_path / "hollow.tar"
    with tarfile.open(hollow, "w") as tar:
        tar.add(tmp_path / "manifest.json", arcname="manifest.json")
        tar.add(tmp_path / "evil", arcname="membria_dept_sales.rows.parquet")
    with pytest.raises(CheckFailed, match=r"hollow\.tar is unreadable.*no membria_dept_sales\.ids\.parquet"):
        store.apply(hollow, target)

    with pytest.raises(BadInput, match="no integer updated_at"):
        store.changes(source, {"seq": 41}, tmp_path)


# -- the lab: a second process reaches the core's Milvus Lite -----------------------------------------------


def test_a_second_process_lists_the_running_cores_collections_through_the_published_uri(
    core: CoreService, site: tuple[Site, Path]
) -> None:
    path = Backends(site[0], LabState.at(site[0].lab.state_dir)).milvus_lite_path()
    published = path.with_name("milvus.db.uri")
    assert published.stat().st_mode & 0o777 == 0o600
    assert published.read_text().startswith("http://127.0.0.1:")

    listed = list_in_subprocess(site[1])
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert set(json.loads(listed.stdout)) >= COLLECTIONS

    # Without the URI the second process cannot open the file the core holds.
    direct = subprocess.run(
        [sys.executable, "-c", f"from pymilvus import MilvusClient; MilvusClient({str(path)!r})"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert direct.returncode != 0 and "Open local milvus failed" in direct.stderr


def test_a_closed_core_removes_its_uri_and_a_stale_one_falls_back_to_the_file(
    core: CoreService, tmp_path: Path
) -> None:
    other_site, other_file = make_site(tmp_path)
    other = start_core(other_site, tmp_path, embedder=core.embedder)
    other.ingest_file("hr", "leave.md", b"# Leave\n\nEveryone has 28 days of paid leave.")
    published = (
        Backends(other_site, LabState.at(other_site.lab.state_dir)).milvus_lite_path().with_name("milvus.db.uri")
    )
    assert published.is_file()
    other.close()
    assert not published.exists()

    published.write_text(f"http://127.0.0.1:{free_port()}\n")  # a core that died without closing
    listed = list_in_subprocess(other_file)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert json.loads(listed.stdout) == ["membria_dept_hr"]
