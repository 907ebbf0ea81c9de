"""Known accelerator specifications: what the site file's GPU entries are checked against.

The serving planner uses the same table, so a site cannot claim memory a card does not have.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    model: str
    memory_gb: int
    architecture: str
    nvlink: bool


_SPECS = [
    GpuSpec("RTX 5090", 32, "blackwell", nvlink=False),
    GpuSpec("RTX 4090", 24, "ada", nvlink=False),
    GpuSpec("RTX 6000 Ada", 48, "ada", nvlink=False),
    GpuSpec("RTX PRO 6000 Blackwell", 96, "blackwell", nvlink=False),
    GpuSpec("L40S", 48, "ada", nvlink=False),
    GpuSpec("A100 80GB", 80, "ampere", nvlink=True),
    GpuSpec("H100 80GB", 80, "hopper", nvlink=True),
    GpuSpec("H200", 141, "hopper", nvlink=True),
]

KNOWN_GPUS: dict[str, GpuSpec] = {s.model: s for s in _SPECS}


def _normalize(model: str) -> str:
    return " ".join(model.lower().replace("geforce", "").replace("nvidia", "").split())


_BY_NORMALIZED = {_normalize(s.model): s for s in _SPECS}


def gpu_spec(model: str) -> GpuSpec | None:
    """Look a GPU up by name, tolerating vendor prefixes ('NVIDIA GeForce RTX 5090')."""
    return _BY_NORMALIZED.get(_normalize(model))
