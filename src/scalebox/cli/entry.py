"""`scalebox`'s entry point: a Ctrl-C while the CLI imports is an interruption.

Importing the CLI (click, httpx, rich) takes a noticeable moment, before
ScaleboxGroup handles Ctrl-C; Python's default then printed a
KeyboardInterrupt traceback. Nothing has been done yet at that point, so
the program says "interrupted" and exits with 130 at once, as it does
later on.
"""

from __future__ import annotations

import os
import signal
import types

from scalebox.cli.errors import EXIT_INTERRUPTED


def _interrupted(_signum: int, _frame: types.FrameType | None) -> None:
    # os.write and os._exit: one system call each, safe inside a signal handler, and
    # there is nothing to clean up yet.
    os.write(2, b"scalebox: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def main() -> None:
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:  # a job started with Ctrl-C ignored keeps it so
        signal.signal(signal.SIGINT, _interrupted)
    from scalebox.cli.main import main as run  # noqa: PLC0415 - the point of this module

    signal.signal(signal.SIGINT, previous)
    run()
