"""After `lab up`: load the example corpus through the gateway, then prove the data flow end to end.

The smoke asks as an engineering user over mTLS (answered from engineering's documents), tries a
cross-department search (must be refused), and finds both requests in the hash-chained audit log.
Everything goes through the same HTTP API a laptop or an operator would use.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from appliance.backends import Backends
from appliance.errors import BadInput, CheckFailed, ServiceError
from appliance.lab import audit_rows, bootstrap
from appliance.lab.runtime_services import Gateway, admin_tls
from appliance.lab.state import LabState
from appliance.pki import Pki
from appliance.site import Site
from runtime.common.tls import TlsFiles, client_context

SMOKE_USER = "smoke-engineer"
SMOKE_DEPARTMENT = "engineering"
SMOKE_QUESTION = "What is the safety procedure for valve VX-55?"


@dataclass(frozen=True)
class SmokeStep:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class IngestSummary:
    files: int
    changed: int


def _client(tls: TlsFiles) -> httpx.Client:
    return httpx.Client(verify=client_context(tls), timeout=120)


def ingest_corpus(site: Site, state: LabState, corpus: Path) -> IngestSummary:
    """Upload every corpus file as the lab operator; unchanged files leave the knowledge base as it was."""
    from runtime.core.corpus import corpus_files  # the corpus layout belongs to the core server

    gateway = Gateway(site, state)
    changed = 0
    try:
        files = corpus_files(corpus)
    except (FileNotFoundError, ValueError) as exc:
        raise BadInput(
            f"lab.corpus_dir: {exc}", hint="paths in the site file are relative to the working directory"
        ) from exc
    with _client(admin_tls(state)) as client:
        for department, path in files:
            response = client.post(
                f"{gateway.endpoint}/v1/knowledge/documents",
                data={"department": department, "doc_id": path.stem},
                files={"file": (path.name, path.read_bytes())},
            )
            if response.status_code != 201:
                raise CheckFailed(f"ingesting {path} failed: HTTP {response.status_code} {response.text[:200]}")
            changed += bool(response.json().get("changed"))
    return IngestSummary(files=len(files), changed=changed)


def _smoke_identity(site: Site, state: LabState) -> TlsFiles:
    cert, key = bootstrap.cert_paths(state, SMOKE_USER)
    chain = bootstrap.ca_chain_path(state)
    if not bootstrap.chains_to(cert, chain.read_text(), min_validity=dt.timedelta(minutes=10)):
        pki = Pki.for_site(site, Backends(site, state).vault())
        pki.issue("admin", SMOKE_USER, ou=SMOKE_DEPARTMENT).write(state.pki_dir, SMOKE_USER)
    return TlsFiles(cert=cert, key=key, ca=chain)


def run(site: Site, state: LabState, audit_lookup: AuditLookup | None = None) -> list[SmokeStep]:
    """`audit_lookup` finds request ids' decisions where the audit log lives (default: this machine)."""
    gateway = Gateway(site, state).endpoint
    steps: list[SmokeStep] = []
    request_ids: list[str] = []
    with _client(_smoke_identity(site, state)) as client:
        chat = client.post(
            f"{gateway}/v1/chat/completions",
            json={
                "model": Backends(site, state).llm().model,
                "messages": [{"role": "user", "content": SMOKE_QUESTION}],
            },
        )
        request_ids.append(chat.headers.get("x-request-id", ""))
        if chat.status_code == 200:
            body = chat.json()
            departments = {s["department"] for s in body["membria"]["sources"]}
            ok = departments == {SMOKE_DEPARTMENT} and "VX-55" in str(body["membria"]["sources"])
            answer = " ".join(body["choices"][0]["message"]["content"].split())[:80]
            steps.append(SmokeStep("answered from engineering", ok, f"sources {sorted(departments)}; '{answer}…'"))
        else:
            steps.append(SmokeStep("answered from engineering", False, f"HTTP {chat.status_code}: {chat.text[:200]}"))

        cross = client.post(f"{gateway}/v1/knowledge/search", json={"query": "vacation days", "departments": ["hr"]})
        request_ids.append(cross.headers.get("x-request-id", ""))
        steps.append(
            SmokeStep("cross-department refused", cross.status_code == 403, f"HTTP {cross.status_code} for hr")
        )
    steps.append(_audit_rows_visible(site, state, request_ids, audit_lookup))
    return steps


AuditLookup = Callable[[list[str]], dict[str, str]]


def _local_audit_lookup(site: Site, state: LabState) -> AuditLookup:
    backends = Backends(site, state)
    return lambda ids: audit_rows.decisions(backends, ids)["decisions"]


def _audit_rows_visible(site: Site, state: LabState, request_ids: list[str], lookup: AuditLookup | None) -> SmokeStep:
    """The gateway writes audit rows in batches (every 0.5 s); wait for ours, sharing chDB politely."""
    lookup = lookup or _local_audit_lookup(site, state)
    deadline = time.monotonic() + 15
    found: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            found = lookup(request_ids)
        except (CheckFailed, ServiceError):  # not created yet, or busy: the next batch will tell
            time.sleep(0.3)
            continue
        if len(found) == len(request_ids):
            decisions = [found[i] for i in request_ids]
            return SmokeStep("audit rows visible", decisions == ["allow", "deny"], f"decisions {decisions}")
        time.sleep(0.3)
    return SmokeStep("audit rows visible", False, f"found {len(found)} of {len(request_ids)} rows after 15 s")
