"""What every protected store does for DR, and the places its data lives (the site, or a restore target).

A store knows four things: how to back itself up fully, how to ship what changed since a watermark,
how to restore a backup and apply shipments into a target, and how to compute per-table checksums on
any place (the live source or a restored copy) so the two can be compared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import hvac
    from clickhouse_connect.driver.client import Client as ClickHouseClient
    from pymilvus import MilvusClient

    from appliance.dr.objects import DrBucket

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TableSum:
    """Rows and a content digest of one table / collection / file."""

    rows: int
    digest: str

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> TableSum:
        return cls(int(value["rows"]), str(value["digest"]))


@dataclass
class StoreBackup:
    """What one store's part of a backup holds; serialized into the backup's manifest."""

    store: str
    objects: dict[str, str]  # object key (relative to the bucket root) -> plaintext sha256 ("" if not ours)
    sums: dict[str, TableSum]
    watermark: dict[str, Any]  # JSON; what a shipment must be newer than to apply on top
    source_time: float  # unix time at which the source was in the backed-up state
    extra: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        out = asdict(self)
        out["sums"] = {k: v.to_wire() for k, v in self.sums.items()}
        return out

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> StoreBackup:
        return cls(
            store=str(value["store"]),
            objects=dict(value["objects"]),
            sums={k: TableSum.from_wire(v) for k, v in value["sums"].items()},
            watermark=dict(value["watermark"]),
            source_time=float(value["source_time"]),
            extra=dict(value.get("extra", {})),
        )


@dataclass
class ShipBatch:
    """Changes since a watermark, ready to upload. `path` is a local file the shipper encrypts and puts."""

    path: Path
    watermark: dict[str, Any]  # the watermark once this batch is shipped
    items: int  # rows / vectors / changes in it
    source_time: float  # unix time up to which the source's changes are in the batch


class Place(ABC):
    """Where a store's data lives: the site's own services, or an empty restore target."""

    @abstractmethod
    def audit_db(self) -> ClickHouseClient:
        """A clickhouse-connect client; the caller closes it (chDB is released then)."""

    @abstractmethod
    def vectors(self) -> MilvusClient: ...

    @abstractmethod
    def sqlite_files(self) -> dict[str, Path]:
        """name -> path of each protected SQLite file (a restore target names where each one goes)."""

    @abstractmethod
    def vault(self) -> hvac.Client | None:
        """A Vault client with the rights to snapshot / restore; None where this place has no Vault."""


class Store(ABC):
    name: ClassVar[str]

    @abstractmethod
    def backup(
        self, bucket: DrBucket, place: Place, prefix: str, previous: StoreBackup | None, progress: Progress
    ) -> StoreBackup:
        """A full backup under `prefix` (e.g. `backups/<id>/<store>/`). `previous` is this store's part of
        the newest earlier backup, for stores that back up incrementally."""

    @abstractmethod
    def changes(self, place: Place, watermark: dict[str, Any] | None, workdir: Path) -> ShipBatch | None:
        """What changed since `watermark` (None: since the beginning), written into `workdir`; None if
        nothing changed."""

    @abstractmethod
    def restore(self, bucket: DrBucket, backup: StoreBackup, target: Place, workdir: Path, progress: Progress) -> None:
        """Restore `backup` into `target`, which must be empty for this store."""

    @abstractmethod
    def apply(self, shipment: Path, target: Place) -> int:
        """Apply one decrypted shipment (in order) on top of a restore; returns the items applied."""

    @abstractmethod
    def sums(self, place: Place) -> dict[str, TableSum]:
        """Per table / collection / file: rows and a content digest, equal on a faithful copy."""

    def can_compare(self, place: Place) -> bool:
        """Whether `place` holds this store's data to compare (a production drill has no scratch Vault: its
        snapshot is verified by checksum only)."""
        return True
