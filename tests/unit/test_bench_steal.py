"""The bench names the host's CPU steal beside each load window (tools/bench.py)."""

from __future__ import annotations

import time

from tools import bench


def test_steal_is_the_stolen_share_of_the_hosts_cpu_time_between_two_reads() -> None:
    assert bench.steal_pct((1000, 10), (1200, 40)) == 15.0
    assert bench.steal_pct((1000, 10), (1000, 10)) is None  # no time passed: no share


def test_the_hosts_cpu_times_are_read_from_proc_stat_and_only_grow() -> None:
    before = bench.cpu_times()
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:  # spend some CPU time so the counters move
        pass
    after = bench.cpu_times()
    assert after[0] > before[0] > 0
    assert after[1] >= before[1] >= 0
    pct = bench.steal_pct(before, after)
    assert pct is not None
    assert 0.0 <= pct <= 100.0


def test_each_window_of_a_run_says_its_steal_and_the_summary_its_worst() -> None:
    run = bench.RunFigures(1, "sb1", (1.0, 1.0, 1.0))
    run.steal_pct = {"no update": 3.2, f"update {bench.A} -> {bench.B}": 7.5}
    lines = bench.run_lines(run)
    assert "  no update, 12 s: [host CPU steal 3.2%]" in lines
    assert any(line.endswith("[host CPU steal 7.5%]") for line in lines)
    text, _ = bench.report([run])
    assert any("host CPU steal" in line and "7.5 %" in line for line in text.splitlines())
