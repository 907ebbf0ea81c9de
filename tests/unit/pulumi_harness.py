"""Run a stack's program under Pulumi's own unit-test mocks and keep what the engine would have been sent.

`run_program(build)` calls `build()` (a stack's `program.build(...)` with its arguments bound) inside the Pulumi
runtime with a `RecordingMonitor`: every resource registration is kept as the engine would receive it, inputs
serialised (`raw`: secrets still inside their envelope) and deserialised (`inputs`), with the options that matter
(provider, protect, depends_on, property dependencies, additional secret outputs, custom timeouts). The program's
exports come back resolved, each with whether it is a secret and whether it was known (preview leaves outputs of
resources not yet created unknown).

`MembriaMocks` stands in for the engine's providers: a resource's outputs echo its inputs, plus the few computed
values the programs read (`arn` for S3 buckets, canned outputs for the dynamic providers); the
`vault:kv/getSecretV2` invoke answers with canary values, so `leaks()` can look for them in everything recorded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from google.protobuf.json_format import MessageToDict
from pulumi.runtime.mocks import MockCallArgs, MockMonitor, MockResourceArgs
from pulumi.runtime.settings import SETTINGS
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

# What the engine puts around a secret value on the wire (pulumi.runtime.rpc._special_secret_sig).
SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"

CANARY_ACCESS_KEY = "AKIACANARY0ACCESS0KEY"
CANARY_SECRET_KEY = "canary-secret-key-0f7c2b9e4d1a"
CANARY_VAULT_TOKEN = "hvs.canary-vault-token-5e3d"
CANARY_SECRET_ID = "canary-approle-secret-id-9a7e"
CANARIES = [CANARY_ACCESS_KEY, CANARY_SECRET_KEY, CANARY_VAULT_TOKEN, CANARY_SECRET_ID]
APPROLE_SECRET_ENV = "MEMBRIA_VAULT_SECRET_ID"  # examples/rack.yaml's secret_id_env


def lab_state_with_openbao(root: Path) -> Path:
    """A lab state directory holding what `appliance lab up` leaves for the stacks' Vault provider: OpenBao's
    root token (a canary) and its CA."""
    secrets = root / "secrets"
    (secrets / "openbao-tls").mkdir(parents=True, exist_ok=True)
    (secrets / "openbao-root-token").write_text(CANARY_VAULT_TOKEN + "\n")
    (secrets / "openbao-tls" / "vault-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    return root


@dataclass
class Registered:
    """One resource as the engine would have received it."""

    urn: str
    type: str
    name: str
    custom: bool
    raw: dict[str, Any]  # the serialised inputs; secrets inside their envelope
    inputs: dict[str, Any]  # deserialised (what Mocks.new_resource saw); secrets plain
    provider: str
    parent: str
    protect: bool
    dependencies: list[str]
    property_dependencies: dict[str, list[str]]
    additional_secret_outputs: list[str]
    custom_timeouts: dict[str, str]
    state: dict[str, Any] = field(default_factory=dict)  # what the mock returned as outputs


class RecordingMonitor(MockMonitor):
    """A MockMonitor that keeps every RegisterResource request and every component's registered outputs."""

    def __init__(self, mocks: MembriaMocks) -> None:
        super().__init__(mocks)
        self.registered: list[Registered] = []
        self.component_outputs: dict[str, dict[str, Any]] = {}  # urn -> serialised outputs

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type == "pulumi:pulumi:Stack":
            return response
        from pulumi.runtime import rpc

        urn = response.urn
        self.registered.append(
            Registered(
                urn=urn,
                type=request.type,
                name=request.name,
                custom=bool(request.custom),
                raw=MessageToDict(request.object),
                inputs=rpc.deserialize_properties(request.object),
                provider=request.provider,
                parent=request.parent,
                protect=bool(request.protect),
                dependencies=list(request.dependencies),
                property_dependencies={k: list(v.urns) for k, v in request.propertyDependencies.items()},
                additional_secret_outputs=list(request.additionalSecretOutputs),
                custom_timeouts=MessageToDict(request.customTimeouts),
                state=dict(self.resources[urn].state) if urn in self.resources else {},
            )
        )
        return response

    def RegisterResourceOutputs(self, request: Any) -> Any:
        self.component_outputs[request.urn] = MessageToDict(request.outputs)
        return super().RegisterResourceOutputs(request)

    # --- queries for assertions ---------------------------------------------------------------------------

    def of_type(self, type_: str) -> list[Registered]:
        return [r for r in self.registered if r.type == type_]

    def one(self, type_: str, name: str | None = None) -> Registered:
        found = [r for r in self.of_type(type_) if name is None or r.name == name]
        if len(found) != 1:
            names = [r.name for r in self.of_type(type_)]
            raise AssertionError(f"expected one {type_} named {name!r}, found {len(found)} among {names}")
        return found[0]

    def by_urn(self, urn: str) -> Registered:
        for r in self.registered:
            if r.urn == urn:
                return r
        raise AssertionError(f"no resource {urn}")

    def types(self) -> list[str]:
        return [r.type for r in self.registered]


class MembriaMocks(pulumi.runtime.Mocks):
    """Outputs = inputs, plus what the programs read back; canary secrets from Vault's KV invoke.

    `outputs` maps a resource type to a function of (name, inputs) returning extra outputs: the dynamic
    providers' tests add the values their provider would compute (a recap, an image's sha256)."""

    def __init__(self, outputs: Mapping[str, Callable[[str, dict[str, Any]], dict[str, Any]]] | None = None) -> None:
        self.outputs = dict(outputs or {})
        self.calls: list[MockCallArgs] = []

    def new_resource(self, args: MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        state = dict(args.inputs)
        if args.typ.startswith("aws:s3/bucket:Bucket") and "bucket" in state:
            state.setdefault("arn", f"arn:aws:s3:::{state['bucket']}")
        if args.typ in self.outputs:
            state.update(self.outputs[args.typ](args.name, args.inputs))
        return f"{args.name}-id", state

    def call(self, args: MockCallArgs) -> dict[str, Any]:
        self.calls.append(args)
        if args.token == "vault:kv/getSecretV2:getSecretV2":
            data = {"access_key": CANARY_ACCESS_KEY, "secret_key": CANARY_SECRET_KEY}
            return {**args.args, "data": data, "data_json": json.dumps(data)}
        return dict(args.args)


@dataclass(frozen=True)
class Export:
    value: Any  # None when not known (preview)
    secret: bool
    known: bool


async def _resolve(exports: Mapping[str, Any]) -> dict[str, Export]:
    resolved: dict[str, Export] = {}
    for key, value in exports.items():
        output = pulumi.Output.from_input(value)
        resolved[key] = Export(await output.future(), await output.is_secret(), await output.is_known())
    return resolved


_LOOP: list[asyncio.AbstractEventLoop] = []


def _event_loop() -> asyncio.AbstractEventLoop:
    """One loop for every program this process runs (a loop per run would hold its file descriptors)."""
    if not _LOOP or _LOOP[0].is_closed():
        _LOOP[:] = [asyncio.new_event_loop()]
    return _LOOP[0]


def run_program(
    build: Callable[[], Mapping[str, Any]],
    *,
    mocks: MembriaMocks | None = None,
    stack: str = "test",
    project: str = "membria",
    preview: bool = False,
) -> tuple[dict[str, Export], RecordingMonitor]:
    """Run `build()` under the mocks; its returned mapping is treated as the stack's exports."""
    # The Pulumi runtime creates futures on the current event loop; an earlier test's `asyncio.run` leaves none.
    asyncio.set_event_loop(_event_loop())
    monitor = RecordingMonitor(mocks or MembriaMocks())
    pulumi.runtime.set_mocks(monitor.mocks, project=project, stack=stack, preview=preview, monitor=monitor)
    SETTINGS.rpc_manager.clear()
    SETTINGS.outputs.clear()
    holder: dict[str, dict[str, Export]] = {}

    def program() -> None:
        holder["exports"] = _sync_await(_resolve(build()))

    _sync_await(run_pulumi_func(program))
    return holder["exports"], monitor


# --- secret scanning -------------------------------------------------------------------------------------------


def is_secret_envelope(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIG_KEY) == SECRET_SIG


def plain_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in `value` that is not inside a secret envelope, with where it is."""
    if is_secret_envelope(value):
        return
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from plain_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from plain_strings(item, f"{path}[{index}]")


def leaks(structures: Mapping[str, Any], canaries: list[str]) -> list[str]:
    """Where any canary appears in plain text (outside a secret envelope): `name:path`."""
    found = []
    for name, structure in structures.items():
        for path, text in plain_strings(structure):
            if any(canary in text for canary in canaries):
                found.append(f"{name}:{path}")
    return found


def recorded(monitor: RecordingMonitor) -> dict[str, Any]:
    """Everything a stack's state would hold from this run: each resource's serialised inputs and the
    components' registered outputs, keyed by URN."""
    everything: dict[str, Any] = {f"inputs {r.urn}": r.raw for r in monitor.registered}
    everything.update({f"outputs {urn}": outputs for urn, outputs in monitor.component_outputs.items()})
    return everything
