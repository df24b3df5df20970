"""`scalebox-update status` in-process, with systemd's part stood in for (systemd is not
PID 1 on this host; the system tests run the real one)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from scalebox.update import interrupt, main
from scalebox.update.paths import Paths
from scalebox.update.systemd import UnitState


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
    handlers = {s: signal.getsignal(s) for s in interrupt.HANDLED}
    try:
        code = main.main(["status"])
    finally:  # main ends ignoring every signal (only its exit is left): not this runner
        for s, handler in handlers.items():
            signal.signal(s, handler)
    out, err = capsys.readouterr()
    assert code == main.EXIT_REFUSED
    assert "interrupted by SIGINT" in err
    assert "systemctl unavailable" not in out + err
