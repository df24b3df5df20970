"""Run the pending migrations against the config, remembering each one applied.

After each migration the config is saved (atomically, only if it changed)
and then its id is added to the state file. A crash between the two makes
the next run apply that migration again, which is safe because migrations
are idempotent; a migration already in the state file is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scalebox.fsutil import atomic_write
from scalebox.migrations.configfile import ConfigFile
from scalebox.migrations.errors import MigrationError, MigrationFailed
from scalebox.migrations.registry import Migration, pending

STATE_FORMAT = 1


@dataclass(frozen=True)
class Outcome:
    applied: tuple[str, ...]  # run now, in order
    skipped: tuple[str, ...]  # pending by version, but already in the state file
    config_changed: bool


def read_state(path: Path) -> list[str]:
    """The ids applied so far (an absent file: none)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise MigrationError(
            f"the migration state file {path} is unreadable ({exc})",
            "it belongs to an interrupted update; let `scalebox-update recover` finish it",
        ) from None
    applied = raw.get("applied") if isinstance(raw, dict) else None
    if not isinstance(applied, list) or not all(isinstance(i, str) for i in applied):
        raise MigrationError(
            f"the migration state file {path} has no list 'applied'",
            "it belongs to an interrupted update; let `scalebox-update recover` finish it",
        )
    return applied


def write_state(path: Path, applied: Sequence[str]) -> None:
    atomic_write(
        path, json.dumps({"format": STATE_FORMAT, "applied": list(applied)}) + "\n", mode=0o600
    )


def run(
    migrations: Sequence[Migration],
    *,
    config_path: Path,
    from_version: str,
    to_version: str,
    state_path: Path,
    report: Callable[[str], None] = lambda _line: None,
) -> Outcome:
    """Apply what is pending; raise MigrationFailed naming the first migration that raised."""
    done = read_state(state_path)
    by_version = pending(migrations, from_version, to_version, ())
    skipped = tuple(m.id for m in by_version if m.id in done)
    applied: list[str] = []
    changed = False
    for m in by_version:
        if m.id in done:
            continue
        config = ConfigFile.load(config_path)
        try:
            m.apply(config)
        except MigrationError as exc:
            raise MigrationFailed(m.id, exc.what) from exc
        except Exception as exc:  # any bug in a migration stops the update
            raise MigrationFailed(m.id, f"{type(exc).__name__}: {exc}") from exc
        this_changed = config.changed
        changed = changed or this_changed
        config.save()
        done.append(m.id)
        write_state(state_path, done)
        applied.append(m.id)
        outcome = "" if this_changed else " (the config already said so: no change)"
        report(f"applied {m.id}: {m.description}{outcome}")
    return Outcome(tuple(applied), skipped, changed)
