"""Migrate: the new release's own migrations, on the live config, after the backup.

The updater does not import the migrations: it runs the *new* release's
runner with the new release's interpreter (design section 8: the first
update after a release must not run the old code's idea of the new one)::

    releases/<new>/venv/bin/python -m scalebox.migrations run --config ... --json

Its state file lives in the transaction's backup directory, so a re-run
within the transaction skips what was applied, and a rollback (which
restores the config from that backup) needs no undo of its own.

Going back to an older release (``--rollback``, or a downgrade) undoes the
migrations of the release being left: when the update that installed it
changed the config, that update kept the config as it was before
(``/var/lib/scalebox-update/migrated/<release>/``), and it is put back byte
for byte, unless someone edited the config since (then it is kept: an older
release ignores keys it does not know).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from scalebox.fsutil import atomic_write
from scalebox.migrations import registry
from scalebox.release.manifest import MigrationInfo
from scalebox.runner import ProgramError, run_program
from scalebox.update import stage, versions
from scalebox.update.errors import UpdateError
from scalebox.update.journal import Journal
from scalebox.update.paths import Paths

RUN_TIMEOUT = 120.0
# A write the server's disk refused (the runner says its errno): full, over quota, read-only.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
STATE = "migrations.json"  # in the transaction's backup directory
BEFORE = "config.before"
RECORD = "record.json"

Report = Callable[[str], None]


class MigrationFailed(UpdateError):
    """A migration of the new release failed; the transaction rolls back."""


def step(paths: Paths, j: Journal, report: Report) -> list[str]:
    """The transaction's migrate step: forward, run the new release's migrations; back, undo.

    Returns the ids of the migrations applied. Runs after the backup, so a
    failure (or a crash) is rolled back with the config restored from it.
    """
    direction = versions.compare(j.to_version, j.from_version)
    if direction < 0:
        undo(paths, j.from_release, j.to_version, report)
        return []
    if direction == 0:
        return []  # a reinstall: nothing is pending between a version and itself
    forget(paths, j.to_release)
    backup = paths.backup_dir(j.id)
    applied = run(
        paths,
        j.to_release,
        from_version=j.from_version,
        to_version=j.to_version,
        state=backup / STATE,
        report=report,
    )
    if applied:
        # switch.back_up saved the config as "config" before this step began.
        before = (backup / "config").read_bytes()
        remember(paths, j.to_release, from_version=j.from_version, before=before, applied=applied)
    return applied


def would_run(release_root: Path, from_version: str, to_version: str) -> list[MigrationInfo]:
    """What the migrate step would apply, from the release's manifest (for --dry-run).

    The same rule the release's own runner applies (scalebox.migrations.registry);
    a downgrade runs none (it restores the config instead).
    """
    if versions.compare(to_version, from_version) <= 0:
        return []
    return registry.pending(stage.declared_migrations(release_root), from_version, to_version, ())


def records_dir(paths: Paths) -> Path:
    return paths.state_dir / "migrated"


def run(
    paths: Paths,
    release_name: str,
    *,
    from_version: str,
    to_version: str,
    state: Path,
    report: Report,
    timeout: float = RUN_TIMEOUT,
) -> list[str]:
    """Run the pending migrations of releases/<release_name>; return the ids applied."""
    release = paths.release_dir(release_name)
    if not stage.declared_migrations(release):
        report(f"{to_version} ships no migrations")
        return []
    python = release / "venv" / "bin" / "python"
    argv = [
        str(python),
        "-m",
        "scalebox.migrations",
        "run",
        "--config",
        str(paths.config),
        "--from",
        from_version,
        "--to",
        to_version,
        "--state",
        str(state),
        "--json",
    ]
    report(f"running {to_version}'s migrations with its own interpreter")
    try:
        # A session of its own, as every program the updater runs: a terminal's
        # hang-up (SIGHUP to the foreground group) killed it, and the update was
        # rolled back although the updater itself carries on through a hang-up.
        done = run_program(argv, timeout=timeout, new_session=True)
    except ProgramError as exc:
        raise MigrationFailed(
            f"running {to_version}'s migrations failed: {exc.detail}",
            "the update is rolled back; see the message above",
        ) from None
    for line in done.stderr.splitlines():
        report(f"  {line}")
    result = _last_json(done.stdout)
    applied = result.get("applied")
    if done.returncode == 0 and result.get("result") == "ok" and isinstance(applied, list):
        return [str(i) for i in applied]
    code = result.get("errno")
    if result.get("result") == "error" and isinstance(code, int) and code in DISK_ERRNOS:
        # This server's disk refused the config's write, not the release: the update is
        # refused as any full or read-only disk before the switch (transaction.py).
        raise OSError(code, os.strerror(code), str(result.get("filename") or paths.config))
    failed = result.get("failed")
    if isinstance(failed, dict):
        raise MigrationFailed(
            f"migration {failed.get('id')} of {to_version} failed: {failed.get('message')}",
            "the config was restored from the backup; report this to the release's publisher",
        )
    why = result.get("message") or done.stderr.strip()[-2000:] or "no output"
    raise MigrationFailed(
        f"{to_version}'s migrations failed (exit {done.returncode}): {why}",
        str(result.get("hint") or "the config was restored from the backup"),
    )


def _last_json(stdout: str) -> dict[str, object]:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remember(
    paths: Paths, release_name: str, *, from_version: str, before: bytes, applied: list[str]
) -> None:
    """Keep the config as it was before release_name's migrations changed it (for --rollback)."""
    where = records_dir(paths) / release_name
    after = paths.config.read_bytes()
    if after == before:
        return
    atomic_write(where / BEFORE, before, mode=0o600)
    record = {
        "from_version": from_version,
        "applied": applied,
        "after_sha256": _sha256(after),
    }
    atomic_write(where / RECORD, json.dumps(record, sort_keys=True) + "\n", mode=0o600)


def stale_records(recorded: Iterable[str], kept: Iterable[str]) -> list[str]:
    """The releases whose records may go: those no longer kept under releases/.

    A record is only read when leaving its release (--rollback from it), so
    one whose release directory was pruned can never be used again.
    """
    return sorted(set(recorded) - set(kept))


def prune_records(paths: Paths, kept: Iterable[str], report: Report) -> list[str]:
    """Delete migrated/<release> of every release not in ``kept``; return their names."""
    where = records_dir(paths)
    try:
        recorded = [d.name for d in where.iterdir() if d.is_dir()]
    except FileNotFoundError:
        return []
    doomed = stale_records(recorded, kept)
    for name in doomed:
        report(f"pruning the migration record of {name}")
        shutil.rmtree(where / name, ignore_errors=True)
    return doomed


def forget(paths: Paths, release_name: str) -> None:
    """Drop what an earlier install of release_name kept; this install decides afresh."""
    shutil.rmtree(records_dir(paths) / release_name, ignore_errors=True)


def undo(paths: Paths, leaving: str, to_version: str, report: Report) -> bool:
    """Restore the config from before ``leaving``'s migrations, if they changed it and no one since.

    Returns whether the config was restored.
    """
    where = records_dir(paths) / leaving
    try:
        record = json.loads((where / RECORD).read_text())
        before = (where / BEFORE).read_bytes()
    except (OSError, ValueError):
        return False  # its migrations did not change the config
    if not isinstance(record, dict) or versions.compare(
        str(record.get("from_version")), to_version
    ):
        return False  # it was migrated from another version than the one we go back to
    current = paths.config.read_bytes()
    if _sha256(current) != record.get("after_sha256"):
        report(
            f"the config was edited after {leaving}'s migrations ran; keeping it as it is "
            f"({to_version} ignores keys it does not know)"
        )
        return False
    st = paths.config.stat()
    atomic_write(paths.config, before, mode=st.st_mode & 0o7777)
    os.chown(paths.config, st.st_uid, st.st_gid)
    report(
        f"restored the config from before {leaving}'s migrations "
        f"({', '.join(str(i) for i in record.get('applied', []))})"
    )
    return True
