"""How long a download may take and how slowly it may go: pure decisions over a clock.

A server that drips a byte every two seconds never trips a read timeout, so
a download also has a total time limit and a minimum transfer rate measured
over a window. Both come from the environment (docs/operations.md):

    SCALEBOX_DOWNLOAD_TIMEOUT   seconds for the whole download, retries included (1800)
    SCALEBOX_DOWNLOAD_MIN_RATE  bytes/s, averaged over each 60 s of transfer (4096)

0 turns a limit off. The total limit is also enforced while a read is
blocked (``deadline``): a read timeout starts again with every byte, so a
server dripping its headers would otherwise hold the update for days.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType

from scalebox.errors import UsageError

DEFAULT_TOTAL = 1800.0
DEFAULT_MIN_RATE = 4096.0
DEFAULT_WINDOW = 60.0
# The releases API answers in a few KB: one request may take this long in all.
API_TOTAL = 60.0

Clock = Callable[[], float]


@dataclass(frozen=True)
class Limits:
    total: float = DEFAULT_TOTAL  # seconds; 0 = none
    min_rate: float = DEFAULT_MIN_RATE  # bytes/s; 0 = none
    window: float = DEFAULT_WINDOW  # seconds over which min_rate is averaged

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Limits:
        """The limits the environment sets; a bad value is a usage error (exit 2)."""
        return cls(
            total=_number(environ, "SCALEBOX_DOWNLOAD_TIMEOUT", DEFAULT_TOTAL),
            min_rate=_number(environ, "SCALEBOX_DOWNLOAD_MIN_RATE", DEFAULT_MIN_RATE),
        )

    def hint(self) -> str:
        return (
            "check the network and the server, then run scalebox-update again; "
            "SCALEBOX_DOWNLOAD_TIMEOUT and SCALEBOX_DOWNLOAD_MIN_RATE set these limits "
            "(docs/operations.md)"
        )


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(
            f"{name}={raw[:40]!r} is not a number >= 0", f"set it to e.g. {default:g}, or unset it"
        )
    return value


@dataclass
class Pace:
    """The running clock of one download against its Limits."""

    limits: Limits
    clock: Clock = time.monotonic
    started: float = field(init=False)
    _window_start: float = field(init=False)
    _window_bytes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.started = self._window_start = self.clock()

    def restart_window(self) -> None:
        """A new attempt: the rate is measured from its first byte on."""
        self._window_start = self.clock()
        self._window_bytes = 0

    def overdue(self) -> str:
        return f"it took more than {self.limits.total:g} s (SCALEBOX_DOWNLOAD_TIMEOUT)"

    def over_time(self) -> str | None:
        """Why the download must stop now for its total limit, or None."""
        total = self.limits.total
        if total and self.clock() - self.started > total:
            return self.overdue()
        return None

    def received(self, n: int) -> str | None:
        """Count ``n`` new bytes; why the download must stop now, or None."""
        if (late := self.over_time()) is not None:
            return late
        self._window_bytes += n
        now = self.clock()
        elapsed = now - self._window_start
        if self.limits.min_rate and elapsed >= self.limits.window:
            rate = self._window_bytes / elapsed
            if rate < self.limits.min_rate:
                return (
                    f"it arrived at {rate:.0f} bytes/s over {elapsed:.0f} s, below the minimum "
                    f"of {self.limits.min_rate:g} bytes/s (SCALEBOX_DOWNLOAD_MIN_RATE)"
                )
            self._window_start, self._window_bytes = now, 0
        return None


class DeadlinePassed(Exception):
    """``deadline``'s time ran out while the code under it was running."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise DeadlinePassed once ``seconds`` have passed, even inside a blocked read.

    SIGALRM interrupts the blocked system call and its handler's exception ends
    it (PEP 475). Only the main thread receives signals: elsewhere, for 0 (no
    limit), or when another alarm is already set, this does nothing.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:  # someone else's alarm: leave it be
        yield
        return

    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        raise DeadlinePassed

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
