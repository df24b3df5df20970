"""A test run stopped by SIGTERM or Ctrl-C tears down what its tests started.

Python's default for SIGTERM ends the process at once: no fixture's teardown
runs, so a test's scaleboxd (started in a session of its own), its stand-in
VMs, or a system test's machine and network namespace outlived the run (seen:
a test daemon left running after a CI run was stopped with SIGTERM). Raised as
KeyboardInterrupt, pytest stops the test and tears down every fixture, as on
Ctrl-C. A CI's SIGKILL cannot be caught; tools/machine.py sweeps stale
machines at the next start. Not tools/machine.sigterm_raises (SystemExit):
pytest reports a SystemExit inside a test as that test's failure and goes on.

Under pytest-xdist each worker leads a session of its own. The updater lowers
the CPU priority of the session it shares (scalebox.priority), and its tests do
so on purpose: in one shared session, one worker's update test lowered the
other worker's tests too, and two of them restoring in turn could leave the
session lowered, so conftest's check that no test leaves it so had to be off.
A worker in its own session gets no Ctrl-C from the terminal, so the run
itself (the xdist controller) passes SIGINT and SIGTERM on to its workers:
each stops its test, tears down and reports itself interrupted, which ends the
run. A second signal stops the controller too, without waiting for them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from types import FrameType

import pytest

WORKER = "PYTEST_XDIST_WORKER"  # set by pytest-xdist in each worker


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def tear_down_on_sigterm() -> None:
    """From the main thread (pytest's), at startup; in an xdist worker, also
    leave the run's session for one of its own."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _interrupt)
    if os.environ.get(WORKER):
        with contextlib.suppress(PermissionError):  # already leads its process group
            os.setsid()


_FORWARDED: list[int] = []


def _workers() -> list[int]:
    """The controller's children: its xdist workers."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def _forward(signum: int, _frame: FrameType | None) -> None:
    for pid in _workers():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    if _FORWARDED:
        raise KeyboardInterrupt(f"stopped by a second signal {signum}")
    _FORWARDED.append(signum)


def forward_to_workers(config: pytest.Config) -> None:
    """At the start of the session: in an xdist controller (the run itself, running
    workers), pass SIGINT and SIGTERM on to the workers; elsewhere nothing."""
    controller = not os.environ.get(WORKER) and config.pluginmanager.has_plugin("dsession")
    if controller and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _forward)
        signal.signal(signal.SIGTERM, _forward)
