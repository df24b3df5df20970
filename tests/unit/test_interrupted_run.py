"""A test run stopped by SIGTERM still tears down what its tests started (tests/interrupt.py).

A real pytest run in a child process, on a test whose fixture stands for a
daemon or a machine: it notes its start and, in its teardown, its end.
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

CONFTEST = """
from tests.interrupt import tear_down_on_sigterm

tear_down_on_sigterm()
"""

TEST = """
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def started():
    (HERE / "up").write_text("")
    yield
    (HERE / "down").write_text("")  # what a daemon's or a machine's teardown does


def test_waits(started):
    time.sleep(60)
"""


@pytest.mark.parametrize("handled", [True, False])
def test_a_run_stopped_by_sigterm_tears_down_its_fixtures(tmp_path: Path, handled: bool) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST if handled else "")
    (tmp_path / "test_waits.py").write_text(TEST)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "up").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "up").exists(), "the inner test never started"
        run.send_signal(signal.SIGTERM)
        code = run.wait(30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    # Handled: interrupted (2) after the teardown. Python's default: killed at once.
    assert ((tmp_path / "down").exists(), code) == ((True, 2) if handled else (False, -15))
