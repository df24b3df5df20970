"""The one way to run a program to completion: argv in, a ``Finished`` out.

Every program (daemon, updater) calls this and turns the outcome into its own
error at its own boundary (``scalebox.update.process``,
``scalebox.daemon.vms.command``). Never a shell; stdin is /dev/null unless
given, so a child never reads the operator's terminal.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from scalebox import priority

OUTPUT_TAIL = 2000  # characters of a failed program's output kept for the message
# How long a killed program's output is read before its pipes are closed unread.
PIPE_SECONDS = 5.0
# What a terminal or a service manager sends to a whole process group.
GROUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGHUP, signal.SIGTERM})


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
    shield: bool = False,
    stop_grace: float = 0.0,
) -> Finished:
    """Run ``argv`` and wait for it; raise ProgramError when it cannot run or overruns.

    A program that overruns ``timeout`` is killed (SIGKILL), or with
    ``stop_grace`` first asked to stop (SIGTERM) and killed only if it has not
    exited within that many seconds: for a program that must not die half way
    through its work (apt-get, whose dpkg leaves packages half installed).

    ``new_session`` starts it in a session of its own, so a signal sent to the
    caller's process group (a terminal's Ctrl-C or hang-up) does not reach it;
    that session has the caller's session nice from before the program starts
    (priority.session_setup), so work the caller does at a lower priority keeps
    it in its child.
    ``shield`` (with ``new_session``) also starts it with those signals
    blocked: between fork and setsid() it is still in the caller's group, and
    a Ctrl-C landing in that window would otherwise kill it (seen: a
    `systemctl show` the rollback waited on died of SIGINT under repeated
    Ctrl-C). Only for programs that must finish (systemctl, up to a start's
    15 s): the block stays for the child's life and is inherited by its own
    children; one left by a SIGKILLed caller ends with its systemd job. The
    caller's signals are blocked only while the child is created, then
    delivered as usual.
    """
    args = [str(a) for a in argv]
    setup = priority.session_setup(priority.session_nice()) if new_session else None
    try:
        with _group_signals_blocked(new_session and shield):
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL if input_text is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=dict(env) if env is not None else None,
                start_new_session=new_session,
                preexec_fn=setup,  # noqa: PLW1509 -- plain system calls only (session_setup)
            )
    except FileNotFoundError:
        raise ProgramError("not found", args, f"program {args[0]} not found") from None
    except OSError as exc:
        raise ProgramError("oserror", args, f"cannot run {args[0]}: {exc}") from None
    with proc:
        try:
            stdout, stderr = proc.communicate(input=input_text, timeout=timeout)
        except subprocess.TimeoutExpired:
            how = _stop_overrun(proc, stop_grace)
            raise ProgramError(
                "timeout", args, f"{' '.join(args)} did not finish within {timeout:g} s ({how})"
            ) from None
        except BaseException:
            proc.kill()  # an exception here (a signal the caller acts on) ends the child too
            proc.wait()
            raise
    return Finished(tuple(args), proc.returncode, stdout, stderr)


def _stop_overrun(proc: subprocess.Popen[str], grace: float) -> str:
    """Stop a program that overran its time; say how it ended.

    Never waits without a bound: a program it started (dpkg under apt-get) may
    hold the output pipes open after the program itself has exited.
    """
    how = "killed"
    if grace > 0:
        proc.terminate()
        try:
            proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            if proc.poll() is not None:
                _close_pipes(proc)
                return "stopped with SIGTERM; a program it started still runs"
            how = f"killed: still running {grace:g} s after SIGTERM"
        except BaseException:
            proc.kill()  # stopped while it was given its grace: no more grace
            _reap(proc)
            raise
        else:
            return "stopped with SIGTERM"
    proc.kill()
    _reap(proc)
    return how


def _reap(proc: subprocess.Popen[str]) -> None:
    try:
        proc.communicate(timeout=PIPE_SECONDS)
    except subprocess.TimeoutExpired:
        _close_pipes(proc)  # held open by a program it started
        proc.wait()


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


@contextlib.contextmanager
def _group_signals_blocked(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
