"""The two systemd protocols scaleboxd speaks: sd_notify and socket activation.

Both are small enough to write here instead of depending on libsystemd:
sd_notify is one datagram to $NOTIFY_SOCKET; socket activation hands the
listening socket over as fd 3 with LISTEN_FDS/LISTEN_PID set.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3
_ACTIVATION_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The datagram address from $NOTIFY_SOCKET; '@name' is an abstract socket."""
    raw = environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    return raw


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. 'READY=1') to systemd; False when not run by systemd.

    A failure to send is not fatal for the daemon: systemd then times the
    start out and says so in its own log, which is where an admin looks.
    """
    address = notify_address(os.environ if environ is None else environ)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def activation_fd_count(environ: Mapping[str, str], pid: int) -> int:
    """How many sockets systemd passed to process ``pid`` (0 when not socket-activated).

    LISTEN_PID guards against a child that inherited the variables by accident.
    """
    if environ.get("LISTEN_PID", "") != str(pid):
        return 0
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return 0
    return max(count, 0)


def take_activation_socket(environ: MutableMapping[str, str], pid: int) -> socket.socket | None:
    """The listening socket systemd passed as fd 3, or None.

    The variables are removed from ``environ`` and fd 3 is made
    non-inheritable, so VM guests started later never see them.
    """
    count = activation_fd_count(environ, pid)
    for name in _ACTIVATION_VARS:
        environ.pop(name, None)
    if count < 1:
        return None
    os.set_inheritable(SD_LISTEN_FDS_START, False)
    # Extra fds would be a unit misconfiguration; close them so they do not leak.
    for extra in range(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + count):
        os.close(extra)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.setblocking(False)
    return sock


def bind_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on host:port (used when not socket-activated).

    Made with IPPROTO_TCP named, as a socket systemd passes says it is: asyncio
    turns Nagle's algorithm off only on connections whose socket says so, and
    without it each answer on a kept-alive connection waited ~40 ms for the
    client's delayed ACK (uvicorn sends a response's head and body apart).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
