"""Each test machine gets cgroups of its own on the host.

``systemd-nspawn --keep-unit`` (the host has no systemd as PID 1 to ask for a
scope) puts the container's cgroup tree, "payload", under the cgroup of the
process that starts it, beside its own "supervisor". Two machines started
from one cgroup, as the two xdist workers of the system tests start them,
shared one tree: on this host both machines' journald sat in
``/payload/system.slice/systemd-journald.service``. Each machine's systemd
then created and removed the other's unit cgroups, and a unit that one
machine started while the other stopped its namesake failed with
219/CGROUP ("Failed to attach to cgroup /system.slice/scaleboxd.service: No
such file or directory"): install.sh's first start of scaleboxd in a CI run,
and starts right after a stop before it.

So nspawn starts in ``<hierarchy>/scalebox-machines/<name>`` (it joins it
between fork and exec) in each hierarchy systemd uses to track units: the
unified one (cgroup2) and, on hybrid or legacy hosts, the v1 "name=systemd"
one. The machine's teardown removes those cgroups again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PARENT = "scalebox-machines"
MOUNTS = Path("/proc/self/mounts")


def hierarchies(mounts: Path = MOUNTS) -> list[Path]:
    """Where the unified hierarchy and the v1 name=systemd hierarchy are mounted."""
    found: list[Path] = []
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        where, kind, options = fields[1], fields[2], fields[3].split(",")
        if kind == "cgroup2" or (kind == "cgroup" and "name=systemd" in options):
            path = Path(where.replace("\\040", " "))
            if path not in found:
                found.append(path)
    return found


def machine_cgroups(name: str, roots: list[Path] | None = None) -> list[Path]:
    """The cgroups machine ``name`` runs in, one per hierarchy."""
    return [root / PARENT / name for root in (hierarchies() if roots is None else roots)]


def prepare(name: str, roots: list[Path] | None = None) -> list[Path]:
    """Make machine ``name``'s cgroups (a stale one from a killed run is removed first)."""
    made = []
    for cgroup in machine_cgroups(name, roots):
        remove_tree(cgroup)
        try:
            cgroup.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue  # a read-only or foreign hierarchy: nspawn then starts where it is
        made.append(cgroup)
    return made


def join(cgroups: list[Path]) -> None:  # pragma: no cover - runs in the child after fork
    """Move the calling process into each of ``cgroups``."""
    for cgroup in cgroups:
        with contextlib.suppress(OSError):
            (cgroup / "cgroup.procs").write_text("0")


def remove(name: str, roots: list[Path] | None = None) -> None:
    """Remove machine ``name``'s cgroups once its processes are gone."""
    for cgroup in machine_cgroups(name, roots):
        remove_tree(cgroup)


def remove_tree(cgroup: Path) -> None:
    """rmdir ``cgroup`` and every cgroup below it, deepest first. A cgroup that still
    holds a process is left (EBUSY), as are its parents."""
    if not cgroup.is_dir():
        return
    for top, _dirs, _files in os.walk(cgroup, topdown=False):
        with contextlib.suppress(OSError):
            Path(top).rmdir()
