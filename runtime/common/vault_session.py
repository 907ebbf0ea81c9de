"""A requests session for hvac that checks Vault's certificate against a fixed name, not the URL's host.

For a Vault reached through an address its certificate does not carry (the lab's relay to OpenBao, whose dev
certificate names loopback only): the name is sent as SNI and asserted, so verification stays on.
"""

from __future__ import annotations

from typing import Any

import requests
import requests.adapters


class _ServerNameAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, server_name: str) -> None:
        self._server_name = server_name
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs.update(server_hostname=self._server_name, assert_hostname=self._server_name)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


def server_name_session(server_name: str, verify: str | bool) -> requests.Session:
    session = requests.Session()
    session.verify = verify  # hvac takes a given session's own verify over its argument
    session.mount("https://", _ServerNameAdapter(server_name))
    return session
