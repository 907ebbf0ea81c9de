"""The protected stores, each in its own module; `make_store` imports only the one asked for."""

from __future__ import annotations

from importlib import import_module

from appliance.dr.stores.base import Store

# Restore order: Vault first (the others' credentials live there), the audit log before the vectors
# because its RTO is the shorter one.
STORE_NAMES = ("vault", "state", "audit_db", "vectors")
SHIPPED = ("state", "audit_db", "vectors")  # Vault is covered by snapshots only

_CLASSES = {
    "vault": ("appliance.dr.stores.vault", "VaultStore"),
    "state": ("appliance.dr.stores.state", "StateStore"),
    "audit_db": ("appliance.dr.stores.audit_db", "AuditDbStore"),
    "vectors": ("appliance.dr.stores.vectors", "VectorsStore"),
}


def make_store(name: str) -> Store:
    module, cls = _CLASSES[name]
    store: Store = getattr(import_module(module), cls)()
    return store
