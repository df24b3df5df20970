"""The one narrow door to systemctl.

Everything the updater asks of systemd goes through ``Systemctl``. The
transaction takes any object with the same methods (``ServiceManager``), so
the file-level steps can also run where systemd is not PID 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from scalebox import unitprops
from scalebox.runner import ProgramError, run_program
from scalebox.update import process, unit_files
from scalebox.update.errors import CommandError

SERVICE = "scaleboxd.service"
SOCKET = "scaleboxd.socket"
# The second instance that serves on SOCKET while SERVICE restarts (switch.hand_over).
HANDOVER = "scaleboxd-handover.service"
# The updater's own budget for a restarted scaleboxd to send READY=1. A healthy
# start takes a few seconds; waiting for the unit's TimeoutStartSec=30 made a
# release that hangs at start cost 30 s of downtime before the rollback began.
READY_TIMEOUT = 15.0
STATE_PROPERTIES = "ActiveState,SubState,MainPID,NRestarts,ExecMainStatus,Job"
# The exit status systemd gives a start it could not set up the cgroup for.
EXIT_CGROUP = 219
HINT = "see `systemctl status scaleboxd` and `journalctl -u scaleboxd -n 50`"


@dataclass(frozen=True)
class UnitState:
    """What systemd says about a unit at one moment."""

    active: str  # ActiveState: active, activating, deactivating, failed, inactive
    sub: str  # SubState: running, auto-restart, dead, ...
    main_pid: int
    restarts: int  # NRestarts: systemd's own restarts (Restart=on-failure)
    exit_status: int = 0  # ExecMainStatus: the main process's exit status (or systemd's)
    queued: bool = False  # Job: a start, stop or restart of the unit is queued or running

    @property
    def running(self) -> bool:
        return self.active == "active" and self.main_pid > 0


class ServiceManager(Protocol):
    def daemon_reload(self) -> None: ...
    def reload_reason(self, units: Sequence[str]) -> str | None: ...
    def restart(self, unit: str, timeout: float) -> None: ...
    def start(self, unit: str, timeout: float) -> None: ...
    def stop(self, unit: str, timeout: float) -> None: ...
    def reset_failed(self, unit: str) -> None: ...
    def state(self, unit: str) -> UnitState: ...


def _hint(unit: str) -> str:
    name = unit.removesuffix(".service")
    return f"see `systemctl status {name}` and `journalctl -u {name} -n 50`"


def run(argv: Sequence[str], description: str, *, timeout: float = 120.0) -> str:
    """Run one systemctl command; a failure raises a CommandError carrying its stderr."""
    return process.run(argv, description, timeout=timeout, hint=HINT, shield=True)


class Systemctl:
    """The real systemd, through the systemctl program."""

    def __init__(self, ready_timeout: float = READY_TIMEOUT) -> None:
        self.ready_timeout = ready_timeout

    def daemon_reload(self) -> None:
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload")

    def reload_reason(self, units: Sequence[str]) -> str | None:
        """Why systemd's view of ``units`` may differ from their files, or None: what
        systemd says (``stale``), then any of their files written since it last loaded
        units (unit_files: what systemd 252 does not look for)."""
        what = "read whether systemd has the units as they are on disk"
        out = run(
            ["systemctl", "show", *units, "-p", "LoadState,NeedDaemonReload"], what, timeout=15.0
        )
        if stale(out, len(units)):
            return "systemd has a unit out of date with its files (NeedDaemonReload)"
        loaded = last_load(
            run(["systemctl", "show", "-p", f"{RELOADED},{BOOT_LOAD}"], what, timeout=15.0)
        )
        if loaded is None:
            return "this systemd does not say when it loaded units"
        written = unit_files.written_since(units, unit_files.loaded_at(loaded))
        if written:
            return f"{written[0]} was written since systemd loaded units"
        return None

    def restart(self, unit: str, timeout: float) -> None:
        if unit not in (SERVICE, HANDOVER):
            run(["systemctl", "restart", unit], f"restart {unit}", timeout=timeout)
            return
        self._until_ready("restart", unit, timeout)

    def start(self, unit: str, timeout: float) -> None:
        """Start ``unit`` (not running) and return once it is ready, as restart does."""
        self._until_ready("start", unit, timeout)

    def stop(self, unit: str, timeout: float) -> None:
        run(["systemctl", "stop", unit], f"stop {unit}", timeout=timeout)

    def _until_ready(self, verb: str, unit: str, timeout: float) -> None:
        # `systemctl start` (or restart) waits for its job, which ends once the unit is
        # active (Type=notify: READY=1) or has failed, a crash before READY=1 included
        # (the unit passes through "failed" before any auto-restart). It waits on
        # systemd's signals, with our own deadline instead of the unit's
        # TimeoutStartSec: a start not ready in time is given up (its job goes on in
        # systemd) and rolled back sooner. Polling `systemctl show` every 0.1 s
        # instead cost ~12 ms of CPU a time (the program and systemd), ~10 times a
        # start, at full priority beside the daemon serving.
        budget = min(timeout, self.ready_timeout)
        try:
            done = run_program(
                ["systemctl", verb, unit], timeout=budget, new_session=True, shield=True
            )
        except ProgramError as exc:
            if exc.kind != "timeout":
                raise CommandError(f"{verb} {unit} failed: {exc.detail}", _hint(unit)) from None
            state = self._state_for_an_error(unit)
            raise CommandError(
                f"{verb} {unit} did not become ready within {budget:g} s "
                f"(the unit is {state.active}/{state.sub}, main PID {state.main_pid})",
                _hint(unit),
            ) from None
        if not done.ok:
            state = self._state_for_an_error(unit)
            status = f" (exit status {state.exit_status})" if state.exit_status else ""
            said = done.output.strip().splitlines()[0]  # "Job for ... failed because ..."
            raise CommandError(
                f"{verb} {unit} failed: the unit is {state.active}/{state.sub}{status} "
                f"(systemctl: {said})",
                _hint(unit),
            )

    def _state_for_an_error(self, unit: str) -> UnitState:
        """The unit's state to describe a failure with; one that cannot be read (a
        `systemctl show` that overran on a loaded server) must not replace the failure."""
        try:
            return self.state(unit)
        except CommandError:
            return UnitState("unknown", "unknown (systemctl show failed)", 0, 0)

    def reset_failed(self, unit: str) -> None:
        # Clears the start-rate limit a crashing release may have run into, so
        # the restart that brings the old release back is not refused.
        run(["systemctl", "reset-failed", unit], f"reset-failed {unit}")

    def state(self, unit: str) -> UnitState:
        out = run(
            ["systemctl", "show", unit, "-p", STATE_PROPERTIES],
            f"read the state of {unit}",
            timeout=15.0,
        )
        return parse_show(out)


def parse_show(text: str) -> UnitState:
    """Parse ``systemctl show -p ...`` output (KEY=VALUE lines) into a UnitState."""
    props = unitprops.parse(text)
    return UnitState(
        active=props.get("ActiveState", "unknown"),
        sub=props.get("SubState", "unknown"),
        main_pid=unitprops.number(props, "MainPID"),
        restarts=unitprops.number(props, "NRestarts"),
        exit_status=unitprops.number(props, "ExecMainStatus"),
        queued=bool(props.get("Job")),  # "Job=" when none, "Job=133" when one is queued
    )


def stale(show_output: str, count: int) -> bool:
    """Whether ``systemctl show -p LoadState,NeedDaemonReload`` of ``count`` units asks for
    a daemon-reload: a unit not loaded, a file or drop-in changed since it was loaded
    (NeedDaemonReload=yes), or an answer that does not say (an older systemd): all but
    a clear "no" for every unit.
    """
    blocks = unitprops.parse_blocks(show_output)
    return len(blocks) != count or any(
        b.get("LoadState") != "loaded" or b.get("NeedDaemonReload") != "no" for b in blocks
    )


# The manager's properties for when it loaded units: at its last daemon-reload
# (0 until there was one), and at boot.
RELOADED = "UnitsLoadTimestampMonotonic"
BOOT_LOAD = "UnitsLoadStartTimestampMonotonic"


def last_load(show_output: str) -> int | None:
    """When systemd last loaded its units (µs, CLOCK_MONOTONIC), from ``systemctl show -p
    RELOADED,BOOT_LOAD``: the last daemon-reload, else the boot's load; None if neither."""
    props = unitprops.parse(show_output)
    for key in (RELOADED, BOOT_LOAD):
        value = unitprops.number(props, key)
        if value:
            return value
    return None
