"""Whether any file that defines a unit was written since systemd last loaded its units.

``NeedDaemonReload`` alone misses one case (systemd 252, Debian 12): a
drop-in directory created after the last daemon-reload (``scaleboxd.service.d/``
made by hand) is not looked for, so systemd says "no" while the next start
would ignore the drop-in. So the switch also looks at the files themselves:
the unit files and the drop-in directories that can apply to a unit
(``NAME.d``, ``TYPE.d`` such as ``service.d``, and for a name with dashes
each prefix, ``scaleboxd-.service.d``), with their files, in every
directory systemd reads units from. A new directory or file carries the
time it was made, so anything made or written since the last load (less a
margin for coarse file times) means a daemon-reload. (A file removed is
NeedDaemonReload's to see: systemd notices a loaded file gone.)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

# Where systemd (system instance) looks for units and drop-ins, most specific first.
SEARCH_DIRS = (
    Path("/etc/systemd/system.control"),
    Path("/run/systemd/system.control"),
    Path("/etc/systemd/system"),
    Path("/run/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)
# systemd takes its load time as loading starts, from a precise clock; a
# file's time comes from the kernel's coarse one (a tick, 1-10 ms, behind).
# Anything written this close before the load counts as written after it.
MARGIN_S = 0.25


def dropin_dirs(unit: str) -> list[str]:
    """The names of the drop-in directories systemd reads for ``unit``, e.g.
    scaleboxd-handover.service: scaleboxd-handover.service.d, scaleboxd-.service.d,
    service.d (and for a template instance, the template's)."""
    stem, dot, kind = unit.rpartition(".")
    if not dot:
        return [f"{unit}.d"]
    names = [f"{unit}.d"]
    prefix, at, instance = stem.partition("@")
    if at and instance:
        names.append(f"{prefix}@.{kind}.d")
    parts = prefix.split("-")
    for end in range(len(parts) - 1, 0, -1):
        names.append("-".join(parts[:end]) + f"-.{kind}.d")
    names.append(f"{kind}.d")
    return names


def _paths(units: Iterable[str], roots: Iterable[Path]) -> Iterator[Path]:
    units = list(units)
    for root in roots:
        for unit in units:
            yield root / unit
            for name in dropin_dirs(unit):
                folder = root / name
                yield folder
                files: list[Path] = []
                with contextlib.suppress(OSError):  # not a directory, or not there
                    files = sorted(folder.iterdir())
                yield from files


def written_since(
    units: Iterable[str], since: float, roots: Iterable[Path] = SEARCH_DIRS
) -> list[Path]:
    """The unit files, drop-in directories and drop-ins of ``units`` changed at or after
    ``since`` (seconds since the epoch, less MARGIN_S); empty when none was."""
    changed = []
    for path in _paths(units, roots):
        try:
            times = [path.lstat()]
            if path.is_symlink():
                times.append(path.stat())  # a unit linked from elsewhere: its target too
        except OSError:
            continue  # not there (or a dangling link): nothing for systemd to load either
        if max(max(st.st_mtime, st.st_ctime) for st in times) >= since - MARGIN_S:
            changed.append(path)
    return changed


def loaded_at(units_load_monotonic_us: int) -> float:
    """systemd's UnitsLoadTimestampMonotonic (µs, CLOCK_MONOTONIC) as seconds since the epoch
    (as the wall clock reads now: a clock step since the load shifts it by as much)."""
    return time.time() - (time.monotonic() - units_load_monotonic_us / 1e6)
