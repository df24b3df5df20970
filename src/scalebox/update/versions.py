"""Release versions: the one place they are parsed and ordered (PEP 440, by ``packaging``).

Pure code, no I/O. Versions come from outside (a release tag, RELEASE.json,
``--to``), so ``parse`` bounds their length and turns every failure,
including Python's own limits on huge integers, into ``InvalidVersion``: a
refusal with a hint, never a traceback.
"""

from __future__ import annotations

from typing import Literal

import packaging.version
from packaging.version import Version

from scalebox.errors import ScaleboxError

__all__ = ["InvalidVersion", "Relation", "Version", "compare", "is_newer", "parse", "relation"]

# Longer than any real version (0.2.0.dev0, 1.2.3rc1+build.7); bounds the work on a hostile tag.
MAX_LENGTH = 128

Relation = Literal["upgrade", "same", "downgrade"]


class InvalidVersion(ScaleboxError):
    """A version string is not a PEP 440 version."""


def _invalid(text: str, why: str = "") -> InvalidVersion:
    shown = text if len(text) <= 40 else text[:40] + "..."
    return InvalidVersion(
        f"{shown!r} is not a version{why}",
        "use a PEP 440 version such as 0.2.0, 0.2.0rc1 or 0.2.0.dev0",
    )


def parse(text: str) -> Version:
    """Parse a PEP 440 version; a leading "v" (as in a git tag) is accepted."""
    if not isinstance(text, str):
        raise _invalid(repr(text))
    if len(text) > MAX_LENGTH:
        raise _invalid(text, f" (it is {len(text)} characters; at most {MAX_LENGTH})")
    try:
        return Version(text)
    except (packaging.version.InvalidVersion, ValueError):
        # ValueError: an integer past Python's digit limit, among others.
        raise _invalid(text) from None


def _as_version(v: str | Version) -> Version:
    return v if isinstance(v, Version) else parse(v)


def compare(a: str | Version, b: str | Version) -> int:
    """-1 if a < b, 0 if they are the same version, 1 if a > b."""
    va, vb = _as_version(a), _as_version(b)
    return (va > vb) - (va < vb)


def is_newer(candidate: str | Version, installed: str | Version) -> bool:
    """True when ``candidate`` is a later version than ``installed``."""
    return compare(candidate, installed) > 0


def relation(installed: str | Version, candidate: str | Version) -> Relation:
    """What installing ``candidate`` over ``installed`` would be."""
    order = compare(candidate, installed)
    if order > 0:
        return "upgrade"
    if order < 0:
        return "downgrade"
    return "same"
