"""CIS 1.1.1: filesystem and storage kernel modules a core node never needs cannot be loaded.

The configuration is checked everywhere: modprobe must run a no-op instead of loading the module (`install <m>
/bin/false`) and must not load it as an alias or dependency (`blacklist <m>`). On a running system with its own
kernel, the module must also not be loaded now. Inside a container modules belong to the host's kernel, so only
the configuration is this system's.
"""

from __future__ import annotations

import re
from typing import Any

from appliance.audit.checks._system import in_container, q, run

MODPROBE_DIRS = (
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/usr/local/lib/modprobe.d",
    "/usr/lib/modprobe.d",
    "/lib/modprobe.d",
)
NO_OP = frozenset({"/bin/false", "/usr/bin/false", "/bin/true", "/usr/bin/true"})


def _not_available(host: Any, target: Any, evidence: Any, module: str) -> None:
    # modprobe treats '-' and '_' in module names alike.
    name = "[-_]".join(re.escape(part) for part in re.split(r"[-_]", module))
    dirs = " ".join(q(d) for d in MODPROBE_DIRS)
    lines = run(
        host, f"grep -rHE --include='*.conf' '^[[:space:]]*(install|blacklist)[[:space:]]+{name}([[:space:]]|$)' {dirs}"
    ).stdout.splitlines()
    installs = [line.partition(":")[2].split()[2:] for line in lines if line.partition(":")[2].split()[0] == "install"]
    blacklisted = any(line.partition(":")[2].split()[0] == "blacklist" for line in lines)
    assert installs, f"no modprobe.d 'install {module} /bin/false' line: the {module} module can be loaded"
    loaders = [" ".join(command) for command in installs if not command or command[0] not in NO_OP]
    assert not loaders, f"modprobe.d runs '{loaders[0]}' for {module} instead of a no-op"
    assert blacklisted, f"{module} is not blacklisted in modprobe.d"
    if not target.running:
        evidence.add(f"{module} loaded?", "not checked: an image has no running kernel", None)
        return
    container = in_container(host)
    if container:
        evidence.add(
            f"{module} loaded?",
            f"not checked: inside a container ({container}) kernel modules belong to the host's kernel",
            None,
        )
        return
    loaded = run(host, f"grep -E '^{module.replace('-', '_')} ' /proc/modules").stdout.strip()
    assert not loaded, f"the {module} module is loaded now"
    probe = run(host, f"command -v modprobe >/dev/null && modprobe -n -v {q(module)}")
    if probe.rc == 0 or probe.stdout.strip():
        assert "install" in probe.stdout, f"modprobe would load {module}: {probe.stdout.strip()}"


def test_cramfs_not_available(host: Any, target: Any, evidence: Any) -> None:
    _not_available(host, target, evidence, "cramfs")


def test_freevxfs_not_available(host: Any, target: Any, evidence: Any) -> None:
    _not_available(host, target, evidence, "freevxfs")


def test_hfs_not_available(host: Any, target: Any, evidence: Any) -> None:
    _not_available(host, target, evidence, "hfs")


def test_hfsplus_not_available(host: Any, target: Any, evidence: Any) -> None:
    _not_available(host, target, evidence, "hfsplus")


def test_jffs2_not_available(host: Any, target: Any, evidence: Any) -> None:
    _not_available(host, target, evidence, "jffs2")


def test_usb_storage_not_available(host: Any, target: Any, evidence: Any) -> None:
    _not_available(host, target, evidence, "usb-storage")
