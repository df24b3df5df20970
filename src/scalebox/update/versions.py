"""Release versions: parse and order them the way PEP 440 does.

Pure code, no I/O. The updater only needs "is this newer, the same, or older",
but it must get pre-releases right (``0.2.0.dev0 < 0.2.0a1 < 0.2.0rc1 < 0.2.0
< 0.2.0.post1``), so this is a small, complete PEP 440 comparator rather than
a split on dots. ``packaging`` is not a runtime dependency of Scalebox (only
pytest pulls it in), hence our own.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from scalebox.errors import ScaleboxError

# PEP 440's permissive spelling: optional "v", any case, "-", "_" or "."
# between parts, and the long pre-release names (alpha, beta, preview, c).
_PATTERN = re.compile(
    r"""
    ^\s*v?
    (?:(?P<epoch>\d+)!)?
    (?P<release>\d+(?:\.\d+)*)
    (?:[-_.]?(?P<pre_label>alpha|a|beta|b|preview|pre|c|rc)[-_.]?(?P<pre_n>\d+)?)?
    (?:-(?P<post_implicit>\d+)|[-_.]?(?P<post_label>post|rev|r)[-_.]?(?P<post_n>\d+)?)?
    (?:[-_.]?(?P<dev_label>dev)[-_.]?(?P<dev_n>\d+)?)?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?
    \s*$
    """,
    re.VERBOSE | re.IGNORECASE,
)

_PRE_CANONICAL = {"alpha": "a", "a": "a", "beta": "b", "b": "b"}
_PRE_CANONICAL |= {"preview": "rc", "pre": "rc", "c": "rc", "rc": "rc"}
_PRE_RANK = {"a": 0, "b": 1, "rc": 2}

Relation = Literal["upgrade", "same", "downgrade"]


class InvalidVersion(ScaleboxError):
    """A version string is not a PEP 440 version."""


@functools.total_ordering
@dataclass(frozen=True, eq=False)
class Version:
    """One parsed version. Equal and ordered by PEP 440 rules (1.0 == 1.0.0)."""

    epoch: int
    release: tuple[int, ...]
    pre: tuple[str, int] | None
    post: int | None
    dev: int | None
    local: tuple[int | str, ...] | None

    @property
    def is_prerelease(self) -> bool:
        return self.pre is not None or self.dev is not None

    def _key(self) -> tuple[object, ...]:
        release = list(self.release)
        while len(release) > 1 and release[-1] == 0:
            release.pop()
        # A dev release with no pre-release label comes before every pre-release
        # of the same release (1.0.dev0 < 1.0a0); no label at all comes after them.
        if self.pre is None and self.post is None and self.dev is not None:
            pre_key: tuple[int, int] = (-1, 0)
        elif self.pre is None:
            pre_key = (3, 0)
        else:
            pre_key = (_PRE_RANK[self.pre[0]], self.pre[1])
        post_key = -1 if self.post is None else self.post
        dev_key = (1, 0) if self.dev is None else (0, self.dev)
        # Alphanumeric local parts sort before numeric ones; no local part first.
        local_key: tuple[object, ...] = (
            (0,)
            if self.local is None
            else (1, *((1, p, "") if isinstance(p, int) else (0, 0, p) for p in self.local))
        )
        return (self.epoch, tuple(release), pre_key, post_key, dev_key, local_key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        text = f"{self.epoch}!" if self.epoch else ""
        text += ".".join(str(n) for n in self.release)
        if self.pre is not None:
            text += f"{self.pre[0]}{self.pre[1]}"
        if self.post is not None:
            text += f".post{self.post}"
        if self.dev is not None:
            text += f".dev{self.dev}"
        if self.local is not None:
            text += "+" + ".".join(str(p) for p in self.local)
        return text


def parse(text: str) -> Version:
    """Parse a PEP 440 version; a leading "v" (as in a git tag) is accepted."""
    match = _PATTERN.match(text)
    if match is None:
        raise InvalidVersion(
            f"{text!r} is not a version",
            "use a PEP 440 version such as 0.2.0, 0.2.0rc1 or 0.2.0.dev0",
        )
    pre = None
    if match["pre_label"]:
        pre = (_PRE_CANONICAL[match["pre_label"].lower()], int(match["pre_n"] or 0))
    post = None
    if match["post_implicit"]:
        post = int(match["post_implicit"])
    elif match["post_label"]:
        post = int(match["post_n"] or 0)
    local = None
    if match["local"]:
        local = tuple(
            int(part) if part.isdigit() else part.lower()
            for part in re.split(r"[-_.]", match["local"])
        )
    return Version(
        epoch=int(match["epoch"] or 0),
        release=tuple(int(n) for n in match["release"].split(".")),
        pre=pre,
        post=post,
        dev=int(match["dev_n"] or 0) if match["dev_label"] else None,
        local=local,
    )


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
