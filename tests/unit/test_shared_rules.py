"""The shared one-place rules, each tested once with cases written by hand:
the retry schedule (scalebox.retry), the `systemctl show` parser
(scalebox.unitprops) and the program runner (scalebox.runner).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from scalebox import unitprops
from scalebox.retry import backoff_delays
from scalebox.runner import ProgramError, run_program

# -- retry ---------------------------------------------------------------------


def test_backoff_delays_grow_are_capped_and_jittered() -> None:
    delays = backoff_delays(6, base=0.5, cap=4.0, rng=random.Random(7))
    # Each pause lies in [d/2, d], d = 0.5, 1, 2, 4 (the cap), 4, 4: written out by hand.
    bounds = [(0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.0, 4.0), (2.0, 4.0)]
    assert len(delays) == len(bounds)
    for delay, (low, high) in zip(delays, bounds, strict=True):
        assert low <= delay <= high
    assert delays == backoff_delays(6, base=0.5, cap=4.0, rng=random.Random(7))
    assert delays != backoff_delays(6, base=0.5, cap=4.0, rng=random.Random(8))
    assert backoff_delays(0) == []


# -- systemctl show --------------------------------------------------------------

TWO_UNITS = (
    "Id=scalebox-vm@vm-0123456789ab.service\n"
    "MainPID=77\n"
    "ActiveState=active\n"
    "ExecStart={ path=/usr/bin/python3 ; argv[]=/usr/bin/python3 -m x --a=b }\n"
    "\n"
    "Id=scalebox-vm@vm-ba9876543210.service\n"
    "MainPID=0\n"
    "ActiveState=inactive\n"
)


def test_show_output_is_one_block_per_unit_split_at_the_first_equals() -> None:
    assert unitprops.parse_blocks(TWO_UNITS) == [
        {
            "Id": "scalebox-vm@vm-0123456789ab.service",
            "MainPID": "77",
            "ActiveState": "active",
            "ExecStart": "{ path=/usr/bin/python3 ; argv[]=/usr/bin/python3 -m x --a=b }",
        },
        {"Id": "scalebox-vm@vm-ba9876543210.service", "MainPID": "0", "ActiveState": "inactive"},
    ]


def test_show_output_of_one_unit_and_of_none() -> None:
    assert unitprops.parse("ActiveState=failed\nSubState=failed\n") == {
        "ActiveState": "failed",
        "SubState": "failed",
    }
    assert unitprops.parse("") == {}
    assert unitprops.parse("\n\n") == {}
    assert unitprops.parse_blocks("junk line\n\nA=1\n\n\n") == [{"A": "1"}]


@pytest.mark.parametrize(
    ("raw", "value"), [("1234", 1234), ("0", 0), ("", 0), ("[not set]", 0), ("-1", 0)]
)
def test_numbers_that_are_not_numbers_read_as_zero(raw: str, value: int) -> None:
    assert unitprops.number({"MainPID": raw}, "MainPID") == value
    assert unitprops.number({}, "MainPID") == 0


# -- running a program ----------------------------------------------------------------


def test_a_program_that_fails_is_finished_with_its_output() -> None:
    code = "import sys; print('out'); print('the reason', file=sys.stderr); sys.exit(3)"
    done = run_program([sys.executable, "-c", code], timeout=30)
    assert (done.ok, done.returncode, done.stdout, done.output) == (False, 3, "out\n", "the reason")


def test_stdin_is_never_the_terminal() -> None:
    done = run_program(
        [sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"], timeout=30
    )
    assert done.stdout == "''\n"
    fed = run_program(
        [sys.executable, "-c", "import sys; print(sys.stdin.read())"], timeout=30, input_text="hi"
    )
    assert fed.stdout == "hi\n"


def test_a_missing_program_and_an_overrun_are_program_errors() -> None:
    with pytest.raises(ProgramError) as missing:
        run_program(["/nonexistent/program"], timeout=5)
    assert missing.value.kind == "not found"
    assert missing.value.detail == "program /nonexistent/program not found"
    with pytest.raises(ProgramError) as slow:
        run_program([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow.value.kind == "timeout"
    assert slow.value.detail.endswith(" did not finish within 0.5 s (killed)")


# Exits 7 on SIGTERM after writing a file, as apt-get finishing its step would.
_STOPS_ON_TERM = (
    "import signal, sys, time\n"
    "def stop(*_):\n"
    "    time.sleep(0.3); open(sys.argv[1], 'w').write('clean'); sys.exit(7)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)


def test_an_overrun_with_a_grace_is_asked_to_stop_before_it_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    with pytest.raises(ProgramError) as slow:
        run_program([sys.executable, "-c", _STOPS_ON_TERM, str(marker)], timeout=3, stop_grace=10)
    assert slow.value.kind == "timeout"
    assert slow.value.detail.endswith(" did not finish within 3 s (stopped with SIGTERM)")
    assert marker.read_text() == "clean"


def test_an_overrun_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
    started = time.monotonic()
    with pytest.raises(ProgramError) as slow:
        run_program([sys.executable, "-c", ignores], timeout=1.0, stop_grace=1.0)
    assert slow.value.detail.endswith("(killed: still running 1 s after SIGTERM)")
    assert time.monotonic() - started < 10


def _blocked_in_child(shield: bool) -> set[int]:
    status = run_program(["cat", "/proc/self/status"], timeout=10, new_session=True, shield=shield)
    line = next(x for x in status.stdout.splitlines() if x.startswith("SigBlk:"))
    mask = int(line.split()[1], 16)
    return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}


# Leaves a grandchild holding the output pipes open (as dpkg under apt-get), then waits.
_WITH_GRANDCHILD = 'sleep 30 & echo $! > "$1"; exec sleep 30'


def _kill_pid_in(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(path.read_text()), signal.SIGKILL)


def test_an_overrun_whose_grandchild_holds_its_output_is_not_waited_for(tmp_path: Path) -> None:
    grandchild = tmp_path / "pid"
    started = time.monotonic()
    try:
        with pytest.raises(ProgramError) as slow:
            run_program(["sh", "-c", _WITH_GRANDCHILD, "sh", str(grandchild)], timeout=1.0)
        assert slow.value.detail.endswith("(killed)")
        assert time.monotonic() - started < 20  # was 30: until the grandchild ended
    finally:
        _kill_pid_in(grandchild)


def test_a_stop_whose_grandchild_still_runs_is_said_as_such(tmp_path: Path) -> None:
    grandchild = tmp_path / "pid"
    started = time.monotonic()
    try:
        with pytest.raises(ProgramError) as slow:
            run_program(
                ["sh", "-c", _WITH_GRANDCHILD, "sh", str(grandchild)], timeout=1.0, stop_grace=3.0
            )
        assert slow.value.detail.endswith("(stopped with SIGTERM; a program it started still runs)")
        assert time.monotonic() - started < 20
    finally:
        _kill_pid_in(grandchild)


def test_a_shielded_child_starts_with_the_group_signals_blocked() -> None:
    """Between fork and setsid() the child is still in our process group: a Ctrl-C there
    must not kill a shielded one, so it starts with SIGINT, SIGHUP and SIGTERM blocked;
    any other child starts with them as we had them."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    wanted = {int(signal.SIGINT), int(signal.SIGHUP), int(signal.SIGTERM)}
    assert wanted <= _blocked_in_child(shield=True)
    assert not wanted & _blocked_in_child(shield=False)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before  # ours restored
