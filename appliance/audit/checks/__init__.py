"""The audit's checks: pytest-testinfra tests, one per control (see appliance/audit/DESIGN.md)."""
