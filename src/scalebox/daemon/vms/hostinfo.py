"""Host figures for GET /info, read from statvfs and /proc (no extra libraries)."""

from __future__ import annotations

import os
import time
from pathlib import Path

GIB = 1024**3


def gb(n_bytes: float) -> float:
    return round(n_bytes / GIB, 1)


def storage(path: Path) -> dict[str, float]:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    free = st.f_bavail * st.f_frsize  # what an unprivileged writer can still use
    return {"total_gb": gb(total), "used_gb": gb(used), "free_gb": gb(free)}


def parse_meminfo(text: str) -> dict[str, float]:
    """/proc/meminfo -> {total_gb, free_gb}; free is MemAvailable (what can be allocated)."""
    kib = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            kib[key] = int(fields[0])
    free = kib.get("MemAvailable", kib.get("MemFree", 0))
    return {"total_gb": gb(kib.get("MemTotal", 0) * 1024), "free_gb": gb(free * 1024)}


def memory() -> dict[str, float]:
    return parse_meminfo(Path("/proc/meminfo").read_text())


def parse_cpu_times(text: str) -> tuple[int, int]:
    """(idle, total) jiffies from the ``cpu`` line of /proc/stat."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            # guest and guest_nice are already counted in user and nice.
            return idle, sum(values[:8])
    raise ValueError("/proc/stat has no cpu line")


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    idle = after[0] - before[0]
    total = after[1] - before[1]
    return round(100.0 * (total - idle) / total, 1) if total > 0 else 0.0


class CpuMeter:
    """CPU use since the previous reading; the first reading samples a short interval."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None

    def percent(self) -> float:
        if self._last is None:
            self._last = self._read()
            time.sleep(0.1)
        now = self._read()
        result = busy_percent(self._last, now)
        if now[1] - self._last[1] > 0:
            self._last = now
        return result

    @staticmethod
    def _read() -> tuple[int, int]:
        return parse_cpu_times(Path("/proc/stat").read_text())
