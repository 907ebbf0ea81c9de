"""The lab's one edge agent: a "laptop" for the site's `lab.edge_profile`, as a supervised process.

The lab plays the laptop's first-boot enrollment: it issues the device certificate (role edge-device,
OU = the profile's department) and renders the agent's settings from the edge profile. The agent's local
API is plain HTTP on loopback, as on a laptop; it talks to the gateway over mTLS with the device certificate.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import httpx

from appliance.backends import Backends
from appliance.edge.spec import agent_settings
from appliance.errors import BadInput
from appliance.lab import bootstrap, model
from appliance.lab.runtime_services import Gateway
from appliance.lab.services import EmbeddedService, Health
from appliance.lab.state import LabState
from appliance.pki import Pki
from appliance.site import EdgeProfile, Site
from runtime.common import atomic

LAB_DEVICE = "lab-laptop-1"


def lab_profile(site: Site) -> EdgeProfile:
    if not site.edge_profiles:
        raise BadInput("the site has no edge_profiles: the lab's edge agent needs one")
    wanted = site.lab.edge_profile
    for profile in site.edge_profiles:
        if wanted is None or profile.name == wanted:
            return profile
    names = ", ".join(p.name for p in site.edge_profiles)
    raise BadInput(f"lab.edge_profile: no edge profile named '{wanted}' (the site has: {names})")


class EdgeAgentService(EmbeddedService):
    name = "edge"
    start_timeout = 180.0  # loads the embedding model and the local model, then pins knowledge

    @property
    def port(self) -> int:
        return self.site.lab.ports.edge

    @property
    def endpoint(self) -> str:
        return f"http://{self._url_host()}:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.state.root / "config" / "edge.json"

    @property
    def data_dir(self) -> Path:
        return self.state.data_dir / "edge"

    def _device_tls(self, profile: EdgeProfile) -> tuple[Path, Path]:
        cert, key = bootstrap.cert_paths(self.state, LAB_DEVICE)
        chain = bootstrap.ca_chain_path(self.state).read_text()
        if not bootstrap.chains_to(cert, chain, min_validity=dt.timedelta(hours=2)):
            pki = Pki.for_site(self.site, Backends(self.site, self.state).vault())
            common_name = f"{LAB_DEVICE}.{self.site.site.domain}"
            # One OU per certificate in this PKI: a multi-department profile gets its first department.
            pki.issue("edge-device", common_name, ou=profile.departments[0]).write(self.state.pki_dir, LAB_DEVICE)
        return cert, key

    def prepare(self) -> None:
        profile = lab_profile(self.site)
        cert, key = self._device_tls(profile)
        # The laptop image's settings (appliance/edge/spec.py), with what the lab plays: enrollment's device
        # identity, this machine's paths and ports, and a quick demonstration of the offline path.
        config = agent_settings(self.site, profile, str(profile.model.path or model.ensure_gemma()))
        config["routing"]["taxonomy_file"] = str(profile.routing.taxonomy_file.resolve())
        config.update(
            device=LAB_DEVICE,
            data_dir=str(self.data_dir),
            host=self.host,
            port=self.port,
            gateways=[Gateway(self.site, self.state).endpoint],
            tls={"cert": str(cert), "key": str(key), "ca": str(bootstrap.ca_chain_path(self.state))},
        )
        config["escalation"] = {
            "retries": profile.escalation.retries,
            "backoff_seconds": min(profile.escalation.backoff_seconds, 0.5),
            "backoff_max_seconds": min(profile.escalation.backoff_max_seconds, 5.0),
            "wait_seconds": 60.0,
        }
        if not profile.routing.taxonomy_file.is_file():
            raise BadInput(
                f"edge profile {profile.name}: routing.taxonomy_file {profile.routing.taxonomy_file} does not exist"
            )
        atomic.write_text(self.config_file, json.dumps(config, indent=2) + "\n")

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "runtime.edge", "--config", str(self.config_file)]

    def check(self) -> Health:
        try:
            response = httpx.get(f"{self.endpoint}/api/status", timeout=10)
        except (httpx.HTTPError, OSError) as exc:
            return Health(self.name, False, f"no answer: {exc}", self.endpoint)
        if response.status_code != 200:
            return Health(self.name, False, f"HTTP {response.status_code}", self.endpoint)
        status = response.json()
        k = status.get("knowledge", {})
        return Health(
            self.name,
            True,
            f"{status['device']} ({status['profile']}), {k.get('chunks', 0)} chunks, "
            f"outbox pending {status.get('outbox', {}).get('pending', 0)}",
            self.endpoint,
        )


def edge_services(site: Site, state: LabState) -> list[EmbeddedService]:
    return [EdgeAgentService(site, state)] if site.edge_profiles else []
