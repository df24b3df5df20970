"""What a request sees when a program under it is killed (scaleboxd during a restart).

Real programs, no doubles: a shell that kills itself with a signal stands
for the `systemctl` a restart's SIGTERM would reach.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from scalebox.daemon.errors import Unavailable
from scalebox.daemon.vms.command import CommandFailed, run


def test_a_program_killed_by_a_signal_is_a_retryable_503() -> None:
    with pytest.raises(Unavailable) as caught:
        run(["sh", "-c", "kill -TERM $$"], "start the unit of VM vm-x")
    assert caught.value.status == 503
    assert caught.value.retry_after > 0
    assert caught.value.what == (
        "could not start the unit of VM vm-x: sh was killed by signal 15 (SIGTERM) (the "
        "server may be restarting, or the program ran out of memory)"
    )
    assert "dmesg for the OOM killer" in str(caught.value.hint)


def test_a_program_that_fails_is_still_a_500() -> None:
    with pytest.raises(CommandFailed) as caught:
        run(["sh", "-c", "echo no such unit >&2; exit 5"], "start the unit of VM vm-x")
    assert caught.value.status == 500
    assert "no such unit" in caught.value.what


def test_the_program_runs_in_a_session_of_its_own() -> None:
    """A terminal's signal to the daemon's process group does not reach it."""
    out = run(["sh", "-c", "ps -o sid= -p $$ 2>/dev/null || cut -d' ' -f6 /proc/$$/stat"], "x")
    assert int(out.split()[0]) != os.getsid(0)


def test_a_vm_unit_stops_within_the_time_scaleboxd_waits_for_its_stop() -> None:
    """systemd's default 90 s outlasted the 60 s scaleboxd waits for `systemctl stop`:
    a guest ignoring its shutdown made DELETE fail while the stop ran on."""
    unit = Path(__file__).parents[2] / "units" / "scalebox-vm@.service"
    stop = [line for line in unit.read_text().splitlines() if line.startswith("TimeoutStopSec=")]
    waited = inspect.signature(run).parameters["timeout"].default
    assert len(stop) == 1
    assert int(stop[0].removeprefix("TimeoutStopSec=")) + 10 <= waited
