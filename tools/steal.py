"""The host's CPU stolen by its hypervisor: per window, and traced beside each request.

The 2-core host is a VM, and its neighbours take its CPU at times ("steal"
in /proc/stat). A window's share cannot tell one burst from noise spread
over it: a 60 ms burst in a 12 s window is 0.5 %, yet it is a 60 ms
request. So while the bench's loads run, the host's steal counter is also
read every 10 ms, and each of the slowest requests is printed with the
steal booked while it waited (tools/bench.py). The counter moves in
clock ticks (10 ms), summed over both CPUs; it is a clue beside a slow
request, never a reason to leave one out of the figures.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

EVERY = 0.01  # seconds between two reads of the counter
# The kernel books a vCPU's stolen time when it next accounts that CPU (its next
# tick once it runs again), so a burst shows up a little after the wait it caused.
BOOKED_LATE = 0.02
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")
STAT = Path("/proc/stat")


def cpu_times() -> tuple[int, int]:
    """(all, stolen) CPU time of the host so far, in ticks (/proc/stat's first line)."""
    with STAT.open() as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is counted in user)
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of the host's CPU time its hypervisor gave to others between two reads.

    A phase whose requests all slowed down with nothing of ours happening is
    often this: the 2-core host is a VM, and its neighbours take its CPU.
    """
    total = after[0] - before[0]
    return round(100 * (after[1] - before[1]) / total, 1) if total > 0 else None


@dataclass
class StealTrace:
    """The host's stolen ticks so far, read every EVERY seconds: (time.time(), ticks)."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def stolen_ms(self, start: float, end: float) -> float | None:
        """Steal booked from the last read before ``start`` to the first read BOOKED_LATE
        after ``end``; None when the trace does not cover that span."""
        times = [t for t, _ in self.samples]
        first = bisect.bisect_right(times, start) - 1
        last = bisect.bisect_left(times, end + BOOKED_LATE)
        if first < 0 or last >= len(times):
            return None
        return (self.samples[last][1] - self.samples[first][1]) * TICK_MS

    def note(self, start: float, seconds: float) -> str:
        """The words 'host steal N ms of CPU meanwhile' for a request (summed over the
        host's CPUs, so it may exceed the request's own time); empty when not known."""
        stolen = self.stolen_ms(start, start + seconds)
        return "" if stolen is None else f"host steal {stolen:.0f} ms of CPU meanwhile"


@contextlib.contextmanager
def tracing(every: float = EVERY) -> Iterator[StealTrace]:
    """Read the host's steal counter every ``every`` seconds until the block ends."""
    trace = StealTrace()
    done = threading.Event()

    def read() -> None:
        while True:
            trace.samples.append((time.time(), cpu_times()[1]))
            if done.wait(every):
                trace.samples.append((time.time(), cpu_times()[1]))
                return

    reader = threading.Thread(target=read, name="steal-trace", daemon=True)
    reader.start()
    try:
        yield trace
    finally:
        done.set()
        reader.join()
