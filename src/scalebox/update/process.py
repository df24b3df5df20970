"""The updater's door for running programs: argv in, stdout out, a CommandError on failure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from scalebox.runner import ProgramError, run_program
from scalebox.update.errors import CommandError


def run(
    argv: Sequence[str],
    description: str,
    *,
    timeout: float = 300.0,
    env: Mapping[str, str] | None = None,
    hint: str | None = None,
    shield: bool = False,
    stop_grace: float = 0.0,
) -> str:
    """Run ``argv`` (never through a shell) and return its stdout.

    ``description`` says in words what the command does, for the error a
    person reads: "restart scaleboxd failed: ...".

    The program runs in a session of its own, away from the terminal: a
    Ctrl-C or hang-up reaches the updater only, which decides whether the
    program is stopped (an exception here kills it) or finishes (a shielded
    rollback must not lose its `systemctl restart`). ``shield`` closes the
    short window before the child leaves our session (runner.run_program).
    ``stop_grace``: an overrun is first asked to stop (runner.run_program).
    """
    try:
        done = run_program(
            argv,
            timeout=timeout,
            env=env,
            new_session=True,
            shield=shield,
            stop_grace=stop_grace,
        )
    except ProgramError as exc:
        if exc.kind == "not found":
            raise CommandError(
                f"{description} failed: {exc.detail}", hint or f"install {argv[0]} or check PATH"
            ) from None
        if exc.kind == "timeout":
            raise CommandError(f"{description} did not finish: {exc.detail}", hint) from None
        raise CommandError(f"{description} failed: {exc.detail}", hint) from None
    if not done.ok:
        raise CommandError(
            f"{description} failed (exit {done.returncode}): {done.output}",
            hint,
            exit_status=done.returncode if done.returncode > 0 else None,
        )
    return done.stdout
