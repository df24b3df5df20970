"""The updater's decisions, as pure functions of data.

Nothing here reads a file, runs a program or looks at the clock: each
function takes what the steps found and returns what to do, so every rule
is tested directly (tests/unit/test_update_plan.py).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scalebox.update import versions
from scalebox.update.errors import UpdateError
from scalebox.update.history import ROLLED_BACK, UPDATED, Entry

KEEP_RELEASES = 3


class Decision(enum.Enum):
    UPDATE = "update"
    UP_TO_DATE = "up to date"
    REINSTALL = "reinstall"
    DOWNGRADE = "downgrade"


def decide(installed: str, candidate: str, *, force: bool, allow_downgrade: bool) -> Decision:
    """Whether to install ``candidate`` over ``installed``; older is refused unless allowed."""
    relation = versions.relation(installed, candidate)
    if relation == "same":
        return Decision.REINSTALL if force else Decision.UP_TO_DATE
    if relation == "upgrade":
        return Decision.UPDATE
    if allow_downgrade:
        return Decision.DOWNGRADE
    raise UpdateError(
        f"{candidate} is older than the installed {installed}; nothing was changed",
        f"to install it anyway run `scalebox-update --to {candidate} --allow-downgrade`, "
        "or `scalebox-update --rollback` for the previous release",
    )


class Recovery(enum.Enum):
    """How to finish a transaction found unfinished in the journal."""

    DISCARD = "discard"  # nothing live changed: drop the journal and unfinished files
    ROLL_BACK = "roll back"  # the switch may have happened: restore the old release
    COMMIT = "commit"  # the new release was verified: finish recording it


def recovery_action(step: str) -> Recovery:
    """The one way to finish a transaction whose journal says ``step`` had begun.

    - stage, backup: the running release, units and config were not touched yet.
    - migrate: nothing live has moved, but the config may be half migrated: put
      back from the backup, byte for byte, then dropped as above (the release is
      not blamed for a power cut: its history line says refused).
    - switch, handover, verify: the switch may be half done (a handover instance
      of the new release may still run beside scaleboxd), or the new release was
      not yet seen stable: roll back. (An interrupted verify proves nothing.)
    - commit: the new release passed verification; only bookkeeping is left.
    - rollback: run the rollback again; each of its steps is idempotent.
    """
    if step in ("stage", "backup", "migrate"):
        return Recovery.DISCARD
    if step in ("switch", "handover", "verify", "rollback"):
        return Recovery.ROLL_BACK
    if step == "commit":
        return Recovery.COMMIT
    raise ValueError(f"unknown journal step {step!r}")


@dataclass(frozen=True)
class ReleaseDir:
    """One directory under releases/: its name, its version and whether it is complete."""

    name: str
    version: str
    complete: bool


def failed_versions(entries: Iterable[Entry]) -> set[str]:
    """Versions whose last update to them ended in a rollback (and never installed since).

    An operator's ``--rollback`` that was itself rolled back (a power cut in its
    verify: recovery brings the release it left back) says nothing against the
    release it went to, which ran before: it is not counted. Nor is a rollback that
    was not the release's doing (``release_failed`` false: a signal, the updater's
    own disk, a crash or power cut of the updater before the release was judged).
    """
    last: dict[str, str] = {}
    for entry in entries:
        judged = entry.action == "update" and entry.release_failed is not False
        if entry.result == UPDATED or (entry.result == ROLLED_BACK and judged):
            last[entry.to_version] = entry.result
    return {version for version, result in last.items() if result == ROLLED_BACK}


def to_prune(
    releases: Sequence[ReleaseDir],
    *,
    current: str,
    previous: str | None,
    failed: set[str],
    keep: int = KEEP_RELEASES,
    rollback_target: str | None = None,
) -> list[str]:
    """Names of release directories to delete.

    Keeps the ``keep`` newest good releases, always including ``current``,
    ``previous`` and ``rollback_target`` (by directory name). Failed releases
    (rolled back) never take one of those places and are removed unless
    protected. Unfinished directories are removed too.
    """
    protected = {current} | {name for name in (previous, rollback_target) if name}
    kept = {r.name for r in releases if r.name in protected and r.complete}
    candidates = sorted(
        (r for r in releases if r.complete and r.name not in kept and r.version not in failed),
        key=lambda r: _sortable(r.version),
        reverse=True,
    )
    for release in candidates:
        if len(kept) >= keep:
            break
        kept.add(release.name)
    return sorted(r.name for r in releases if r.name not in kept and r.name not in protected)


def _sortable(version: str) -> tuple[int, versions.Version | None]:
    # A directory whose version does not parse sorts as the oldest.
    try:
        return (1, versions.parse(version))
    except versions.InvalidVersion:
        return (0, None)


def previous_release(
    entries: Sequence[Entry], current_version: str, available: set[str]
) -> str | None:
    """The version that ``--rollback`` returns to: what ``current`` was updated from.

    Walks history newest first for the update that installed the current
    version, and returns its ``from`` if that release is still kept. A
    reinstall of the same version (``--force``) is passed over: the release
    to go back to is still the one before it.
    """
    for entry in reversed(entries):
        if entry.result == UPDATED and entry.to_version == current_version:
            if entry.from_version == current_version:
                continue
            return entry.from_version if entry.from_version in available else None
    return None


def choose_previous(
    entries: Sequence[Entry], current_version: str, available: Sequence[str]
) -> str | None:
    """History's answer when it has one, else the newest kept release older than
    current that ran on this server (a pre-staged release never ran: it is no
    release to go back to). With no history at all, the newest kept older one."""
    from_history = previous_release(entries, current_version, set(available))
    if from_history:
        return from_history
    ran = {e.from_version for e in entries} | {e.to_version for e in entries if e.result == UPDATED}
    older = [v for v in available if (not entries or v in ran) and _older(v, current_version)]
    return max(older, key=versions.parse) if older else None


def _older(version: str, than: str) -> bool:
    """Whether ``version`` is older than ``than``; a name that is no version (a stray
    directory under releases/) is not a release to go back to, and hides no other."""
    try:
        return versions.compare(version, than) < 0
    except versions.InvalidVersion:
        return False
