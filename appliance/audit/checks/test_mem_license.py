"""MEM-LICENSE: the license the node's gateway runs with verifies with the site's public key and has not expired.

The license file is the one the gateway's configuration names, read from the node; it is verified on the
controller with the site's key (facts `license_public_key`, the controller's copy), not with the key the node
keeps: a node whose license and key were both replaced fails here. The node's copy of the key must be the site's.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.checks import membria_support as mem
from appliance.audit.targets import TargetSpec
from runtime.common.license import LicenseError, key_id, load_public_key, verify_license_bytes


def test_license_valid(host: Any, target: TargetSpec, evidence: Any) -> None:
    config_path, config = mem.gateway_config(host, target)
    license_path = str(config.get("license_file") or "")
    node_key_path = str(config.get("license_public_key") or "")
    assert license_path, f"{config_path} names no license_file"
    site_key_path = Path(str(target.facts.get("license_public_key") or ""))
    try:
        site_key = load_public_key(site_key_path)
    except LicenseError as exc:
        raise LookupError(f"the site's license public key: {exc.message}") from None
    raw = mem.read_text(host, license_path)
    assert raw is not None, f"the gateway's license {license_path} (from {config_path}) is missing"
    problems: list[str] = []
    summary: dict[str, Any] = {"license_file": license_path, "site_key": key_id(site_key)}
    try:
        lic = verify_license_bytes(raw.encode(), site_key, datetime.now(UTC), source=license_path)
        summary.update(
            license_id=lic.license_id,
            customer=lic.customer,
            seats=lic.seats,
            expires_at=lic.expires_at.isoformat(),
            days_left=lic.days_left(),
        )
    except LicenseError as exc:
        summary["refused"] = exc.reason
        problems.append(exc.message)
    node_key = mem.read_text(host, node_key_path) if node_key_path else None
    if node_key is None:
        problems.append(f"the gateway's license public key {node_key_path or '(not configured)'} is missing")
    else:
        try:
            loaded = serialization.load_pem_public_key(node_key.encode())
            summary["node_key"] = key_id(loaded) if isinstance(loaded, Ed25519PublicKey) else "not an Ed25519 key"
        except ValueError:
            summary["node_key"] = "not a PEM public key"
        if summary["node_key"] != summary["site_key"]:
            problems.append(
                f"the gateway verifies licenses with {node_key_path} ({summary['node_key']}), not the site's key "
                f"({summary['site_key']})"
            )
    evidence.add(
        f"license {license_path} verified with the site's key {site_key_path}", json.dumps(summary, indent=1), 0
    )
    assert not problems, "; ".join(problems)
