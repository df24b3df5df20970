"""The daemon's door for running other programs (systemctl, cp)."""

from __future__ import annotations

import os
import signal

from scalebox.daemon.errors import ApiError, Unavailable
from scalebox.runner import ProgramError, run_program

# What only scaleboxd itself may use: a child holding NOTIFY_SOCKET speaks to
# systemd in scaleboxd's name (systemd logs "Got notification message from PID ...").
PRIVATE_ENV = frozenset({"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})


class CommandFailed(ApiError):
    """A program the daemon relies on failed; ``what`` carries its stderr."""

    status = 500


def run(
    argv: list[str], description: str, *, timeout: float = 60.0, stdin: str | None = None
) -> str:
    """Run ``argv`` (no shell) and return its stdout; raise CommandFailed on failure.

    ``description`` says what the command was for, in words a person reading
    the error understands ("start the unit of VM vm-..."); ``stdin``, if
    given, is written to the program's standard input.
    """
    try:
        done = run_program(
            argv,
            timeout=timeout,
            input_text=stdin,
            env={key: value for key, value in os.environ.items() if key not in PRIVATE_ENV},
            # Its own session: a signal meant for the daemon (a terminal's Ctrl-C
            # in development) does not kill the systemctl a request waits on.
            new_session=True,
        )
    except ProgramError as exc:
        if exc.kind == "not found":
            raise CommandFailed(
                f"could not {description}: {argv[0]} is not installed", f"install {argv[0]}"
            ) from None
        raise CommandFailed(
            f"could not {description}: {exc.detail}",
            "check the system's load and the program's logs",
        ) from None
    if done.returncode < 0:
        # Killed by a signal: mostly the machine or the service stopping (the request
        # may be retried), but the kernel's OOM killer also ends programs this way.
        raise Unavailable(
            f"could not {description}: {argv[0]} was killed by signal "
            f"{_signal_name(-done.returncode)} (the server may be restarting, or the "
            "program ran out of memory)",
            "retry in a few seconds; if it happens again, see the server's log "
            "(journalctl -u scaleboxd, and dmesg for the OOM killer)",
        )
    if not done.ok:
        raise CommandFailed(
            f"could not {description}: {done.command} exited with {done.returncode}: {done.output}",
            "see the daemon's log (journalctl -u scaleboxd) for context",
        )
    return done.stdout


def _signal_name(number: int) -> str:
    try:
        return f"{number} ({signal.Signals(number).name})"
    except ValueError:
        return str(number)
