"""Preflight: is this a server we can update? Checked before anything else happens."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from scalebox.update import stage
from scalebox.update.context import Context
from scalebox.update.errors import UpdateError
from scalebox.update.interrupt import Interrupted
from scalebox.update.paths import Paths
from scalebox.update.systemd import SERVICE

MIN_FREE_BYTES = 300 * 1024 * 1024  # a venv plus the wheels, with room to spare


@dataclass(frozen=True)
class Installed:
    version: str
    release: str  # directory name under releases/


def require_root() -> None:
    if os.geteuid() != 0:
        raise UpdateError("Must run as root. Try: sudo scalebox-update")


def installed(paths: Paths) -> Installed:
    """The running release, as ``current`` names it; refuse when Scalebox is not installed."""
    name = stage.current_name(paths)
    if name is None or not stage.is_complete(paths.release_dir(name)):
        raise UpdateError(
            f"Scalebox not installed ({paths.current} does not point at a complete release). "
            "Run bootstrap first.",
            "install with scripts/install.sh from a release tarball",
        )
    version = stage.manifest_version(paths.release_dir(name))
    if not version:
        try:
            version = paths.version_file.read_text().strip()
        except OSError:
            version = name
    return Installed(version, name)


def check(ctx: Context) -> Installed:
    """Root, installed, config present, python, disk space; warn about a stopped service."""
    p = ctx.paths
    found = installed(p)
    if not p.config.is_file():
        raise UpdateError(
            f"the server config {p.config} is missing",
            "restore it from a backup; scalebox-update never creates it",
        )
    if shutil.which(ctx.python) is None:
        raise UpdateError(
            f"{ctx.python} is not on PATH; it is needed to build the new release's venv",
            "install python3 and python3-venv",
        )
    p.releases.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(p.releases).free
    if free < MIN_FREE_BYTES:
        raise UpdateError(
            f"only {free // (1024 * 1024)} MiB free under {p.releases}; "
            f"an update needs {MIN_FREE_BYTES // (1024 * 1024)} MiB",
            "free some space, e.g. remove old releases listed by `scalebox-update status`",
        )
    try:
        state = ctx.service.state(SERVICE)
    except Interrupted:
        raise
    except UpdateError as exc:
        raise UpdateError(f"cannot ask systemd about scaleboxd: {exc.what}", exc.hint) from None
    if not state.running:
        # Not a refusal: an update (or a rollback) ends with scaleboxd running,
        # and a re-run must always be possible (design section 8).
        ctx.report(f"note: scaleboxd is {state.active}/{state.sub}; the update will start it")
    return found
