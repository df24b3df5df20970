"""Domain errors of the daemon. The API layer maps each to its HTTP status."""

from __future__ import annotations

from scalebox.errors import ScaleboxError


class ApiError(ScaleboxError):
    """An error the API answers with ``{"error": what}`` and ``status``."""

    status = 500


class InvalidInput(ApiError):
    """A request field is missing or wrong; ``what`` names the field."""

    status = 400


class NotFound(ApiError):
    status = 404


class Protected(ApiError):
    status = 403


class Conflict(ApiError):
    status = 409


class InsufficientStorage(ApiError):
    status = 507


class Unavailable(ApiError):
    """Retryable: the daemon is stopping (a restart, an update); try again shortly.

    Answered with 503 and ``Retry-After: retry_after`` seconds.
    """

    status = 503
    retry_after = 2
