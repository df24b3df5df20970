"""What a request sees when a program under it is killed (scaleboxd during a restart).

Real programs, no doubles: a shell that kills itself with a signal stands
for the `systemctl` a restart's SIGTERM would reach.
"""

from __future__ import annotations

import os

import pytest

from scalebox.daemon.errors import Unavailable
from scalebox.daemon.vms.command import CommandFailed, run


def test_a_program_killed_by_a_signal_is_a_retryable_503() -> None:
    with pytest.raises(Unavailable) as caught:
        run(["sh", "-c", "kill -TERM $$"], "start the unit of VM vm-x")
    assert caught.value.status == 503
    assert caught.value.retry_after > 0
    assert "stopped by a signal (15)" in caught.value.what


def test_a_program_that_fails_is_still_a_500() -> None:
    with pytest.raises(CommandFailed) as caught:
        run(["sh", "-c", "echo no such unit >&2; exit 5"], "start the unit of VM vm-x")
    assert caught.value.status == 500
    assert "no such unit" in caught.value.what


def test_the_program_runs_in_a_session_of_its_own() -> None:
    """A terminal's signal to the daemon's process group does not reach it."""
    out = run(["sh", "-c", "ps -o sid= -p $$ 2>/dev/null || cut -d' ' -f6 /proc/$$/stat"], "x")
    assert int(out.split()[0]) != os.getsid(0)
