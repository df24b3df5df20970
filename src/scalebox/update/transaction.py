"""The update transaction: stage -> backup -> migrate -> switch -> verify -> commit, or rollback.

Each step is entered only after the journal names it (written and fsynced),
so ``recover`` can finish any transaction a crash interrupted. Preflight,
resolve, fetch and verification of the release happen before (main.py):
nothing here starts until the release is proven good.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

from scalebox.update import (
    commit,
    health,
    history,
    interrupt,
    journal,
    migrate,
    plan,
    rollback,
    stage,
    switch,
)
from scalebox.update.context import Context
from scalebox.update.errors import RollbackFailed, RolledBack, UpdateError
from scalebox.update.journal import Journal


@dataclass(frozen=True)
class Target:
    """What to install: a verified, extracted release, or (root None) an already-built one."""

    version: str
    root: Path | None


@dataclass(frozen=True)
class Outcome:
    result: str  # history.UPDATED, ...
    from_version: str
    to_version: str
    message: str
    pruned: list[str] = field(default_factory=list)
    step_times: dict[str, float] = field(default_factory=dict)  # when each step began
    migrations: list[str] = field(default_factory=list)  # ids applied, in order


def install(
    ctx: Context, *, action: str, from_version: str, from_release: str, target: Target
) -> Outcome:
    """Run the whole transaction to ``target``; raise RolledBack or RollbackFailed on failure."""
    p = ctx.paths
    name = stage.check_name(target.version)
    new_dir = p.release_dir(name)
    reusing = stage.is_complete(new_dir) and (
        target.root is None
        or (new_dir / stage.MANIFEST).read_bytes() == (target.root / stage.MANIFEST).read_bytes()
    )
    j = journal.begin(
        p.journal,
        Journal(
            id=journal.new_id(),
            action=action,
            from_version=from_version,
            from_release=from_release,
            to_version=target.version,
            to_release=name,
            step="stage",
            built_release=not reusing,
        ),
    )

    # stage: nothing live changes; a failure here refuses the update.
    try:
        release_root = target.root if target.root is not None else new_dir
        stage.ensure_packages(release_root, target.version, ctx.report)
        if target.root is not None:
            stage.build(p, target.root, target.version, python=ctx.python, report=ctx.report)
        ctx.report(f"checking the live config with {target.version}'s own scaleboxd")
        stage.check_config(p, name)
    except BaseException as exc:
        _discard(ctx, j)
        if isinstance(exc, UpdateError):
            _record(ctx, j, history.REFUSED, exc.what)
        raise

    j = journal.advance(p.journal, j, "backup")
    old_units = switch.release_units(p.release_dir(from_release))
    switch.back_up(p, p.backup_dir(j.id), [*switch.release_units(new_dir), *old_units])

    # migrate: the new release's own migrations change the config; a failure
    # (or a crash, via recovery) rolls back with the config restored from the backup.
    j = journal.advance(p.journal, j, "migrate")
    try:
        applied = migrate.step(p, j, ctx.report)
    except Exception as exc:  # noqa: BLE001 - a failed migration rolls everything back
        _roll_back(ctx, j, _reason(exc))  # raises
    j = replace(j, migrations=applied)

    j = journal.advance(p.journal, j, "switch")
    try:
        ctx.report(f"switching current to releases/{name} and restarting scaleboxd")
        switch.swap_current(p, name)
        changed = switch.install_units(p, new_dir)
        if changed:
            ctx.report(f"installed changed units: {', '.join(changed)}")
        switch.restart(ctx.service, changed, ctx.restart_timeout)
        j = journal.advance(p.journal, j, "verify")
        health.verify(
            ctx.service,
            ctx.http,
            health.Check(
                ctx.health_url(), target.version, ctx.stability_window, ctx.verify_timeout
            ),
            ctx.report,
        )
    except Exception as exc:  # noqa: BLE001 - every failure from the switch on rolls back
        _roll_back(ctx, j, _reason(exc))  # raises

    j = journal.advance(p.journal, j, "commit")
    pruned = commit.commit(ctx, j)
    _finish(ctx, j)
    return Outcome(
        history.UPDATED,
        from_version,
        target.version,
        f"updated {from_version} -> {target.version}; scaleboxd {target.version} is healthy",
        pruned,
        {**j.step_times, "end": journal.stamp()},
        applied,
    )


def _reason(exc: Exception) -> str:
    return exc.what if isinstance(exc, UpdateError) else f"{type(exc).__name__}: {exc}"


def _roll_back(ctx: Context, j: Journal, reason: str) -> NoReturn:
    j = journal.advance(ctx.paths.journal, j, "rollback", reason=reason)
    try:
        with interrupt.shielded():
            rollback.roll_back(ctx, j)
    except RollbackFailed as exc:
        _record(ctx, j, history.ROLLBACK_FAILED, f"{reason}; then {exc.what}")
        raise  # the journal stays: the next run or the boot unit tries again
    _record(ctx, j, history.ROLLED_BACK, reason)
    _finish(ctx, j)
    rolled_back = RolledBack(
        f"{j.to_version} failed: {reason}. Rolled back to {j.from_version}, which is healthy",
        "nothing else changed; see `scalebox-update history` and `journalctl -u scaleboxd`",
    )
    rolled_back.step_times = {**j.step_times, "end": journal.stamp()}
    raise rolled_back


def recover(ctx: Context) -> str | None:
    """Finish the transaction a crash interrupted; say what was done (None: nothing to do)."""
    j = journal.read(ctx.paths.journal)
    if j is None:
        return None
    action = plan.recovery_action(j.step)
    ctx.report(f"found an unfinished {j.action} {j.from_version} -> {j.to_version} ({j.step})")
    if action is plan.Recovery.DISCARD:
        _discard(ctx, j)
        _record(ctx, j, history.REFUSED, f"interrupted during {j.step}; nothing had changed")
        return (
            f"recovered: the interrupted update to {j.to_version} had changed nothing; "
            f"{j.from_version} still runs"
        )
    if action is plan.Recovery.COMMIT:
        commit.commit(ctx, j)
        _finish(ctx, j)
        return f"recovered: finished committing the verified update to {j.to_version}"
    reason = j.reason or f"the updater was interrupted during {j.step}"
    with contextlib.suppress(RolledBack):
        _roll_back(ctx, j, reason)
    return (
        f"recovered: rolled back the interrupted update to {j.to_version}; "
        f"{j.from_version} is healthy"
    )


def _discard(ctx: Context, j: Journal) -> None:
    """End a transaction that changed nothing live: drop what it built, then the journal."""
    p = ctx.paths
    target = p.release_dir(j.to_release)
    if j.built_release and stage.current_name(p) != j.to_release and target.exists():
        shutil.rmtree(target, ignore_errors=True)
    _finish(ctx, j)


def _finish(ctx: Context, j: Journal) -> None:
    # The journal goes first: once it is gone the transaction is over, and a
    # leftover backup directory is only clutter that the next run removes.
    journal.remove(ctx.paths.journal)
    shutil.rmtree(ctx.paths.backup_dir(j.id), ignore_errors=True)


def _record(ctx: Context, j: Journal, result: str, reason: str | None) -> None:
    entries = history.read(ctx.paths.history)
    if not history.has(entries, j.id, result):
        history.record(
            ctx.paths.history,
            transaction_id=j.id,
            action=j.action,
            from_version=j.from_version,
            to_version=j.to_version,
            result=result,
            reason=reason,
            step_times=j.step_times,
        )


def clean_leftovers(ctx: Context) -> None:
    """With no transaction open: remove unfinished releases, stale backups and scratch files."""
    p = ctx.paths
    stage.remove_unfinished(p, ctx.report)
    for leftover in (p.backups, p.work):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
