"""Commit: the new release is verified; record it and prune old releases.

Idempotent, so a commit interrupted by a crash is finished by the next run:
the version file is rewritten with the same bytes, the history line is
appended only once per transaction, pruning skips what is already gone.
"""

from __future__ import annotations

import shutil

from scalebox.fsutil import atomic_write
from scalebox.update import history, migrate, plan, stage
from scalebox.update.context import Context
from scalebox.update.journal import Journal


def commit(ctx: Context, journal: Journal) -> list[str]:
    """Write /etc/scaleboxd/version, append history, prune; return the pruned release names."""
    p = ctx.paths
    atomic_write(p.version_file, f"{journal.to_version}\n")
    entries = history.read(p.history)
    if not history.has(entries, journal.id, history.UPDATED):
        entries.append(
            history.record(
                p.history,
                transaction_id=journal.id,
                action=journal.action,
                from_version=journal.from_version,
                to_version=journal.to_version,
                result=history.UPDATED,
                step_times=journal.step_times,
                migrations=journal.migrations,
            )
        )
    return prune(ctx, previous=journal.from_release, entries=entries)


def prune(ctx: Context, *, previous: str | None, entries: list[history.Entry]) -> list[str]:
    p = ctx.paths
    current = stage.current_name(p)
    if current is None:
        return []
    releases = stage.list_releases(p)
    # What `--rollback` goes back to stays too, also when ``previous`` (the release this
    # transaction came from) is the current one: a reinstall with --force.
    target = rollback_target(releases, current, entries)
    doomed = plan.to_prune(
        releases,
        current=current,
        previous=previous,
        failed=plan.failed_versions(entries),
        rollback_target=target,
    )
    for name in doomed:
        ctx.report(f"pruning releases/{name}")
        shutil.rmtree(p.release_dir(name), ignore_errors=True)
    # The running release's and the rollback target's records always stay.
    kept = {r.name for r in stage.list_releases(p)} | {current}
    kept |= {name for name in (previous, target) if name}
    migrate.prune_records(p, kept, ctx.report)
    return doomed


def rollback_target(
    releases: list[plan.ReleaseDir], current: str, entries: list[history.Entry]
) -> str | None:
    """The directory of the release `--rollback` would go back to now."""
    version = next((r.version for r in releases if r.name == current), current)
    kept = {r.version: r.name for r in releases if r.complete}
    target = plan.choose_previous(entries, version, list(kept))
    return kept[target] if target else None
