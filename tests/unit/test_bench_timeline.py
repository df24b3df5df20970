"""An update's timeline puts its slowest requests beside what was happening (tools/bench.py)."""

from __future__ import annotations

from tools import bench
from tools.loadgen import Sample


def test_the_slowest_counted_requests_are_named_in_time_order_with_the_steps() -> None:
    start = 1000.0
    phase = bench.Phase("update", start, start + 10, {})
    phase.measured_from = start + 0.3
    phase.samples = {
        "new connection": [
            Sample(start + 0.1, 0.050, "ok"),  # the load warming up: not in the figures
            Sample(start + 3.2, 0.0296, "ok"),
            Sample(start + 5.0, 0.004, "ok"),
        ],
        "open loop": [Sample(start + 1.0, 0.0196, "ok"), Sample(start + 9.6, 0.0223, "ok")],
    }
    longest = bench.slowest(phase)
    assert [round(took * 1000, 1) for _, took, _ in longest] == [29.6, 22.3, 19.6]

    run = bench.UpdaterRun(
        started=start + 0.34,
        ended=start + 9.5,
        exit_code=0,
        result={"step_times": {"handover": start + 2.17, "verify": start + 4.06}},
        lines=[],
        peak_rss_mb=55.0,
    )
    journal = [
        (start + 3.0, "scaleboxd 1.1.0 ready"),
        (start + 3.1, "scaleboxd.api: GET /health 200"),  # an access-log line: left out
    ]
    assert bench.update_timeline(run, journal, longest) == [
        "+ 0.660 s  request: 19.6 ms (open loop)",
        "+ 1.830 s  updater: handover",
        "+ 2.660 s  systemd: scaleboxd 1.1.0 ready",
        "+ 2.860 s  request: 29.6 ms (new connection)",
        "+ 3.720 s  updater: verify",
        "+ 9.260 s  request: 22.3 ms (open loop)",
    ]
