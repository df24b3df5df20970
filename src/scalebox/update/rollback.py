"""Rollback: the old release back, exactly, and verified healthy.

Stops a handover instance the update left, swaps ``current`` back, restores
units and config byte for byte from the transaction's backup, daemon-reloads,
brings the old version back (with the same handover as the update when the
old release ships it) and verifies it. When scaleboxd.service never left the
old version (the new release failed in its handover instance) it is not
restarted at all: it served all along. Every step is idempotent, so a
rollback interrupted by a crash is simply run again by the next
``scalebox-update`` or the boot-time recover unit.
"""

from __future__ import annotations

from scalebox.update import health, stage, switch
from scalebox.update.context import Context
from scalebox.update.errors import RollbackFailed, UpdateError, reason_of
from scalebox.update.journal import Journal
from scalebox.update.systemd import HANDOVER, SERVICE, SOCKET


def manual_steps(ctx: Context, journal: Journal) -> str:
    """The exact commands that finish this rollback by hand."""
    p = ctx.paths
    backup = p.backup_dir(journal.id)
    return (
        "fix the cause shown above, then run `scalebox-update recover`; by hand: "
        f"`ln -sfn releases/{journal.from_release} {p.current}.new && "
        f"mv -T {p.current}.new {p.current}`, copy {backup}/units/* to {p.systemd_dir}/ "
        f"and {backup}/config to {p.config}, then `systemctl daemon-reload && "
        "systemctl reset-failed scaleboxd && systemctl restart scaleboxd`"
    )


def roll_back(ctx: Context, journal: Journal) -> None:
    """Bring releases/<from_release> back; raise RollbackFailed when it is not healthy."""
    p = ctx.paths
    ctx.report(f"rolling back to {journal.from_version}: {journal.reason or 'interrupted'}")
    try:
        # Only when it moved: a `current` that never left (the switch itself
        # failed, e.g. a read-only /opt/scalebox) needs no write to come back.
        if ctx.service.state(HANDOVER).active not in ("inactive", "failed"):
            # The new release's handover instance (a run killed mid-handover): the
            # main daemon serves alone again before anything else moves.
            ctx.service.stop(HANDOVER, ctx.restart_timeout)
        if stage.current_name(p) != journal.from_release:
            switch.swap_current(p, journal.from_release)
        backup = p.backup_dir(journal.id)
        touched: list[str] = []
        if (backup / switch.BACKUP_INDEX).is_file():
            touched = switch.restore(p, backup)
        # Always, unlike an update's switch: a rollback trusts nothing systemd loaded.
        ctx.service.daemon_reload()
        ctx.service.reset_failed(SERVICE)
        if SOCKET not in touched and _old_still_serves(ctx, journal):
            ctx.report(f"scaleboxd {journal.from_version} kept serving; it is not restarted")
        elif switch.can_hand_over(p.release_dir(journal.from_release), touched):
            # Reloaded above: no second one.
            switch.start_handover(ctx.service, (), ctx.restart_timeout, ctx.report)
            switch.finish_handover(ctx.service, ctx.restart_timeout, ctx.report)
        else:
            if SOCKET in touched:
                ctx.service.restart(SOCKET, ctx.restart_timeout)
            switch.restart_service(ctx.service, ctx.restart_timeout, ctx.report)
        health.verify(
            ctx.service,
            ctx.http,
            health.Check(
                ctx.health_url(),
                journal.from_version,
                ctx.stability_window,
                ctx.verify_timeout,
            ),
            ctx.report,
        )
    except (UpdateError, OSError, ValueError, KeyError) as exc:
        what = reason_of(exc)
        raise RollbackFailed(
            f"rollback to {journal.from_version} failed: {what} "
            f"(the update failed first: {journal.reason})",
            manual_steps(ctx, journal),
        ) from exc


def _old_still_serves(ctx: Context, journal: Journal) -> bool:
    """Whether scaleboxd.service still runs the old version (the handover never got past it).

    Only the main daemon can answer now (no handover instance runs), and a
    process started after ``current`` moved would report the new version.
    """
    state = ctx.service.state(SERVICE)
    answer = health.probe(ctx.http, ctx.health_url()) if state.running else None
    if answer != journal.from_version:
        ctx.report(
            f"scaleboxd is {state.active}/{state.sub} and /health answers {answer!r}: "
            f"bringing {journal.from_version} back"
        )
    return answer == journal.from_version
