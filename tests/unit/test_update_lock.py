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


def test_holder_names_the_running_updater_without_taking_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    assert lock.holder(path) is None  # no file yet
    holder = _start_holder(path)
    try:
        assert lock.holder(path) == holder.pid
        assert lock.holder(path) == holder.pid  # asking twice took nothing
    finally:
        holder.kill()
        holder.wait()
    assert lock.holder(path) is None  # the kernel dropped it with its holder


def test_holder_is_found_where_stat_and_the_kernel_disagree_on_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On btrfs a subvolume's stat() device is not the one /proc/locks names. Stand-in
    (no btrfs here): the kernel's real table, its device rewritten. The same inode held
    by the PID written in the file is the holder; by another PID it is not."""
    path = tmp_path / "lock"
    holder = _start_holder(path)
    try:
        st = path.stat()
        where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        real = Path("/proc/locks").read_text()
        assert where in real
        table = tmp_path / "locks"
        table.write_text(real.replace(where, f"00:99:{st.st_ino}"))
        monkeypatch.setattr(lock, "LOCKS", table)
        assert lock.holder(path) == holder.pid
        path.write_text("1\n")  # not the PID that holds it: another file's lock
        assert lock.holder(path) is None
    finally:
        holder.kill()
        holder.wait()
