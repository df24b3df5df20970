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
from scalebox.update import process

SERVICE = "scaleboxd.service"
SOCKET = "scaleboxd.socket"


@dataclass(frozen=True)
class UnitState:
    """What systemd says about a unit at one moment."""

    active: str  # ActiveState: active, activating, deactivating, failed, inactive
    sub: str  # SubState: running, auto-restart, dead, ...
    main_pid: int
    restarts: int  # NRestarts: systemd's own restarts (Restart=on-failure)

    @property
    def running(self) -> bool:
        return self.active == "active" and self.main_pid > 0


class ServiceManager(Protocol):
    def daemon_reload(self) -> None: ...
    def restart(self, unit: str, timeout: float) -> None: ...
    def reset_failed(self, unit: str) -> None: ...
    def state(self, unit: str) -> UnitState: ...


def run(argv: Sequence[str], description: str, *, timeout: float = 120.0) -> str:
    """Run one systemctl command; a failure raises a CommandError carrying its stderr."""
    return process.run(
        argv,
        description,
        timeout=timeout,
        hint="see `systemctl status scaleboxd` and `journalctl -u scaleboxd -n 50`",
    )


class Systemctl:
    """The real systemd, through the systemctl program."""

    def daemon_reload(self) -> None:
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload")

    def restart(self, unit: str, timeout: float) -> None:
        # Type=notify: restart returns once the new process has sent READY=1,
        # and fails at once when it exits before that.
        run(["systemctl", "restart", unit], f"restart {unit}", timeout=timeout)

    def reset_failed(self, unit: str) -> None:
        # Clears the start-rate limit a crashing release may have run into, so
        # the restart that brings the old release back is not refused.
        run(["systemctl", "reset-failed", unit], f"reset-failed {unit}")

    def state(self, unit: str) -> UnitState:
        out = run(
            ["systemctl", "show", unit, "-p", "ActiveState,SubState,MainPID,NRestarts"],
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
    )
