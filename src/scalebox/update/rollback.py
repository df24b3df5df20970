"""Rollback: the old release back, exactly, and verified healthy.

Swaps ``current`` back, restores units and config byte for byte from the
transaction's backup, daemon-reloads, restarts and verifies the old version.
Every step is idempotent, so a rollback interrupted by a crash is simply
run again by the next ``scalebox-update`` or the boot-time recover unit.
"""

from __future__ import annotations

from scalebox.update import health, stage, switch
from scalebox.update.context import Context
from scalebox.update.errors import RollbackFailed, UpdateError, reason_of
from scalebox.update.journal import Journal
from scalebox.update.systemd import SERVICE, SOCKET


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
        if stage.current_name(p) != journal.from_release:
            switch.swap_current(p, journal.from_release)
        backup = p.backup_dir(journal.id)
        touched: list[str] = []
        if (backup / switch.BACKUP_INDEX).is_file():
            touched = switch.restore(p, backup)
        ctx.service.daemon_reload()
        ctx.service.reset_failed(SERVICE)
        if SOCKET in touched:
            ctx.service.restart(SOCKET, ctx.restart_timeout)
        ctx.service.restart(SERVICE, ctx.restart_timeout)
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
