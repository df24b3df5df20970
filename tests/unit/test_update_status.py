"""`scalebox-update status` in-process, with systemd's part stood in for (systemd is not
PID 1 on this host; the system tests run the real one)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebox.update import interrupt, journal, main
from scalebox.update.paths import Paths
from scalebox.update.systemd import UnitState


@pytest.fixture(autouse=True)
def _handlers_kept() -> Iterator[None]:
    """main() ends ignoring every signal (only its exit is left): not this test runner."""
    handlers = {s: signal.getsignal(s) for s in interrupt.HANDLED}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


class _CtrlCWhileAsked:
    """systemctl's part: the admin presses Ctrl-C while `systemctl show` runs."""

    def state(self, unit: str) -> UnitState:
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("the signal should have stopped the status here")


def test_a_ctrl_c_while_status_asks_systemd_is_not_told_as_systemctl_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(main, "_paths", lambda: Paths(tmp_path))
    monkeypatch.setattr(main, "Systemctl", _CtrlCWhileAsked)
    code = main.main(["status"])
    out, err = capsys.readouterr()
    assert code == main.EXIT_REFUSED
    assert "interrupted by SIGINT" in err
    assert "systemctl unavailable" not in out + err


class _Running:
    """systemctl's part: scaleboxd runs."""

    def state(self, unit: str) -> UnitState:
        return UnitState("active", "running", 4242, 0)


def test_status_tells_an_update_in_progress_from_one_to_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """While an updater works, its journal is its transaction in progress: status said
    "run `scalebox-update recover`", which then refused as busy. The lock is held by
    a real process, as a running updater holds it."""
    paths = Paths(tmp_path)
    monkeypatch.setattr(main, "_paths", lambda: paths)
    monkeypatch.setattr(main, "Systemctl", _Running)
    j = journal.Journal(
        id=journal.new_id(), action="update", from_version="1.0.0", from_release="1.0.0",
        to_version="1.1.0", to_release="1.1.0", step="switch", built_release=True,
    )  # fmt: skip
    journal.begin(paths.journal, j)
    paths.lock.write_text("")
    holding = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(paths.lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holding.stdout is not None and holding.stdout.readline() == "held\n"
        assert main.main(["status"]) == 0
        busy = capsys.readouterr().out
        assert main.main(["status", "--json"]) == 0
        busy_json = json.loads(capsys.readouterr().out)
    finally:
        holding.kill()
        holding.wait()
    assert main.main(["status"]) == 0
    left = capsys.readouterr().out
    assert (
        f"IN PROGRESS: update 1.0.0 -> 1.1.0 at step switch (scalebox-update PID {holding.pid})"
        in busy
    )
    assert "recover" not in busy
    assert busy_json["updater_pid"] == holding.pid
    assert "UNFINISHED update 1.0.0 -> 1.1.0 at step switch: run `scalebox-update recover`" in left


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""
