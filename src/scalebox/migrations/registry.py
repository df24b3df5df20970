"""The ordered list of a release's migrations, and which of them are pending.

``steps.py`` registers each migration with ``@migration(...)``, in the order
they run. A migration names the release that introduced it (``since``); an
update from ``from_version`` to ``to_version`` runs those with
``from_version < since <= to_version`` (the target's release number, so a
pre-release or dev build of 1.2.0 already runs the migrations of 1.2.0).
Re-running one is harmless because every migration is idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from scalebox.migrations.configfile import ConfigFile
from scalebox.update import versions

Apply = Callable[[ConfigFile], None]
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


@dataclass(frozen=True)
class Migration:
    id: str
    since: str  # the release that introduced it
    description: str
    apply: Apply

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "since": self.since, "description": self.description}


MIGRATIONS: list[Migration] = []


def check_next(existing: Sequence[Migration], new: Migration) -> None:
    """Refuse a malformed id, a duplicate id, or one that is older than the one before it."""
    if not _ID.match(new.id):
        raise ValueError(
            f"migration id {new.id!r}: use 1-64 lower-case letters, digits and -, "
            "e.g. '0003-add-metrics-port'"
        )
    if any(m.id == new.id for m in existing):
        raise ValueError(f"migration id {new.id!r} is registered twice; ids are never reused")
    if not new.description.strip():
        raise ValueError(f"migration {new.id!r} needs a description: operators read it")
    versions.parse(new.since)
    if existing and versions.compare(new.since, existing[-1].since) < 0:
        raise ValueError(
            f"migration {new.id!r} (since {new.since}) is registered after "
            f"{existing[-1].id!r} (since {existing[-1].since}); keep them in release order"
        )


def migration(id: str, *, since: str, description: str) -> Callable[[Apply], Apply]:
    """Register the decorated function as the next migration."""

    def register(apply: Apply) -> Apply:
        new = Migration(id, since, description, apply)
        check_next(MIGRATIONS, new)
        MIGRATIONS.append(new)
        return apply

    return register


def release_number(version: str) -> str:
    """1.2.0rc1, 1.2.0.dev3 and 1.2.0.post1 -> 1.2.0."""
    return ".".join(str(n) for n in versions.parse(version).release)


class Versioned(Protocol):
    """A migration or its entry in a release manifest: an id and the release it came with."""

    @property
    def id(self) -> str: ...
    @property
    def since(self) -> str: ...


M = TypeVar("M", bound=Versioned)


def pending(
    migrations: Iterable[M], from_version: str, to_version: str, applied: Iterable[str]
) -> list[M]:
    """The migrations an update from ``from_version`` to ``to_version`` still has to run."""
    done = set(applied)
    ceiling = release_number(to_version)
    return [
        m
        for m in migrations
        if m.id not in done
        and versions.compare(m.since, from_version) > 0
        and versions.compare(m.since, ceiling) <= 0
    ]
