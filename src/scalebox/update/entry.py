"""`scalebox-update`'s entry point: the updater's imports run nicer too.

Importing the updater (click, httpx, rich, cryptography; and httpcore, which
httpx imports only at its first client) is about 0.4 s of CPU, as much as a
third of a stage, and it happens before any step. So it
runs at the lower priority of the steps before the switch (scalebox.priority),
before those imports are made; main() then starts at the priority it was
given, and an update lowers it again before its first step, until the switch.

Signals come first of all: a SIGTERM or Ctrl-C during those imports is kept
(interrupt.keep_early) and told once main() handles signals, as an
interrupted run (exit 1), with the priority put back on the way out.
"""

from __future__ import annotations

import contextlib
import signal
import sys

from scalebox import priority
from scalebox.update import interrupt


def _warn(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"scalebox-update: warning: {message}", file=sys.stderr, flush=True)


def main() -> int:
    # First: a signal during the imports is kept and told once main() handles signals.
    for signum in interrupt.HANDLED:
        signal.signal(signum, interrupt.keep_early)
    given = priority.lower(_warn, priority.Session.SHARED)
    try:
        # httpx imports httpcore only at its first Client(): ~70 ms of CPU, lowered here too.
        import httpcore  # noqa: F401, PLC0415

        from scalebox.update.main import main as run  # noqa: PLC0415 - the point of this module
    finally:
        priority.restore(given, _warn)
    return run()
