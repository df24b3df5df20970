"""`scaleboxd`'s entry point: a daemon's start gives way from its first import.

A daemon's start (the interpreter, main.py's imports, uvicorn's and
FastAPI's, the VMs' reconciliation: about a second of CPU) runs twice per
update beside the daemon serving: the handover instance's, then the new
main daemon's. It runs lowered (scalebox.priority), from before main.py's
imports: only scalebox.priority and daemon/serving.py come first. This is
the only place a daemon is lowered.

Only a service that will serve is lowered: one that leads its session (a
unit's process), whose arguments ask for none of the programs that do not
serve. A VM's program (``--run-guest``) must never run lowered: main()
restores the priority before a VM's program, a config check or --version,
should a spelling (argparse takes prefixes) get past the check here.
The server restores it just before READY=1. scalebox.priority imports only
what the interpreter's start and enum bring; the interpreter's start itself
(~15 ms) still runs at the unit's priority.

It gives way only to a daemon serving beside it (daemon/serving.py): a
start with nobody serving (boot, `systemctl restart`, a restart after a
crash) is what every client waits for, and runs at the unit's priority.
And only for ``GIVE_WAY_SECONDS``: on a saturated CPU a lowered start got a
few percent of a core, past the updater's wait and systemd's timeout.
"""

from __future__ import annotations

import contextlib
import os
import sys

from scalebox import priority
from scalebox.daemon import serving

NOT_SERVING = ("--run-guest", "--check-config", "--version", "-h", "--help")
# A start takes about a second of CPU; lowered past this, it goes on at full priority.
GIVE_WAY_SECONDS = 3.0


def serves(args: list[str]) -> bool:
    """Whether ``scaleboxd ARGS`` runs the API (and not a VM, a check or help)."""
    return not any(
        arg == option or arg.startswith(option + "=") for arg in args for option in NOT_SERVING
    )


def _warn(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"scaleboxd: warning: {message}", file=sys.stderr, flush=True)


def main() -> int:
    args = sys.argv[1:]
    if (
        serves(args)
        and os.getsid(0) == os.getpid()
        and serving.others_serve(serving.config_in(args))
    ):
        priority.lower_process(_warn, priority.Session.OWN, at_most=GIVE_WAY_SECONDS)
    from scalebox.daemon.main import main as run  # noqa: PLC0415 - the point of this module

    return run()


if __name__ == "__main__":
    sys.exit(main())
