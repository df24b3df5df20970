"""What is mounted where, from /proc/self/mountinfo.

``os.path.ismount`` compares device numbers, so it misses a bind mount (or
an idmapped clone) of a directory of the same file system: a VM's lower/
is the template's disk seen again, on DATA_DIR's own device. Removing a
directory through such a mount removes the template. Only the mount table
knows, so every check whether something is mounted reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_points(mountinfo: str | None = None) -> list[tuple[str, list[str]]]:
    """(mount point, its mount options) of every mount, in mount order."""
    text = MOUNTINFO.read_text() if mountinfo is None else mountinfo
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 5:
            found.append((_unescape(fields[4]), fields[5].split(",")))
    return found


def is_mounted(path: Path, mountinfo: str | None = None) -> bool:
    """Whether something is mounted at ``path`` (symlinks on the way resolved)."""
    target = os.path.realpath(path)
    return any(point == target for point, _ in mount_points(mountinfo))


def mounts_under(path: Path, mountinfo: str | None = None) -> list[str]:
    """Mount points at or below ``path``."""
    target = os.path.realpath(path)
    return [p for p, _ in mount_points(mountinfo) if p == target or p.startswith(target + "/")]


def is_idmapped(path: Path, mountinfo: str | None = None) -> bool:
    """Whether the mount seen at ``path`` (the last one there) is idmapped."""
    target = os.path.realpath(path)
    found = False
    for point, options in mount_points(mountinfo):
        if point == target:
            found = "idmapped" in options
    return found
