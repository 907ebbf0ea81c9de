"""The edge agent: ask → retrieve → draft → route → (escalate) → remember, and the sync with the core.

It glues the modules together and owns only the `decisions` table (every routing decision with its reasons)
and `edge_state` (small key/values such as the hub's last known clock). Escalations never block the user
for longer than `escalation.wait_seconds`: the local draft is the answer meanwhile, and the core's answer
arrives through the outbox (`escalation(id)`), exactly once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime.common import sqlite_db
from runtime.common.embeddings import Embedder
from runtime.common.replica import ApplyResult, LocalWrite, ReplicaStore
from runtime.common.sync_wire import Record, SyncPayload
from runtime.common.vclock import VectorClock
from runtime.edge.knowledge import ChunkRecord, KnowledgeCore, KnowledgeHit
from runtime.edge.local_model import Draft, LocalModel, LocalModelConfig, PinnedPrefix
from runtime.edge.outbox import Outbox, OutboxWorker
from runtime.edge.router import Decision, RouterConfig, route
from runtime.edge.settings import EdgeSettings
from runtime.edge.taxonomy import Taxonomy, load_taxonomy
from runtime.edge.transport import GatewayTransport, GatewayUnreachable

log = logging.getLogger("membria.edge")

Source = Literal["local", "core", "cache"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    conversation_id TEXT NOT NULL,
    route TEXT NOT NULL,
    confidence REAL NOT NULL,
    sensitive INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    escalation_id TEXT
);
CREATE TABLE IF NOT EXISTS edge_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_CONTEXT_HITS = 3  # hits put into the prompt
_SEARCH_HITS = 4  # hits retrieved: coverage and the sensitivity labels look at one more


@dataclass(frozen=True)
class Sampling:
    """Per-question overrides from the chat page or the API (None = the profile's value)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None


@dataclass
class Answer:
    answer: str
    source: Source
    conversation_id: str
    decision: dict[str, Any]
    sources: list[dict[str, Any]] = field(default_factory=list)
    escalation: dict[str, Any] | None = None
    local_draft: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SyncRefused(RuntimeError):
    """The gateway answered a sync call with an error (not reachable is `GatewayUnreachable`)."""


@dataclass(frozen=True)
class SyncReport:
    pushed: int
    pulled: int
    mode: str
    bytes: int
    invalidated_answers: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EdgeAgent:
    def __init__(self, settings: EdgeSettings, *, embedder: Embedder | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.knowledge = KnowledgeCore(settings.db_path, embedder or Embedder.shared())
        self.replica = ReplicaStore(settings.db_path, settings.device)
        esc = settings.escalation
        self.outbox = Outbox(settings.db_path, backoff_base=esc.backoff_seconds, backoff_max=esc.backoff_max_seconds)
        self.taxonomy: Taxonomy = load_taxonomy(settings.routing.taxonomy_file)
        m = settings.model
        self.model = LocalModel(
            LocalModelConfig(
                model_path=m.path,
                n_ctx=m.context_tokens,
                n_threads=m.threads,
                temperature=m.temperature,
                top_p=m.top_p,
                max_tokens=m.max_tokens,
                presence_penalty=m.presence_penalty,
            )
        )
        self.router_config = RouterConfig(
            theta=settings.routing.theta,
            logprob_weight=settings.routing.logprob_weight,
            coverage_weight=1.0 - settings.routing.logprob_weight,
            local_only_labels=tuple(settings.routing.local_only_labels),
        )
        self.transport = GatewayTransport(
            settings.gateways,
            settings.tls.files(),
            timeout=esc.timeout_seconds,
            retries_per_endpoint=esc.retries + 1,
            backoff_base=esc.backoff_seconds,
            backoff_max=max(esc.backoff_max_seconds, esc.backoff_seconds),
        )
        self.worker = OutboxWorker(self.outbox, self.transport)
        self._db = sqlite_db.connect(settings.db_path, durable=True)
        with self._db:
            self._db.executescript(_SCHEMA)
        self._db_lock = threading.Lock()
        self._pinned: PinnedPrefix | None = None
        self._pinned_chunks: frozenset[str] = frozenset()  # "chunk_id@version" of what the prefix holds
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self.last_sync: dict[str, Any] = {}

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> EdgeAgent:
        """Load the model, precompute the pinned knowledge, start the outbox and sync loops."""
        self.model.ensure_loaded()
        self.repin()
        if self.settings.background:
            self.worker.start()
            self._sync_thread = threading.Thread(target=self._sync_loop, name="edge-sync", daemon=True)
            self._sync_thread.start()
        return self

    def stop(self) -> None:
        """Flush: the outbox worker finishes the delivery in hand; nothing queued is lost (it is on disk)."""
        self._stop.set()
        self.worker.stop()
        if self._sync_thread is not None:
            self._sync_thread.join(timeout=30)
        self.knowledge.close()
        self.outbox.close()
        self.replica.close()
        with self._db_lock:
            self._db.close()

    def repin(self) -> PinnedPrefix | None:
        """(Re)compute the cache-augmented prefix from the profile's pinned knowledge."""
        limit = self.settings.pinned_knowledge_chars
        if limit <= 0:
            self._pinned, self._pinned_chunks = None, frozenset()
            return None
        chunks = self.knowledge.pinned_chunks(
            self.settings.departments, self.settings.sync.topics or None, max_chars=limit
        )
        if not chunks:
            self._pinned, self._pinned_chunks = None, frozenset()
            return None
        text = self.model.pinned_text([c.text for c in chunks])
        keys = [f"{c.chunk_id}@{c.version}" for c in chunks]
        self._pinned = self.model.load_or_pin(text, ",".join(keys), self.settings.pinned_state_path)
        self._pinned_chunks = frozenset(keys)
        return self._pinned

    # --- questions ------------------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        *,
        conversation_id: str | None = None,
        sampling: Sampling | None = None,
        share: bool = False,
        use_cache: bool = True,
        wait_seconds: float | None = None,
    ) -> Answer:
        question = question.strip()
        if not question:
            raise ValueError("the question is empty")
        conversation_id = conversation_id or uuid.uuid4().hex
        sampling = sampling or Sampling()
        departments = self.settings.departments
        started = time.monotonic()

        if use_cache:
            cached = self.knowledge.cached_answer(question, departments)
            if cached is not None:
                answer = Answer(
                    answer=cached.answer,
                    source="cache",
                    conversation_id=conversation_id,
                    decision={"route": "cache", "reasons": [{"code": "cached", "detail": cached.source}]},
                    timings={"total_s": time.monotonic() - started},
                )
                self._remember(conversation_id, question, answer)
                return answer

        hits = self.knowledge.search(question, departments, k=_SEARCH_HITS)
        coverage = self.knowledge.coverage(question, hits)
        retrieved = time.monotonic()
        history = [(t.role, t.text) for t in self.knowledge.turns(conversation_id, limit=4)]
        pinned, pinned_ids = self._pinned, self._pinned_chunks
        context = [h.text for h in hits[:_CONTEXT_HITS] if f"{h.chunk_id}@{h.version}" not in pinned_ids]
        prompt = self.model.prompt_for(question, context, history, prefix=pinned)
        draft: Draft = self.model.draft(
            prompt,
            prefix=pinned,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            presence_penalty=sampling.presence_penalty,
        )
        decision: Decision = route(
            question,
            config=self.router_config,
            device_departments=departments,
            draft=draft,
            coverage=coverage,
            taxonomy=self.taxonomy,
            chunk_labels=[h.labels for h in hits],
        )
        sources = [_hit_json(h) for h in hits[:_CONTEXT_HITS]]
        timings = {
            "retrieval_s": retrieved - started,
            "ttft_s": draft.ttft_seconds,
            "generation_s": draft.total_seconds,
            "tokens_per_s": draft.tokens_per_second,
        }
        escalation: dict[str, Any] | None = None
        answer_text = draft.text.strip()
        source: Source = "local"
        if decision.route == "escalate":
            item = self.outbox.enqueue("escalation", self._escalation_body(question, sampling))
            self.worker.wake()
            delivered = self._wait_for(
                item.id, self.settings.escalation.wait_seconds if wait_seconds is None else wait_seconds
            )
            escalation = {"id": item.id, "status": delivered.status if delivered else "queued"}
            core_text = _core_answer(delivered.response) if delivered and delivered.status == "delivered" else None
            if core_text is not None:
                answer_text, source = core_text, "core"
        self._log_decision(conversation_id, decision, escalation["id"] if escalation else None)
        answer = Answer(
            answer=answer_text,
            source=source,
            conversation_id=conversation_id,
            decision=decision.to_json(),
            sources=sources,
            escalation=escalation,
            local_draft=draft.text.strip() if source == "core" else None,
            timings={**timings, "total_s": time.monotonic() - started},
        )
        self._remember(conversation_id, question, answer)
        if source == "core" or (decision.route == "local" and not decision.sensitive):
            # Sensitive answers are not cached: a cache hit would skip the router's record of why.
            self.knowledge.cache_answer(
                question, departments, answer_text, source=source, chunk_versions={h.chunk_id: h.version for h in hits}
            )
        if share and not decision.sensitive:
            self._share(question, answer)
        return answer

    def escalation(self, escalation_id: str) -> dict[str, Any]:
        """Where a queued escalation stands; with the core's answer once delivered."""
        item = self.outbox.get(escalation_id)
        if item is None:
            raise KeyError(escalation_id)
        out: dict[str, Any] = {"id": item.id, "status": item.status, "attempts": item.attempts}
        if item.status == "delivered":
            out["answer"] = _core_answer(item.response)
        if item.last_error:
            out["last_error"] = item.last_error
        return out

    def _escalation_body(self, question: str, sampling: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.core_model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": min(sampling.max_tokens or 256, 1024),
        }
        if sampling.temperature is not None:
            body["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        return body

    def _wait_for(self, item_id: str, seconds: float) -> Any:
        deadline = time.monotonic() + seconds
        while True:
            item = self.outbox.get(item_id)
            if item is not None and item.status in ("delivered", "rejected"):
                return item
            if time.monotonic() >= deadline:
                return item
            time.sleep(0.05)

    def _remember(self, conversation_id: str, question: str, answer: Answer) -> None:
        self.knowledge.add_turn(conversation_id, "user", question)
        self.knowledge.add_turn(conversation_id, "assistant", answer.answer, source=answer.source)

    def _share(self, question: str, answer: Answer) -> None:
        """A chain of reasoning for the core (immutable once written; synced on the next push)."""
        self.replica.local_write(
            "reasoning",
            uuid.uuid4().hex,
            department=self.settings.departments[0],
            payload={
                "question": question,
                "answer": answer.answer,
                "source": answer.source,
                "reasons": answer.decision.get("reasons", []),
                "sources": [s["chunk_id"] for s in answer.sources],
            },
        )

    def _log_decision(self, conversation_id: str, decision: Decision, escalation_id: str | None) -> None:
        payload = decision.to_json()
        log.info(
            "route=%s confidence=%.3f sensitive=%s reasons=%s",
            decision.route,
            decision.confidence,
            decision.sensitive,
            # Reasons name kinds of findings and numbers, never the matched text itself.
            "; ".join(f"{r['code']}: {r['detail']}" for r in payload["reasons"]),
        )
        with self._db_lock, self._db:
            self._db.execute(
                "INSERT INTO decisions (at, conversation_id, route, confidence, sensitive, reasons, escalation_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    conversation_id,
                    decision.route,
                    decision.confidence,
                    int(decision.sensitive),
                    json.dumps(payload["reasons"]),
                    escalation_id,
                ),
            )

    def decisions(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._db_lock:
            rows = self._db.execute(
                "SELECT at, conversation_id, route, confidence, sensitive, reasons, escalation_id"
                " FROM decisions ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {
                "at": r[0],
                "conversation_id": r[1],
                "route": r[2],
                "confidence": r[3],
                "sensitive": bool(r[4]),
                "reasons": json.loads(r[5]),
                "escalation_id": r[6],
            }
            for r in rows
        ]

    # --- documents ------------------------------------------------------------------------------------

    def add_document(
        self,
        filename: str,
        data: bytes,
        *,
        department: str | None = None,
        labels: Sequence[str] = (),
        doc_id: str | None = None,
    ) -> dict[str, Any]:
        """Add a document to the local knowledge. Unless labelled local-only it syncs to the core."""
        department = department or self.settings.departments[0]
        if department not in self.settings.departments:
            raise ValueError(
                f"department '{department}' is not one of this device's: {', '.join(self.settings.departments)}"
            )
        doc_id = doc_id or _doc_id(filename)
        before = set(self.knowledge.document_chunk_ids(department, doc_id))
        chunks = self.knowledge.ingest_document(doc_id, department, filename, data, labels=tuple(labels))
        local_only = bool(set(labels) & set(self.settings.routing.local_only_labels))
        if not local_only:
            writes = [LocalWrite("chunk", c.chunk_id, department, c.topic, _payload(c)) for c in chunks] + [
                LocalWrite("chunk", gone, department, deleted=True)
                for gone in sorted(before - {c.chunk_id for c in chunks})
            ]
            self.replica.local_write_many(writes)  # one transaction
        self.knowledge.invalidate_answers_for([c.chunk_id for c in chunks] + sorted(before))
        self.repin()  # the pinned knowledge may include this document now
        return {"doc_id": doc_id, "department": department, "chunks": len(chunks), "local_only": local_only}

    # --- sync -----------------------------------------------------------------------------------------

    def _hub_clock(self) -> VectorClock:
        with self._db_lock:
            row = self._db.execute("SELECT value FROM edge_state WHERE key = 'hub_clock'").fetchone()
        return VectorClock.from_json(json.loads(row[0])) if row else VectorClock()

    def _set_hub_clock(self, clock: VectorClock) -> None:
        with self._db_lock, self._db:
            self._db.execute(
                "INSERT INTO edge_state (key, value) VALUES ('hub_clock', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (json.dumps(clock.to_json()),),
            )

    def sync_now(self) -> SyncReport:
        """Push what the hub has not seen, then pull what this device has not seen. One at a time."""
        with self._sync_lock:
            started = time.monotonic()
            hub_clock = self._hub_clock()
            outgoing = self.replica.changes_since(hub_clock)
            pushed = 0
            if outgoing:
                body = self._sync_call(
                    "/v1/sync/push",
                    {
                        "replica": self.replica.replica_id,
                        "records": [r.to_wire() for r in outgoing],
                        "clock": self.replica.clock().to_json(),
                    },
                )
                pushed = int(body.get("accepted", 0))
                hub_clock = hub_clock.merge(VectorClock.from_json(body.get("clock", {})))
            body = self._sync_call(
                "/v1/sync/pull",
                {
                    "replica": self.replica.replica_id,
                    "clock": self.replica.clock().to_json(),
                    "departments": list(self.settings.departments),
                    "topics": list(self.settings.sync.topics) or None,
                    "max_patch_bytes": self.settings.sync.max_patch_bytes,
                },
            )
            payload = SyncPayload.from_wire(body)
            result = self.replica.import_payload(payload)
            invalidated = self._index(result)
            self._set_hub_clock(hub_clock.merge(payload.clock))
            report = SyncReport(
                pushed=pushed,
                pulled=len(result.accepted),
                mode=payload.mode,
                bytes=payload.bytes,
                invalidated_answers=invalidated,
                seconds=time.monotonic() - started,
            )
            self.last_sync = {"at": time.time(), **report.to_json()}
        if result.accepted:
            self.repin()
        return report

    def _sync_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.transport.post_json(path, body)
        if response.status != 200 or not isinstance(response.body, dict):
            detail = response.body.get("error", {}).get("message") if isinstance(response.body, dict) else None
            raise SyncRefused(f"{path} at {response.endpoint}: HTTP {response.status}: {detail or response.body}")
        return response.body

    def _index(self, result: ApplyResult) -> int:
        """Bring the knowledge core in line with the records a sync changed."""
        upserts: list[ChunkRecord] = []
        deletes: list[str] = []
        for record in result.accepted:
            if record.kind != "chunk":
                continue
            if record.deleted:
                deletes.append(record.record_id)
            else:
                upserts.append(_chunk_from_record(record))
        if upserts:
            self.knowledge.upsert_chunks(upserts)
        if deletes:
            self.knowledge.delete_chunks(deletes)
        changed = [c.chunk_id for c in upserts] + deletes
        return self.knowledge.invalidate_answers_for(changed) if changed else 0

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.settings.sync.interval_seconds):
            try:
                self.sync_now()
            except GatewayUnreachable as exc:
                self.last_sync = {"at": time.time(), "error": str(exc)}
                log.info("sync skipped: %s", exc)
            except Exception as exc:  # noqa: BLE001 - the loop must survive a bad round; the next one retries
                self.last_sync = {"at": time.time(), "error": str(exc)}
                log.warning("sync failed: %s", exc)

    # --- status ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "device": self.settings.device,
            "profile": self.settings.profile,
            "departments": list(self.settings.departments),
            "model": {"name": self.settings.model.name, "loaded": self.model.loaded},
            "models": [self.settings.model.name],
            "sampling": {
                "temperature": self.settings.model.temperature,
                "top_p": self.settings.model.top_p,
                "max_tokens": self.settings.model.max_tokens,
                "presence_penalty": self.settings.model.presence_penalty,
            },
            "theta": self.settings.routing.theta,
            "knowledge": self.knowledge.counts(),
            "pinned": {"chunks": len(self._pinned_chunks), "tokens": self._pinned.tokens} if self._pinned else None,
            "outbox": self.outbox.counts(),
            "sync": {"clock": self.replica.clock().to_json(), "last": self.last_sync},
            "gateways": list(self.settings.gateways),
        }


def _hit_json(hit: KnowledgeHit) -> dict[str, Any]:
    return {
        "chunk_id": hit.chunk_id,
        "doc_id": hit.doc_id,
        "title": hit.title,
        "department": hit.department,
        "version": hit.version,
        "similarity": round(hit.similarity, 4),
    }


def _core_answer(response: Mapping[str, Any] | None) -> str | None:
    try:
        return str(response["choices"][0]["message"]["content"]) if response else None
    except (KeyError, IndexError, TypeError):
        return None


def _payload(chunk: ChunkRecord) -> dict[str, Any]:
    return {
        "doc_id": chunk.doc_id,
        "title": chunk.title,
        "text": chunk.text,
        "labels": list(chunk.labels),
        "chunk_index": chunk.position,
    }


def _chunk_from_record(record: Record) -> ChunkRecord:
    p = record.payload
    return ChunkRecord(
        chunk_id=record.record_id,
        doc_id=str(p.get("doc_id", "")),
        department=record.department,
        title=str(p.get("title", "")),
        text=str(p.get("text", "")),
        version=record.lamport,
        topic=record.topic,
        labels=tuple(str(x) for x in p.get("labels", [])),
        position=int(p.get("chunk_index", 0)),
    )


def _doc_id(filename: str) -> str:
    stem = Path(filename).stem.lower()
    cleaned = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in stem).strip("-_")
    return cleaned[:100] or uuid.uuid4().hex[:12]
