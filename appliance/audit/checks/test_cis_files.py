"""CIS 7.1: permissions of the account databases and their backups, and no world-writable or unowned files."""

from __future__ import annotations

from typing import Any

from appliance.audit.checks._system import check_access, find_on_local

SHADOW_GROUPS = ("root", "shadow")


def test_etc_passwd_permissions(host: Any) -> None:
    check_access(host, "/etc/passwd", 0o644)


def test_etc_passwd_backup_permissions(host: Any) -> None:
    check_access(host, "/etc/passwd-", 0o644, required=False)


def test_etc_group_permissions(host: Any) -> None:
    check_access(host, "/etc/group", 0o644)


def test_etc_group_backup_permissions(host: Any) -> None:
    check_access(host, "/etc/group-", 0o644, required=False)


def test_etc_shadow_permissions(host: Any) -> None:
    check_access(host, "/etc/shadow", 0o640, groups=SHADOW_GROUPS)


def test_etc_shadow_backup_permissions(host: Any) -> None:
    check_access(host, "/etc/shadow-", 0o640, groups=SHADOW_GROUPS, required=False)


def test_etc_gshadow_permissions(host: Any) -> None:
    check_access(host, "/etc/gshadow", 0o640, groups=SHADOW_GROUPS)


def test_etc_gshadow_backup_permissions(host: Any) -> None:
    check_access(host, "/etc/gshadow-", 0o640, groups=SHADOW_GROUPS, required=False)


def test_etc_shells_permissions(host: Any) -> None:
    check_access(host, "/etc/shells", 0o644)


def test_opasswd_permissions(host: Any) -> None:
    check_access(host, "/etc/security/opasswd", 0o600, required=False)
    check_access(host, "/etc/security/opasswd.old", 0o600, required=False)


def test_no_world_writable_files(host: Any, target: Any) -> None:
    files = find_on_local(host, target, "\\( -type f -perm -0002 \\)")
    assert not files, f"world-writable file{'s' if len(files) > 1 else ''}: {', '.join(files[:5])}"
    dirs = find_on_local(host, target, "\\( -type d -perm -0002 ! -perm -1000 \\)")
    assert not dirs, (
        f"world-writable director{'ies' if len(dirs) > 1 else 'y'} without the sticky bit: {', '.join(dirs[:5])}"
    )


def test_no_unowned_files(host: Any, target: Any) -> None:
    files = find_on_local(host, target, "\\( -nouser -o -nogroup \\)")
    assert not files, f"without an existing owner or group: {', '.join(files[:5])}"
