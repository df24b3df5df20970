"""The one way to run a program to completion: argv in, a ``Finished`` out.

Every program (daemon, updater) calls this and turns the outcome into its own
error at its own boundary (``scalebox.update.process``,
``scalebox.daemon.vms.command``). Never a shell; stdin is /dev/null unless
given, so a child never reads the operator's terminal.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

OUTPUT_TAIL = 2000  # characters of a failed program's output kept for the message


@dataclass(frozen=True)
class Finished:
    """A program that ran to its end (any exit code)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output(self) -> str:
        """The end of stderr, else of stdout, for an error message; 'no output' when empty."""
        text = self.stderr.strip() or self.stdout.strip()
        return text[-OUTPUT_TAIL:] or "no output"

    @property
    def command(self) -> str:
        return " ".join(self.argv)


class ProgramError(Exception):
    """The program could not run to its end: ``kind`` is 'not found', 'timeout' or 'oserror'."""

    def __init__(self, kind: str, argv: Sequence[str], detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.argv = tuple(argv)
        self.detail = detail


def run_program(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
    new_session: bool = False,
) -> Finished:
    """Run ``argv`` and wait for it; raise ProgramError when it cannot run or overruns.

    ``new_session`` starts it in a session of its own, so a signal sent to the
    caller's process group (a terminal's Ctrl-C or hang-up) does not reach it.
    """
    args = [str(a) for a in argv]
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            input=input_text,
            stdin=subprocess.DEVNULL if input_text is None else None,
            start_new_session=new_session,
            check=False,
        )
    except FileNotFoundError:
        raise ProgramError("not found", args, f"program {args[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise ProgramError(
            "timeout", args, f"{' '.join(args)} did not finish within {timeout:g} s"
        ) from None
    except OSError as exc:
        raise ProgramError("oserror", args, f"cannot run {args[0]}: {exc}") from None
    return Finished(tuple(args), done.returncode, done.stdout, done.stderr)
