"""The updater gives way for the CPU only to a daemon that serves (update/giveway.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from scalebox import priority
from scalebox.daemon import serving
from scalebox.runner import run_program
from scalebox.update import giveway, main
from scalebox.update.paths import Paths


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


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_the_update_gives_way_for_a_bounded_time_only(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU saturated by busy VMs a lowered stage would take minutes: after
    GIVE_WAY_SECONDS the updater goes on at its normal priority, and says so."""
    monkeypatch.setattr(giveway, "GIVE_WAY_SECONDS", 0.3)
    given = os.getpriority(os.PRIO_PROCESS, 0)
    daemon = serving.Serving(str(config))
    assert daemon.hold() is None
    said: list[str] = []
    try:
        assert giveway.give_way(config, said.append) is True
        assert priority.lowered()
        deadline = time.monotonic() + 5
        while priority.lowered() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not priority.lowered()
        assert os.getpriority(os.PRIO_PROCESS, 0) == max(given, 0)
    finally:
        priority.restore_process(print)
        daemon.release()
    assert said == [
        "still busy after 0.3 s at a lower CPU priority; going on at normal priority, "
        "so that a saturated CPU cannot starve it"
    ]


CHILD_NICE = (
    "import os, pathlib\n"
    "group = pathlib.Path('/proc/self/autogroup')\n"  # absent without autogroup scheduling
    "print(os.getpriority(os.PRIO_PROCESS, 0), "
    "group.read_text().split()[-1] if group.exists() else '-')\n"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_work_after_the_commit_runs_lowered_and_its_programs_too(config: Path) -> None:
    """The template notice after an update starts the new release's Python (~130 ms of
    CPU); at full priority it stalled every request for 35-45 ms. In ``waiting`` it runs
    lowered, programs it starts in a session of their own too, and ends restored, also
    when the block raises."""
    given = os.getpriority(os.PRIO_PROCESS, 0)
    lowered = min(max(given, 0) + priority.NICER, priority.MAX_NICE)
    daemon = serving.Serving(str(config))
    assert daemon.hold() is None
    try:
        with giveway.waiting(config, print):
            done = run_program([sys.executable, "-c", CHILD_NICE], timeout=30, new_session=True)
        nice, session = done.stdout.split()
        assert int(nice) == lowered
        if priority.session_nice() is not None:  # autogroup scheduling on this kernel
            assert int(session) == lowered
        assert os.getpriority(os.PRIO_PROCESS, 0) == given
        with pytest.raises(RuntimeError), giveway.waiting(config, print):
            raise RuntimeError("the block failed")
        assert not priority.lowered()
        assert os.getpriority(os.PRIO_PROCESS, 0) == given
    finally:
        priority.restore_process(print)
        daemon.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
@pytest.mark.parametrize(("argv", "lowered"), [(["--dry-run"], True), (["--rollback"], False)])
def test_an_update_gives_way_before_it_makes_its_http_client_and_a_rollback_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], lowered: bool
) -> None:
    """The health probes' client costs ~20 ms of CPU (the CA bundle), after the entry
    point's lowered imports and before any step: made at full priority, it slowed the
    serving daemon's requests. Run with the server's layout under tmp_path (nothing is
    installed there, so the run is refused after the client is made)."""
    paths = Paths(tmp_path)
    paths.config.parent.mkdir(parents=True)
    monkeypatch.setattr(main, "_paths", lambda: paths)
    seen: list[bool] = []
    real = httpx.Client

    def noting(*args: Any, **kwargs: Any) -> httpx.Client:
        seen.append(priority.lowered())
        return real(*args, **kwargs)

    monkeypatch.setattr(main.httpx, "Client", noting)
    daemon = serving.Serving(str(paths.config))
    assert daemon.hold() is None
    try:
        result = CliRunner().invoke(main.cli, ["--json", *argv])
    finally:
        priority.restore_process(print)  # never leave the test runner lowered
        daemon.release()
    assert result.exit_code != 0, result.output
    assert seen == [lowered]
    assert not priority.lowered()


def test_a_prestage_names_the_command_that_switches_to_what_it_staged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--to 0.9.0` alone is refused for an older release, and a release found through
    SCALEBOX_RELEASE_URL may have no GitHub tag to find it by."""
    monkeypatch.delenv("SCALEBOX_RELEASE_URL", raising=False)
    assert main._switch_command("1.0.0", "1.1.0") == "`scalebox-update --to 1.1.0`"
    assert main._switch_command("1.0.0", "0.9.0") == (
        "`scalebox-update --to 0.9.0 --allow-downgrade`"
    )
    monkeypatch.setenv("SCALEBOX_RELEASE_URL", "/srv/scalebox-0.9.0-x86_64.tar.gz")
    assert main._switch_command("1.0.0", "0.9.0") == (
        "`scalebox-update --allow-downgrade` with the same SCALEBOX_RELEASE_URL"
    )
