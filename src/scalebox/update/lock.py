"""One updater at a time: an fcntl lock on /var/lib/scalebox-update/lock.

The kernel drops the lock when its holder dies, even by kill -9, so a stale
lock file never blocks the next run. The holder writes its PID into the file
so a refused run can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scalebox.update.errors import LockHeld


@contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold the updater lock for the ``with`` block, or raise LockHeld naming the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(
                f"another scalebox-update is running (PID {holder})",
                f"wait for it to finish; check it with `ps -p {holder}`",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            # Only a courtesy to the next reader: a full or read-only disk must not
            # turn a finished transaction's outcome into an error.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


LOCKS = Path("/proc/locks")


def holder(path: Path) -> int | None:
    """The PID of the scalebox-update holding the lock now, or None.

    Read from the kernel's table of locks (/proc/locks), not by trying the lock:
    an update starting in that instant would find it taken and refuse, and
    `status` may be run in a loop by monitoring. A PID in another PID namespace
    reads as 0 there.

    On btrfs a subvolume's files stat() with a device number of their own while
    the kernel's table names the file system's, so where no lock matches the
    device and inode, a lock on the same inode held by the PID the holder wrote
    into the file is taken as it (two matches by chance would need both).
    """
    try:
        st = path.stat()
        table = LOCKS.read_text()
        written = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    same_inode: int | None = None
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:123456 0 EOF"; "->" marks a waiter
        fields = line.split()
        if fields[1:4] != ["FLOCK", "ADVISORY", "WRITE"] or len(fields) < 6:
            continue
        pid = int(fields[4]) if fields[4].isdigit() else 0
        if fields[5] == where:
            return pid
        if fields[5].rpartition(":")[2] == str(st.st_ino) and fields[4] == written:
            same_inode = pid
    return same_inode
