"""The updater's errors, one class per outcome; main.exit_code_for maps them to exit codes."""

from __future__ import annotations

from scalebox.errors import ScaleboxError


class UpdateError(ScaleboxError):
    """Refused before any change to the running install: nothing was changed."""


class CommandError(UpdateError):
    """A program the updater ran (systemctl, pip, the new scaleboxd) failed.

    ``exit_status``: what it exited with when it ran to its end and said no
    (above 0); None when it could not run, was killed or overran.
    """

    def __init__(self, what: str, hint: str | None = None, *, exit_status: int | None = None):
        super().__init__(what, hint)
        self.exit_status = exit_status


class VerifyError(UpdateError):
    """The service did not come up healthy with the expected version."""


class RolledBack(UpdateError):
    """The new release failed after the switch; the old one runs again, verified healthy."""

    step_times: dict[str, float] | None = None  # when each step began, for --json


class RollbackFailed(UpdateError):
    """The old release could not be brought back healthy: a person must step in."""


class LockHeld(UpdateError):
    """Another scalebox-update holds the lock."""


def os_error(exc: OSError) -> str:
    """An OSError in words: what failed on which file ("No space left on device: /var/...")."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def reason_of(exc: BaseException) -> str:
    """What went wrong, in words for a person: an error's ``what``, an OSError's text."""
    if isinstance(exc, ScaleboxError):  # an UpdateError, or a config's or release's own
        return exc.what
    if isinstance(exc, OSError):
        return os_error(exc)  # "Read-only file system: /opt/...", never "[Errno 30] ..."
    return f"{type(exc).__name__}: {exc}"
