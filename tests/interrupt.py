"""A test run stopped by SIGTERM tears down like one stopped by Ctrl-C.

Python's default for SIGTERM ends the process at once: no fixture's teardown
runs, so a test's scaleboxd (started in a session of its own), its stand-in
VMs, or a system test's machine and network namespace outlived the run (seen:
a test daemon left running after a CI run was stopped with SIGTERM). Raised as
KeyboardInterrupt, pytest stops the test and tears down every fixture, as on
Ctrl-C. A CI's SIGKILL cannot be caught; tools/machine.py sweeps stale
machines at the next start. Not tools/machine.sigterm_raises (SystemExit):
pytest reports a SystemExit inside a test as that test's failure and goes on.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def tear_down_on_sigterm() -> None:
    """From the main thread (pytest's), at startup."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
