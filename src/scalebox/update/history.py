"""The update history: /var/lib/scalebox-update/history.jsonl, one JSON object a line.

Append-only. Each line: ``at`` (UTC), ``id`` (transaction id), ``action``
(update, rollback, recover), ``from``, ``to``, ``result`` (updated,
rolled back, rollback failed, refused), ``reason`` and ``step_times``
(when each step began, Unix seconds, plus ``end``: when the result was
recorded; absent in lines written before it existed) and ``migrations``
(the ids of the migrations the update applied; absent in older lines) and,
on a ``rolled back`` line, ``release_failed``: false when the rollback was
not the release's doing (a signal, the updater's disk, a crash or power cut
of the updater before the release was judged), so that the release does not
count among the failed ones in the pruning (absent in older lines: true).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scalebox.fsutil import append_line
from scalebox.update.journal import new_id, now, stamp

UPDATED = "updated"
ROLLED_BACK = "rolled back"
ROLLBACK_FAILED = "rollback failed"
REFUSED = "refused"


@dataclass(frozen=True)
class Entry:
    at: str
    id: str
    action: str
    from_version: str
    to_version: str
    result: str
    reason: str | None = None
    step_times: dict[str, float] | None = None
    migrations: list[str] | None = None
    release_failed: bool | None = None  # on "rolled back" lines; None: not said (older lines)

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "id": self.id,
            "action": self.action,
            "from": self.from_version,
            "to": self.to_version,
            "result": self.result,
            "reason": self.reason,
            "step_times": self.step_times,
            "migrations": self.migrations,
            "release_failed": self.release_failed,
        }


def append(path: Path, entry: Entry) -> None:
    """Add one line and fsync it. A line torn by a crash is skipped by ``read``."""
    append_line(path, json.dumps(entry.to_json(), sort_keys=True) + "\n")


def record(
    path: Path,
    *,
    transaction_id: str,
    action: str,
    from_version: str,
    to_version: str,
    result: str,
    reason: str | None = None,
    step_times: dict[str, float] | None = None,
    migrations: list[str] | None = None,
    release_failed: bool | None = None,
) -> Entry:
    """Append the result of a transaction; ``step_times`` gains ``end``: now."""
    times = None if step_times is None else {**step_times, "end": stamp()}
    entry = Entry(
        now(),
        transaction_id,
        action,
        from_version,
        to_version,
        result,
        reason,
        times,
        migrations,
        release_failed,
    )
    append(path, entry)
    return entry


def record_refusal(
    path: Path, *, action: str, from_version: str, to_version: str, reason: str
) -> str | None:
    """Record a refusal before any transaction began (no journal, so a fresh id).

    Returns None, or what went wrong if the history itself cannot be written
    (for the caller to say on stderr: a refusal must never become a traceback).
    """
    try:
        record(
            path,
            transaction_id=new_id(),
            action=action,
            from_version=from_version,
            to_version=to_version,
            result=REFUSED,
            reason=reason,
        )
    except OSError as exc:
        return f"could not record the refusal in {path} ({exc.strerror or exc})"
    return None


def read(path: Path) -> list[Entry]:
    """All entries, oldest first; lines that are not whole JSON objects are skipped.

    Line by line from bytes: one line that is not UTF-8 (a damaged sector, a hand
    edit) is skipped like any other bad line. Decoded as a whole, it failed every
    read, and a run that had switched could not record its commit.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    entries = []
    for line in data.splitlines():
        try:
            raw = json.loads(line)
            entries.append(
                Entry(
                    at=str(raw["at"]),
                    id=str(raw["id"]),
                    action=str(raw["action"]),
                    from_version=str(raw["from"]),
                    to_version=str(raw["to"]),
                    result=str(raw["result"]),
                    reason=raw.get("reason"),
                    step_times=raw.get("step_times"),
                    migrations=raw.get("migrations"),
                    release_failed=_flag(raw.get("release_failed")),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def _flag(value: object) -> bool | None:
    """A true/false field as written; anything else (absent, a hand edit) is not said."""
    return value if isinstance(value, bool) else None


def has(entries: Sequence[Entry], transaction_id: str, result: str) -> bool:
    """Whether the transaction already has this result recorded (keeps recovery idempotent)."""
    return any(e.id == transaction_id and e.result == result for e in entries)
