"""CIS 4.1 and 4.3: one firewall utility, nftables, and a default-deny ruleset that is loaded and kept.

The loaded ruleset (`nft -j list ruleset`) exists only on a running system; on an image the checks that
need it are not applicable, and 4.3.10 reads the file the nftables service loads at boot.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

HOOKS = ("input", "forward", "output")
OTHER_FIREWALLS = ("ufw", "iptables-persistent", "netfilter-persistent", "firewalld")
BOOT_CONFIG = "/etc/nftables.conf"
UNIT = "/lib/systemd/system/nftables.service"
UNIT_OVERRIDES = "/etc/systemd/system/nftables.service.d"


def _installed(host: Any, package: str) -> bool:
    """dpkg's view: installed, and not marked for removal."""
    result = host.run("dpkg-query -W -f='${Status}' %s", package)
    words = result.stdout.split()
    return result.rc == 0 and len(words) == 3 and words[0] in ("install", "hold") and words[2] == "installed"


def _ruleset(host: Any, target: Any) -> list[dict[str, Any]]:
    if not target.running:
        pytest.skip("the loaded nftables ruleset exists only on a running system")
    result = host.run("nft -j list ruleset")
    assert result.rc == 0, f"nft cannot list the loaded ruleset: {result.stderr.strip() or result.stdout.strip()}"
    items: list[dict[str, Any]] = json.loads(result.stdout or '{"nftables": []}')["nftables"]
    return items


def _base_chains(ruleset: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i["chain"] for i in ruleset if "chain" in i and "hook" in i["chain"] and i["chain"].get("type") == "filter"]


def _input_chain_text(host: Any) -> str:
    """The text of every base chain on the input hook, as `nft list ruleset` prints it."""
    result = host.run("nft list ruleset")
    assert result.rc == 0, f"nft cannot list the loaded ruleset: {result.stderr.strip()}"
    chains, current, depth = [], [], 0
    for line in result.stdout.splitlines():
        stripped = line.strip()
        if stripped.startswith("chain ") and stripped.endswith("{"):
            current, depth = [line], 1
            continue
        if current:
            current.append(line)
            depth += stripped.count("{") - stripped.count("}")
            if depth <= 0:
                text = "\n".join(current)
                if re.search(r"\bhook input\b", text):
                    chains.append(text)
                current = []
    return "\n".join(chains)


def _assert_service_enabled(host: Any) -> None:
    state = host.run("systemctl is-enabled nftables.service").stdout.strip() or "unknown"
    assert state == "enabled", f"nftables.service is {state}, not enabled: the ruleset is not loaded at boot"


def test_single_firewall_utility(host: Any) -> None:
    """4.1.1: nftables is the firewall in use; no other firewall utility is installed."""
    _assert_service_enabled(host)
    others = [name for name in OTHER_FIREWALLS if _installed(host, name)]
    assert not others, f"another firewall utility is installed besides nftables: {', '.join(others)}"


def test_nftables_installed(host: Any) -> None:
    """4.3.1"""
    assert _installed(host, "nftables"), "nftables is not installed (or is marked for removal)"


def test_ufw_not_installed(host: Any) -> None:
    """4.3.2: the appliance never installs ufw; nftables is managed directly."""
    assert not _installed(host, "ufw"), "ufw is installed alongside nftables"


def test_nftables_table_exists(host: Any, target: Any) -> None:
    """4.3.4"""
    tables = [i["table"] for i in _ruleset(host, target) if "table" in i]
    assert tables, "no nftables table is loaded: the node runs without a firewall"


def test_nftables_base_chains(host: Any, target: Any) -> None:
    """4.3.5: filter base chains on the input, forward and output hooks."""
    hooks = {c["hook"] for c in _base_chains(_ruleset(host, target))}
    missing = [h for h in HOOKS if h not in hooks]
    assert not missing, f"no nftables filter base chain on the {', '.join(missing)} hook"


def test_nftables_loopback(host: Any, target: Any) -> None:
    """4.3.6: loopback accepted on lo, and loopback source addresses dropped anywhere else."""
    _ruleset(host, target)  # skips on an image
    text = _input_chain_text(host)
    wanted = {
        'iif "lo" accept': r'\biif(name)? "lo" accept\b',
        "ip saddr 127.0.0.0/8 drop": r"\bip saddr 127\.0\.0\.0/8\b.*\bdrop\b",
        "ip6 saddr ::1 drop": r"\bip6 saddr ::1\b.*\bdrop\b",
    }
    missing = [rule for rule, pattern in wanted.items() if not re.search(pattern, text)]
    assert not missing, f"the input chain lacks: {'; '.join(missing)}"


def test_nftables_default_deny(host: Any, target: Any) -> None:
    """4.3.8: every filter base chain on input, forward and output drops what no rule accepts."""
    chains = [c for c in _base_chains(_ruleset(host, target)) if c["hook"] in HOOKS]
    problems = [
        f"{c['family']} {c['table']} {c['name']} ({c['hook']}) has policy {c.get('policy', 'accept')}"
        for c in chains
        if c.get("policy", "accept") != "drop"
    ]
    problems += [
        f"no base chain on the {h} hook (everything passes)" for h in HOOKS if h not in {c["hook"] for c in chains}
    ]
    assert not problems, f"not default deny: {'; '.join(problems)}"


def test_nftables_service_enabled(host: Any) -> None:
    """4.3.9"""
    _assert_service_enabled(host)


def test_nftables_rules_permanent(host: Any) -> None:
    """4.3.10: the file the nftables service loads at boot holds the default-deny base chains."""
    unit = host.run("grep -hs '^ExecStart=' %s %s/*.conf", UNIT, UNIT_OVERRIDES)
    assert BOOT_CONFIG in unit.stdout, f"nftables.service does not load {BOOT_CONFIG} at boot"
    config = host.file(BOOT_CONFIG)
    assert config.exists, f"{BOOT_CONFIG} is missing"
    text = config.content_string
    missing = [h for h in HOOKS if not re.search(rf"hook {h}\b[^;]*;\s*policy drop\b", text)]
    assert not missing, f"{BOOT_CONFIG} has no default-deny base chain on the {', '.join(missing)} hook"
