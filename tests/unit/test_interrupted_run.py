"""A test run stopped by SIGTERM or Ctrl-C still tears down what its tests started
(tests/interrupt.py), also on pytest-xdist's workers, which lead sessions of their own.

A real pytest run in a child process, on tests whose fixture stands for a
daemon or a machine: each notes its start and, in its teardown, its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Not this run's xdist variables: the inner run would take itself for a worker.
_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}

CONFTEST = """
from tests.interrupt import forward_to_workers, tear_down_on_sigterm

tear_down_on_sigterm()


def pytest_sessionstart(session):
    forward_to_workers(session.config)
"""

TEST = """
import os
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def started(request):
    name = request.node.name
    (HERE / f"up-{name}").write_text(f"{os.getsid(0) == os.getpid()}")
    yield
    # A machine's teardown can take a while: as long as the run's test says.
    time.sleep(float(os.environ.get("TEARDOWN_SECONDS", "0")))
    (HERE / f"down-{name}").write_text("")  # what a daemon's or a machine's teardown does


def test_waits(started):
    (HERE / "running-test_waits").write_text("")  # set up whole: a signal now tears down
    time.sleep(60)


def test_waits_too(started):
    (HERE / "running-test_waits_too").write_text("")
    time.sleep(60)
"""


@pytest.mark.parametrize("handled", [True, False])
def test_a_run_stopped_by_sigterm_tears_down_its_fixtures(tmp_path: Path, handled: bool) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST if handled else "")
    (tmp_path / "test_waits.py").write_text(TEST)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**_ENV, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        # The test's own marker, not the fixture's: a signal that lands while the
        # fixture is still setting up skips its teardown (seen once in CI).
        while not (tmp_path / "running-test_waits").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "running-test_waits").exists(), "the inner test never started"
        run.send_signal(signal.SIGTERM)
        code = run.wait(30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    # Handled: interrupted (2) after the teardown. Python's default: killed at once.
    assert ((tmp_path / "down-test_waits").exists(), code) == (
        (True, 2) if handled else (False, -15)
    )


@pytest.mark.parametrize(
    ("signum", "group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c-on-the-terminal", "sigterm-to-the-run"],
)
def test_xdist_workers_in_sessions_of_their_own_still_tear_down(
    tmp_path: Path, signum: int, group: bool
) -> None:
    """Ctrl-C reaches the terminal's foreground process group, which the workers left
    (setsid); SIGTERM, as CI sends it, reaches the run's process alone. Both must still
    stop every worker's test and run its whole teardown, also a slow one: 16 s here,
    longer than xdist lets a worker run on once the run itself is interrupted (execnet
    waits 5 s, interrupts the worker, waits 10 s, then ends it with os._exit)."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_waits.py").write_text(TEST)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", str(tmp_path)],
        cwd=tmp_path,
        env={**_ENV, "PYTHONPATH": str(REPO), "TEARDOWN_SECONDS": "16"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a shell gives a command
    )
    names = ("test_waits", "test_waits_too")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
            (tmp_path / f"running-{name}").exists() for name in names
        ):
            time.sleep(0.05)
        for name in names:
            # Each worker leads a session of its own.
            assert (tmp_path / f"up-{name}").read_text() == "True", name
        if group:
            os.killpg(run.pid, signum)
        else:
            run.send_signal(signum)
        code = run.wait(60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert [(tmp_path / f"down-{name}").exists() for name in names] == [True, True]
    assert code == 2  # interrupted
