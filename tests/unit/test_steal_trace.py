"""The host's steal, read every 10 ms, is named beside the bench's slowest requests
(tools/steal.py, tools/bench.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from tools import bench, steal
from tools.loadgen import Sample

TICK_S = steal.TICK_MS / 1000


def _trace(start: float, bursts: dict[int, int]) -> steal.StealTrace:
    """A read every 10 ms for 2 s from ``start``; ``bursts`` maps a read's index to the
    ticks the kernel booked just before it."""
    ticks, samples = 500, []
    for i in range(200):
        ticks += bursts.get(i, 0)
        samples.append((start + i * 0.01, ticks))
    return steal.StealTrace(samples)


def test_the_steal_booked_while_a_request_waited_is_counted_and_none_outside_the_trace() -> None:
    start = 1000.0
    trace = _trace(start, {40: 6, 150: 1})  # 6 ticks booked by the read at +0.40 s
    # A request from +0.33 s to +0.39 s: the burst is booked after it ended, at the
    # kernel's next tick, and still counts (BOOKED_LATE).
    assert trace.stolen_ms(start + 0.33, start + 0.39) == 6 * steal.TICK_MS
    stolen = f"host steal {6 * steal.TICK_MS:.0f} ms of CPU meanwhile"
    assert trace.note(start + 0.33, 0.06) == stolen
    assert trace.stolen_ms(start + 0.5, start + 1.2) == 0  # nothing booked meanwhile
    assert trace.stolen_ms(start + 1.0, start + 1.6) == steal.TICK_MS
    assert trace.stolen_ms(start - 1, start + 0.1) is None  # began before the first read
    assert trace.stolen_ms(start + 1.9, start + 1.99) is None  # no read BOOKED_LATE after
    assert trace.note(start - 1, 0.1) == ""


def test_a_read_at_the_request_start_or_booked_late_after_its_end_bounds_the_span() -> None:
    start = 1000.0
    trace = _trace(start, {30: 2, 31: 4, 45: 3})
    # Reads at +0.30 (2 ticks) and +0.31 (4 ticks): a request sent exactly at +0.30
    # counts from that read, so the 2 ticks booked by it were before the request.
    assert trace.stolen_ms(start + 0.30, start + 0.40) == 4 * steal.TICK_MS
    # A request ending at +0.43: the read exactly BOOKED_LATE after (+0.45) is the last.
    assert trace.stolen_ms(start + 0.35, start + 0.43) == 3 * steal.TICK_MS
    assert trace.stolen_ms(start + 0.35, start + 0.4299) == 3 * steal.TICK_MS
    assert trace.stolen_ms(start + 0.35, start + 0.42) == 0


def test_tracing_reads_the_steal_field_of_proc_stat_until_the_block_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  101 102 103 104 105 106 107 4242 109 110\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    monkeypatch.setattr(steal, "STAT", stat)
    assert steal.cpu_times() == (101 + 102 + 103 + 104 + 105 + 106 + 107 + 4242, 4242)
    with steal.tracing(every=0.01) as trace:
        time.sleep(0.1)
        # Replaced, not rewritten in place: the kernel's /proc/stat is never seen half
        # written, and a truncated file read mid-write would count as steal 0.
        moved = tmp_path / "stat.new"
        moved.write_text("cpu  101 102 103 104 105 106 107 4250 109 110\n")
        moved.replace(stat)
        time.sleep(0.1)
    ticks = [n for _, n in trace.samples]
    assert ticks[0] == 4242 and ticks[-1] == 4250 and set(ticks) == {4242, 4250}
    times = [t for t, _ in trace.samples]
    assert times == sorted(times) and len(times) >= 10
    assert not [t for t in threading.enumerate() if t.name == "steal-trace"]


def test_the_slowest_requests_and_each_windows_longest_carry_the_steal_meanwhile() -> None:
    start = 1000.0
    phase = bench.Phase("no update", start, start + 2, {}, steal=_trace(start, {40: 6}))
    phase.measured_from = start + 0.1
    phase.samples = {
        "open loop": [Sample(start + 0.33, 0.0667, "ok"), Sample(start + 1.0, 0.004, "ok")],
        "keep-alive": [Sample(start + 1.5, 0.012, "ok")],
        "new connection": [Sample(start + 1.98, 0.015, "ok")],  # past the trace's end
    }
    stolen = f"host steal {6 * steal.TICK_MS:.0f} ms of CPU meanwhile"
    assert [what for _, _, what in bench.slowest(phase)] == [
        f"open loop; {stolen}",
        "new connection",  # the trace cannot say: no note rather than a wrong one
        "keep-alive; host steal 0 ms of CPU meanwhile",
    ]
    assert bench.longest_note(phase) == f"longest request 66.7 ms (open loop; {stolen})"

    run = bench.RunFigures(1, "sb1", (1.0, 1.0, 1.0))
    run.steal_pct = {"no update": 0.5}
    run.longest = {"no update": bench.longest_note(phase)}
    assert (
        f"  no update, 12 s: [host CPU steal 0.5%; longest request 66.7 ms (open loop; {stolen})]"
        in bench.run_lines(run)
    )
