"""Errors of the release artifact: building, extracting and verifying it."""

from __future__ import annotations

from scalebox.errors import ScaleboxError


class ReleaseError(ScaleboxError):
    """A release tarball or tree is unusable; nothing outside the destination was changed."""
