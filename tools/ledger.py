"""releases.json, the release ledger: which commit each release was cut from.

Git tags are not available everywhere (a shallow CI checkout, a mirror, an
export), so the ledger is a file in the repository, written by
`./do release` and read by `./do check-update` to rebuild the last release
from its own sources:

    {"format": 1, "releases": [{"version": "0.1.0", "commit": "<40 hex>", "date": "2025-11-27"}]}

Entries are kept oldest first; "newest" means the highest version. Pure code
apart from load().
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from scalebox.errors import ScaleboxError
from scalebox.update import versions

FORMAT = 1
_COMMIT = re.compile(r"[0-9a-f]{40}")
_FIX_HINT = "fix releases.json by hand (git log -- releases.json shows its history)"


class LedgerError(ScaleboxError):
    """releases.json is unreadable or would become inconsistent."""


@dataclass(frozen=True)
class Entry:
    version: str
    commit: str
    date: str  # YYYY-MM-DD

    def to_json(self) -> dict[str, str]:
        return {"version": self.version, "commit": self.commit, "date": self.date}


def _entry(item: Any, where: str) -> Entry:
    if not isinstance(item, dict) or set(item) != {"version", "commit", "date"}:
        raise LedgerError(
            f"{where} is not an object with exactly version, commit and date", _FIX_HINT
        )
    version, commit, day = item["version"], item["commit"], item["date"]
    if not isinstance(version, str) or not isinstance(commit, str) or not isinstance(day, str):
        raise LedgerError(f"{where}: version, commit and date must be strings", _FIX_HINT)
    try:
        versions.parse(version)
    except versions.InvalidVersion as exc:
        raise LedgerError(f"{where}: {exc.what}", _FIX_HINT) from None
    if not _COMMIT.fullmatch(commit):
        raise LedgerError(f"{where}: commit {commit!r} is not a full 40-digit hash", _FIX_HINT)
    try:
        date.fromisoformat(day)
    except ValueError:
        raise LedgerError(f"{where}: date {day!r} is not YYYY-MM-DD", _FIX_HINT) from None
    return Entry(version, commit, day)


def parse(text: str, source: str = "releases.json") -> tuple[Entry, ...]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LedgerError(f"{source} is not JSON: {exc}", _FIX_HINT) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LedgerError(
            f'{source} is not a format {FORMAT} ledger ({{"format": {FORMAT}, "releases": [...]}})',
            _FIX_HINT,
        )
    releases = data.get("releases")
    if not isinstance(releases, list):
        raise LedgerError(f"{source}: releases must be a list", _FIX_HINT)
    entries = tuple(_entry(item, f"{source} entry {i}") for i, item in enumerate(releases))
    seen: set[versions.Version] = set()
    for entry in entries:
        parsed = versions.parse(entry.version)
        if parsed in seen:
            raise LedgerError(f"{source} lists version {entry.version} twice", _FIX_HINT)
        seen.add(parsed)
    return entries


def render(entries: tuple[Entry, ...]) -> str:
    body = {"format": FORMAT, "releases": [e.to_json() for e in entries]}
    return json.dumps(body, indent=2) + "\n"


def newest(entries: tuple[Entry, ...]) -> Entry | None:
    return max(entries, key=lambda e: versions.parse(e.version), default=None)


def add(entries: tuple[Entry, ...], entry: Entry) -> tuple[Entry, ...]:
    """The ledger with ``entry`` appended; refused unless it is newer than every entry."""
    last = newest(entries)
    if last is not None and not versions.is_newer(entry.version, last.version):
        raise LedgerError(
            f"release {entry.version} is not newer than {last.version}, "
            "the newest release in releases.json",
            f"choose a version above {last.version}",
        )
    return (*entries, entry)


def load(path: Path) -> tuple[Entry, ...]:
    """The entries of the ledger at ``path``; none when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ()
    return parse(text, str(path))
