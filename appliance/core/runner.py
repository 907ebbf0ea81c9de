"""ansible-runner around `roles/playbooks/core.yml`: events to a callback and a JSON log, a recap per host.

Each run is one ansible-runner invocation with its own artifact directory,
`<private_data_dir>/artifacts/<ident>/` (the last `keep_runs` are kept); the run's event log is
`events.jsonl` in it, one JSON event a line.

Secrets reach the play only through `envvars` (the AppRole secret id). ansible-runner would write them in
three places; each is closed here:
- `env/envvars` in the private data dir: not written (`suppress_env_files`);
- `artifacts/<ident>/command`, which holds the whole environment of the run: rewritten without the values
  when the run ends (and any left by an interrupted run, before the next one starts);
- the event log: every value of `envvars` is masked in every event before it is written or passed on,
  on top of ansible's own `no_log` censoring. Raw per-event files (`job_events/`) are not kept.
"""

from __future__ import annotations

import base64
import difflib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import ansible_runner

import appliance
from appliance.errors import MissingEnvironment
from appliance.site import Site
from runtime.common import atomic

REPO_ROOT = Path(appliance.__file__).resolve().parent.parent
MASK = "********"
KEEP_RUNS = 10
# Values shorter than this are not masked: masking "1" or "yes" everywhere would garble the log.
MIN_MASKED = 4
STATUS_DIR = "/var/lib/membria/provision"
SETTINGS = {"suppress_ansible_output": True, "suppress_output_file": True}
HOST_EVENTS = ("runner_on_ok", "runner_on_failed", "runner_on_skipped", "runner_on_unreachable")

EventHandler = Callable[[dict[str, Any]], None]


def roles_dir() -> Path:
    """`<repo>/roles`: beside the `appliance` package (a source checkout or an editable install)."""
    path = REPO_ROOT / "roles"
    if not path.is_dir():
        raise MissingEnvironment(
            f"the Ansible roles are not at {path}", hint="run from a checkout of the repository (pip install -e .)"
        )
    return path


def core_playbook() -> Path:
    path = roles_dir() / "playbooks" / "core.yml"
    if not path.is_file():
        raise MissingEnvironment(f"the core playbook is not at {path}")
    return path


def search_path() -> str:
    """PATH for the run with this interpreter's bin directory first: a venv's CLI runs the venv's
    ansible-playbook without being activated (ansible-runner finds the command on PATH)."""
    here = Path(sys.executable).parent
    path = os.pathsep.join([str(here), os.environ.get("PATH", os.defpath)])
    if shutil.which("ansible-playbook", path=path) is None:
        raise MissingEnvironment("ansible-playbook is not installed", hint="pip install ansible-core")
    return path


# --- results -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostRecap:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0

    @property
    def broken(self) -> bool:
        return self.failed > 0 or self.unreachable > 0


@dataclass(frozen=True)
class Change:
    """One changed (or, in check mode, to-be-changed) task or loop item."""

    host: str
    role: str
    task: str
    target: str = ""  # what it touches: a file, a package, a unit ("" when the result does not say)
    detail: str = ""  # "+3 -1" lines for a file diff


@dataclass(frozen=True)
class Failure:
    host: str
    role: str
    task: str
    message: str
    unreachable: bool = False


@dataclass(frozen=True)
class Note:
    """A role's recorded decision on a node (`/var/lib/membria/provision/<role>.status`), e.g. a skip inside
    a container. The playbook's last tasks slurp those files; their results are read here."""

    host: str
    role: str
    text: str


@dataclass
class RunResult:
    rc: int
    status: str
    recap: dict[str, HostRecap]
    changes: list[Change]
    failures: list[Failure]
    errors: list[str]  # ansible's own errors (a missing role, a syntax error): no host failed, the run did
    notes: list[Note]
    events_path: Path
    artifacts_dir: Path
    elapsed_s: float = 0.0

    @property
    def broken_hosts(self) -> list[str]:
        return sorted(host for host, recap in self.recap.items() if recap.broken)

    @property
    def tasks(self) -> int:
        """Task results over all hosts (ok includes changed)."""
        return sum(r.ok + r.failed + r.skipped + r.unreachable for r in self.recap.values())

    def to_wire(self) -> dict[str, Any]:
        return {
            "rc": self.rc,
            "status": self.status,
            "recap": {host: asdict(r) for host, r in sorted(self.recap.items())},
            "changes": [asdict(c) for c in self.changes],
            "failures": [asdict(f) for f in self.failures],
            "errors": self.errors,
            "notes": [asdict(n) for n in self.notes],
            "events_path": str(self.events_path),
            "elapsed_s": round(self.elapsed_s, 2),
        }


@dataclass
class EventSummary:
    """Recap, changes and failures from a stream of runner events (live, or read back from events.jsonl)."""

    recap: dict[str, HostRecap] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def feed(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        data = event.get("event_data") or {}
        if kind == "playbook_on_stats":
            self.recap = recap_from_stats(data)
        elif kind == "runner_on_ok":
            self.changes.extend(_changes(data))
            self.notes.extend(_notes(data))
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            res = data.get("res") or {}
            self.failures.append(
                Failure(
                    host=str(data.get("host", "")),
                    role=_role(data),
                    task=str(data.get("task", "")),
                    message=_message(res),
                    unreachable=kind == "runner_on_unreachable",
                )
            )
        elif kind in ("verbose", "error") and "ERROR!" in str(event.get("stdout", "")):
            self.errors.append(str(event["stdout"]).strip())


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def summarize(events: Iterable[Mapping[str, Any]]) -> EventSummary:
    summary = EventSummary()
    for event in events:
        summary.feed(event)
    return summary


def recap_from_stats(data: Mapping[str, Any]) -> dict[str, HostRecap]:
    """`playbook_on_stats` holds one host -> count map per outcome."""
    fields = {
        "ok": "ok",
        "changed": "changed",
        "failed": "failures",
        "unreachable": "dark",
        "skipped": "skipped",
        "rescued": "rescued",
        "ignored": "ignored",
    }
    hosts: set[str] = set()
    for key in [*fields.values(), "processed"]:
        hosts.update((data.get(key) or {}).keys())
    return {
        host: HostRecap(**{name: int((data.get(key) or {}).get(host, 0)) for name, key in fields.items()})
        for host in sorted(hosts)
    }


def _role(data: Mapping[str, Any]) -> str:
    return str(data.get("role") or "-")


def _message(res: Mapping[str, Any]) -> str:
    for key in ("msg", "stderr", "module_stderr", "censored"):
        if res.get(key):
            return str(res[key]).strip().splitlines()[0][:300]
    return "failed"


def _changes(data: Mapping[str, Any]) -> list[Change]:
    res = data.get("res") or {}
    host, role, task = str(data.get("host", "")), _role(data), str(data.get("task", ""))
    items = res.get("results")
    results = [r for r in items if isinstance(r, dict)] if isinstance(items, list) and items else [res]
    return [Change(host, role, task, *_target(r)) for r in results if r.get("changed")]


def _notes(data: Mapping[str, Any]) -> list[Note]:
    res = data.get("res") or {}
    items = res.get("results")
    results = [r for r in items if isinstance(r, dict)] if isinstance(items, list) else [res]
    notes: list[Note] = []
    for r in results:
        source = str(r.get("source", ""))
        if source.startswith(STATUS_DIR + "/") and source.endswith(".status") and "content" in r:
            try:
                text = base64.b64decode(r["content"]).decode("utf-8", "replace")
            except ValueError:
                continue
            role = source.rsplit("/", 1)[-1].removesuffix(".status")
            notes.extend(Note(str(data.get("host", "")), role, line) for line in status_lines(text))
    return notes


def status_lines(text: str) -> list[str]:
    """A status file's decisions, one line each: JSON ({reason, skipped_items: [{item, reason}]}) or text."""
    try:
        record = json.loads(text)
    except ValueError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(record, dict):
        return [text.strip()] if text.strip() else []
    lines = [str(record["reason"])] if record.get("reason") else []
    for item in record.get("skipped_items") or []:
        if isinstance(item, dict):
            lines.append(f"skipped {item.get('item', '?')}: {item.get('reason', '')}".rstrip(": "))
    return lines


def _target(res: Mapping[str, Any]) -> tuple[str, str]:
    """(what the result touched, a +/- line count for a file diff)."""
    if res.get("censored"):
        return "(hidden: no_log)", ""
    diffs = res.get("diff")
    for diff in diffs if isinstance(diffs, list) else [diffs] if isinstance(diffs, dict) else []:
        header = diff.get("after_header") or diff.get("before_header")
        if header:
            return str(header), _line_delta(diff.get("before"), diff.get("after"))
    for key in ("dest", "path", "name", "_ansible_item_label", "item"):
        value = res.get(key)
        if value:
            return (", ".join(map(str, value)) if isinstance(value, list) else str(value)), ""
    return "", ""


def _line_delta(before: Any, after: Any) -> str:
    if not isinstance(before, str) or not isinstance(after, str):
        return ""
    added = removed = 0
    for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0):
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return f"+{added} -{removed}"


# --- masking -------------------------------------------------------------------------------------------------


def masker(secrets: Iterable[str]) -> Callable[[Any], Any]:
    """A function that returns a copy of a JSON value with every occurrence of a secret replaced by MASK."""
    values = sorted({s for s in secrets if len(s) >= MIN_MASKED}, key=len, reverse=True)

    def mask(value: Any) -> Any:
        if isinstance(value, str):
            for secret in values:
                if secret in value:
                    value = value.replace(secret, MASK)
            return value
        if isinstance(value, Mapping):
            return {k: mask(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        return value

    return mask if values else (lambda value: value)


def scrub_command_files(artifacts: Path) -> None:
    """Drop the environment's values from ansible-runner's `command` record (the names stay, for debugging)."""
    if not artifacts.is_dir():
        return
    for path in artifacts.glob("*/command"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # unreadable: it may still hold the environment
            continue
        env = record.get("env")
        if isinstance(env, dict):
            record["env"] = sorted(env)
            atomic.write_text(path, json.dumps(record), mode=0o600)


# --- the run -------------------------------------------------------------------------------------------------


class _EventLog:
    """The runner's event handler: mask, append to events.jsonl, summarize, pass on."""

    def __init__(self, path: Path, mask: Callable[[Any], Any], on_event: EventHandler | None) -> None:
        self.path = path
        self.mask = mask
        self.on_event = on_event
        self.summary = EventSummary()
        self.callback_error: BaseException | None = None
        self._fh: IO[str] = path.open("w", encoding="utf-8")
        os.chmod(path, 0o600)

    def __call__(self, event: dict[str, Any]) -> bool:
        clean: dict[str, Any] = self.mask(event)
        self._fh.write(json.dumps(clean, default=str) + "\n")
        self._fh.flush()
        self.summary.feed(clean)
        if self.on_event is not None and self.callback_error is None:
            try:
                self.on_event(clean)
            except Exception as exc:  # noqa: BLE001 - a view bug must not abandon ansible mid-run; raised after
                self.callback_error = exc
        return False  # ansible-runner would also keep an unmasked copy in job_events/

    def close(self) -> None:
        self._fh.close()


def run_playbook(
    site: Site | None,
    *,
    check: bool,
    diff: bool,
    limit: str | None,
    tags: list[str] | None,
    on_event: EventHandler | None,
    private_data_dir: Path,
    envvars: Mapping[str, str],
    inventory: Path | None = None,
    playbook: Path | None = None,
    keep_runs: int = KEEP_RUNS,
    forks: int | None = None,
) -> RunResult:
    """Run `playbook` (default: roles/playbooks/core.yml) on `inventory` (default: built from `site` and
    written to its state directory). `envvars` are the secrets for the play's environment: they are masked
    in everything this writes. Returns when the run has ended; a failed host is a result, not an exception."""
    if inventory is None:
        if site is None:
            raise ValueError("run_playbook needs a site or an inventory")
        from appliance.core.inventory import build_inventory, core_state_dir, write_inventory

        inventory = write_inventory(build_inventory(site), core_state_dir(site))
    book = playbook or core_playbook()
    if not book.is_file():
        raise MissingEnvironment(f"no playbook at {book}")
    pdd = Path(private_data_dir).absolute()
    pdd.mkdir(mode=0o700, parents=True, exist_ok=True)
    artifacts = pdd / "artifacts"
    scrub_command_files(artifacts)  # left behind by a run that was killed
    ident = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{'check' if check else 'run'}-{uuid.uuid4().hex[:6]}"
    run_dir = artifacts / ident
    run_dir.mkdir(mode=0o700, parents=True)
    # ansible-runner reads settings from this file only (a `settings=` argument is dropped without it).
    # No stdout file: the masked event log carries the same text.
    atomic.write_text(pdd / "env" / "settings", json.dumps(SETTINGS))
    log = _EventLog(run_dir / "events.jsonl", masker(envvars.values()), on_event)
    env = {
        **envvars,
        "PATH": search_path(),
        "ANSIBLE_HOST_KEY_CHECKING": "True",  # ansible-runner turns it off unless told
        "ANSIBLE_NOCOLOR": "True",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_PIPELINING": "True",
    }
    cmdline = " ".join(flag for flag, wanted in (("--check", check), ("--diff", diff)) if wanted)
    started = datetime.now(UTC)
    try:
        runner = ansible_runner.run(
            private_data_dir=str(pdd),
            ident=ident,
            playbook=str(book.absolute()),
            inventory=str(Path(inventory).absolute()),
            roles_path=str(roles_dir()),
            cmdline=cmdline or None,
            limit=limit or None,
            tags=",".join(tags) if tags else None,
            forks=forks,
            envvars=env,
            event_handler=log,
            quiet=True,
            suppress_env_files=True,
            rotate_artifacts=max(1, keep_runs),
        )
    finally:
        log.close()
        scrub_command_files(artifacts)
    if log.callback_error is not None:
        raise log.callback_error
    summary = log.summary
    return RunResult(
        rc=int(runner.rc if runner.rc is not None else -1),
        status=str(runner.status),
        recap=summary.recap,
        changes=summary.changes,
        failures=summary.failures,
        errors=summary.errors,
        notes=summary.notes,
        events_path=log.path,
        artifacts_dir=run_dir,
        elapsed_s=(datetime.now(UTC) - started).total_seconds(),
    )
