"""When the handover fails and its cleanup fails too, the first failure is the one told.

systemd's part is a stand-in here (systemd is not PID 1 on this host): a unit
manager whose every call fails, as a loaded or broken systemd can. The system
tests run the real one.
"""

from __future__ import annotations

import pytest

from scalebox.update import switch
from scalebox.update.errors import CommandError
from scalebox.update.systemd import UnitState


class BrokenSystemd:
    """Every call fails with its own words, so the test can tell which one was told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _fail(self, what: str) -> None:
        self.calls.append(what)
        raise CommandError(f"{what} failed", "see journalctl")

    def start(self, unit: str, timeout: float) -> None:
        self._fail(f"start {unit}")

    def restart(self, unit: str, timeout: float) -> None:
        self._fail(f"restart {unit}")

    def stop(self, unit: str, timeout: float) -> None:
        self._fail(f"stop {unit}")

    def state(self, unit: str) -> UnitState:
        self._fail(f"show {unit}")
        raise AssertionError("unreachable")


def test_a_handover_that_fails_to_start_is_told_even_when_its_stop_fails() -> None:
    systemd = BrokenSystemd()
    with pytest.raises(CommandError) as caught:
        switch._start_or_stop(systemd, 5)  # type: ignore[arg-type]
    assert caught.value.what == "start scaleboxd-handover.service failed"
    assert systemd.calls == ["start scaleboxd-handover.service", "stop scaleboxd-handover.service"]


def test_a_restart_that_fails_is_told_even_when_the_handover_cannot_be_stopped() -> None:
    systemd = BrokenSystemd()
    with pytest.raises(CommandError) as caught:
        switch.finish_handover(systemd, 5, print)  # type: ignore[arg-type]
    assert caught.value.what == "restart scaleboxd.service failed"
    assert systemd.calls == [
        "restart scaleboxd.service",
        "show scaleboxd.service",  # was it systemd's cgroup? cannot tell: the restart's error
        "stop scaleboxd-handover.service",
    ]
