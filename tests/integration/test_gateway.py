"""The gateway for real: one lab (OpenBao PKI, llama.cpp, the core server, the gateway over mTLS), real
certificates from the site PKI, real HTTP. Covers TLS, RBAC, licensing, audit, rate limiting, the API
surface, bad input and a schemathesis run against the live OpenAPI spec.

A second gateway process (`aux`) runs next to the lab's: its own port, state directory, chDB audit path
and a 2-seat license, pointed at the same core server. It serves the seat-limit test, the service-token
scoping test (its policy also binds the `employee` role to service accounts, which examples/rbac.yaml does
not) and schemathesis (its rate limit is high so the fuzzer reaches the handlers instead of 429s; the
lab's gateway keeps 5/s, burst 20 for the rate-limit test).

chDB admits one process at a time and the gateway takes it for each audit batch: the pytest process
never opens it; queries run in a subprocess that retries on AuditDbBusy (and on losing the race for the
engine's lock between that check and the open).

One test kills the lab's model server mid-answer and starts it again; it runs after the other model users
except the audit test, which needs it back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from ruamel.yaml import YAML

from appliance.lab import bootstrap, process
from appliance.lab.runtime_services import AUDIT_KEY_ENV, admin_tls
from appliance.lab.services import LlamaServer
from appliance.license import sign_license
from runtime.common import service_tokens
from runtime.common.audit import pseudonymize
from runtime.common.license import License
from runtime.common.tls import TlsFiles, client_context
from runtime.core.settings import CoreSettings
from tests.conftest import EXAMPLES, REPO, free_port
from tests.integration.conftest import GatewayLab, audit_rows_until, gateway_env

pytestmark = pytest.mark.integration

SERVER_ERRORS = range(500, 600)


# --- the lab ---------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Documents uploaded once for the module: an engineering-only secret and one document per department."""

    secret: str  # appears only in the engineering document
    phrase: str  # what to ask about to reach it
    doc_ids: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def corpus(lab: GatewayLab) -> Corpus:
    """One document per department, each uploaded by that department's editor through the gateway."""
    secret = f"ZX-{secrets.token_hex(4).upper()}"
    corpus = Corpus(secret=secret, phrase="zorblax calibration code")
    docs = {
        ("alice", "engineering"): (
            "zorblax.md",
            f"# Zorblax calibration\n\nThe zorblax calibration code for the VX-55 valve is {secret}. "
            "Engineers enter it before every pressure test.\n",
            "text/markdown",
        ),
        ("bob", "sales"): (
            "discounts.txt",
            "Sales discount policy\n\nDiscounts above 15 percent need approval by the regional sales lead. "
            "Quotes are valid for 30 days.\n",
            "text/plain",
        ),
        ("carol", "hr"): (
            "leave.md",
            "# Parental leave\n\nEmployees get 16 weeks of paid parental leave. Tell HR four weeks ahead.\n",
            "text/markdown",
        ),
    }
    for (who, department), (name, text, ctype) in docs.items():
        doc_id = f"gw-{department}-{secrets.token_hex(3)}"
        with lab.client(who) as client:
            response = client.post(
                "/v1/knowledge/documents",
                files={"file": (name, text.encode(), ctype)},
                data={"department": department, "doc_id": doc_id},
            )
        assert response.status_code == 201, response.text
        corpus.doc_ids[department] = doc_id
    return corpus


# --- helpers ----------------------------------------------------------------------------------------------


def raw_request(port: int, context: ssl.SSLContext, path: str = "/v1/knowledge/documents?department=sales") -> bytes:
    """One HTTP/1.1 request on a fresh TLS connection; returns whatever the server sent before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def refused(port: int, context: ssl.SSLContext) -> str:
    """Assert the server drops the connection without an HTTP answer (a failed client-certificate check in
    TLS 1.3 surfaces after the client's side of the handshake: as an alert, a reset or a bare EOF)."""
    try:
        answer = raw_request(port, context)
    except (ssl.SSLError, ConnectionError) as exc:
        return f"{type(exc).__name__}: {exc}"
    assert not answer.startswith(b"HTTP/"), answer[:200]
    assert answer == b""
    return "EOF"


def no_server_error(response: httpx.Response) -> httpx.Response:
    assert response.status_code not in SERVER_ERRORS, f"{response.status_code}: {response.text[:500]}"
    return response


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def chat_body(model: str, question: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, **extra}


def read_sse(response: httpx.Response) -> tuple[list[dict[str, Any]], list[str]]:
    datas = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    events = [json.loads(d) for d in datas if d != "[DONE]"]
    return events, datas


def make_pdf(text: str) -> bytes:
    """A minimal one-page PDF with a text layer (Helvetica), offsets computed so readers need no repair."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


def foreign_ca_identity(directory: Path) -> TlsFiles:
    """A self-signed CA of our own and a client certificate from it that looks like a site user."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Membria Root CA (not this site)")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "membria-user"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "engineering"),
        ]
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "foreign.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (directory / "foreign.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TlsFiles(cert=directory / "foreign.crt", key=directory / "foreign.key", ca=directory / "foreign-ca.pem")


# --- TLS ----------------------------------------------------------------------------------------------------


def test_tls13_is_negotiated_and_a_tls12_only_client_is_refused(lab: GatewayLab) -> None:
    context = client_context(lab.who("alice"))
    with socket.create_connection(("127.0.0.1", lab.port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.3"
            cipher = tls.cipher()
            assert cipher is not None and cipher[1] == "TLSv1.3"

    # The same valid certificate, but a client that stops at TLS 1.2.
    old = ssl.create_default_context(cafile=str(lab.ca))
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    alice = lab.who("alice")
    old.load_cert_chain(alice.cert, alice.key)
    with socket.create_connection(("127.0.0.1", lab.port), timeout=10) as sock:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            old.wrap_socket(sock, server_hostname="127.0.0.1")


def test_no_certificate_and_no_token_is_401(lab: GatewayLab) -> None:
    with lab.client(None) as client:
        for method, path, body in (
            ("GET", "/v1/knowledge/documents?department=engineering", None),
            ("POST", "/v1/knowledge/search", {"query": "valve"}),
            ("POST", "/v1/chat/completions", chat_body(lab.model, "hello")),
            ("POST", "/v1/embeddings", {"model": lab.model, "input": "hello"}),
        ):
            response = client.request(method, path, json=body)
            assert response.status_code == 401, (path, response.text)
            assert error_code(response) == "unauthenticated"
        # A bearer header that is not a token is no better.
        response = client.post("/v1/knowledge/search", json={"query": "x"}, headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401


def test_a_certificate_from_another_ca_is_refused_at_the_handshake(lab: GatewayLab, tmp_path: Path) -> None:
    foreign = foreign_ca_identity(tmp_path)
    # The client trusts the site CA (so the gateway's own certificate verifies) but presents the foreign leaf.
    context = client_context(TlsFiles(cert=foreign.cert, key=foreign.key, ca=lab.ca))
    refused(lab.port, context)
    # Control: the same raw request with a site certificate gets an HTTP answer.
    assert raw_request(lab.port, client_context(lab.who("bob"))).startswith(b"HTTP/1.1 200")


def test_an_expired_certificate_is_refused(lab: GatewayLab) -> None:
    cert = lab.issue("admin", "hank", "sales", ttl="3s")
    files = lab.files(cert, "hank-short")
    # Valid now ...
    assert raw_request(lab.port, client_context(files)).startswith(b"HTTP/1.1 200")
    leaf = x509.load_pem_x509_certificate(cert.certificate.encode())
    time.sleep(max(0.0, (leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()) + 1.5)
    # ... refused once its notAfter has passed, before any HTTP is exchanged.
    refused(lab.port, client_context(files))


def test_a_revoked_certificate_is_refused_without_a_restart(lab: GatewayLab) -> None:
    cert = lab.issue("admin", "ivan", "sales")
    files = lab.files(cert, "ivan-revoked")
    keep = lab.files(lab.issue("admin", "judy", "sales"), "judy")
    with lab.client(files) as client:
        assert client.get("/v1/knowledge/documents", params={"department": "sales"}).status_code == 200
    gateway_pid = json.loads((lab.state.run_dir / "gateway.json").read_text()).get("pid")

    lab.pki.revoke(cert.serial_number)
    bootstrap.write_crl(lab.state, lab.pki)

    with lab.client(files) as client:
        response = client.get("/v1/knowledge/documents", params={"department": "sales"})
    assert response.status_code == 401, response.text
    assert error_code(response) == "certificate_revoked"
    with lab.client(keep) as client:  # only that certificate
        assert client.get("/v1/knowledge/documents", params={"department": "sales"}).status_code == 200
    assert json.loads((lab.state.run_dir / "gateway.json").read_text()).get("pid") == gateway_pid


# --- RBAC ----------------------------------------------------------------------------------------------------

UPLOAD = {"file": ("note.txt", b"A short note for the knowledge base.\n", "text/plain")}

# (caller, method, path, request kwargs, status): each must be refused through the real HTTP API.
DENIED: list[tuple[str, str, str, dict[str, Any], int]] = [
    ("bob", "POST", "/v1/knowledge/search", {"json": {"query": "valve", "departments": ["engineering"]}}, 403),
    ("bob", "GET", "/v1/knowledge/documents", {"params": {"department": "engineering"}}, 403),
    ("alice", "GET", "/v1/knowledge/documents", {"params": {"department": "hr"}}, 403),
    ("alice", "POST", "/v1/knowledge/search", {"json": {"query": "leave", "departments": ["engineering", "hr"]}}, 403),
    ("sales-laptop", "POST", "/v1/knowledge/search", {"json": {"query": "valve", "departments": ["engineering"]}}, 403),
    ("sales-laptop", "POST", "/v1/knowledge/documents", {"files": UPLOAD, "data": {"department": "sales"}}, 403),
    ("erin", "POST", "/v1/knowledge/documents", {"files": UPLOAD, "data": {"department": "engineering"}}, 403),
    ("bob", "POST", "/v1/knowledge/documents", {"files": UPLOAD, "data": {"department": "engineering"}}, 403),
    ("dana", "POST", "/v1/chat/completions", {"json": chat_body("MODEL", "what is our leave policy?")}, 403),
    ("dana", "POST", "/v1/knowledge/search", {"json": {"query": "leave"}}, 403),
    ("alice", "POST", "/v1/knowledge/search", {"json": {"query": "valve", "departments": ["*"]}}, 403),
    ("alice", "GET", "/v1/knowledge/documents", {"params": {"department": "*"}}, 403),
    ("gus", "POST", "/v1/knowledge/search", {"json": {"query": "valve"}}, 403),
    ("gus", "POST", "/v1/chat/completions", {"json": chat_body("MODEL", "hello")}, 403),
    ("gus", "GET", "/v1/knowledge/documents", {"params": {"department": "engineering"}}, 403),
    ("alice", "POST", "/v1/knowledge/search", {"json": {"query": "valve", "departments": ["finance"]}}, 403),
    ("alice", "POST", "/v1/knowledge/documents", {"files": UPLOAD, "data": {"department": "finance"}}, 403),
    ("alice", "POST", "/v1/embeddings", {"json": {"model": "MODEL", "input": "hello"}}, 403),
    ("device-named-ops-admin", "POST", "/v1/embeddings", {"json": {"model": "MODEL", "input": "hello"}}, 403),
    ("device-named-ops-admin", "GET", "/v1/knowledge/documents", {"params": {"department": "hr"}}, 403),
]


@pytest.mark.parametrize(
    ("caller", "method", "path", "kwargs", "status"),
    DENIED,
    ids=[f"{c}-{m}-{p.rsplit('/', 1)[-1]}-{i}" for i, (c, m, p, _, _) in enumerate(DENIED)],
)
def test_rbac_denies(
    lab: GatewayLab, corpus: Corpus, caller: str, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    if "json" in kwargs and kwargs["json"].get("model") == "MODEL":
        kwargs = {**kwargs, "json": {**kwargs["json"], "model": lab.model}}
    with lab.client(caller) as client:
        response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert error_code(response) == "forbidden"
    assert corpus.secret not in response.text


def test_rbac_allows_within_scope(lab: GatewayLab, corpus: Corpus) -> None:
    with lab.client("alice") as client:
        for body in ({"query": corpus.phrase, "departments": ["engineering"]}, {"query": corpus.phrase}):
            response = client.post("/v1/knowledge/search", json=body)
            assert response.status_code == 200, response.text
            hits = response.json()["results"]
            assert any(corpus.secret in h["text"] for h in hits)
            assert {h["department"] for h in hits} == {"engineering"}
        listed = client.get("/v1/knowledge/documents", params={"department": "engineering"})
        assert listed.status_code == 200
        assert corpus.doc_ids["engineering"] in {d["doc_id"] for d in listed.json()["documents"]}
    with lab.client("eng-laptop") as client:  # a device of the department reads it too
        response = client.post("/v1/knowledge/search", json={"query": corpus.phrase, "departments": ["engineering"]})
        assert response.status_code == 200 and corpus.secret in response.text
    with lab.client("ops-admin") as client:  # the admin role reaches every department
        response = client.post(
            "/v1/knowledge/search", json={"query": "policy", "departments": ["engineering", "sales", "hr"]}
        )
        assert response.status_code == 200, response.text


def test_search_outside_the_department_never_returns_its_content(lab: GatewayLab, corpus: Corpus) -> None:
    for who in ("bob", "sales-laptop"):
        with lab.client(who) as client:
            response = client.post("/v1/knowledge/search", json={"query": f"{corpus.phrase} {corpus.secret}"})
        assert response.status_code == 200, response.text
        assert {h["department"] for h in response.json()["results"]} <= {"sales"}
        assert corpus.secret not in response.text


def test_chat_for_another_department_never_contains_engineering_content(lab: GatewayLab, corpus: Corpus) -> None:
    question = f"What is the {corpus.phrase} for the VX-55 valve?"
    # alice asks first, so an answer about the secret may sit in the core's response cache.
    with lab.client("alice") as client:
        answer = client.post("/v1/chat/completions", json=chat_body(lab.model, question, max_tokens=32))
    assert answer.status_code == 200, answer.text
    assert any(s["department"] == "engineering" for s in answer.json()["membria"]["sources"])

    with lab.client("bob") as client:
        response = client.post("/v1/chat/completions", json=chat_body(lab.model, question, max_tokens=32))
        assert response.status_code == 200, response.text
        body = response.json()
        assert corpus.secret not in response.text
        assert {s["department"] for s in body["membria"]["sources"]} <= {"sales"}
        with client.stream(
            "POST", "/v1/chat/completions", json=chat_body(lab.model, question, max_tokens=32, stream=True)
        ) as streamed:
            assert streamed.status_code == 200
            events, datas = read_sse(streamed)
    assert datas[-1] == "[DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert corpus.secret not in "".join(datas)


def test_service_tokens_follow_the_policy(lab: GatewayLab, corpus: Corpus) -> None:
    """examples/rbac.yaml binds no role to a service account but the gateway and core: deny by default."""
    headers = {"Authorization": f"Bearer {lab.token('report-bot', ['sales'])}"}
    with lab.client(None, headers=headers) as client:
        chat = client.post("/v1/chat/completions", json=chat_body(lab.model, f"What is the {corpus.phrase}?"))
        assert chat.status_code == 403, chat.text
        search = client.post("/v1/knowledge/search", json={"query": corpus.phrase, "departments": ["engineering"]})
        assert search.status_code == 403, search.text
        assert corpus.secret not in chat.text + search.text

    key = bootstrap.ed25519_from_vault(lab.backends, bootstrap.SERVICE_TOKEN_KEY_PATH)
    now = int(time.time())
    claims = {"sub": "report-bot", "kind": "service", "departments": ["sales"], "aud": service_tokens.AUDIENCE}
    bad_tokens = {
        "expired": jwt.encode({**claims, "iat": now - 600, "exp": now - 300}, key, algorithm="EdDSA"),
        "other key": service_tokens.issue(
            bootstrap.ed25519_from_vault(lab.backends, bootstrap.LAB_LICENSE_KEY_PATH), "report-bot", ["sales"]
        ),
        "not a service": jwt.encode({**claims, "kind": "user", "iat": now, "exp": now + 60}, key, algorithm="EdDSA"),
        "wrong audience": jwt.encode({**claims, "aud": "x", "iat": now, "exp": now + 60}, key, algorithm="EdDSA"),
        "too long": jwt.encode({**claims, "iat": now, "exp": now + 86400}, key, algorithm="EdDSA"),
    }
    with lab.client(None) as client:
        for why, token in bad_tokens.items():
            response = client.post(
                "/v1/knowledge/search", json={"query": "x"}, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 401, (why, response.text)


# --- rate limiting ------------------------------------------------------------------------------------------


def test_a_burst_over_the_limit_gets_429_with_retry_after(lab: GatewayLab) -> None:
    assert lab.config.get("rate_limit") is None  # the lab runs the defaults: 5/s, burst 20
    rita = lab.files(lab.issue("admin", "rita", "sales"), "rita")
    statuses: list[int] = []
    limited: list[httpx.Response] = []
    # Until the bucket runs dry: 20 at once, then faster than the 5/s refill. A fixed count of 30 was not enough on
    # a loaded machine, where requests slower than 67 ms each let the refill keep up.
    with lab.client(rita) as client:
        while not limited and len(statuses) < 400:
            response = client.get("/v1/knowledge/documents", params={"department": "sales"})
            statuses.append(response.status_code)
            if response.status_code == 429:
                limited.append(response)
    assert statuses[:20] == [200] * 20, statuses
    assert limited, statuses
    for response in limited:
        retry_after = response.headers["Retry-After"]
        assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
        assert error_code(response) == "rate_limited"
    # Buckets are per identity: someone else is not throttled meanwhile ...
    with lab.client("carol") as client:
        assert client.get("/v1/knowledge/documents", params={"department": "hr"}).status_code == 200
    # ... and an obedient client gets through after waiting.
    time.sleep(int(limited[-1].headers["Retry-After"]))
    with lab.client(rita) as client:
        assert client.get("/v1/knowledge/documents", params={"department": "sales"}).status_code == 200


# --- the API ----------------------------------------------------------------------------------------------------


def test_chat_completions_non_streaming_and_streaming(lab: GatewayLab, corpus: Corpus) -> None:
    question = f"What is the {corpus.phrase}?"
    with lab.client("alice") as client:
        response = client.post("/v1/chat/completions", json=chat_body(lab.model, question, max_tokens=24))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["model"] == lab.model
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
        assert response.headers.get("x-request-id")

        with client.stream(
            "POST", "/v1/chat/completions", json=chat_body(lab.model, question, max_tokens=24, stream=True)
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            events, datas = read_sse(streamed)
    assert datas[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"].get("role") == "assistant"
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == lab.model for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert content.strip(), events


def test_a_refused_stream_is_an_http_error_not_a_broken_200(lab: GatewayLab) -> None:
    """The gateway accepts max_tokens up to 4096, the core server only up to its own limit: the refusal must
    reach a streaming client as the same HTTP error a non-streaming one gets."""
    core_config = json.loads((lab.state.root / "config" / "core.json").read_text())
    limit = int(core_config.get("max_answer_tokens", CoreSettings.model_fields["max_answer_tokens"].default))
    assert limit < 4096
    body = chat_body(lab.model, "Describe the pump P-7.", max_tokens=limit + 1)
    with lab.client("alice") as client:
        plain = client.post("/v1/chat/completions", json=body)
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            streamed.read()
    assert plain.status_code == 422, plain.text
    assert streamed.status_code == plain.status_code, streamed.text
    assert streamed.headers["content-type"].startswith("application/json")
    assert error_code(streamed) == error_code(plain)


def test_embeddings_have_384_dimensions(lab: GatewayLab) -> None:
    with lab.client("ops-admin") as client:
        one = client.post("/v1/embeddings", json={"model": lab.model, "input": "pressure test of the valve"})
        assert one.status_code == 200, one.text
        assert len(one.json()["data"]) == 1
        assert len(one.json()["data"][0]["embedding"]) == 384
        two = client.post("/v1/embeddings", json={"model": lab.model, "input": ["first text", "second text"]})
        assert two.status_code == 200, two.text
        vectors = [d["embedding"] for d in two.json()["data"]]
        assert [len(v) for v in vectors] == [384, 384] and vectors[0] != vectors[1]


def test_upload_txt_md_pdf_then_list_and_search(lab: GatewayLab) -> None:
    tag = secrets.token_hex(3)
    uploads = {
        f"txt-{tag}": ("torque.txt", b"The flange bolts of pump P-7 are torqued to 45 newton metres.\n", "text/plain"),
        f"md-{tag}": (
            "seals.md",
            b"# Seals\n\nReplace the O-ring seals of pump P-7 every 2000 hours.\n",
            "text/markdown",
        ),
        f"pdf-{tag}": (
            "impeller.pdf",
            make_pdf("The quixotic impeller of pump P-7 turns at 2950 rpm."),
            "application/pdf",
        ),
    }
    with lab.client("alice") as client:
        for doc_id, (name, content, ctype) in uploads.items():
            response = client.post(
                "/v1/knowledge/documents",
                files={"file": (name, content, ctype)},
                data={"department": "engineering", "doc_id": doc_id},
            )
            assert response.status_code == 201, (name, response.text)
            assert response.json()["doc_id"] == doc_id and response.json()["chunks"] >= 1
        listed = client.get("/v1/knowledge/documents", params={"department": "engineering"})
        assert listed.status_code == 200
        assert set(uploads) <= {d["doc_id"] for d in listed.json()["documents"]}
        found = client.post(
            "/v1/knowledge/search", json={"query": "quixotic impeller rpm", "departments": ["engineering"]}
        )
        assert found.status_code == 200
        assert found.json()["results"][0]["doc_id"] == f"pdf-{tag}"
        assert "2950" in found.json()["results"][0]["text"]


def test_ops_routes_and_openapi(lab: GatewayLab) -> None:
    with lab.client("ops-admin") as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["core"] is True
        assert ready.json()["license_days_left"] > 300
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "membria_gateway_requests_total" in metrics.text
        spec = client.get("/openapi.json")
        assert spec.status_code == 200
        paths = spec.json()["paths"]
        for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/knowledge/documents", "/v1/knowledge/search"):
            assert path in paths


# --- bad input: a clear 4xx, never a 500 -------------------------------------------------------------------------


def test_bad_input_gets_a_clear_4xx(lab: GatewayLab) -> None:
    max_body = int(lab.config.get("max_body_bytes", 10 * 1024 * 1024))
    oversized = b'{"query": "' + b"a" * max_body + b'"}'

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold on the bytes received
        for start in range(0, len(oversized), 256 * 1024):
            yield oversized[start : start + 256 * 1024]

    json_type = {"content-type": "application/json"}
    cases: list[tuple[str, str, dict[str, Any], set[int]]] = [
        ("malformed JSON", "/v1/chat/completions", {"content": b'{"model": ', "headers": json_type}, {400, 422}),
        ("not UTF-8", "/v1/knowledge/search", {"content": b"\xff\xfe\x00", "headers": json_type}, {400, 422}),
        ("an array", "/v1/knowledge/search", {"json": []}, {422}),
        ("oversized", "/v1/knowledge/search", {"content": oversized, "headers": json_type}, {413}),
        ("oversized, chunked", "/v1/knowledge/search", {"content": chunked(), "headers": json_type}, {413}),
        (
            "oversized upload",
            "/v1/knowledge/documents",
            {
                "files": {"file": ("big.txt", b"x" * (max_body + 1), "text/plain")},
                "data": {"department": "engineering"},
            },
            {413},
        ),
        ("unknown model", "/v1/chat/completions", {"json": chat_body("gpt-17", "hi")}, {404}),
        (
            ".exe",
            "/v1/knowledge/documents",
            {
                "files": {"file": ("setup.exe", b"MZ\x90\x00\x03", "application/octet-stream")},
                "data": {"department": "engineering"},
            },
            {415},
        ),
        (
            "zip",
            "/v1/knowledge/documents",
            {
                "files": {"file": ("docs.zip", b"PK\x03\x04\x14\x00", "application/zip")},
                "data": {"department": "engineering"},
            },
            {415},
        ),
        ("no messages", "/v1/chat/completions", {"json": {"model": lab.model}}, {422}),
        ("no model", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}]}}, {422}),
        (
            "no user message",
            "/v1/chat/completions",
            {"json": {"model": lab.model, "messages": [{"role": "assistant", "content": "hi"}]}},
            {422},
        ),
        (
            "bad role",
            "/v1/chat/completions",
            {"json": {"model": lab.model, "messages": [{"role": "root", "content": "hi"}]}},
            {422},
        ),
        (
            "max_tokens not a number",
            "/v1/chat/completions",
            {"json": chat_body(lab.model, "hi", max_tokens="many")},
            {422},
        ),
        ("no query", "/v1/knowledge/search", {"json": {"departments": ["engineering"]}}, {422}),
        ("unknown field", "/v1/knowledge/search", {"json": {"query": "x", "everything": True}}, {422}),
        ("no file", "/v1/knowledge/documents", {"data": {"department": "engineering"}}, {422}),
        ("no department", "/v1/knowledge/documents", {"files": UPLOAD}, {422}),
        ("JSON to the upload", "/v1/knowledge/documents", {"json": {"department": "engineering"}}, {422}),
        (
            "empty document",
            "/v1/knowledge/documents",
            {"files": {"file": ("e.txt", b"", "text/plain")}, "data": {"department": "engineering"}},
            {422},
        ),
        ("no embedding input", "/v1/embeddings", {"json": {"model": lab.model}}, {422}),
    ]
    with lab.client("ops-admin") as client:  # the admin passes RBAC everywhere: input handling is what is tested
        for why, path, kwargs, expected in cases:
            response = no_server_error(client.post(path, **kwargs))
            assert response.status_code in expected, (why, response.status_code, response.text[:300])
            assert "error" in response.json(), why
        bad_department = client.get("/v1/knowledge/documents", params={"department": "Eng ineering"})
        assert no_server_error(bad_department).status_code in (403, 422)
        missing_department = client.get("/v1/knowledge/documents")
        assert no_server_error(missing_department).status_code == 422
        # Routing errors answer in the same shape as every other error.
        for response, status in ((client.get("/v1/nowhere"), 404), (client.delete("/v1/knowledge/search"), 405)):
            assert response.status_code == status and "error" in response.json(), response.text


# --- licensing -------------------------------------------------------------------------------------------------


def _signed_license(lab: GatewayLab, *, seats: int, issued: dt.datetime, expires: dt.datetime) -> dict[str, object]:
    key = bootstrap.ed25519_from_vault(lab.backends, bootstrap.LAB_LICENSE_KEY_PATH)
    lic = License(
        license_id=f"test-{secrets.token_hex(3)}",
        customer="gateway tests",
        seats=seats,
        issued_at=issued.replace(microsecond=0),
        expires_at=expires.replace(microsecond=0),
        features=["gateway"],
    )
    return sign_license(lic, key)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("case", ["missing", "tampered", "expired"])
def test_the_gateway_refuses_to_start_without_a_valid_license(lab: GatewayLab, tmp_path: Path, case: str) -> None:
    now = dt.datetime.now(dt.UTC)
    license_file = tmp_path / "license.json"
    if case == "tampered":
        document = _signed_license(lab, seats=5, issued=now, expires=now + dt.timedelta(days=30))
        document["license"]["seats"] = 5000  # type: ignore[index]
        license_file.write_text(json.dumps(document, indent=2))
    elif case == "expired":
        document = _signed_license(
            lab, seats=5, issued=now - dt.timedelta(days=400), expires=now - dt.timedelta(days=2)
        )
        license_file.write_text(json.dumps(document, indent=2))
    port = free_port()
    config = {
        **lab.config,
        "port": port,
        "license_file": str(license_file),
        "state_dir": str(tmp_path / "state"),
        "audit": {"dsn": f"chdb://{tmp_path / 'chdb'}", "hmac_key_env": AUDIT_KEY_ENV},
    }
    config_file = tmp_path / "gateway.json"
    config_file.write_text(json.dumps(config))

    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.gateway", "--config", str(config_file)],
        cwd=REPO,
        env=gateway_env(lab),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    opened = False
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            opened = opened or _port_open(port)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not opened and not _port_open(port), "the port opened"
    assert proc.returncode != 0
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gateway: refusing to start:")
    expected = {
        "missing": (2, "no such license file"),
        "tampered": (1, "signature does not match"),
        "expired": (1, "expired on"),
    }[case]
    assert proc.returncode == expected[0]
    assert expected[1] in lines[0] and str(license_file) in lines[0]
    assert not (tmp_path / "state").exists()  # not even the seat ledger was created


# --- a second gateway: seats, service-token scoping, schemathesis -------------------------------------------


@dataclass
class AuxGateway:
    url: str
    port: int
    seats: int


@pytest.fixture(scope="module")
def aux(lab: GatewayLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuxGateway]:
    root = tmp_path_factory.mktemp("aux-gateway")
    now = dt.datetime.now(dt.UTC)
    seats = 2
    (root / "license.json").write_text(
        json.dumps(_signed_license(lab, seats=seats, issued=now, expires=now + dt.timedelta(days=30)), indent=2)
    )
    policy = YAML(typ="safe").load((EXAMPLES / "rbac.yaml").read_text())
    policy["bindings"].append({"role": "employee", "kind": "service"})  # service accounts: their token's departments
    with (root / "rbac.yaml").open("w") as fh:
        YAML().dump(policy, fh)
    port = free_port()
    config = {
        **lab.config,
        "port": port,
        "license_file": str(root / "license.json"),
        "rbac_policy": str(root / "rbac.yaml"),
        "state_dir": str(root / "state"),
        "audit": {"dsn": f"chdb://{root / 'chdb'}", "hmac_key_env": AUDIT_KEY_ENV},
        "rate_limit": {"rate_per_second": 1000, "burst": 1000},
    }
    (root / "gateway.json").write_text(json.dumps(config))
    log = (root / "gateway.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.gateway", "--config", str(root / "gateway.json")],
        cwd=REPO,
        env=gateway_env(lab),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "gateway.log").read_text()
            try:
                with lab.client("ops-admin", url=url) as client:
                    if client.get("/healthz").status_code == 200:
                        break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the second gateway did not start"
            time.sleep(0.2)
        yield AuxGateway(url=url, port=port, seats=seats)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_seat_limit_refuses_a_third_device_and_keeps_the_first_two(lab: GatewayLab, aux: AuxGateway) -> None:
    devices = [lab.files(lab.issue("edge-device", f"seat-laptop-{i}", "sales"), f"seat-{i}") for i in (1, 2, 3)]

    def list_sales(files: TlsFiles) -> httpx.Response:
        with lab.client(files, url=aux.url) as client:
            return client.get("/v1/knowledge/documents", params={"department": "sales"})

    assert list_sales(devices[0]).status_code == 200
    assert list_sales(devices[1]).status_code == 200
    third = list_sales(devices[2])
    assert third.status_code == 403, third.text
    assert error_code(third) == "seat_limit"
    assert str(aux.seats) in third.json()["error"]["message"]
    for files in devices[:2]:  # the first two keep working
        assert list_sales(files).status_code == 200
    assert list_sales(devices[2]).status_code == 403  # and the third stays out
    # Users are not devices: they take no seat.
    with lab.client("bob", url=aux.url) as client:
        assert client.get("/v1/knowledge/documents", params={"department": "sales"}).status_code == 200


def test_a_service_token_reaches_only_its_departments(lab: GatewayLab, corpus: Corpus, aux: AuxGateway) -> None:
    headers = {"Authorization": f"Bearer {lab.token('report-bot', ['sales'])}"}
    with lab.client(None, url=aux.url, headers=headers) as client:
        inside = client.post("/v1/knowledge/search", json={"query": "discount approval"})
        assert inside.status_code == 200, inside.text
        assert {h["department"] for h in inside.json()["results"]} == {"sales"}
        outside = client.post("/v1/knowledge/search", json={"query": corpus.phrase, "departments": ["engineering"]})
        assert outside.status_code == 403, outside.text
        assert client.get("/v1/knowledge/documents", params={"department": "engineering"}).status_code == 403
        chat = client.post(
            "/v1/chat/completions", json=chat_body(lab.model, f"What is the {corpus.phrase}?", max_tokens=24)
        )
        assert chat.status_code == 200, chat.text
        assert {s["department"] for s in chat.json()["membria"]["sources"]} <= {"sales"}
        assert corpus.secret not in chat.text + outside.text


# Loaded by `st run` through SCHEMATHESIS_HOOKS; it steers part of the generated data towards values that
# get past the first refusal, so the fuzzed rest of the request reaches the core server and the model:
# - a random model name only ever reaches the 404 branch (tested above): the served model is put in instead,
#   and the answer length capped so 25 examples per operation stay within the time budget (the model's
#   speed is not under test);
# - a random department is refused by RBAC before anything else: three generated names in four are mapped to
#   a real department (which one depends on the generated value), the fourth goes through unchanged.
_SCHEMATHESIS_HOOKS = """
import os
import schemathesis

MODEL = os.environ["MEMBRIA_TEST_MODEL"]
DEPARTMENTS = ("engineering", "sales", "hr")


def department(value):
    if not isinstance(value, str) or len(value) % 4 == 3:
        return value
    return DEPARTMENTS[len(value) % 3]


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if isinstance(case.query, dict) and "department" in case.query:
        case.query["department"] = department(case.query["department"])
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
            body["max_tokens"] = min(body["max_tokens"], 16)
    if "department" in body:
        body["department"] = department(body["department"])
    if isinstance(body.get("departments"), list):
        body["departments"] = [department(d) for d in body["departments"]]
"""


def test_schemathesis_finds_no_server_error(lab: GatewayLab, aux: AuxGateway, tmp_path: Path) -> None:
    """`st run` over every operation of the live spec (examples, coverage and fuzzing phases, positive and
    negative data, at most 25 examples per operation), as the site admin so RBAC lets the fuzzed input reach
    the handlers, against the second gateway so the rate limit does not answer instead of them. Nothing is
    excluded. (schemathesis' pytest integration, `from_fixture`, does not run on pytest 9.2: it sets
    `Function._nodeid`, which pytest no longer has; the CLI is the same engine.)"""
    hooks = tmp_path / "hooks.py"
    hooks.write_text(_SCHEMATHESIS_HOOKS)
    admin = admin_tls(lab.state)
    junit = tmp_path / "junit.xml"
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("st")),
            "run",
            f"{aux.url}/openapi.json",
            "--request-cert",
            str(admin.cert),
            "--request-cert-key",
            str(admin.key),
            "--tls-verify",
            str(lab.ca),
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--workers",
            "1",
            "--request-timeout",
            "120",
            "--report",
            "junit",
            "--report-junit-path",
            str(junit),
        ],
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(hooks), "MEMBRIA_TEST_MODEL": lab.model, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    operations = re.search(r"Tested:\s+(\d+)", output)
    spec = httpx.get(f"{aux.url}/openapi.json", verify=client_context(admin), timeout=30).json()
    count = sum(
        len([m for m in item if m in {"get", "post", "put", "patch", "delete"}]) for item in spec["paths"].values()
    )
    assert operations and int(operations.group(1)) == count, output[-3000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated and generated.group(1) == generated.group(2) and int(generated.group(1)) > count, output[-3000:]


def test_a_model_failure_mid_stream_ends_the_stream_as_an_error(lab: GatewayLab) -> None:
    """The model server dies while an answer streams: the client must see finish_reason "error" and the
    stream's end, not an answer presented as complete. The model server is started again afterwards.

    The kill comes once three pieces of the answer have arrived (the model is generating); an answer that
    ends before that is simply asked again with another question."""
    llm = process.running(lab.state, "llm")
    assert llm is not None
    killed = False
    datas: list[str] = []
    try:
        with lab.client("alice") as client:
            for _ in range(6):
                run = secrets.token_hex(4)
                question = f"List twenty numbered steps to service pump P-7, one per line (run {run})."
                body = chat_body(lab.model, question, max_tokens=1024, stream=True, temperature=0.8)
                datas = []
                with client.stream("POST", "/v1/chat/completions", json=body) as streamed:
                    assert streamed.status_code == 200, streamed.read()
                    pieces = 0
                    for line in streamed.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        datas.append(line[5:].strip())
                        if datas[-1] != "[DONE]" and json.loads(datas[-1])["choices"][0]["delta"].get("content"):
                            pieces += 1
                        if pieces == 3 and not killed:
                            os.kill(llm.pid, signal.SIGKILL)
                            killed = True
                if killed:
                    break
    finally:
        if killed:  # start the model server again the way the lab does (the rest of the lab is untouched)
            assert process.wait_until(lambda: not llm.alive(), timeout=10)
            server = LlamaServer(lab.site, lab.state)
            server.prepare()
            record = process.spawn(lab.state, server.name, server.argv(), env=server.env())
            process.wait_until(
                lambda: not record.alive() or server.check().ok, timeout=server.start_timeout, interval=0.5
            )
            assert server.check().ok, "the model server did not come back"
    assert killed, "no answer of three pieces in six tries"
    assert datas[-1] == "[DONE]"
    last = json.loads(datas[-2])
    content = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in datas[:-1])
    assert last["choices"][0]["finish_reason"] == "error", (len(datas), content)


# --- audit --------------------------------------------------------------------------------------------------------


def verify_audit_log(lab: GatewayLab) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "audit-log", "verify", "--site", str(lab.site_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"(\d+) rows checked, chain intact", done.stdout)
    assert match, done.stdout
    return int(match.group(1))


def test_every_request_leaves_a_pseudonymized_row_in_an_intact_chain(lab: GatewayLab, corpus: Corpus) -> None:
    before = verify_audit_log(lab)
    request_ids: dict[str, str] = {}
    with lab.client("alice") as client:
        for name, response in (
            ("search", client.post("/v1/knowledge/search", json={"query": corpus.phrase})),
            ("denied", client.get("/v1/knowledge/documents", params={"department": "hr"})),
            ("embeddings denied", client.post("/v1/embeddings", json={"model": lab.model, "input": "x"})),
            ("invalid", client.post("/v1/knowledge/search", json={})),
        ):
            request_ids[name] = response.headers["x-request-id"]
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body(lab.model, "How are O-ring seals replaced?", max_tokens=24, stream=True),
        ) as streamed:
            events, _ = read_sse(streamed)
            request_ids["stream"] = streamed.headers["x-request-id"]
        streamed_chunks = sum(1 for e in events if e["choices"][0]["delta"].get("content"))
    with lab.client(None) as client:
        request_ids["anonymous"] = client.get("/v1/knowledge/documents?department=sales").headers["x-request-id"]

    rows = audit_rows_until(lab, lambda rows: set(request_ids.values()) <= {r["request_id"] for r in rows})
    by_id = {row["request_id"]: row for row in rows}
    assert all(rid in by_id for rid in request_ids.values()), request_ids

    alice = pseudonymize("alice", lab.audit_key())
    assert by_id[request_ids["search"]]["user_pseudonym"] == alice
    assert by_id[request_ids["search"]]["decision"] == "allow"
    assert by_id[request_ids["search"]]["status"] == 200
    assert by_id[request_ids["denied"]]["decision"] == "deny"
    assert by_id[request_ids["denied"]]["status"] == 403
    assert by_id[request_ids["denied"]]["user_pseudonym"] == alice
    assert by_id[request_ids["anonymous"]]["user_pseudonym"] == ""
    # A streamed answer's row is written when the stream ends, with what was streamed.
    stream_row = by_id[request_ids["stream"]]
    assert (stream_row["status"], stream_row["decision"]) == (200, "allow")
    assert streamed_chunks >= 1 and stream_row["completion_tokens"] == streamed_chunks
    assert by_id[request_ids["anonymous"]]["status"] == 401
    # Nowhere in the whole log, in any column, is a raw user name.
    for row in rows:
        text = json.dumps(row, default=str)
        for raw in ("alice", "bob", "carol", "dana", "erin", "gus"):
            assert not re.search(rf"\b{raw}\b", text), (raw, row)

    after = verify_audit_log(lab)
    assert after >= before + len(request_ids), (before, after)


def test_no_request_in_this_module_got_a_server_error(lab: GatewayLab) -> None:
    """The gateway counts every answer by status: over everything above, no 5xx (but /readyz's own 503 while
    the lab was starting, which is the readiness probe doing its job)."""
    with lab.client("ops-admin") as client:
        metrics = client.get("/metrics").text
    errors = [
        line
        for line in metrics.splitlines()
        if line.startswith("membria_gateway_requests_total{")
        and re.search(r'status="5\d\d"', line)
        and 'route="/readyz",status="503"' not in line
    ]
    assert errors == []
