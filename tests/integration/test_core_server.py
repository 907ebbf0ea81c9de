"""The core server for real: Milvus Lite, the packaged embedding model and llama.cpp on Gemma 3 270M.

One app (one Milvus Lite file, one cache) serves the whole module; the example corpus is loaded once.
Tests that change documents use their own departments or doc ids so the others do not depend on order.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from fastapi.testclient import TestClient

from appliance.lab.model import MODEL_ALIAS
from runtime.common.tls import TlsFiles, client_context
from runtime.core.app import create_app
from runtime.core.corpus import corpus_files
from runtime.core.service import CoreService
from runtime.core.settings import CoreSettings
from tests.conftest import EXAMPLES, REPO, free_port

pytestmark = pytest.mark.integration

MAX_UPLOAD = 64 * 1024
MAX_PAGES = 5


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A minimal, valid PDF with one Helvetica text stream per page (what a real exporter writes)."""
    objects: dict[int, bytes] = {}
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects[1] = b"<< /Type /Catalog /Pages 2 0 R >>"
    kids = " ".join(f"{p} 0 R" for p in page_ids)
    objects[2] = f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode()
    objects[3] = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    for page_id, text in zip(page_ids, pages, strict=True):
        ops = ["BT", "/F1 11 Tf", "14 TL", "72 720 Td"]
        for line in text.split("\n"):
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"({escaped}) Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        objects[page_id] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_id + 1} 0 R >>"
        ).encode()
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    info_id = None
    if title:
        info_id = max(objects) + 1
        objects[info_id] = f"<< /Title ({title}) >>".encode("latin-1")
    out = bytearray(b"%PDF-1.4\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number]
    info = b" /Info %d 0 R" % info_id if info_id else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (size, info, xref)
    return bytes(out)


def upload(
    client: TestClient,
    department: str,
    name: str,
    data: bytes,
    *,
    doc_id: str | None = None,
    title: str | None = None,
    content_type: str = "application/octet-stream",
) -> Any:  # the test client's response (httpx2 under Starlette's TestClient)
    form = {"department": department}
    if doc_id:
        form["doc_id"] = doc_id
    if title:
        form["title"] = title
    return client.post("/internal/documents", data=form, files={"file": (name, data, content_type)})


def search(client: TestClient, query: str, departments: list[str], **extra: Any) -> list[dict[str, Any]]:
    response = client.post("/internal/search", json={"query": query, "departments": departments, **extra})
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def rag(client: TestClient, question: str, departments: list[str], **extra: Any) -> dict[str, Any]:
    body = {"question": question, "departments": departments, "max_tokens": 48, "temperature": 0.0, **extra}
    response = client.post("/internal/rag", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def assert_error(response: Any, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code


# -- fixtures ------------------------------------------------------------------------------------------


def core_settings(directory: Path, llm_endpoint: str, **overrides: Any) -> CoreSettings:
    values: dict[str, Any] = {
        "milvus_uri": str(directory / "milvus.db"),
        "cache_path": directory / "cache.sqlite",
        "llm": {"base_url": llm_endpoint, "model": MODEL_ALIAS, "prompt_style": "completion"},
        "max_upload_bytes": MAX_UPLOAD,
        "max_pdf_pages": MAX_PAGES,
        "require_gateway_peer": False,
        **overrides,
    }
    return CoreSettings.model_validate(values)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, llm_endpoint: str) -> Iterator[TestClient]:
    settings = core_settings(tmp_path_factory.mktemp("core"), llm_endpoint)
    with TestClient(create_app(settings)) as test_client:
        for department, path in corpus_files(EXAMPLES / "corpus"):
            response = upload(test_client, department, path.name, path.read_bytes())
            assert response.status_code == 200, response.text
        yield test_client


def service(client: TestClient) -> CoreService:
    app = client.app
    assert isinstance(app, FastAPI)
    core: CoreService = app.state.service
    return core


# -- health ----------------------------------------------------------------------------------------------


def test_health_and_readiness_check_every_dependency_for_real(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert set(checks) == {"milvus", "embeddings", "llm", "cache"}
    assert all(c["ok"] for c in checks.values())
    assert "384 dims" in checks["embeddings"]["detail"]
    assert "department collection(s)" in checks["milvus"]["detail"]


# -- ingestion ---------------------------------------------------------------------------------------------


def test_corpus_is_listed_per_department(client: TestClient) -> None:
    listed = client.get("/internal/documents", params={"department": "engineering"}).json()
    assert listed["department"] == "engineering"
    docs = {d["doc_id"]: d for d in listed["documents"]}
    assert set(docs) == {"incident-reporting", "pump-p12-maintenance", "safety-procedure-vx-55"}
    vx = docs["safety-procedure-vx-55"]
    assert vx["title"] == "Safety procedure for valve VX-55"
    assert vx["version"] == 1
    assert vx["kind"] == "md"
    assert vx["chunks"] >= 3
    assert docs["incident-reporting"]["title"] == "Incident reporting for engineering"  # a TXT's first line
    sales = client.get("/internal/documents", params={"department": "sales"}).json()["documents"]
    assert {d["doc_id"] for d in sales} == {"commission-plan", "pricing-and-discount-policy", "quote-approval"}
    assert client.get("/internal/documents", params={"department": "legal"}).json()["documents"] == []


def test_txt_markdown_and_pdf_are_ingested_and_searchable(client: TestClient) -> None:
    txt = upload(
        client, "qa", "shift-handover.txt", b"Shift handover\n\nThe handover log is signed by both shift leads."
    )
    md = upload(client, "qa", "kiln.md", b"# Kiln K-7\n\nThe kiln K-7 is preheated for 90 minutes.", doc_id="kiln-k7")
    pdf_bytes = make_pdf(
        ["Forklift charging rules", "Forklifts charge only in bay 3.\nNever charge a forklift overnight unattended."],
        title="Forklift charging",
    )
    pdf = upload(client, "qa", "forklifts.pdf", pdf_bytes, content_type="application/pdf")
    for response in (txt, md, pdf):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["department"] == "qa"
        assert body["version"] == 1
        assert body["previous_version"] is None
        assert body["chunks"] >= 1
        assert body["unchanged_chunks"] == 0
        assert body["changed"] is True
    assert txt.json()["doc_id"] == "shift-handover"
    assert md.json()["doc_id"] == "kiln-k7"
    assert pdf.json()["title"] == "Forklift charging"
    kinds = {d["doc_id"]: d["kind"] for d in client.get("/internal/documents?department=qa").json()["documents"]}
    assert kinds == {"shift-handover": "txt", "kiln-k7": "md", "forklifts": "pdf"}
    top = search(client, "where may forklifts be charged", ["qa"], top_k=1)[0]
    assert top["doc_id"] == "forklifts"
    assert "bay 3" in top["text"]


def test_unsupported_types_are_refused_with_415(client: TestClient) -> None:
    docx = upload(client, "qa", "report.docx", b"PK\x03\x04 word document")
    assert_error(docx, 415, "unsupported_document_type")
    assert "accepted" in docx.json()["error"]["message"]
    assert_error(upload(client, "qa", "program.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00"), 415)
    assert_error(upload(client, "qa", "fake.pdf", b"this is plain text"), 415)
    not_multipart = client.post("/internal/documents", json={"department": "qa"})
    assert_error(not_multipart, 415, "unsupported_media_type")


def test_oversized_uploads_are_refused_with_413(client: TestClient) -> None:
    just_over = upload(client, "qa", "big.txt", b"a" * (MAX_UPLOAD + 1))
    assert_error(just_over, 413, "too_large")
    way_over = upload(client, "qa", "huge.txt", b"b" * (MAX_UPLOAD * 4))  # refused on Content-Length
    assert_error(way_over, 413, "too_large")
    pages = upload(client, "qa", "long.pdf", make_pdf([f"Page {i}" for i in range(MAX_PAGES + 1)]))
    assert_error(pages, 413, "too_large")
    assert "pages" in pages.json()["error"]["message"]
    assert "big" not in {d["doc_id"] for d in client.get("/internal/documents?department=qa").json()["documents"]}


def test_bad_input_gets_a_4xx_json_error_never_a_500(client: TestClient) -> None:
    cases: list[tuple[Any, int]] = [
        (client.post("/internal/documents", files={"file": ("a.txt", b"x")}), 422),
        (upload(client, "Sales!", "a.txt", b"x"), 422),
        (upload(client, "qa", "a.txt", b"x", doc_id="../etc/passwd"), 422),
        (upload(client, "qa", "empty.txt", b"  \n\n  "), 422),
        (upload(client, "qa", "legacy.txt", "Привет".encode("cp1251")), 422),
        (upload(client, "qa", "broken.pdf", b"%PDF-1.4\ngarbage"), 422),
        (client.post("/internal/search", json={"query": "x", "departments": []}), 403),
        (client.post("/internal/rag", json={"question": "x", "departments": []}), 403),
        (client.post("/internal/search", json={"query": "   ", "departments": ["qa"]}), 422),
        (client.post("/internal/search", json={"query": "x", "departments": ["qa"], "top_k": 0}), 422),
        (client.post("/internal/search", json={"query": "x", "departments": ["QA DROP"]}), 422),
        (client.post("/internal/search", json={"query": "x", "departments": ["qa"], "extra": 1}), 422),
        (client.post("/internal/search", content=b"{not json", headers={"content-type": "application/json"}), 422),
        (client.post("/internal/rag", json={"question": "x", "departments": ["qa"], "max_tokens": 10**6}), 422),
        (client.post("/internal/rag", json={"question": "x", "departments": ["qa"], "temperature": -1}), 422),
        (client.post("/internal/search", json={"query": "x" * 5000, "departments": ["qa"]}), 413),
        (client.get("/internal/documents"), 422),
        (client.get("/internal/documents", params={"department": "Bad Dept"}), 422),
        (client.delete("/internal/documents/qa/no-such-doc"), 404),
        (client.delete("/internal/documents/qa/bad%22id"), 404),
        (client.delete("/internal/documents/Bad_Dept/x"), 422),
        (client.post("/internal/embeddings", json={"input": []}), 422),
        (client.post("/internal/embeddings", json={"input": [""]}), 422),
        (client.post("/internal/embeddings", json={"input": 42}), 422),
        (client.get("/internal/nothing-here"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert response.json()["error"]["message"]


def test_reupload_keeps_ids_of_unchanged_chunks_and_increments_the_version(client: TestClient) -> None:
    sections = [f"## Step {i}\n\nStep {i}: inspect flange F-{i} and record the torque in the log." for i in range(6)]
    first = "# Press line manual\n\n" + "\n\n".join(sections)
    v1 = upload(client, "manuals", "press-line.md", first.encode()).json()
    assert (v1["version"], v1["chunks"], v1["unchanged_chunks"]) == (1, 6, 0)
    ids_v1 = service(client).store.document_chunk_ids("manuals", "press-line")
    assert len(ids_v1) == 6

    edited = list(sections)
    edited[3] = "## Step 3\n\nStep 3: inspect flange F-3, replace its gasket and record the torque in the log."
    v2 = upload(client, "manuals", "press-line.md", ("# Press line manual\n\n" + "\n\n".join(edited)).encode()).json()
    assert (v2["version"], v2["previous_version"], v2["chunks"]) == (2, 1, 6)
    assert (v2["unchanged_chunks"], v2["removed_chunks"], v2["changed"]) == (5, 1, True)
    ids_v2 = service(client).store.document_chunk_ids("manuals", "press-line")
    assert len(set(ids_v1) & set(ids_v2)) == 5
    assert set(ids_v2.values()) == {2}  # every stored chunk carries the new version

    # Re-wrapping lines is not a change; the version stays.
    rewrapped = ("# Press line manual\n\n" + "\n\n".join(edited)).replace(" record the", "\nrecord   the")
    same = upload(client, "manuals", "press-line.md", rewrapped.encode()).json()
    assert (same["version"], same["changed"], same["unchanged_chunks"]) == (2, False, 6)
    assert service(client).store.document_chunk_ids("manuals", "press-line") == ids_v2
    hits = search(client, "replace the gasket of flange F-3", ["manuals"], top_k=1)
    assert hits[0]["version"] == 2
    assert "gasket" in hits[0]["text"]


def test_delete_removes_a_document_and_its_chunks(client: TestClient) -> None:
    upload(client, "scratch", "temp-note.txt", b"Temporary note about the ZQ-4411 calibration rig.")
    assert search(client, "ZQ-4411", ["scratch"])
    deleted = client.delete("/internal/documents/scratch/temp-note")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted_chunks"] == 1
    assert search(client, "ZQ-4411", ["scratch"]) == []
    assert client.get("/internal/documents?department=scratch").json()["documents"] == []
    assert_error(client.delete("/internal/documents/scratch/temp-note"), 404, "not_found")


# -- retrieval ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hybrid", "dense", "lexical"])
def test_a_search_scoped_to_sales_never_returns_engineering_chunks(client: TestClient, mode: str) -> None:
    phrase = "Safety procedure for valve VX-55"
    engineering = search(client, phrase, ["engineering"], top_k=3, mode=mode)
    assert engineering[0]["doc_id"] == "safety-procedure-vx-55"
    for departments in (["sales"], ["sales", "hr"]):
        hits = search(client, phrase, departments, top_k=20, mode=mode)
        assert all(h["department"] in departments for h in hits)
        assert not any("VX-55" in h["text"] for h in hits)
        engineering_docs = {"safety-procedure-vx-55", "incident-reporting", "pump-p12-maintenance"}
        assert not engineering_docs & {h["doc_id"] for h in hits}
    assert search(client, phrase, ["legal"], mode=mode) == []  # a department without documents


def test_multi_department_search_ranks_across_departments(client: TestClient) -> None:
    hits = search(client, "how many days of paid vacation do employees get", ["hr", "sales", "engineering"], top_k=3)
    assert hits[0]["doc_id"] == "vacation-policy"
    assert hits[0]["department"] == "hr"
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_hybrid_search_finds_an_exact_identifier_that_dense_search_ranks_lower(client: TestClient) -> None:
    documents = {
        "gauges.md": "# Pressure gauges\n\nGauge PG-55 on the steam header reads 0 to 25 bar. "
        "Gauge PG-56 is its spare. Calibrate both yearly.",
        "drains.md": "# Drain valves\n\nDrain valve DV-55 empties the condensate line. "
        "Drain valve DV-56 serves the feed tank. Open them slowly.",
        "bypass.md": "# Bypass valves\n\nThe bypass valve VX-56 and the bypass valve VX-54 must be closed "
        "and tagged before work on the header.",
        "valves-overview.md": "# Valves overview\n\nValves VX-5, VX-50 and VX-550 are ball valves on the "
        "cooling water loop; they need no lock-out.",
        "spares.md": "# Spare parts order 2024-117\n\nThe annual order includes gaskets for the header flange, "
        "two packing sets for VX-55, one actuator seal kit, bearing grease and a replacement handwheel for "
        "the feed tank inlet. Delivery is expected in week 12; the storeroom keeps them on shelf C4.",
    }
    for name, text in documents.items():
        assert upload(client, "plant", name, text.encode()).status_code == 200

    def rank(mode: str) -> int:
        hits = search(client, "VX-55", ["plant"], top_k=5, mode=mode)
        return [h["doc_id"] for h in hits].index("spares")

    dense, lexical, hybrid = rank("dense"), rank("lexical"), rank("hybrid")
    assert lexical == 0, "BM25 on the fused identifier puts the exact match first"
    assert hybrid < dense, f"hybrid rank {hybrid} should beat dense rank {dense}"


# -- RAG and the response cache ------------------------------------------------------------------------


def test_rag_answers_with_sources_from_the_callers_department(client: TestClient) -> None:
    answer = rag(client, "How many calendar days of paid vacation does a full-time employee get?", ["hr"])
    assert answer["answer"].strip()
    assert answer["model"] == MODEL_ALIAS
    assert answer["cached"] is False
    assert answer["sources"]
    assert {s["department"] for s in answer["sources"]} == {"hr"}
    assert answer["sources"][0]["doc_id"] == "vacation-policy"
    assert answer["usage"]["prompt_tokens"] > 0


def test_rag_cache_hits_a_reworded_question_and_is_invalidated_by_a_reupload(client: TestClient) -> None:
    core = service(client)
    question = "Who approves a discount between 10% and 20%?"
    first = rag(client, question, ["sales"])
    assert first["cached"] is False
    assert any(s["doc_id"] == "pricing-and-discount-policy" for s in first["sources"])

    again = rag(client, "  who APPROVES a discount   between 10% and 20%?\n", ["sales"])
    assert again["cached"] is True
    assert again["answer"] == first["answer"]
    assert again["usage"]["completion_tokens"] == 0
    assert [s["chunk_id"] for s in again["sources"]] == [s["chunk_id"] for s in first["sources"]]

    entries = core.cache.count()
    pricing = (EXAMPLES / "corpus" / "sales" / "pricing-and-discount-policy.md").read_text()
    changed = pricing.replace("Three-year subscriptions paid upfront get an additional 7%.", "Upfront: +8%.")
    reupload = upload(client, "sales", "pricing-and-discount-policy.md", changed.encode()).json()
    assert (reupload["version"], reupload["changed"]) == (2, True)
    assert core.cache.count() < entries  # the answers built on the old version are gone

    after = rag(client, question, ["sales"])
    assert after["cached"] is False
    assert {s["version"] for s in after["sources"] if s["doc_id"] == "pricing-and-discount-policy"} == {2}
    assert rag(client, question, ["sales"])["cached"] is True


def test_rag_streams_server_sent_events_and_caches_the_result(client: TestClient) -> None:
    body = {"question": "When is sales commission paid?", "departments": ["sales"], "max_tokens": 32}
    body |= {"temperature": 0.0, "stream": True}

    def events() -> list[Any]:
        with client.stream("POST", "/internal/rag", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    first = events()
    assert first[0]["type"] == "sources"
    assert first[0]["cached"] is False
    assert {s["department"] for s in first[0]["sources"]} == {"sales"}
    deltas = [e["delta"] for e in first if e["type"] == "delta"]
    done = first[-1]
    assert done["type"] == "done"
    assert done["answer"] == "".join(deltas).strip()
    assert done["answer"]

    second = events()
    assert second[0]["cached"] is True
    assert second[-1]["answer"] == done["answer"]


def test_llm_failure_is_a_503_not_a_500(tmp_path: Path, client: TestClient) -> None:
    settings = core_settings(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    core = CoreService(settings, embedder=service(client).embedder)
    with TestClient(create_app(settings, service=core)) as offline:
        assert upload(offline, "hr", "a.txt", b"Vacation is 28 days.").status_code == 200
        response = offline.post("/internal/rag", json={"question": "vacation?", "departments": ["hr"]})
        assert_error(response, 503, "unavailable")
        streamed = offline.post("/internal/rag", json={"question": "vacation?", "departments": ["hr"], "stream": True})
        assert_error(streamed, 503, "unavailable")
        assert offline.get("/readyz").status_code == 503
    core.close()


# -- embeddings --------------------------------------------------------------------------------------------


def test_embeddings_endpoint_returns_normalised_384_dim_vectors(client: TestClient) -> None:
    single = client.post("/internal/embeddings", json={"input": "valve safety"}).json()
    assert single["object"] == "list"
    assert len(single["data"]) == 1
    vector = single["data"][0]["embedding"]
    assert len(vector) == 384
    assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-4)
    assert single["usage"]["prompt_tokens"] > 0

    many = client.post("/internal/embeddings", json={"input": ["valve safety", "vacation days", "valve safety"]})
    data = many.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert data[0]["embedding"] == data[2]["embedding"]
    assert data[0]["embedding"] != data[1]["embedding"]
    assert many.json()["model"] == "all-MiniLM-L6-v2"


# -- who may call ------------------------------------------------------------------------------------------


def test_peer_check_refuses_requests_without_a_gateway_certificate(tmp_path: Path, client: TestClient) -> None:
    settings = core_settings(tmp_path, "http://127.0.0.1:9/v1", require_gateway_peer=True)
    core = CoreService(settings, embedder=service(client).embedder)
    with TestClient(create_app(settings, service=core)) as guarded:
        refused = guarded.get("/internal/documents", params={"department": "sales"})
        assert_error(refused, 403, "forbidden")
        assert "gateway" in refused.json()["error"]["message"]
        assert_error(guarded.post("/internal/search", json={"query": "x", "departments": ["sales"]}), 403)
        assert_error(upload(guarded, "sales", "a.txt", b"x"), 403)
        assert guarded.get("/healthz").status_code == 200
    core.close()


class _Pki:
    """A throwaway site CA issuing certificates shaped like the site PKI's (O = kind, OU = department)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test site CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, cn: str, org: str, ou: str | None = None, server: bool = False) -> TlsFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
        if ou:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            import ipaddress

            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return TlsFiles(cert=cert_file, key=key_file, ca=self.ca_file)


def test_the_server_runs_under_mtls_and_answers_only_the_gateway(tmp_path: Path, llm_endpoint: str) -> None:
    """`python -m runtime.core --config core.json`: TLS 1.3 with client certificates; the gateway's service
    certificate gets in, a user's certificate is refused, no certificate fails the handshake; SIGTERM
    stops it cleanly."""
    pki = _Pki(tmp_path)
    pki.issue("core", "core.lab.membria.internal", "membria-service", server=True)  # core.pem, core.key
    gateway = pki.issue("gateway", "gateway.lab.membria.internal", "membria-service")
    other_service = pki.issue("edge-sync", "sync.lab.membria.internal", "membria-service")
    user = pki.issue("alice", "alice", "membria-user", ou="sales")
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "tls": {"cert": "core.pem", "key": "core.key", "ca": "ca.pem"},  # relative to the config file
        "milvus_uri": "milvus.db",
        "cache_path": "cache.sqlite",
        "llm": {"base_url": llm_endpoint, "model": MODEL_ALIAS},
        "gateway_subject_prefix": "gateway.",
        "log_level": "warning",
    }
    (tmp_path / "core.json").write_text(json.dumps(config))
    log = (tmp_path / "core.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.core", "--config", str(tmp_path / "core.json")],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    url = f"https://127.0.0.1:{port}"
    try:

        def get(tls: TlsFiles, path: str) -> httpx.Response:
            with httpx.Client(verify=client_context(tls), timeout=10) as http:
                return http.get(url + path)

        deadline = time.monotonic() + 60
        while True:
            try:
                if get(gateway, "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "core.log").read_text()
            assert time.monotonic() < deadline, "the core server did not come up"
            time.sleep(0.3)

        listed = get(gateway, "/internal/documents?department=sales")
        assert listed.status_code == 200, listed.text
        assert listed.json() == {"department": "sales", "documents": []}
        assert get(user, "/internal/documents?department=sales").status_code == 403
        assert get(other_service, "/internal/documents?department=sales").status_code == 403
        assert get(user, "/healthz").status_code == 200  # liveness is open to any site certificate

        import ssl

        anonymous = ssl.create_default_context(cafile=str(pki.ca_file))
        with pytest.raises(httpx.HTTPError), httpx.Client(verify=anonymous, timeout=10) as http:
            http.get(url + "/healthz")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "core.log").read_text()


def test_bad_config_exits_2_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "core.json").write_text(json.dumps({"milvus_uri": "m.db", "llm": {"base_url": "x"}}))
    result = subprocess.run(
        [sys.executable, "-m", "runtime.core", "--config", str(tmp_path / "core.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cache_path" in result.stderr
    assert "llm.model" in result.stderr
    assert "Traceback" not in result.stderr
