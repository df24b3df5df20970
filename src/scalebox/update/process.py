"""The one door for running programs: argv in, stdout out, a CommandError on failure."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from scalebox.update.errors import CommandError


def run(
    argv: Sequence[str],
    description: str,
    *,
    timeout: float = 300.0,
    env: Mapping[str, str] | None = None,
    hint: str | None = None,
) -> str:
    """Run ``argv`` (never through a shell) and return its stdout.

    ``description`` says in words what the command does, for the error a
    person reads: "restart scaleboxd failed: ...".

    The program runs in a session of its own, away from the terminal: a
    Ctrl-C or hang-up reaches the updater only, which decides whether the
    program is stopped (an exception here kills it) or finishes (a shielded
    rollback must not lose its `systemctl restart`).
    """
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CommandError(
            f"{description} failed: program {argv[0]} not found",
            hint or f"install {argv[0]} or check PATH",
        ) from None
    except subprocess.TimeoutExpired:
        raise CommandError(
            f"{description} did not finish within {timeout:.0f} s ({' '.join(argv)})",
            hint,
        ) from None
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise CommandError(
            f"{description} failed (exit {done.returncode}): {output or 'no output'}",
            hint,
        )
    return done.stdout
