"""Which signals stop the updater, sent for real to this process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from scalebox.update import interrupt, process
from scalebox.update.errors import CommandError


def test_sigint_and_sigterm_stop_an_unsettled_transaction() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        with (
            interrupt.catching(),
            pytest.raises(interrupt.Interrupted, match=signal.Signals(sig).name),
        ):
            signal.raise_signal(sig)


def test_once_stopped_later_signals_cannot_cut_the_cleanup_short(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A Ctrl-C held down: the second one lands in the first one's ``except``, before
    its cleanup is shielded (transaction.py). It is noted, not raised."""
    cleaned = False
    with interrupt.catching():
        try:
            signal.raise_signal(signal.SIGINT)
        except interrupt.Interrupted:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            cleaned = True
    assert cleaned
    assert "SIGINT ignored: already stopping" in capfd.readouterr().err
    # The outermost scope ended: the next run's first signal stops it again.
    with interrupt.catching(), pytest.raises(interrupt.Interrupted):
        signal.raise_signal(signal.SIGINT)


def test_a_hang_up_never_stops_it(capfd: pytest.CaptureFixture[str]) -> None:
    with interrupt.catching():
        signal.raise_signal(signal.SIGHUP)
    assert "SIGHUP (the terminal hung up): carrying on" in capfd.readouterr().err


def test_once_settled_signals_are_noted_until_the_program_ends(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with interrupt.catching():
        with interrupt.catching():  # the transaction's own scope, inside main's
            interrupt.settle()
        # Still settled after the inner scope: main's result must not change.
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # said once: a held-down Ctrl-C is one line
        signal.raise_signal(signal.SIGTERM)
        interrupt.unsettle()
        with pytest.raises(interrupt.Interrupted):
            signal.raise_signal(signal.SIGINT)
    assert capfd.readouterr().err.count("ignored: the transaction is finishing") == 2
    # The outermost scope ended: the flag is gone with it, the handlers restored.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_after_a_settled_run_signals_are_ignored_until_exit() -> None:
    """main()'s scope ends with the outcome settled: only the exit is left."""
    saved = {s: signal.getsignal(s) for s in interrupt.HANDLED}
    try:
        with interrupt.catching():
            interrupt.settle()
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in interrupt.HANDLED)
        signal.raise_signal(signal.SIGINT)  # would raise KeyboardInterrupt otherwise
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_after_the_programs_last_scope_a_signal_cannot_change_the_exit_code() -> None:
    """Refused, not settled: a Ctrl-C while the outcome is printed must not make it 130."""
    before = {s: signal.getsignal(s) for s in interrupt.HANDLED}
    try:
        with pytest.raises(interrupt.Interrupted), interrupt.catching(last=True):
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # would raise KeyboardInterrupt otherwise
        signal.raise_signal(signal.SIGTERM)  # would end pytest otherwise
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in interrupt.HANDLED)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _sleep_with_a_sigint_meanwhile(seconds: float) -> float:
    """Run a real `sleep` the way the updater runs programs, with a SIGINT 0.2 s in;
    return how long the program ran."""
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        process.run(["sleep", str(seconds)], "sleep")
    finally:
        timer.cancel()
        ran = time.monotonic() - started
    return ran


def test_a_deferred_program_finishes_before_a_signal_stops_the_run(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """apt-get killed half way leaves dpkg's database for `dpkg --configure -a`."""
    ran = 0.0
    with (
        interrupt.catching(),
        pytest.raises(interrupt.Interrupted) as caught,
        interrupt.deferred("sleep"),
    ):
        ran = _sleep_with_a_sigint_meanwhile(1.0)
    assert ran >= 1.0  # not killed
    assert caught.value.what == "interrupted by SIGINT (after sleep had finished)"
    assert "stopping once sleep has finished" in capfd.readouterr().err


def test_without_deferring_a_signal_stops_the_program_at_once() -> None:
    started = time.monotonic()
    with interrupt.catching(), pytest.raises(interrupt.Interrupted):
        _sleep_with_a_sigint_meanwhile(5.0)
    assert time.monotonic() - started < 3


def test_an_error_of_the_deferred_block_wins_over_a_signal_meanwhile() -> None:
    with (
        interrupt.catching(),
        pytest.raises(CommandError, match="exit 3"),
        interrupt.deferred("sh"),
    ):
        signal.raise_signal(signal.SIGINT)
        process.run(["sh", "-c", "exit 3"], "sh")
    with interrupt.catching(), pytest.raises(interrupt.Interrupted):
        signal.raise_signal(signal.SIGINT)  # nothing was left pending or stopping


# The real entry point, with a SIGTERM sent to itself right after it lowered its
# priority, while the ~0.4 s of imports that follow run.
EARLY_SIGTERM = """
import os, signal, sys
from scalebox import priority
from scalebox.update import entry

lower = priority.lower

def lower_then_signalled(*args, **kwargs):
    given = lower(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return given

priority.lower = lower_then_signalled
sys.exit(entry.main())
"""


def test_a_sigterm_during_the_entry_points_imports_is_an_interrupted_run() -> None:
    """Python's default SIGTERM ended the updater with 143 while it imported, before
    main() handled signals: no --json result, and its session left lowered."""
    done = subprocess.run(
        [sys.executable, "-c", EARLY_SIGTERM, "--json", "status"],
        capture_output=True, text=True, timeout=60, start_new_session=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert (result["exit_code"], result["message"]) == (1, "interrupted by SIGTERM")
