"""The transaction journal: /var/lib/scalebox-update/journal.json.

It is written atomically and fsynced *before* each step begins, so after a
crash (kill -9, power loss) the next run knows the last step that may have
started, and plan.recovery_action says how to finish the transaction.
It is removed only when the transaction has ended (committed, rolled back or
refused with nothing changed).

Format (one JSON object, ``format`` 1)::

    {
      "format": 1,
      "id": "20261127T134514Z-4242",      transaction id; names the backup dir
      "action": "update" | "rollback",    an update, or `scalebox-update --rollback`
      "pid": 4242,                         the updater that wrote it
      "started": "2026-11-27T13:45:14Z",
      "updated": "2026-11-27T13:45:20Z",   when ``step`` was written
      "from_version": "0.1.0",  "from_release": "0.1.0",   running before (dir under releases/)
      "to_version": "0.2.0",    "to_release": "0.2.0",     the target
      "built_release": true,               this transaction created releases/<to_release>
      "step": "stage" | "backup" | "migrate" | "switch" | "handover" | "verify" | "commit"
              | "rollback",
                                           handover: the new release's handover instance is
                                           ready and scaleboxd.service is being restarted onto it
      "reason": null | "why the rollback started",
      "step_times": {"stage": 1795786514.123, ...},  when each step began (Unix time)
      "migrations": ["0001-add-x", ...]    ids the migrate step applied (for the history)
    }

Fault injection for tests: when the environment variable
SCALEBOX_UPDATE_STOP_AT names a step (e.g. ``switch``), the updater stops
itself with SIGSTOP right after that step's journal entry is durable. A test
waits for the stopped state, sends SIGKILL, and so kills the updater at that
exact step boundary however short the step is (tests/system/test_update_crash.py).
Unset (always, outside tests), it does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from scalebox.fsutil import atomic_write, fsync_dir
from scalebox.update.errors import UpdateError

FORMAT = 1
STOP_AT_ENV = "SCALEBOX_UPDATE_STOP_AT"
STEPS = ("stage", "backup", "migrate", "switch", "handover", "verify", "commit", "rollback")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


@dataclass(frozen=True)
class Journal:
    id: str
    action: str
    from_version: str
    from_release: str
    to_version: str
    to_release: str
    step: str
    built_release: bool = False
    reason: str | None = None
    pid: int = 0
    started: str = ""
    updated: str = ""
    format: int = FORMAT
    # Only for the record (history, --json, ./do bench): nothing decides on them.
    step_times: dict[str, float] = field(default_factory=dict)
    migrations: list[str] = field(default_factory=list)


def write(path: Path, journal: Journal) -> None:
    """Make ``journal`` durable (atomic replace + fsync of file and directory)."""
    if journal.step not in STEPS:
        raise ValueError(f"unknown journal step {journal.step!r}")
    text = json.dumps(asdict(journal), indent=2, sort_keys=True) + "\n"
    atomic_write(path, text, mode=0o600)
    if os.environ.get(STOP_AT_ENV) == journal.step:
        os.kill(os.getpid(), signal.SIGSTOP)


def stamp() -> float:
    """The time a step begins, in Unix seconds to the millisecond."""
    return round(time.time(), 3)


def begin(path: Path, journal: Journal) -> Journal:
    """Write the first journal entry of a transaction."""
    stamped = replace(
        journal,
        pid=os.getpid(),
        started=now(),
        updated=now(),
        step_times={**journal.step_times, journal.step: stamp()},
    )
    write(path, stamped)
    return stamped


def advance(path: Path, journal: Journal, step: str, reason: str | None = None) -> Journal:
    """Record that ``step`` is about to begin; returns the journal as written."""
    moved = replace(
        journal,
        step=step,
        reason=reason if reason is not None else journal.reason,
        pid=os.getpid(),
        updated=now(),
        step_times={**journal.step_times, step: stamp()},
    )
    write(path, moved)
    return moved


def read(path: Path) -> Journal | None:
    """The unfinished transaction, or None when there is none."""
    try:
        raw = json.loads(path.read_text())
        journal = Journal(**raw)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise UpdateError(
            f"the update journal {path} is unreadable ({exc})",
            "check where /opt/scalebox/current points and that scaleboxd is healthy, "
            f"then move {path} aside and run scalebox-update again",
        ) from None
    if journal.format != FORMAT or journal.step not in STEPS:
        raise UpdateError(
            f"the update journal {path} has format {journal.format} step {journal.step!r}, "
            "which this updater does not know",
            "finish it with the scalebox-update that wrote it (/opt/scalebox/current)",
        )
    return journal


def remove(path: Path) -> None:
    """End the transaction: the journal disappears durably."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)
