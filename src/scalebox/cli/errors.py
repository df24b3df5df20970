"""Errors of the scalebox CLI and the exit codes it maps them to (exit_code_for).

The exit codes are part of the CLI's interface (scripts test them) and are
printed in ``scalebox --help``; keep them stable.
"""

from __future__ import annotations

from scalebox.errors import ConfigError, ScaleboxError, UsageError

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

EXIT_CODES_HELP = (
    (EXIT_OK, "success"),
    (EXIT_API_ERROR, "the server answered with an error"),
    (EXIT_USAGE, "usage or configuration error (nothing was sent)"),
    (EXIT_UNREACHABLE, "cannot reach the server"),
    (EXIT_AUTH, "the server refused the token"),
    (EXIT_NOT_FOUND, "the VM or template does not exist"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); a request already sent may still complete"),
)


class ApiError(ScaleboxError):
    """The server answered with an error; ``what`` is its ``{"error"}`` text."""

    def __init__(self, what: str, hint: str | None = None, status: int = 0) -> None:
        super().__init__(what, hint)
        self.status = status


class Unreachable(ScaleboxError):
    """No HTTP answer: connection refused, DNS failure, timeout, TLS failure."""


class AuthRefused(ApiError):
    """401: the token is missing or wrong."""


class NotFound(ApiError):
    """404: the VM or template named on the command line does not exist."""


def exit_code_for(error: ScaleboxError) -> int:
    """The CLI's exit code for an error, by its kind (the table: EXIT_CODES_HELP)."""
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, AuthRefused):
        return EXIT_AUTH
    if isinstance(error, Unreachable):
        return EXIT_UNREACHABLE
    if isinstance(error, (UsageError, ConfigError)):
        return EXIT_USAGE
    return EXIT_API_ERROR
