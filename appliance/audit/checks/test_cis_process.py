"""CIS 1.5: process hardening (address space randomisation, ptrace, core dumps)."""

from __future__ import annotations

from typing import Any

from appliance.audit.checks._system import check_sysctl, installed, run

LIMITS_FILES = "/etc/security/limits.conf /etc/security/limits.d/*.conf"
COREDUMP_CONFIG = "systemd/coredump.conf"


def test_aslr_enabled(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(host, target, evidence, {"kernel.randomize_va_space": ("2",)})


def test_ptrace_restricted(host: Any, target: Any, evidence: Any) -> None:
    check_sysctl(host, target, evidence, {"kernel.yama.ptrace_scope": ("1", "2", "3")})


def test_core_dumps_restricted(host: Any, target: Any, evidence: Any) -> None:
    # pam_limits: a hard limit of 0 for everyone ('*'), and no line (for anyone) with another hard limit.
    lines = run(
        host, f"grep -HE '^[[:space:]]*[^#[:space:]]+[[:space:]]+(hard|-)[[:space:]]+core[[:space:]]' {LIMITS_FILES}"
    )
    entries = [line.partition(":")[2].split() for line in lines.stdout.splitlines()]
    everyone = [entry for entry in entries if len(entry) >= 4 and entry[0] == "*"]
    assert everyone, "no '* hard core 0' limit in /etc/security/limits.conf or limits.d"
    raised = [entry for entry in entries if len(entry) >= 4 and entry[3] != "0"]
    assert not raised, f"a limits file sets '{' '.join(raised[0][:4])}': core dumps are allowed"
    check_sysctl(host, target, evidence, {"fs.suid_dumpable": ("0",)})
    if installed(host, ["systemd-coredump"]):
        config = run(host, f"systemd-analyze cat-config {COREDUMP_CONFIG}").stdout
        values: dict[str, str] = {}
        for line in config.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip()
        assert values.get("Storage") == "none", "systemd-coredump stores core dumps (Storage is not none)"
        assert values.get("ProcessSizeMax") == "0", "systemd-coredump processes core dumps (ProcessSizeMax is not 0)"
