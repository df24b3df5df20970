"""`scaleboxd`'s entry point: a daemon's start gives way from its first import.

serve() lowers the daemon's CPU priority before its heavy imports (uvicorn,
fastapi), but the interpreter's start and main.py's own imports (argparse,
logging, the config module: about 60 ms of CPU) came first, at the unit's
priority and in a session (autogroup) of its own at nice 0: beside the
daemon serving, twice per update (the handover instance, then the new main
daemon). Here only scalebox.priority is imported before the lowering.

Only a service that will serve is lowered: one that leads its session (a
unit's process), whose arguments ask for none of the programs that do not
serve. A VM's program (``--run-guest``) must never run lowered: main()
restores the priority before a VM's program, a config check or --version,
should a spelling (argparse takes prefixes) get past the check here.
serve() then finds the process lowered and leaves it; the server restores
it just before READY=1, as before. scalebox.priority imports only what the
interpreter's start and enum bring; the interpreter's start itself (~15 ms)
still runs at the unit's priority.
"""

from __future__ import annotations

import contextlib
import os
import sys

from scalebox import priority

NOT_SERVING = ("--run-guest", "--check-config", "--version", "-h", "--help")


def serves(args: list[str]) -> bool:
    """Whether ``scaleboxd ARGS`` runs the API (and not a VM, a check or help)."""
    return not any(
        arg == option or arg.startswith(option + "=") for arg in args for option in NOT_SERVING
    )


def _warn(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"scaleboxd: warning: {message}", file=sys.stderr, flush=True)


def main() -> int:
    if serves(sys.argv[1:]) and os.getsid(0) == os.getpid():
        priority.lower_process(_warn, priority.Session.OWN)
    from scalebox.daemon.main import main as run  # noqa: PLC0415 - the point of this module

    return run()


if __name__ == "__main__":
    sys.exit(main())
