"""`appliance edge ask | status | sync`: talk to the edge agent running on this laptop (or in the lab).

The image commands (`keygen`, `verify`, `flash`) live in appliance/cli/edge_image.py and join this group.

The agent listens on 127.0.0.1 (the site's `lab.ports.edge` in the lab) or on a unix socket; `--url` or
`--socket` say which. Every answer says where it came from (local, core, cache) and why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli import edge_image as edge_image_cli
from appliance.cli.common import SiteOption, load
from appliance.cli.output import console
from appliance.errors import BadInput, CheckFailed, MissingEnvironment

app = typer.Typer(
    help=(
        "The edge agent on this laptop: ask it questions, see its state, sync its knowledge with the core.\n\n"
        "It answers from its own knowledge and model when it is confident; it escalates to the core through "
        "the gateway when not, or when the question needs another department; sensitive questions never leave.\n\n"
        "Laptop images: `keygen` (once, the signing key into Vault), `verify IMAGE` (signature, partitions, LUKS2 "
        "header, root filesystem decrypted offline) and `flash IMAGE DISK` (mapped ranges only, read back)."
    ),
    no_args_is_help=True,
)

UrlOption = typer.Option(
    None, "--url", envvar="MEMBRIA_EDGE_URL", help="The agent's local API (default: the site's lab edge port)."
)
SocketOption = typer.Option(None, "--socket", help="The agent's unix socket, instead of --url.")
JsonOption = typer.Option(False, "--json", help="Print the raw JSON.")


def _client(site_file: Path, url: str | None, socket: Path | None, timeout: float) -> httpx.Client:
    if socket is not None:
        if not socket.exists():
            raise MissingEnvironment(f"no edge agent socket at {socket}", hint="is the agent running?")
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://localhost", timeout=timeout
        )
    if url is None:
        site = load(site_file)
        url = f"http://{site.lab.host}:{site.lab.ports.edge}"
    return httpx.Client(base_url=url, timeout=timeout)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TimeoutException as exc:
        raise CheckFailed(f"the edge agent at {client.base_url} did not answer in time") from exc
    except httpx.HTTPError as exc:
        raise MissingEnvironment(
            f"cannot reach the edge agent at {client.base_url}: {exc}", hint="start it with `appliance lab up`"
        ) from exc
    try:
        body = response.json()
    except ValueError as exc:
        raise CheckFailed(f"the edge agent answered HTTP {response.status_code} without JSON") from exc
    if response.status_code >= 400:
        message = (body.get("error") or {}).get("message", response.text[:300]) if isinstance(body, dict) else body
        error = BadInput if response.status_code in (400, 404, 413, 422) else CheckFailed
        raise error(f"edge agent: {message}")
    return body


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question, in quotes."),
    site_file: Path = SiteOption,
    url: str | None = UrlOption,
    socket: Path | None = SocketOption,
    temperature: float | None = typer.Option(None, min=0, max=2, help="Sampling temperature (profile default)."),
    max_tokens: int | None = typer.Option(None, min=1, max=1024, help="Longest answer, in tokens."),
    wait: float | None = typer.Option(None, min=0, help="Seconds to wait for the core when escalating."),
    share: bool = typer.Option(False, "--share", help="Share the answer and its reasoning with the core."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not answer from the answer cache."),
    as_json: bool = JsonOption,
) -> None:
    """Ask the agent; prints the answer, where it came from and why."""
    body = {
        "question": question,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "wait_seconds": wait,
        "share": share,
        "use_cache": not no_cache,
    }
    with _client(site_file, url, socket, timeout=600) as client:
        answer = _call(client, "POST", "/api/ask", json=body)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    console.print(escape(answer["answer"]) or "[dim](empty answer)[/]")
    decision = answer.get("decision", {})
    reasons = "; ".join(f"{r['code']}: {r.get('detail', '')}" for r in decision.get("reasons", []))
    confidence = decision.get("confidence")
    conf = f"confidence {confidence:.2f}, " if isinstance(confidence, float) else ""
    console.print(f"[dim]source: [bold]{answer['source']}[/bold] ({conf}{escape(reasons)})[/]")
    escalation = answer.get("escalation")
    if escalation and answer["source"] != "core":
        console.print(
            f"[dim]escalation {escalation['id']}: {escalation['status']}; the local answer is shown meanwhile[/]"
        )


@app.command()
def status(
    site_file: Path = SiteOption,
    url: str | None = UrlOption,
    socket: Path | None = SocketOption,
    as_json: bool = JsonOption,
) -> None:
    """The agent's profile, model, knowledge, outbox and last sync."""
    with _client(site_file, url, socket, timeout=30) as client:
        state = _call(client, "GET", "/api/status")
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    table = Table(title=f"edge agent {escape(state['device'])}", show_header=False)
    table.add_row("profile", escape(f"{state['profile']} ({', '.join(state['departments'])})"))
    table.add_row("model", escape(f"{state['model']['name']} (loaded: {state['model']['loaded']})"))
    table.add_row("theta", str(state["theta"]))
    k = state["knowledge"]
    table.add_row("knowledge", f"{k.get('chunks', 0)} chunks, {k.get('documents', 0)} documents")
    pinned = state.get("pinned")
    table.add_row("pinned (CAG)", f"{pinned['chunks']} chunks, {pinned['tokens']} tokens" if pinned else "none")
    table.add_row("outbox", escape(", ".join(f"{key} {value}" for key, value in state["outbox"].items()) or "empty"))
    last = state["sync"].get("last") or {}
    table.add_row("last sync", escape(json.dumps(last)) if last else "never")
    table.add_row("gateways", escape(", ".join(state["gateways"])))
    console.print(table)


@app.command()
def sync(
    site_file: Path = SiteOption,
    url: str | None = UrlOption,
    socket: Path | None = SocketOption,
    as_json: bool = JsonOption,
) -> None:
    """Sync now: push this laptop's changes, pull the core's (a patch, or a snapshot when large)."""
    with _client(site_file, url, socket, timeout=600) as client:
        report = _call(client, "POST", "/api/sync")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console.print(
        f"pushed {report['pushed']}, pulled {report['pulled']} ({report['mode']}, {report['bytes']} bytes), "
        f"{report['invalidated_answers']} cached answers invalidated, {report['seconds']:.2f} s"
    )


edge_image_cli.register(app)
