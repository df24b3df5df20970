"""The one door for running other programs (systemctl, cp)."""

from __future__ import annotations

import subprocess

from scalebox.daemon.errors import ApiError, Unavailable


class CommandFailed(ApiError):
    """A program the daemon relies on failed; ``what`` carries its stderr."""

    status = 500


def run(argv: list[str], description: str, *, timeout: float = 60.0) -> str:
    """Run ``argv`` (no shell) and return its stdout; raise CommandFailed on failure.

    ``description`` says what the command was for, in words a person reading
    the error understands ("start the unit of VM vm-...").
    """
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            # Its own session: a signal meant for the daemon (a terminal's Ctrl-C
            # in development) does not kill the systemctl a request waits on.
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CommandFailed(
            f"could not {description}: {argv[0]} is not installed", f"install {argv[0]}"
        ) from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(
            f"could not {description}: {' '.join(argv)} did not finish in {timeout:.0f} s",
            "check the system's load and the program's logs",
        ) from None
    if done.returncode < 0:
        # Killed by a signal: the machine or the service is stopping. The
        # request may be retried; it is no server error.
        raise Unavailable(
            f"could not {description}: {argv[0]} was stopped by a signal "
            f"({-done.returncode}); the server is restarting",
            "retry in a few seconds",
        )
    if done.returncode != 0:
        stderr = done.stderr.strip() or done.stdout.strip() or "no output"
        raise CommandFailed(
            f"could not {description}: {' '.join(argv)} exited with {done.returncode}: {stderr}",
            "see the daemon's log (journalctl -u scaleboxd) for context",
        )
    return done.stdout
