"""Site file + edge profile -> `ImageSpec`, the plain description `edge_image` builds from.

What the laptop's agent needs and is known at build time goes into the spec; what only enrollment can know (the
device name, its certificate) is added at first boot. The site's CA chain comes from the PKI in Vault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.bundle.needs import role_defaults
from appliance.errors import BadInput
from appliance.site import EdgeProfile, Site
from edge_image.spec import ImageSpec, ImageUser

DATA_DIR = "/var/lib/membria/edge"
MODELS_DIR = "/var/lib/membria/models"
TAXONOMY = "/etc/membria/taxonomy.yaml"


def profile(site: Site, name: str) -> EdgeProfile:
    for candidate in site.edge_profiles:
        if candidate.name == name:
            return candidate
    names = ", ".join(p.name for p in site.edge_profiles) or "none"
    raise BadInput(f"site {site.site.name} has no edge profile '{name}' (it has: {names})")


def gateways(site: Site) -> list[str]:
    listed = site.edge.gateways if site.edge is not None else []
    return [g.rstrip("/") for g in listed] or [f"https://gateway.{site.site.domain}:8443"]


def model_file_in_image(prof: EdgeProfile, packaged_name: str) -> str:
    """Where the GGUF lies on the laptop: the profile's path, else the packaged Gemma in MODELS_DIR."""
    return str(prof.model.path) if prof.model.path else f"{MODELS_DIR}/{packaged_name}"


def agent_settings(site: Site, prof: EdgeProfile, model_path: str) -> dict[str, Any]:
    """The agent's settings less device, gateways and tls (enrollment writes /etc/membria/edge.json from these)."""
    m = prof.model
    return {
        "profile": prof.name,
        "departments": prof.departments,
        "data_dir": DATA_DIR,
        "host": "127.0.0.1",
        "port": 8450,
        "core_model": site.services.llm.model,
        "model": {
            "name": m.name,
            "path": model_path,
            "context_tokens": m.context_tokens,
            "threads": m.threads,
            "temperature": m.temperature,
            "top_p": m.top_p,
            "max_tokens": m.max_tokens,
            "presence_penalty": m.presence_penalty,
        },
        "routing": {
            "theta": prof.routing.theta,
            "logprob_weight": prof.routing.logprob_weight,
            "taxonomy_file": TAXONOMY,
            "local_only_labels": prof.routing.local_only_labels,
        },
        "sync": {
            "interval_seconds": prof.sync.interval_seconds,
            "max_patch_bytes": prof.sync.max_patch_mb * 1024 * 1024,
            "topics": prof.sync.topics,
        },
        "escalation": {
            "retries": prof.escalation.retries,
            "backoff_seconds": prof.escalation.backoff_seconds,
            "backoff_max_seconds": prof.escalation.backoff_max_seconds,
        },
        "pinned_knowledge_chars": prof.pinned_knowledge_chars,
    }


def image_spec(site: Site, prof: EdgeProfile, *, version: str, ca_pem: str, model_path: str) -> ImageSpec:
    taxonomy: Path = prof.routing.taxonomy_file
    if not taxonomy.is_file():
        raise BadInput(f"edge profile {prof.name}: routing.taxonomy_file {taxonomy} does not exist")
    base = role_defaults("base")
    # One hardening list for core nodes and laptops: the base role's sysctl defaults.
    sysctl = {str(k): str(v) for k, v in {**base.get("base_sysctl", {}), **base.get("base_sysctl_extra", {})}.items()}
    image = prof.image
    return ImageSpec(
        site=site.site.name,
        profile=prof.name,
        version=version,
        domain=site.site.domain,
        packages=sorted(set(prof.extra_packages) | set(image.firmware_packages)),
        root_size_mb=image.root_size_mb,
        esp_size_mb=image.esp_size_mb,
        tpm2_pcrs=list(image.tpm2_pcrs),
        tpm2_pin=image.tpm2_pin,
        users=[ImageUser(name=u.name, ssh_public_keys=u.ssh_public_keys, sudo=u.sudo) for u in image.users],
        sysctl=sysctl,
        agent=agent_settings(site, prof, model_path),
        taxonomy_yaml=taxonomy.read_text(),
        ca_pem=ca_pem,
        gateways=gateways(site),
    )
