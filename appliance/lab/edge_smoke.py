"""The edge part of the lab smoke: the runtime data flow as a laptop user lives it.

1. a question the laptop answers itself (in scope, well covered by its knowledge);
2. a question it escalates (it needs another department) and the core's answer;
3. an offline period: the gateway is stopped, the question is queued and answered locally meanwhile;
4. the gateway returns and the queued escalation is delivered, once.

Every step goes through the agent's local API, exactly as the chat page and `appliance edge ask` do. Questions
skip the answer cache, so a second `lab up` exercises the same paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from appliance.errors import CheckFailed
from appliance.lab.edge_agent import EdgeAgentService
from appliance.lab.smoke import SmokeStep
from appliance.lab.state import LabState
from appliance.site import Site

LOCAL_QUESTION = "What is the alarm threshold for the bearing temperature of feed pump P-12?"
ESCALATED_QUESTION = "What discount may sales give on a quote before it needs approval?"
OFFLINE_QUESTION = "Which commission rate applies to sales of pump P-12 spare parts?"
DELIVERY_TIMEOUT_S = 120.0


def _agent(site: Site, state: LabState, timeout: float = 300) -> httpx.Client:
    return httpx.Client(base_url=EdgeAgentService(site, state).endpoint, timeout=timeout)


def first_sync(site: Site, state: LabState) -> dict[str, Any]:
    with _agent(site, state) as client:
        response = client.post("/api/sync")
    if response.status_code != 200:
        raise CheckFailed(f"edge agent: first sync failed: HTTP {response.status_code} {response.text[:300]}")
    report: dict[str, Any] = response.json()
    return report


def _ask(client: httpx.Client, question: str, wait: float) -> dict[str, Any]:
    response = client.post("/api/ask", json={"question": question, "use_cache": False, "wait_seconds": wait})
    if response.status_code != 200:
        raise CheckFailed(f"edge agent: /api/ask failed: HTTP {response.status_code} {response.text[:300]}")
    answer: dict[str, Any] = response.json()
    return answer


def _why(answer: dict[str, Any]) -> str:
    decision = answer.get("decision", {})
    reasons = ", ".join(r["code"] for r in decision.get("reasons", []))
    return f"route {decision.get('route')}, confidence {decision.get('confidence', 0):.2f} ({reasons})"


@dataclass(frozen=True)
class GatewayOutage:
    """How to take the gateway away and bring it back: a lab process, or a unit on the core node."""

    stop: Callable[[], None]
    start: Callable[[], None]


def run(
    site: Site,
    state: LabState,
    progress: Callable[[str], None],
    outage: GatewayOutage | None,
) -> list[SmokeStep]:
    """The steps above; without `outage` (how to stop and start the gateway) the offline period is skipped."""
    steps: list[SmokeStep] = []
    with _agent(site, state) as client:
        local = _ask(client, LOCAL_QUESTION, wait=60)
        steps.append(SmokeStep("edge: local answer", local["source"] == "local", f"{local['source']}: {_why(local)}"))

        escalated = _ask(client, ESCALATED_QUESTION, wait=120)
        steps.append(
            SmokeStep(
                "edge: escalated answer",
                escalated["source"] == "core",
                f"{escalated['source']}: {_why(escalated)}",
            )
        )

        if outage is None:
            return steps
        progress("edge: stopping the gateway for an offline period")
        outage.stop()
        try:
            offline = _ask(client, OFFLINE_QUESTION, wait=3)
        finally:
            progress("edge: starting the gateway again")
            outage.start()
        escalation = offline.get("escalation") or {}
        queued = offline["source"] == "local" and escalation.get("status") not in (None, "delivered")
        steps.append(
            SmokeStep(
                "edge: offline, queued and answered locally",
                queued,
                f"{offline['source']}, escalation {escalation.get('status')}: {_why(offline)}",
            )
        )
        if not escalation.get("id"):
            steps.append(SmokeStep("edge: delivered after the gateway returned", False, "nothing was queued"))
            return steps
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = client.get(f"/api/escalations/{escalation['id']}").json()
            if status.get("status") in ("delivered", "rejected"):
                break
            time.sleep(1)
        steps.append(
            SmokeStep(
                "edge: delivered after the gateway returned",
                status.get("status") == "delivered" and bool(status.get("answer")),
                f"{status.get('status')} after {status.get('attempts')} attempt(s)",
            )
        )
    return steps
