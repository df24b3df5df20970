"""System packages: the Debian packages a release declares, installed before any switch.

A release lists what it needs in RELEASE.json ``debian_packages`` (from
pyproject.toml ``[tool.scalebox] debian-packages``). While staging, the
updater asks dpkg which of them are installed and installs the missing ones
with apt-get. If that fails, the update is refused: nothing was switched.
Installed packages stay installed either way; packages are only ever added.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from scalebox.update import interrupt, process
from scalebox.update.errors import CommandError, UpdateError

APT_TIMEOUT = 600.0  # one apt-get install; a slow mirror must not hang the update forever
# Then apt-get is asked to stop (SIGTERM) and given this long before a SIGKILL:
# killed while dpkg unpacks, it leaves packages half installed.
APT_STOP_GRACE = 120.0
DPKG_STATUS = "${Package}\t${db:Status-Abbrev}\n"


def installed(dpkg_output: str) -> set[str]:
    """Package names dpkg reports as installed, from ``dpkg-query -W -f=DPKG_STATUS``.

    The status abbreviation is desired/current/error ("ii ", "hi "); the
    second letter ``i`` means the package is installed.
    """
    names = set()
    for line in dpkg_output.splitlines():
        name, _, status = line.partition("\t")
        if len(status) >= 2 and status[1] == "i":
            names.add(name.strip())
    return names


def missing(wanted: Iterable[str], have: set[str]) -> list[str]:
    """The wanted packages that are not installed, in the order declared, each once."""
    return list(dict.fromkeys(p for p in wanted if p not in have))


def _installed_now() -> set[str]:
    return installed(
        process.run(
            ["dpkg-query", "-W", f"-f={DPKG_STATUS}"],
            "list the installed Debian packages (dpkg-query)",
            timeout=60,
            hint="scalebox runs on Debian; check that dpkg works on this server",
        )
    )


def missing_now(wanted: Sequence[str]) -> list[str]:
    """The ones of ``wanted`` that this server lacks now (for --dry-run); asks dpkg."""
    return missing(wanted, _installed_now()) if wanted else []


def ensure(
    wanted: Sequence[str], version: str, report: Callable[[str], None], *, timeout: float
) -> list[str]:
    """Install the missing ones of ``wanted``; return what was installed, or refuse."""
    if not wanted:
        return []
    need = missing(wanted, _installed_now())
    if not need:
        report(f"{version} needs Debian packages {', '.join(wanted)}: all installed")
        return []
    report(f"{version} needs Debian packages that are missing; installing {', '.join(need)}")
    command = ["apt-get", "install", "-y", "--no-install-recommends", "-q", *need]
    manual = (
        f"install them yourself (`apt-get update && apt-get install {' '.join(need)}`, "
        "or copy the .deb files to this server and `apt-get install ./*.deb`), "
        "then run scalebox-update again; nothing was switched and scaleboxd keeps running"
    )
    try:
        # A Ctrl-C waits for apt: killed, dpkg leaves packages half installed and
        # every later apt-get refuses until `dpkg --configure -a`.
        with interrupt.deferred("apt-get"):
            process.run(
                command,
                f"apt-get install {' '.join(need)}",
                timeout=timeout,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                stop_grace=APT_STOP_GRACE,
            )
    except CommandError as exc:
        if exc.exit_status is None:  # stopped or killed: dpkg may not have finished
            manual = (
                "if apt-get now says that dpkg was interrupted, run `dpkg --configure -a` "
                f"first; then {manual}"
            )
        raise UpdateError(
            f"release {version} needs the Debian packages {', '.join(need)}, which are not "
            f"installed, and installing them failed: {exc.what}",
            manual,
        ) from None
    still = missing(need, _installed_now())
    if still:
        raise UpdateError(
            f"apt-get reported success but {', '.join(still)} is still not installed",
            manual,
        )
    return need
