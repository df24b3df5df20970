"""Whether another scaleboxd serves this server: a shared lock on the config's folder.

A starting daemon gives way for the CPU (scalebox.priority) to a daemon
that serves beside it: the running one while an update's handover instance
starts, the handover instance while the new daemon starts. A daemon that
starts with nobody serving (at boot, on `systemctl restart scaleboxd`, on
a restart after a crash) is the one every client waits for in the socket's
queue, and must never give way: lowered, on a CI host busy with the clients
themselves, such a start took 10-30 s instead of one, and came within a
second of systemd's TimeoutStartSec= (seen in ./do check).

Every daemon holds a shared flock on the folder of its config file
(/etc/scaleboxd) from READY=1 until it stops accepting; a starting daemon
asks for an exclusive lock without waiting: refused, somebody serves. The
kernel drops a lock when its holder exits, even by SIGKILL, so nothing is
ever stale; and every daemon whose config is in the same folder counts as
the same server (a test's daemons, each with a folder of its own, never see
each other; a second config in /etc/scaleboxd would). The folder rather
than the file: an update may replace the config file (a migration writes a
new one) while a daemon serves.

A daemon of a release before this one holds no lock: during the first
update onto this release the handover instance starts at full priority.

Imported by the entry point before it lowers anything: os and fcntl only.
"""

from __future__ import annotations

import fcntl
import os
import time

# scalebox.config.DEFAULT_PATH, spelt out: the entry point must not import pathlib.
DEFAULT_CONFIG = "/etc/scaleboxd/config"
# A starting daemon holds its exclusive lock for an instant; a daemon going READY
# tries this often for its shared one (1 ms apart) before it serves without.
HOLD_ATTEMPTS = 200


def _open_folder(config: str) -> int:
    folder = os.path.dirname(os.path.abspath(config))  # noqa: PTH100, PTH120 - no pathlib here
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def config_in(args: list[str]) -> str:
    """The config file ``scaleboxd ARGS`` uses: the last --config, as argparse takes it.

    Only the spellings the units use are read (``--config PATH``, ``--config=PATH``);
    a prefix argparse would also take (``--conf``) reads as the default here. The
    cost of a wrong guess is bounded: a start lowered for at most a few seconds.
    """
    path = DEFAULT_CONFIG
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.removeprefix("--config=")
    return path


def others_serve(config: str) -> bool:
    """Whether a daemon with this config serves now (holds the shared lock)."""
    try:
        fd = _open_folder(config)
    except OSError:
        return False  # no such folder: no daemon serves with it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # and with it the exclusive lock, if it was granted
    return False


class Serving:
    """The shared lock a daemon holds while it serves."""

    def __init__(self, config: str) -> None:
        self.config = config
        self._fd: int | None = None

    def hold(self) -> str | None:
        """Take the shared lock; what went wrong instead (the daemon serves anyway)."""
        if self._fd is not None:
            return None
        try:
            fd = _open_folder(self.config)
        except OSError as exc:
            return f"cannot open the folder of {self.config} ({exc.strerror})"
        for _ in range(HOLD_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.001)  # a starting daemon's check, over in microseconds
                continue
            except OSError as exc:
                os.close(fd)
                return f"cannot lock the folder of {self.config} ({exc.strerror})"
            self._fd = fd
            return None
        os.close(fd)
        return f"the folder of {self.config} stayed locked by another process"

    def release(self) -> None:
        """Drop the lock: from now on a daemon that starts does not wait for this one."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
