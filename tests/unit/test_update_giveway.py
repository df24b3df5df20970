"""The updater gives way for the CPU only to a daemon that serves (update/giveway.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scalebox import priority
from scalebox.daemon import serving
from scalebox.update import giveway


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    return tmp_path / "etc" / "config"


def test_with_nobody_serving_the_update_keeps_its_priority(config: Path) -> None:
    """An update run to bring a dead service back has nobody to give way to."""
    given = os.getpriority(os.PRIO_PROCESS, 0)
    said: list[str] = []
    try:
        assert giveway.give_way(config, said.append) is False
        assert not priority.lowered()
        assert os.getpriority(os.PRIO_PROCESS, 0) == given
    finally:
        priority.restore_process(print)
    assert said == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_beside_a_serving_daemon_the_update_gives_way_until_restored(config: Path) -> None:
    given = os.getpriority(os.PRIO_PROCESS, 0)
    daemon = serving.Serving(str(config))
    assert daemon.hold() is None
    try:
        assert giveway.give_way(config, print) is True
        assert priority.lowered()
        lowered = min(max(given, 0) + priority.NICER, priority.MAX_NICE)
        assert os.getpriority(os.PRIO_PROCESS, 0) == lowered
    finally:
        priority.restore_process(print)
        daemon.release()
    assert not priority.lowered()
    assert os.getpriority(os.PRIO_PROCESS, 0) == given
