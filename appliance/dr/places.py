"""The two kinds of place DR reads from and restores into: the site itself, and an empty scratch target.

`SitePlace` is the site's live services through `Backends` (production or lab, one code path).
`ScratchPlace` is a directory with nothing in it yet: a fresh chDB, a fresh Milvus Lite file, SQLite
files and, where the site's Vault is embedded, a fresh OpenBao with the lab's seal. Drills restore there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.backends import Backends
from appliance.dr.stores.base import Place

if TYPE_CHECKING:
    import hvac
    from clickhouse_connect.driver.client import Client as ClickHouseClient
    from pymilvus import MilvusClient

# Where the runtime keeps its SQLite state on a core node (the `core_server` and `gateway` roles).
PRODUCTION_SQLITE = {
    "gateway-idempotency": Path("/var/lib/membria/gateway/idempotency.sqlite"),
    "sync-hub": Path("/var/lib/membria/core/sync-hub.sqlite"),
}


class SitePlace(Place):
    def __init__(self, backends: Backends, *, wait_s: float = 30.0) -> None:
        self.backends = backends
        self.wait_s = wait_s

    def audit_db(self) -> ClickHouseClient:
        from appliance.audit_log import open_audit_db

        return open_audit_db(self.backends, wait_s=self.wait_s)

    def vectors(self) -> MilvusClient:
        return self.backends.vectors()

    def sqlite_files(self) -> dict[str, Path]:
        if self.backends.state is None:
            return dict(PRODUCTION_SQLITE)
        data = self.backends.state.data_dir
        return {
            "gateway-idempotency": data / "gateway" / "idempotency.sqlite",
            "sync-hub": data / "sync-hub.sqlite",
        }

    def vault(self) -> hvac.Client | None:
        return self.backends.vault()


class ScratchPlace(Place):
    """An empty restore target in `root`. Close it to stop what it started (its OpenBao)."""

    def __init__(self, root: Path, backends: Backends) -> None:
        self.root = root
        self.backends = backends
        self._vault: Any = None
        root.mkdir(parents=True, exist_ok=True)

    def audit_db(self) -> ClickHouseClient:
        from runtime.common.audit import client_factory

        return client_factory(f"chdb://{self.root / 'chdb'}")()

    def vectors(self) -> MilvusClient:
        from pymilvus import MilvusClient

        return MilvusClient(str(self.root / "milvus.db"))

    def sqlite_files(self) -> dict[str, Path]:
        return {name: self.root / "state" / f"{name}.sqlite" for name in SitePlace(self.backends).sqlite_files()}

    def vault(self) -> hvac.Client | None:
        if self._vault is None:
            from appliance.dr.scratch_vault import ScratchVault

            self._vault = ScratchVault.start(self.root / "openbao", self.backends)
        return self._vault.client() if self._vault is not None else None

    def close(self) -> None:
        if self._vault is not None:
            self._vault.stop()
            self._vault = None
