"""`lab up | status | down`: start, check and stop the embedded appliance on this machine.

`up` is idempotent: services that are running and healthy are left alone, bootstrap steps only create
what is missing. If `up` fails half-way, whatever this call started is stopped again, so a failed `up`
never leaves a half lab behind. `down` stops recorded processes and then any stray that carries the
lab's environment marker (a CLI killed between spawn and pid file).

With `lab.core: host` (the default) the core server, gateway and llama.cpp are not lab processes: core-1 is
a systemd-nspawn test host that `appliance core apply` provisions with the roles (`core_node.py`), and the
lab's OpenBao and S3 reach it through relays on the lab bridge. `lab.core: processes` runs them here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.audit_log import open_audit_db
from appliance.backends import Backends
from appliance.errors import CheckFailed, MissingEnvironment, ServiceError
from appliance.lab import bootstrap, edge_smoke, process, smoke
from appliance.lab.core_node import LabCoreNode, bridge_relays, is_host_lab
from appliance.lab.dr_shipper import dr_services, heartbeat_health
from appliance.lab.edge_agent import edge_services
from appliance.lab.runtime_services import CoreServer, Gateway, runtime_services
from appliance.lab.services import EmbeddedService, Health, OpenBao, process_services
from appliance.lab.state import LabState
from appliance.site import Site

Progress = Callable[[str], None]
NODE_DR_TIMEOUT_S = 150.0  # the timer fires every 30 s; the first pass ships the corpus


def _quiet(_: str) -> None:
    pass


@dataclass
class UpReport:
    started: list[str] = field(default_factory=list)
    already_running: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)
    health: list[Health] = field(default_factory=list)
    ingest: smoke.IngestSummary | None = None
    smoke: list[smoke.SmokeStep] = field(default_factory=list)
    edge_sync: dict[str, object] | None = None

    @property
    def changed(self) -> bool:
        return bool(self.started or self.bootstrap or (self.ingest and self.ingest.changed))


def _start(service: EmbeddedService, progress: Progress) -> None:
    if service.port_taken():
        raise MissingEnvironment(
            f"port {service.port} for {service.name} is taken by another program",
            hint=f"free it or change lab.ports.{service.name} in the site file",
        )
    progress(f"preparing {service.name}")
    service.prepare()
    progress(f"starting {service.name} on {service.host}:{service.port}")
    record = process.spawn(service.state, service.name, service.argv(), env=service.env())
    last: list[Health] = []

    def healthy() -> bool:
        if not record.alive():
            return True  # stop waiting: it died
        last[:] = [service.check()]
        return last[0].ok

    process.wait_until(healthy, timeout=service.start_timeout, interval=0.5)
    if not record.alive():
        raise ServiceError(f"{service.name} exited during start-up", hint=f"see its log: {record.log}")
    if not last or not last[0].ok:
        detail = last[0].detail if last else "no answer"
        raise ServiceError(
            f"{service.name} did not become healthy within {service.start_timeout:.0f}s: {detail}",
            hint=f"see its log: {record.log}",
        )


def up(site: Site, state: LabState, progress: Progress = _quiet) -> UpReport:
    report = UpReport()
    started_now: list[EmbeddedService] = []
    # `lab.core: host`: core-1 is a test host provisioned by `core apply`; else the runtime runs as processes.
    node = LabCoreNode(site, state) if is_host_lab(site) else None  # a bad node address stops here (exit 2)
    node_started = False

    def ensure(services: list[EmbeddedService]) -> None:
        for service in services:
            if process.running(state, service.name) is not None:
                health = service.check()
                if health.ok:
                    report.already_running.append(service.name)
                    continue
                progress(f"{service.name} is running but unhealthy ({health.detail}); restarting it")
                process.stop(state, service.name)
            started_now.append(service)
            _start(service, progress)
            report.started.append(service.name)

    try:
        ensure(process_services(site, state))
        progress("bootstrapping PKI, secrets and buckets")
        report.bootstrap = bootstrap.run(site, state)
        # The runtime needs what the bootstrap made (certificates, license, keys in Vault).
        if node is None:
            ensure(runtime_services(site, state))
        else:
            ensure(bridge_relays(site, state))
            # A fresh OpenBao knows nothing of the node's Vault identity: apply again (as after a rebuild).
            fresh_vault = OpenBao.name in report.started
            if not fresh_vault and node.health().ok and Gateway(site, state).check().ok:
                report.already_running.append(node.label)
            else:
                node_started = True
                node.up(progress)
                report.started.append(node.label)
        report.health = status(site, state, edge=False)  # the edge agent starts after the corpus is in
        if all(h.ok for h in report.health):
            progress(f"loading {site.lab.corpus_dir} through the gateway")
            report.ingest = smoke.ingest_corpus(site, state, site.lab.corpus_dir)
            progress("smoke: an answer, a refusal and their audit rows")
            lookup = (lambda ids: node.audit_probe(ids)["decisions"]) if node is not None else None
            report.smoke = smoke.run(site, state, audit_lookup=lookup)
            # The laptop comes last: it pulls the knowledge just loaded on its first sync.
            ensure(edge_services(site, state))
            if edge_services(site, state):
                progress("edge agent: first sync, then a local, an escalated and an offline question")
                report.edge_sync = edge_smoke.first_sync(site, state)
                # The offline period stops the gateway: only on an `up` that started something, never to a
                # lab that is already up and in use.
                report.smoke += edge_smoke.run(
                    site, state, progress, _gateway_outage(site, state, node, progress) if report.started else None
                )
                report.health = status(site, state)  # the edge agent too, and the gateway after its restart
            # DR shipping last: its first pass ships what the smoke and the corpus wrote.
            if dr_services(site, state):
                progress("DR shipper: first pass to the S3 buckets")
                ensure(dr_services(site, state))
                report.health = status(site, state)
            elif node is not None and site.lab.dr_shipper:
                progress(f"DR: waiting for {node.label}'s shipping timer to finish a pass")
                process.wait_until(lambda: _node_dr_health(site, node).ok, timeout=NODE_DR_TIMEOUT_S, interval=3)
                report.health = status(site, state)
    except BaseException:
        # All or nothing: do not leave what this call started running behind a failed `up`.
        for service in reversed(started_now):
            process.stop(state, service.name)
        if node is not None and node_started:
            node.stop()  # its tree stays, with the apply's log under logs/
        raise
    failing = [h for h in report.health if not h.ok]
    if failing:
        raise ServiceError("lab is up but unhealthy: " + "; ".join(f"{h.name}: {h.detail}" for h in failing))
    failed_steps = [s for s in report.smoke if not s.ok]
    if failed_steps:
        raise CheckFailed("lab smoke failed: " + "; ".join(f"{s.name}: {s.detail}" for s in failed_steps))
    return report


def _gateway_outage(
    site: Site, state: LabState, node: LabCoreNode | None, progress: Progress
) -> edge_smoke.GatewayOutage:
    if node is not None:
        return edge_smoke.GatewayOutage(stop=node.stop_gateway, start=lambda: node.start_gateway(progress))
    return edge_smoke.GatewayOutage(
        stop=lambda: _stop(state, Gateway.name), start=lambda: _start(Gateway(site, state), progress)
    )


def _stop(state: LabState, name: str) -> None:
    process.stop(state, name)


def _node_dr_health(site: Site, node: LabCoreNode) -> Health:
    endpoint = f"{node.label}: membria-dr-ship.timer, every {site.dr.ship_interval_seconds} s"
    return heartbeat_health("dr-shipping", endpoint, node.dr_heartbeat(), site.dr.ship_interval_seconds)


def _in_process_health(site: Site, state: LabState) -> list[Health]:
    """Milvus Lite and chDB live inside their users' processes; check them with a real query."""
    if is_host_lab(site):
        return _node_store_health(site, state)
    backends = Backends(site, state)
    out: list[Health] = []
    core = CoreServer(site, state)
    if site.services.vectors.backend == "embedded" and process.running(state, core.name) is not None:
        # Milvus Lite admits one process per file: while the core server holds it, ask the core server.
        out.append(core.milvus_health(str(backends.milvus_lite_path())))
    elif site.services.vectors.backend == "embedded":
        try:
            client = backends.vectors()
            try:
                names = client.list_collections()
            finally:
                client.close()
            out.append(
                Health("vectors", True, f"Milvus Lite, {len(names)} collection(s)", str(backends.milvus_lite_path()))
            )
        except Exception as exc:  # noqa: BLE001 - any failure of the embedded store is a failed check
            out.append(Health("vectors", False, f"Milvus Lite: {exc}", str(backends.milvus_lite_path())))
    if site.services.audit_db.backend == "embedded":
        out.append(_chdb_health(backends))
    return out


def _node_store_health(site: Site, state: LabState) -> list[Health]:
    """The stores on the core node: Milvus Lite as its core server sees it, chDB asked on the node."""
    node = LabCoreNode(site, state)
    out: list[Health] = []
    if site.services.vectors.backend == "embedded":
        out.append(CoreServer(site, state).milvus_health(f"{node.label}:/var/lib/membria/vectors"))
    if site.services.audit_db.backend == "embedded":
        where = f"{node.label}:/var/lib/membria/audit_db"
        try:
            version = node.audit_probe([])["version"]
        except (CheckFailed, ServiceError, ValueError, KeyError) as exc:
            detail = exc.message if isinstance(exc, CheckFailed | ServiceError) else str(exc)
            if "there is no embedded audit DB" in detail:
                return [*out, Health("audit_db", True, "chDB (created by the gateway's first request)", where)]
            return [*out, Health("audit_db", False, detail, where)]
        out.append(Health("audit_db", True, f"chDB (ClickHouse {version}) on the core node", where))
    return out


def _chdb_health(backends: Backends) -> Health:
    """chDB admits one process at a time and the gateway takes it for each audit batch: wait a turn."""
    endpoint = f"chdb://{backends.chdb_path()}"
    try:
        client = open_audit_db(backends, wait_s=3)
    except (CheckFailed, ServiceError) as exc:
        if not backends.chdb_path().exists():
            return Health("audit_db", True, "chDB (created by the gateway's first request)", endpoint)
        return Health("audit_db", False, exc.message, endpoint)
    try:
        version = client.query("SELECT version()").result_rows[0][0]
    except Exception as exc:  # noqa: BLE001 - any failure of the embedded store is a failed check
        return Health("audit_db", False, f"chDB: {exc}", endpoint)
    finally:
        client.close()
    return Health("audit_db", True, f"chDB (ClickHouse {version})", endpoint)


def all_services(site: Site, state: LabState, *, edge: bool = True) -> list[EmbeddedService]:
    """Every process the lab runs, in start order."""
    if is_host_lab(site):
        core = process_services(site, state) + bridge_relays(site, state)
    else:
        core = process_services(site, state) + runtime_services(site, state)
    return core + edge_services(site, state) + dr_services(site, state) if edge else core


def status(site: Site, state: LabState, *, edge: bool = True) -> list[Health]:
    out: list[Health] = []
    for service in all_services(site, state, edge=edge):
        if process.running(state, service.name) is None:
            out.append(Health(service.name, False, "not running", service.endpoint))
        else:
            out.append(service.check())
    if is_host_lab(site):
        node = LabCoreNode(site, state)
        out.append(node.health())
        if not node.host.running():  # nothing on it can answer: say so at once rather than time out
            down = [s.name for s in runtime_services(site, state)] + ["dr-shipping"] * (edge and site.lab.dr_shipper)
            return out + [Health(name, False, f"{node.label} is not running", node.host.address) for name in down]
        out += [service.check() for service in runtime_services(site, state)]  # on the node, over mTLS
        if edge and site.lab.dr_shipper:
            out.append(_node_dr_health(site, node))
    return out + _in_process_health(site, state)


@dataclass
class DownReport:
    stopped: list[str] = field(default_factory=list)
    strays_killed: int = 0


def down(site: Site, state: LabState) -> DownReport:
    report = DownReport()
    for service in reversed(all_services(site, state)):
        if process.stop(state, service.name):
            report.stopped.append(service.name)
    if is_host_lab(site):
        node = LabCoreNode(site, state)
        if node.stop():
            report.stopped.append(f"{node.label} (test host {node.host.name}; its tree stays in {node.host.home})")
        node.network.down()
    report.strays_killed = process.kill_strays(state)
    # The dev OpenBao starts empty on every start: its token and TLS files mean nothing after a stop.
    bao = OpenBao(site, state)
    bao.token_file.unlink(missing_ok=True)
    return report
