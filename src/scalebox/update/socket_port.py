"""scaleboxd.socket listens on the config's API_PORT: the drop-in that says so.

The socket unit listens on 8080, API_PORT's default. For any other port,
``/etc/systemd/system/scaleboxd.socket.d/port.conf`` clears ``ListenStream=``
and sets the config's port; with the default the drop-in is removed. The
config is the one source of truth: install.sh writes the drop-in (through
this module's command line), and the updater rewrites it whenever it
installs or restores units (``switch.install_units``, ``switch.restore``),
so a server keeps it true at every update and rollback.

    python -m scalebox.update.socket_port [--root DIR]

writes or removes the drop-in under DIR (default /) and prints
``<port> changed`` or ``<port> unchanged``; a bad API_PORT prints what and
what to do and exits 1. After a change: ``systemctl daemon-reload`` and
``systemctl restart scaleboxd.socket scaleboxd.service``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from scalebox import config
from scalebox.errors import ConfigError
from scalebox.fsutil import atomic_write, fsync_dir
from scalebox.update.paths import Paths
from scalebox.update.systemd import SOCKET

DEFAULT_PORT = 8080  # the ListenStream= of units/scaleboxd.socket
DROPIN = Path(f"{SOCKET}.d") / "port.conf"


def configured_port(config_text: str, source: str) -> int:
    """API_PORT as written in the config (the file, as systemd knows no environment here)."""
    raw, where = config.parse_lines(config_text, source).get(
        "API_PORT", (str(DEFAULT_PORT), "default")
    )
    try:
        return cast(int, config.KEYS["API_PORT"].convert(raw))
    except ValueError as exc:
        raise ConfigError(
            f"{where}: API_PORT={raw!r}: {exc}", f"correct API_PORT in {source} or remove it"
        ) from None


def read_port(paths: Paths) -> int:
    """The live config's API_PORT (bytes that are not UTF-8 elsewhere in it do not matter)."""
    return configured_port(paths.config.read_bytes().decode(errors="replace"), str(paths.config))


def render(port: int) -> bytes | None:
    """The drop-in's bytes for ``port``; None for the default port (no drop-in)."""
    if port == DEFAULT_PORT:
        return None
    return (
        "# Written by scalebox from API_PORT in /etc/scaleboxd/config; install.sh and\n"
        "# scalebox-update rewrite it. Change API_PORT there, not here.\n"
        "[Socket]\n"
        "ListenStream=\n"
        f"ListenStream={port}\n"
    ).encode()


def apply(paths: Paths) -> bool:
    """Make the drop-in match the config's API_PORT; return whether anything changed."""
    port = read_port(paths)
    dropin = paths.systemd_dir / DROPIN
    wanted = render(port)
    if wanted is None:
        if not dropin.exists():
            return False
        dropin.unlink()
        fsync_dir(dropin.parent)
        return True
    if dropin.is_file() and dropin.read_bytes() == wanted:
        return False
    if not dropin.parent.is_dir():
        dropin.parent.mkdir(parents=True)
        # Whatever the caller's umask: readable by all, as /etc/systemd/system is.
        dropin.parent.chmod(0o755)
    atomic_write(dropin, wanted, mode=0o644)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scalebox.update.socket_port",
        description="Write scaleboxd.socket's port drop-in from API_PORT in the config.",
    )
    parser.add_argument("--root", type=Path, default=Path("/"), help="the server's root")
    args = parser.parse_args(argv)
    paths = Paths(args.root)
    try:
        changed = apply(paths)
        port = read_port(paths)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"error: cannot make {paths.systemd_dir / DROPIN} match {paths.config}: "
            f"{exc.strerror} ({exc.filename})\n"
            "  hint: run as root, with the config readable and /etc/systemd/system writable",
            file=sys.stderr,
        )
        return 1
    print(f"{port} {'changed' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
