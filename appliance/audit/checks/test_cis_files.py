"""CIS 7.1: permissions of the account databases."""

from __future__ import annotations

from typing import Any


def _mode_owner(host: Any, path: str, max_mode: int, owner: str = "root", group: str = "root") -> None:
    f = host.file(path)
    assert f.exists, f"{path} is missing"
    assert f.user == owner and f.group == group, f"{path} is owned by {f.user}:{f.group}, not {owner}:{group}"
    assert f.mode & ~max_mode == 0, f"{path} has mode {f.mode:04o}, more than {max_mode:04o}"


def test_etc_passwd_permissions(host: Any) -> None:
    _mode_owner(host, "/etc/passwd", 0o644)
