"""The journal survives as written, and each step's entry is on disk before the step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scalebox.update import history, journal
from scalebox.update.errors import UpdateError
from scalebox.update.journal import Journal


def _journal(step: str = "stage") -> Journal:
    return Journal(
        id="20260101T000000Z-1",
        action="update",
        from_version="0.1.0",
        from_release="0.1.0",
        to_version="0.2.0",
        to_release="0.2.0",
        step=step,
        built_release=True,
    )


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    written = journal.begin(path, _journal())
    assert journal.read(path) == written
    moved = journal.advance(path, written, "rollback", reason="health check failed")
    assert journal.read(path) == moved
    assert moved.reason == "health check failed"
    assert moved.started == written.started


def test_no_journal_means_no_transaction(tmp_path: Path) -> None:
    assert journal.read(tmp_path / "journal.json") is None


def test_remove_ends_the_transaction(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    journal.begin(path, _journal())
    journal.remove(path)
    journal.remove(path)  # idempotent
    assert journal.read(path) is None


def test_file_is_private_and_documented_format(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    journal.begin(path, _journal())
    assert path.stat().st_mode & 0o777 == 0o600
    raw = json.loads(path.read_text())
    assert raw["format"] == 1
    assert raw["step"] == "stage"
    assert set(raw) >= {"id", "action", "from_version", "to_version", "step", "reason"}


def test_unknown_step_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    with pytest.raises(ValueError, match="unknown journal step"):
        journal.write(path, _journal(step="nonsense"))
    assert not path.exists()


def test_corrupt_journal_is_an_error_with_a_way_out(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    path.write_text('{"format": 1, "id": ')
    with pytest.raises(UpdateError, match="unreadable") as caught:
        journal.read(path)
    assert caught.value.hint is not None
    assert "current" in caught.value.hint


def test_advance_is_durable_before_it_returns(tmp_path: Path) -> None:
    """Another process reads the new step as soon as advance returns: no buffering in between.

    The process then dies by SIGKILL, and the step is still there.
    """
    path = tmp_path / "journal.json"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from scalebox.update import journal\n"
        "from scalebox.update.journal import Journal\n"
        "p = Path(sys.argv[1])\n"
        "j = journal.begin(p, Journal('t', 'update', 'a', 'a', 'b', 'b', 'stage'))\n"
        "for step in ('backup', 'switch'):\n"
        "    j = journal.advance(p, j, step)\n"
        "    print(step, flush=True)\n"
        "    sys.stdin.readline()\n"
        "signal.raise_signal(signal.SIGKILL)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        for step in ("backup", "switch"):
            assert proc.stdout.readline().strip() == step
            seen = journal.read(path)
            assert seen is not None
            assert seen.step == step
            proc.stdin.write("\n")
            proc.stdin.flush()
        assert proc.wait(timeout=10) == -9
    finally:
        proc.kill()
        proc.wait()
    after = journal.read(path)
    assert after is not None
    assert after.step == "switch"
    assert not list(tmp_path.glob(".journal.json.*"))  # no temp file left behind


def test_history_appends_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history.record(
        path,
        transaction_id="t1",
        action="update",
        from_version="0.1.0",
        to_version="0.2.0",
        result=history.UPDATED,
    )
    with path.open("a") as f:
        f.write('{"at": "2026-')  # a crash in the middle of a line
    history.record(
        path,
        transaction_id="t2",
        action="update",
        from_version="0.2.0",
        to_version="0.3.0",
        result=history.ROLLED_BACK,
        reason="crashed",
    )
    entries = history.read(path)
    assert [(e.id, e.result, e.reason) for e in entries] == [
        ("t1", "updated", None),
        ("t2", "rolled back", "crashed"),
    ]
    assert history.has(entries, "t2", history.ROLLED_BACK)
    assert not history.has(entries, "t2", history.UPDATED)


def test_history_skips_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    """A damaged sector or a hand edit: one bad byte cost every later read, so a run
    that had switched could not record its commit (and recovery stopped there too)."""
    path = tmp_path / "history.jsonl"
    for number in (1, 2):
        history.record(
            path,
            transaction_id=f"t{number}",
            action="update",
            from_version="0.1.0",
            to_version="0.2.0",
            result=history.UPDATED,
        )
        if number == 1:
            with path.open("ab") as f:
                f.write(b'{"at": "2026-12-03", "reason": "caf\xe9"}\n')  # latin-1, not UTF-8
    assert [e.id for e in history.read(path)] == ["t1", "t2"]
