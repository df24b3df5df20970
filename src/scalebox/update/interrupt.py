"""SIGTERM and SIGINT become an exception where the updater is, so the transaction rolls back.

While a rollback runs it is ``shielded``: a signal then is noted and
ignored, because stopping a rollback half way would leave the server
between two releases. (SIGKILL cannot be caught; the journal covers it.)
"""

from __future__ import annotations

import signal
import types
from collections.abc import Iterator
from contextlib import contextmanager

from scalebox.update.errors import UpdateError

_shield_depth = 0


class Interrupted(UpdateError):
    """SIGTERM or SIGINT arrived."""


def _on_signal(signum: int, _frame: types.FrameType | None) -> None:
    if _shield_depth:
        return
    raise Interrupted(
        f"interrupted by {signal.Signals(signum).name}",
        "run scalebox-update again; it finishes any interrupted transaction first",
    )


@contextmanager
def catching() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into Interrupted for the ``with`` block."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def shielded() -> Iterator[None]:
    """Let the ``with`` block finish even when SIGTERM/SIGINT arrive."""
    global _shield_depth  # noqa: PLW0603 - one process-wide flag, read by the signal handler
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1
