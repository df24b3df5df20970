"""Disks on the process backend: directories copied from a template."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from scalebox.daemon.vms.command import run


def copy_tree(source: Path, target: Path) -> None:
    """Copy directory ``source`` to the new path ``target``, sharing blocks where possible.

    ``cp --reflink=auto`` clones extents on btrfs/XFS and falls back to a
    plain copy elsewhere; ``-a`` keeps modes, owners and times.
    """
    run(
        ["cp", "-a", "--reflink=auto", "--no-target-directory", "--", str(source), str(target)],
        f"copy the disk {source} to {target}",
        timeout=3600,  # a real disk image without reflink support is gigabytes of copying
    )


def tree_size(path: Path) -> int:
    """Bytes in the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = (Path(root) / name).lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything under it; a missing path is fine."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
