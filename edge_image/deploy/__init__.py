"""pyinfra deploys run over `@chroot/<tree>` by `edge_image.deploy_runner` (never imported: pyinfra loads them).

`edge.py` turns a Debian root tree into the edge image's tree: the agent's venv, its configuration, users,
hardening, units. See DESIGN.md, "Build pipeline".
"""

from __future__ import annotations

from pathlib import Path

EDGE_DEPLOY = Path(__file__).with_name("edge.py")
