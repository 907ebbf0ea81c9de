"""Fixtures shared by integration tests: real embedded services started once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab import process
from appliance.lab.services import LlamaServer
from appliance.lab.state import LabState
from appliance.site import Site
from tests.conftest import lab_site_data


@pytest.fixture(scope="session")
def llm_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real llama.cpp server on the packaged Gemma 3 270M, on a free port; its OpenAI root URL
    (`http://127.0.0.1:PORT/v1`). The served model id is `appliance.lab.model.MODEL_ALIAS`."""
    root: Path = tmp_path_factory.mktemp("llm")
    site = Site.model_validate(lab_site_data(root / "state"))
    state = LabState.at(site.lab.state_dir)
    server = LlamaServer(site, state)
    server.prepare()
    record = process.spawn(state, server.name, server.argv(), env=server.env())
    try:
        process.wait_until(lambda: not record.alive() or server.check().ok, timeout=server.start_timeout, interval=0.5)
        health = server.check()
        if not health.ok:
            log = Path(record.log).read_text(errors="replace")[-2000:]
            pytest.fail(f"llama.cpp server did not start: {health.detail}\n{log}")
        yield server.endpoint
    finally:
        process.stop(state, server.name)
