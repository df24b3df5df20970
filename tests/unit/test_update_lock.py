"""One updater at a time: a real second process is refused and told who holds the lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalebox.update import lock
from scalebox.update.errors import LockHeld

HOLDER = (
    "import sys\n"
    "from pathlib import Path\n"
    "from scalebox.update import lock\n"
    "with lock.held(Path(sys.argv[1])):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.readline()\n"
)


def _start_holder(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_is_refused_naming_the_holder_pid(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    holder = _start_holder(path)
    try:
        with (
            pytest.raises(
                LockHeld, match=rf"another scalebox-update is running \(PID {holder.pid}\)"
            ),
            lock.held(path),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_holder_is_free_again(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    holder = _start_holder(path)
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.wait()
    with lock.held(path):
        assert path.read_text().strip() == str(os.getpid())


def test_lock_is_released_after_the_block(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with lock.held(path):
        pass
    with lock.held(path):
        pass
    assert path.read_text() == ""
