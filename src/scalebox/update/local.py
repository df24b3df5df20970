"""A release given as a local path: open it only if it is a regular file, and say what it is if not.

A directory, a device, a FIFO (which would block the read forever), a socket
or a symlink to one of those is refused with a message that names it; a
missing file says it is missing. The check is made on the opened descriptor
(O_NONBLOCK, then fstat), so the file cannot be swapped between check and read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


class NotARegularFile(Exception):
    """The path is not a regular file; str() says what it is instead."""


def kind(mode: int) -> str:
    """What a file of this st_mode is, in words (pure)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def describe(path: Path) -> str | None:
    """Why ``path`` cannot be a release file ("is a directory", ...), or None if it may be."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return f"is a symbolic link to {path.readlink()}, which does not exist"
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    what = kind(st.st_mode)
    if path.is_symlink():
        return f"is a symbolic link to {path.readlink()}, which is {what}, not a release file"
    return f"is {what}, not a release file"


def open_regular(path: Path) -> IO[bytes]:
    """Open ``path`` for reading if it is a regular file; else raise NotARegularFile."""
    reason = describe(path)
    if reason is not None:
        raise NotARegularFile(reason)
    try:
        # O_NONBLOCK: a FIFO swapped in after describe() must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotARegularFile("does not exist") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotARegularFile(f"is {kind(st.st_mode)}, not a release file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
