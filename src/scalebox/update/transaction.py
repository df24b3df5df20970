"""The update transaction: stage -> backup -> migrate -> switch -> [handover] -> verify -> commit,
or rollback.

Each step is entered only after the journal names it (written and fsynced),
so ``recover`` can finish any transaction a crash interrupted. Preflight,
resolve, fetch and verification of the release happen before (main.py):
nothing here starts until the release is proven good.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

from scalebox import priority
from scalebox.update import (
    commit,
    giveway,
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
from scalebox.update.errors import RollbackFailed, RolledBack, UpdateError, os_error, reason_of
from scalebox.update.journal import Journal


class CommitUnfinished(UpdateError):
    """A recovery found a verified update and could not finish its bookkeeping: the
    update stands (its release runs), only the records lag. ``left`` says what."""

    def __init__(self, what: str, hint: str | None, left: str) -> None:
        super().__init__(what, hint)
        self.left = left


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
    unfinished: str | None = None  # updated, but bookkeeping is left: what and how to finish


def install(
    ctx: Context, *, action: str, from_version: str, from_release: str, target: Target
) -> Outcome:
    """Run the whole transaction to ``target``; raise RolledBack or RollbackFailed on failure.

    Faults (design of issue 9): before the switch, any failure (an OSError
    too: a full disk, a read-only releases/; a signal) refuses the update with
    nothing changed, the config put back from the backup once the migrations
    may have changed it. A migration that fails is the release's failure and
    rolls back. From the switch on, any failure, including a journal write that
    fails, rolls back from what is kept in memory. Once the commit begins the
    outcome is "updated": a failure there leaves only bookkeeping, said so.
    """
    p = ctx.paths
    name = stage.check_name(target.version)
    new_dir = p.release_dir(name)
    first = Journal(
        id=journal.new_id(),
        action=action,
        from_version=from_version,
        from_release=from_release,
        to_version=target.version,
        to_release=name,
        step="stage",
        built_release=False,
    )
    j = _begin(ctx, first, target, new_dir)

    # stage and backup: nothing live changes; a failure here refuses the update.
    try:
        release_root = target.root if target.root is not None else new_dir
        stage.ensure_packages(release_root, target.version, ctx.report)
        if target.root is not None:
            stage.build(p, target.root, target.version, python=ctx.python, report=ctx.report)
        ctx.report(f"checking the live config with {target.version}'s own scaleboxd")
        stage.check_config(p, name)
        j = journal.advance(p.journal, j, "backup")
        old_units = switch.release_units(p.release_dir(from_release))
        switch.back_up(p, p.backup_dir(j.id), [*switch.release_units(new_dir), *old_units])
        # migrate: the new release's own migrations change the config. From here a
        # failure (or a crash, via recovery) rolls back, the config restored from the backup.
        j = journal.advance(p.journal, j, "migrate")
    except OSError as exc:
        raise _refuse(ctx, j, exc, j.step) from None
    except BaseException as exc:
        # Shielded: a second Ctrl-C must not stop the cleanup half way.
        with interrupt.shielded():
            _discard_or_say(ctx, j)
            if isinstance(exc, UpdateError):
                _record(ctx, j, history.REFUSED, exc.what)
        raise

    try:
        applied = migrate.step(p, j, ctx.report)
        j = journal.advance(p.journal, replace(j, migrations=applied), "switch")
    except (OSError, interrupt.Interrupted) as exc:
        # Ours, not the release's: a signal, or this server's disk. Nothing live has
        # moved yet, so the update is refused like any before the switch, once the
        # config is back as it was. (A migration that fails is the release's: below.)
        raise _refuse_migrated(ctx, j, exc) from None
    except Exception as exc:  # noqa: BLE001 - the release's migration failed: roll back
        interrupt.settle()
        _roll_back(ctx, _as_written(ctx, j), reason_of(exc))  # raises

    try:
        j = _switch(ctx, j, new_dir)
        j = journal.advance(p.journal, j, "verify")
        health.verify(
            ctx.service,
            ctx.http,
            health.Check(
                ctx.health_url(), target.version, ctx.stability_window, ctx.verify_timeout
            ),
            ctx.report,
            # Healthy, an update's window is a wait: its polls give way (an unanswered
            # one is asked again at full priority). An operator's rollback never waits.
            give_way=(
                (lambda: giveway.give_way(p.config, ctx.report)) if action == "update" else None
            ),
        )
        # Verified: from here no signal changes the outcome. The journal write is the
        # last thing that may still turn back: without "commit" in the journal a crash
        # would roll back, so a journal that cannot say so rolls back now.
        interrupt.settle()
        j = journal.advance(p.journal, j, "commit")
    except Exception as exc:  # noqa: BLE001 - every failure from the switch on rolls back
        interrupt.settle()  # first: a Ctrl-C now must not skip the rollback below
        # A signal or this server's disk stopped the update: the release was not judged.
        judged = not isinstance(exc, (OSError, interrupt.Interrupted))
        _roll_back(ctx, _as_written(ctx, j), reason_of(exc), release_failed=judged)  # raises

    pruned, left = _commit(ctx, j)
    message = f"updated {from_version} -> {target.version}; scaleboxd {target.version} is healthy"
    if left:
        message += f"; {left}"
    return Outcome(
        history.UPDATED,
        from_version,
        target.version,
        message,
        pruned,
        {**j.step_times, "end": journal.stamp()},
        applied,
        unfinished=left,
    )


def _switch(ctx: Context, j: Journal, new_dir: Path) -> Journal:
    """Point ``current`` at the new release, install its units, and hand over or restart."""
    priority.restore_process(ctx.report)  # the service is at stake from here: full speed
    p = ctx.paths
    ctx.report(f"switching current to releases/{j.to_release} and restarting scaleboxd")
    switch.swap_current(p, j.to_release)
    changed = switch.install_units(p, new_dir)
    if changed:
        ctx.report(f"installed changed units: {', '.join(changed)}")
    if not switch.can_hand_over(new_dir, changed):
        switch.restart(ctx.service, changed, ctx.restart_timeout, ctx.report)
        return j
    ctx.report(f"starting {j.to_version} beside the running scaleboxd (handover)")
    switch.start_handover(ctx.service, changed, ctx.restart_timeout, ctx.report)
    # Two daemons serve now; the journal says so before the old one is stopped.
    j = journal.advance(p.journal, j, "handover")
    ctx.report(f"{j.to_version} serves; restarting scaleboxd onto it")
    switch.finish_handover(ctx.service, ctx.restart_timeout, ctx.report)
    return j


def _begin(ctx: Context, first: Journal, target: Target, new_dir: Path) -> Journal:
    """Write the transaction's first journal entry; a failure refuses, nothing changed."""
    try:
        reusing = stage.is_complete(new_dir) and (
            target.root is None
            or (new_dir / stage.MANIFEST).read_bytes()
            == (target.root / stage.MANIFEST).read_bytes()
        )
        return journal.begin(ctx.paths.journal, replace(first, built_release=not reusing))
    except OSError as exc:
        raise _refuse(ctx, first, exc, "stage") from None
    except UpdateError as exc:
        # SIGTERM/SIGINT (Interrupted) right after the entry was written: nothing
        # was built yet; end the transaction it began and record it, as later steps do.
        with interrupt.shielded():
            _discard_or_say(ctx, first)
            _record(ctx, first, history.REFUSED, exc.what)
        raise


def os_hint(exc: OSError) -> str:
    """What to do about an OSError, for the hint line."""
    if exc.errno == errno.ENOSPC:
        return "free space on that file system (`df -h`), then run scalebox-update again"
    if exc.errno == errno.EROFS:
        return "that file system is mounted read-only; remount it read-write and run again"
    return "fix the cause above, then run scalebox-update again"


def _refuse(ctx: Context, j: Journal, exc: OSError, step: str) -> UpdateError:
    """An OSError before anything live changed: undo, record and say so in one line."""
    what = (
        f"the update to {j.to_version} failed during {step}: {os_error(exc)}; nothing was changed"
    )
    with interrupt.shielded():
        _discard_or_say(ctx, j)
        _record(ctx, j, history.REFUSED, what)
    return UpdateError(what, os_hint(exc))


def _refuse_migrated(ctx: Context, j: Journal, exc: OSError | UpdateError) -> UpdateError:
    """The migrate step stopped by a signal or a disk: the config (and units) back from
    the backup, then refused as before the switch. If they cannot be put back, the
    rollback takes over, and its own outcome (and exit code) is the one told."""
    what = exc.what if isinstance(exc, UpdateError) else (
        f"the update to {j.to_version} failed during migrate: {os_error(exc)}"
    )  # fmt: skip
    try:
        with interrupt.shielded():
            _put_config_back(ctx, j)
    except (OSError, ValueError, KeyError) as again:
        ctx.report(f"could not put the config back from the backup ({reason_of(again)})")
        interrupt.settle()
        _roll_back(ctx, _as_written(ctx, j), what, release_failed=False)
    what += "; nothing was changed (the config is as it was)"
    with interrupt.shielded():
        _discard_or_say(ctx, j)
        _record(ctx, j, history.REFUSED, what)
    if isinstance(exc, UpdateError):
        return type(exc)(what, exc.hint)
    return UpdateError(what, os_hint(exc))


def _put_config_back(ctx: Context, j: Journal) -> None:
    """Undo what the migrate step may have done before the switch: units and config as
    backed up, and no record of the new release's migrations."""
    switch.restore(ctx.paths, ctx.paths.backup_dir(j.id))
    migrate.forget(ctx.paths, j.to_release)


def _discard_or_say(ctx: Context, j: Journal) -> None:
    """_discard after a refusal, whose own error is the one to tell: a cleanup that
    fails too (a disk gone read-only) is said in a line and left to the next run."""
    try:
        _discard(ctx, j)
    except OSError as again:
        ctx.report(f"could not clean up ({os_error(again)}); the next run does")


def _commit(ctx: Context, j: Journal) -> tuple[list[str], str | None]:
    """Finish the bookkeeping of a verified update; (pruned, None) or ([], what is left).

    Verified and stable, so the commit and the pruning of old releases can wait for
    the CPU, after an update and in a recovery alike. (An update's stability window
    gave way already; a starved probe there is asked again at full priority, see
    health.py, and a rollback's runs at full priority.)
    """
    try:
        with giveway.waiting(ctx.paths.config, ctx.report):
            pruned = commit.commit(ctx, j)
            _finish(ctx, j)
    except OSError as exc:
        left = (
            f"but its bookkeeping is not finished ({os_error(exc)}): "
            f"{ctx.paths.version_file} or the history may still name {j.from_version}; "
            "fix that, then run `scalebox-update recover`, which finishes it"
        )
        ctx.report(f"the update is done, {left}")
        return [], left
    return pruned, None


def _advance(ctx: Context, j: Journal, step: str, reason: str | None = None) -> Journal:
    """Advance the journal if the disk lets us; the rollback goes on from memory either way."""
    try:
        return journal.advance(ctx.paths.journal, j, step, reason=reason)
    except OSError as exc:
        ctx.report(
            f"could not write the journal ({os_error(exc)}); rolling back from memory "
            f"(the journal still says {j.step}, which a later run also rolls back)"
        )
        return replace(j, step=step, reason=reason if reason is not None else j.reason)


def _as_written(ctx: Context, j: Journal) -> Journal:
    """The journal as last written: a step that failed may have advanced it (switch,
    handover) before raising, and the history should say when each step began."""
    try:
        written = journal.read(ctx.paths.journal)
    except (OSError, UpdateError):
        return j
    return written if written is not None and written.id == j.id else j


def _roll_back(ctx: Context, j: Journal, reason: str, *, release_failed: bool = True) -> NoReturn:
    """Roll back and raise RolledBack (or RollbackFailed). ``release_failed``: whether
    the new release itself failed (its migration, start or verification), or the update
    was stopped before it was judged (a signal, the updater's disk, a crash), which the
    message and the history say, and which the pruning does not hold against it."""
    # Whatever the terminal sends from now on, the rollback finishes and its
    # outcome is the one the exit code reports.
    interrupt.settle()
    priority.restore_process(ctx.report)  # a rollback never waits for the CPU
    j = _advance(ctx, j, "rollback", reason=reason)
    try:
        with interrupt.shielded():
            rollback.roll_back(ctx, j)
    except RollbackFailed as exc:
        _record(ctx, j, history.ROLLBACK_FAILED, f"{reason}; then {exc.what}")
        raise  # the journal stays: the next run or the boot unit tries again
    _record(ctx, j, history.ROLLED_BACK, reason, release_failed=release_failed)
    try:
        _finish(ctx, j)
    except OSError as exc:
        ctx.report(
            f"could not remove the journal ({os_error(exc)}); the next run repeats the "
            "rollback, which changes nothing more, and ends it"
        )
    if release_failed:
        rolled_back = RolledBack(
            f"{j.to_version} failed: {reason}. Rolled back to {j.from_version}, which is healthy",
            "nothing else changed; see `scalebox-update history` and `journalctl -u scaleboxd`",
        )
    else:
        rolled_back = RolledBack(
            f"the {j.action} to {j.to_version} was stopped before {j.to_version} was judged "
            f"({reason}). Rolled back to {j.from_version}, which is healthy",
            f"nothing else changed, and nothing was found wrong with {j.to_version}: "
            "run scalebox-update again once the cause above is dealt with",
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
        undone = ""
        with interrupt.shielded():  # the journal goes first: its history line must follow
            backup = ctx.paths.backup_dir(j.id)
            if j.step == "migrate" and (backup / switch.BACKUP_INDEX).is_file():
                # The config may be half migrated: put back first (as a rollback would).
                _put_config_back(ctx, j)
                undone = " (its migrations were undone: the config is as it was)"
            _discard(ctx, j)
            _record(
                ctx, j, history.REFUSED, f"interrupted during {j.step}; nothing had changed{undone}"
            )
        return (
            f"recovered: the interrupted {j.action} to {j.to_version} had changed nothing"
            f"{undone}; {j.from_version} still runs"
        )
    if action is plan.Recovery.COMMIT:
        _, left = _commit(ctx, j)
        if left:
            raise CommitUnfinished(
                f"{j.to_version} runs, verified, {left}", "nothing else was done in this run", left
            )
        return f"recovered: finished committing the verified update to {j.to_version}"
    # A rollback already under way goes on as it began (its reason may be the release's
    # failure; which one is not in the journal, so it counts as one, as before). A crash
    # in the switch, handover or verify stopped the update before the release was judged.
    reason = j.reason or f"the updater was interrupted during {j.step}"
    with contextlib.suppress(RolledBack):
        _roll_back(ctx, j, reason, release_failed=j.step == "rollback")
    interrupt.unsettle()  # that transaction is over; what this run does next may be stopped
    return (
        f"recovered: rolled back the interrupted {j.action} to {j.to_version}; "
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


def _record(
    ctx: Context, j: Journal, result: str, reason: str | None, *, release_failed: bool | None = None
) -> None:
    """Append the outcome to the history; an unwritable history is said, never raised."""
    try:
        _append_once(ctx, j, result, reason, release_failed)
    except OSError as exc:
        ctx.report(
            f"could not record '{result}' in {ctx.paths.history} ({os_error(exc)}); "
            "the history lacks this transaction"
        )


def _append_once(
    ctx: Context, j: Journal, result: str, reason: str | None, release_failed: bool | None
) -> None:
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
            release_failed=release_failed,
        )


def clean_leftovers(ctx: Context) -> None:
    """With no transaction open: remove unfinished releases, stale backups and scratch files."""
    p = ctx.paths
    stage.remove_unfinished(p, ctx.report)
    for leftover in (p.backups, p.work):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
