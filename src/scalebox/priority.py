"""Work that can wait gives way to the daemon serving: a lower CPU priority, then back.

During an update the serving daemon shares a small server with work that
can wait: the updater downloading, verifying and building the next release,
and the next daemon importing Python and reconciling VMs before it serves
(each about a second of CPU). With both cores busy a request waits for the
CPU. So that work runs ``NICER`` steps nicer than the process was started
with (a unit's ``Nice=``, 0 by default), and goes back to it when it is
over: the daemon just before it tells systemd it is ready, the updater
before it switches (from then on the service is at stake). Only root can go
back (CAP_SYS_NICE); any other user keeps its priority throughout.

Nice values are per thread on Linux: both steps set every thread of the process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

NICER = 10
MAX_NICE = 19

Warn = Callable[[str], None]


def _threads() -> list[int]:
    try:
        return [int(task.name) for task in Path("/proc/self/task").iterdir()]
    except OSError:
        return [0]  # 0: the calling thread


def _set(nice: int) -> None:
    for tid in _threads():
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def lower(warn: Warn) -> int | None:
    """Make the process ``NICER``; return the value ``restore()`` goes back to.

    None (nothing changed) when the process could not raise its priority again.
    """
    if os.geteuid() != 0:
        return None
    given = os.getpriority(os.PRIO_PROCESS, 0)
    nicer = min(given + NICER, MAX_NICE)
    if nicer == given:
        return None
    try:
        _set(nicer)
    except OSError as exc:
        warn(f"cannot lower the CPU priority ({exc.strerror}); going on at the one it has")
        return None
    return given


def restore(given: int | None, warn: Warn) -> None:
    """Back to the priority ``lower()`` found; a failure is only reported."""
    if given is None:
        return
    try:
        _set(given)
    except OSError as exc:
        warn(
            f"cannot restore the CPU priority (nice {given}): {exc.strerror}; it stays "
            "lower until the process ends (restart it to serve at full priority)"
        )


# The priority the process had before lower_process(), until restore_process().
_lowered: dict[str, int | None] = {}


def lower_process(warn: Warn) -> None:
    """lower() until restore_process(), from anywhere in the process; a second call is a no-op."""
    if "given" not in _lowered:
        _lowered["given"] = lower(warn)


def restore_process(warn: Warn) -> None:
    """Undo lower_process(), if it ran; else nothing."""
    if "given" in _lowered:
        restore(_lowered.pop("given"), warn)
