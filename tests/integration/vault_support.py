"""The lab's OpenBao and S3 server, bootstrapped as `lab up` does (PKI, secrets, buckets, DR key, license),
without the LLM and the runtime: what the Vault-agent tests need, on free ports and their own state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance.backends import Backends
from appliance.errors import ServiceError
from appliance.lab import bootstrap, process
from appliance.lab.services import EmbeddedService, OpenBao, S3Server
from appliance.lab.state import LabState
from appliance.site import Site
from tests.conftest import lab_site_data, write_site


def _start(service: EmbeddedService) -> None:
    service.prepare()
    record = process.spawn(service.state, service.name, service.argv(), env=service.env())
    process.wait_until(lambda: not record.alive() or service.check().ok, timeout=service.start_timeout, interval=0.2)
    health = service.check()
    if not health.ok:
        log = Path(record.log).read_text(errors="replace")[-3000:]
        raise ServiceError(f"{service.name} did not start: {health.detail}\n{log}")


@contextlib.contextmanager
def bootstrapped_vault(root: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Iterator[Backends]:
    """A lab site under `root` (`edit` may change its data first, e.g. the core node's address), its OpenBao
    and S3 server running and bootstrapped; both stopped on exit. The site file is `root/site.yaml`."""
    data = lab_site_data(root / "state")
    if edit is not None:
        edit(data)
    root.mkdir(parents=True, exist_ok=True)
    write_site(root / "site.yaml", data)
    site = Site.model_validate(data)
    state = LabState.at(site.lab.state_dir)
    services: list[EmbeddedService] = [OpenBao(site, state), S3Server(site, state)]
    try:
        for service in services:
            _start(service)
        bootstrap.run(site, state)
        yield Backends(site, state)
    finally:
        for service in reversed(services):
            process.stop(state, service.name)
