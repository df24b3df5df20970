"""Signals during a transaction: which ones stop it, and which ones it rides out.

- SIGTERM and SIGINT before the outcome is settled become an exception
  where the updater is, so the transaction refuses (nothing changed yet)
  or rolls back (the switch may have happened).
- While a rollback runs it is ``shielded``: a signal then is noted and
  ignored, because stopping a rollback half way would leave the server
  between two releases.
- Once the outcome is ``settle``d (the commit began, or the rollback did),
  every later signal is noted and ignored until the program ends (after
  the outermost ``catching`` block, ignored outright), so the exit code
  stays the one the transaction earned.
- Once one signal has stopped the run (Interrupted raised), every later
  one is noted and ignored until the outermost ``catching`` block ends: the
  first one decided the outcome, and the cleanup it starts must finish. A
  Ctrl-C held down otherwise landed a second Interrupted between the first
  one's ``except`` and the ``shielded`` block inside it, which skipped the
  cleanup and its history entry (seen once in CI).
- SIGHUP (the admin's SSH session dropped) never stops anything: the
  transaction goes on and records its outcome; lost output is lost.

The programs the updater waits on run in their own session (process.py),
so a terminal's Ctrl-C, which reaches the whole foreground process group,
does not kill a `systemctl restart` under a rollback.
(SIGKILL cannot be caught; the journal covers it.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import types
from collections.abc import Iterator
from contextlib import contextmanager

from scalebox.update.errors import UpdateError

_shield_depth = 0
_settled = False
_catching_depth = 0
_noted: set[int] = set()  # signals already reported (once each is enough)
_stopping = False  # an Interrupted was raised: the run is on its way out
_deferring: str | None = None  # what runs inside deferred(): a signal waits for it
_deferred: list[str] = []  # signals that arrived meanwhile, by name
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_early: list[int] = []  # signals that arrived before the first catching() (entry.py)


class Interrupted(UpdateError):
    """SIGTERM or SIGINT arrived."""


def _note(signum: int, text: str) -> None:
    """Say once per signal kind that it arrived, straight to fd 2.

    A signal handler runs between two bytecodes of whatever the program was
    doing, maybe in the middle of a write to sys.stderr: writing there again
    would be a reentrant call. os.write is one system call, safe here; a
    terminal that is gone loses the line.
    """
    if signum in _noted:
        return
    _noted.add(signum)
    with contextlib.suppress(OSError):
        os.write(2, f"scalebox-update: {text}\n".encode())


def _on_signal(signum: int, _frame: types.FrameType | None) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGHUP:
        _note(
            signum,
            f"{name} (the terminal hung up): carrying on; `scalebox-update history` (or, "
            "for --stage, `scalebox-update status`) shows how it ended",
        )
        return
    global _stopping  # noqa: PLW0603 - one process-wide flag, read by this handler
    if _shield_depth or _settled:
        _note(signum, f"{name} ignored: the transaction is finishing and must not stop half way")
        return
    if _stopping:
        _note(signum, f"{name} ignored: already stopping; cleaning up first")
        return
    if _deferring is not None:
        _note(signum, f"{name}: stopping once {_deferring} has finished (it must not be killed)")
        _deferred.append(name)
        return
    _stopping = True
    raise Interrupted(
        f"interrupted by {name}",
        "run scalebox-update again; it finishes any interrupted transaction first",
    )


def keep_early(signum: int, _frame: types.FrameType | None) -> None:
    """The handler from the program's first line until catching() takes over (entry.py):
    the imports before it take ~0.4 s, and Python's default ended the program with 143
    meanwhile, its --json result unprinted and its session left lowered."""
    _early.append(signum)


def replay_early() -> None:
    """Raise again, once catching() handles them, the signals keep_early kept."""
    while _early:
        signal.raise_signal(_early.pop(0))


@contextmanager
def catching(*, last: bool = False) -> Iterator[None]:
    """Turn SIGTERM/SIGINT into Interrupted for the ``with`` block; ride out SIGHUP.

    ``last``: the program's own outermost scope (main.py). After it the
    program only prints the outcome it reached and exits with its code, so
    every later signal is ignored outright, settled or not: a Ctrl-C then
    must not turn a printed exit_code 1 into a process exit of 130.
    """
    global _catching_depth, _settled, _stopping  # noqa: PLW0603 - process-wide, read by the handler
    previous = {s: signal.signal(s, _on_signal) for s in HANDLED}
    _catching_depth += 1
    try:
        yield
    finally:
        _catching_depth -= 1
        if _catching_depth == 0:
            _noted.clear()
            _stopping = False
        if _catching_depth == 0 and (_settled or last):
            # The outermost scope of a settled run: all that is left is to exit
            # with the settled code, so a signal now must not replace it (a
            # default SIGINT handler would make it 130).
            _settled = False
            previous = dict.fromkeys(HANDLED, signal.SIG_IGN)
        for s, handler in previous.items():
            signal.signal(s, handler)


def settle() -> None:
    """From now until the outermost ``catching`` block ends, signals are noted only."""
    global _settled  # noqa: PLW0603 - one process-wide flag, read by the signal handler
    _settled = True


def unsettle() -> None:
    """Signals may stop the program again (a recovery finished; the run goes on to its task)."""
    global _settled  # noqa: PLW0603 - one process-wide flag, read by the signal handler
    _settled = False


@contextmanager
def deferred(what: str) -> Iterator[None]:
    """Let ``what`` finish even when SIGTERM/SIGINT arrive, then stop as they asked.

    For a program that a kill would leave half done outside our own files (apt
    and dpkg: packages unpacked and not configured, and every later apt run
    refusing until `dpkg --configure -a`). A signal meanwhile is noted; once the
    block has ended it is raised as Interrupted, unless the block raised an error
    of its own, which is then the one told (the run is refused either way).
    """
    global _deferring, _stopping  # noqa: PLW0603 - process-wide, read by the signal handler
    outer, _deferring = _deferring, what
    arrived: list[str] = []
    try:
        yield
    finally:
        _deferring = outer
        if outer is None:
            arrived, _deferred[:] = list(_deferred), []
    # Here only when the block ended without an error of its own (that one wins).
    if arrived and not (_shield_depth or _settled or _stopping):
        _stopping = True
        raise Interrupted(
            f"interrupted by {arrived[0]} (after {what} had finished)",
            "run scalebox-update again; it finishes any interrupted transaction first",
        )


@contextmanager
def shielded() -> Iterator[None]:
    """Let the ``with`` block finish even when SIGTERM/SIGINT arrive."""
    global _shield_depth  # noqa: PLW0603 - one process-wide flag, read by the signal handler
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1
