"""The bench names the host's CPU steal beside each load window (tools/bench.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
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
    run.steal_pct["bare systemctl restart"] = 40.0  # not a window the latency target compares
    text, _ = bench.report([run])
    [row] = [line for line in text.splitlines() if line.startswith("host CPU steal in a latency")]
    assert row.split()[-1:] == ["%"] and "7.5 %" in row


def _run(index: int, **steal: float) -> bench.RunFigures:
    run = bench.RunFigures(index, f"sb{index}", (1.0, 1.0, 1.0))
    windows = dict(
        zip(("quiet", "update", "prestaged", "again"), bench.LATENCY_WINDOWS, strict=True)
    )
    run.steal_pct = {windows[k]: v for k, v in steal.items()}
    return run


def test_the_noisiest_latency_window_is_named_and_other_windows_do_not_count() -> None:
    run = _run(1, quiet=0.4, update=12.5, again=3.0)
    run.steal_pct["bare systemctl restart"] = 40.0  # not a latency window of the target
    assert run.noisiest() == (f"update {bench.A} -> {bench.B}", 12.5)
    assert _run(2).noisiest() is None


def test_runs_with_too_much_steal_are_set_aside_printed_and_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The selection alone: one_run is a double here (no machine is booted), with the
    steal each run's windows report."""
    steal = {1: 0.5, 2: 18.7, 3: 1.0, 4: 29.5, 5: 0.2, 6: 0.1}
    made: list[int] = []

    def one_run(index: int, *_: object) -> tuple[bench.RunFigures, list[bench.Phase]]:
        made.append(index)
        return _run(index, update=steal[index]), []

    monkeypatch.setattr(bench, "one_run", one_run)
    args = argparse.Namespace(runs=3, max_steal=5.0, workers=4, interval=0.05)
    kept: list[tuple[bench.RunFigures, list[bench.Phase]]] = []
    aside: list[tuple[bench.RunFigures, list[bench.Phase]]] = []
    bench._measure(args, Path("/nowhere"), kept, aside)
    assert made == [1, 2, 3, 4, 5]  # three quiet runs, then no more
    assert [r.run for r, _ in kept] == [1, 3, 5]
    assert [r.run for r, _ in aside] == [2, 4]

    text, summary = bench.report([r for r, _ in kept], [r for r, _ in aside], 5.0)
    assert "set aside for more than 5 % host CPU steal: run 2, run 4" in text
    assert "  run 2 (sb2), host loadavg 1.00 1.00 1.00" in text.splitlines()
    assert [r["run"] for r in summary["set_aside"]] == [2, 4]
    assert [r["run"] for r in summary["runs"]] == [1, 3, 5]


def test_at_most_twice_the_runs_are_made_however_noisy_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[int] = []

    def one_run(index: int, *_: object) -> tuple[bench.RunFigures, list[bench.Phase]]:
        made.append(index)
        return _run(index, quiet=30.0), []

    args = argparse.Namespace(runs=2, max_steal=5.0, workers=4, interval=0.05)
    kept: list[tuple[bench.RunFigures, list[bench.Phase]]] = []
    aside: list[tuple[bench.RunFigures, list[bench.Phase]]] = []
    monkeypatch.setattr(bench, "one_run", one_run)
    bench._measure(args, Path("/nowhere"), kept, aside)
    assert made == [1, 2, 3, 4]
    assert kept == [] and len(aside) == 4


def test_when_too_few_runs_are_quiet_the_figures_say_they_include_noisy_ones() -> None:
    runs = [_run(1, update=30.0), _run(2, quiet=0.5)]
    text, summary = bench.report(runs, [], 5.0, noisy_included=True)
    assert "noisy runs included: too few had at most 5 % host CPU steal" in text
    assert summary["noisy_runs_included"] is True
    assert summary["set_aside"] == []
    _, quiet = bench.report(runs[1:], runs[:1], 5.0)
    assert quiet["noisy_runs_included"] is False
