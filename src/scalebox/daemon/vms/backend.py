"""Where a VM's guest runs: the Backend interface and its implementations.

A backend starts, stops and observes guests; it knows nothing about state,
names or templates. Two run the process guest (``guest.py``), for fast
rootless API tests; ``nspawn.NspawnBackend`` runs real containers:

- ``SystemdBackend``: one unit ``scalebox-vm@<id>.service`` per VM, so
  restarting or updating scaleboxd never touches a VM;
- ``ProcessBackend``: outside systemd (tests, development), a detached
  process group per VM, found again by its command line under /proc.

A Firecracker backend implements the same four methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from scalebox import priority, unitprops
from scalebox.daemon.vms import disks
from scalebox.daemon.vms.command import CommandFailed, run
from scalebox.daemon.vms.naming import VM_ID_RE

if TYPE_CHECKING:
    from scalebox.daemon.vms.models import VM

GUEST_MODULE = "scalebox.daemon.vms.guest"
GUEST_LOG_NAME = "guest.log"
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class GuestStatus:
    status: str  # running, starting, stopping, stopped, failed
    pid: int | None = None


class Backend(Protocol):
    ready_timeout: float

    def make_disk(self, vm: VM, template_disk: Path, vm_dir: Path) -> None:
        """Make the disk of ``vm`` from ``template_disk`` in its new directory ``vm_dir``.

        Called before ``vm_dir`` is renamed into place; nothing in it may be mounted then.
        """

    def answers(self, vm: VM) -> bool:
        """Whether the started guest of ``vm`` serves on its ssh_port yet."""

    def release(self, vm_id: str) -> None:
        """Free what a stopped guest held besides its disk (network, forwarder)."""

    def adopt(self, vm: VM) -> None:
        """Called for a guest found running at start: repair what it needs around it."""

    def strays(self, known: set[str]) -> dict[str, str]:
        """What a guest holds besides its unit and disk, for VM ids not in ``known``: id -> what."""

    def copy_for_snapshot(self, vm: VM, disk: Path, target: Path) -> None:
        """Copy the disk of ``vm`` (running or not) to the new path ``target`` for a template."""

    def start(self, vm_id: str) -> int | None:
        """Start the guest of ``vm_id`` (its directory and vm.json exist); return its pid."""

    def stop(self, vm_id: str, pid: int | None) -> None:
        """Stop the guest of ``vm_id``; nothing running is fine."""

    def status(self, vm_id: str, pid: int | None) -> GuestStatus:
        """What the guest of ``vm_id`` is doing now; ``pid`` is the last one seen."""

    def status_many(self, last_pids: Mapping[str, int | None]) -> dict[str, GuestStatus]:
        """``status`` of many guests at once: VM id -> last pid seen, in; id -> status, out."""

    def list_running(self) -> dict[str, int | None]:
        """Every guest of this DATA_DIR that runs, known to the state or not: id -> pid."""

    def recent_output(self, vm_id: str) -> str:
        """The guest's last lines of output and where to find the rest, for error messages."""


def running_under_systemd() -> bool:
    """True when scaleboxd itself runs as a systemd service.

    /run/systemd/system says systemd is PID 1; INVOCATION_ID says we are one
    of its services. A developer's shell on a systemd host has only the
    first, and must not put test VMs into system units.
    """
    return Path("/run/systemd/system").is_dir() and "INVOCATION_ID" in os.environ


def unit_name(vm_id: str) -> str:
    return f"scalebox-vm@{vm_id}.service"


def parse_show(text: str) -> GuestStatus:
    """``systemctl show -p MainPID,ActiveState,SubState`` output -> GuestStatus."""
    return _guest_status(unitprops.parse(text))


def _guest_status(props: dict[str, str]) -> GuestStatus:
    active = props.get("ActiveState", "")
    pid = unitprops.number(props, "MainPID")
    status = {
        "active": "running",
        "reloading": "running",
        "activating": "starting",
        "deactivating": "stopping",
        "failed": "failed",
    }.get(active, "stopped")
    if props.get("SubState") == "auto-restart":
        # Its guest died and systemd waits RestartSec to start it again: not "starting".
        status = "failed"
    return GuestStatus(status, pid or None)


def parse_show_many(text: str) -> dict[str, GuestStatus]:
    """``systemctl show -p Id,MainPID,ActiveState U1 U2 ...``: one block per unit -> by VM id."""
    found = {}
    for props in unitprops.parse_blocks(text):
        unit = props.get("Id", "")
        if unit.startswith("scalebox-vm@") and unit.endswith(".service"):
            found[unit[len("scalebox-vm@") : -len(".service")]] = _guest_status(props)
    return found


def parse_list_units(text: str) -> list[str]:
    """VM ids of the ``scalebox-vm@`` units in ``systemctl list-units --plain --no-legend``."""
    ids = []
    for line in text.splitlines():
        unit = line.split(maxsplit=1)[0] if line.strip() else ""
        if unit.startswith("scalebox-vm@") and unit.endswith(".service"):
            vm_id = unit[len("scalebox-vm@") : -len(".service")]
            if VM_ID_RE.fullmatch(vm_id):
                ids.append(vm_id)
    return ids


def answers_as(port: int, vm_id: str) -> bool:
    """Whether the process guest of ``vm_id`` answers on ``port`` (not merely something)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            line = conn.makefile("rb").readline(64 * 1024)
        answer = json.loads(line)
    except (OSError, ValueError):
        return False
    return isinstance(answer, dict) and answer.get("vm") == vm_id


class _ProcessGuest:
    """What both process-guest backends share: nothing to prepare or free."""

    ready_timeout = 10.0

    def make_disk(self, vm: VM, template_disk: Path, vm_dir: Path) -> None:
        disks.copy_tree(template_disk, vm_dir / "disk")

    def answers(self, vm: VM) -> bool:
        return answers_as(vm.ssh_port, vm.id)

    def release(self, vm_id: str) -> None:
        pass

    def adopt(self, vm: VM) -> None:
        pass

    def strays(self, known: set[str]) -> dict[str, str]:
        return {}

    def copy_for_snapshot(self, vm: VM, disk: Path, target: Path) -> None:
        # A stand-in guest writes nothing to its disk: a plain copy is consistent.
        disks.copy_tree(disk, target)


class SystemdBackend(_ProcessGuest):
    """Each guest in its own unit; systemd keeps it when scaleboxd restarts."""

    def start(self, vm_id: str) -> int | None:
        unit = unit_name(vm_id)
        self._reset_if_failed(vm_id)
        run(["systemctl", "start", unit], f"start unit {unit} of VM {vm_id}")
        return self.status(vm_id, None).pid

    def stop(self, vm_id: str, pid: int | None) -> None:
        unit = unit_name(vm_id)
        run(["systemctl", "stop", unit], f"stop unit {unit} of VM {vm_id}")
        self._reset_if_failed(vm_id)

    def status(self, vm_id: str, pid: int | None) -> GuestStatus:
        unit = unit_name(vm_id)
        out = run(
            ["systemctl", "show", "-p", "MainPID,ActiveState,SubState", unit],
            f"read the state of unit {unit}",
        )
        return parse_show(out)

    def status_many(self, last_pids: Mapping[str, int | None]) -> dict[str, GuestStatus]:
        if not last_pids:
            return {}
        units = [unit_name(vm_id) for vm_id in last_pids]
        out = run(
            ["systemctl", "show", "-p", "Id,MainPID,ActiveState,SubState", *units],
            "read the state of the VM units",
        )
        found = parse_show_many(out)
        return {vm_id: found.get(vm_id, GuestStatus("stopped")) for vm_id in last_pids}

    def list_running(self) -> dict[str, int | None]:
        out = run(
            [
                "systemctl", "list-units", "--plain", "--no-legend",
                "--state=active,activating,deactivating,reloading", "scalebox-vm@*.service",
            ],
            "list the units of running VMs",
        )  # fmt: skip
        return {vm_id: self.status(vm_id, None).pid for vm_id in parse_list_units(out)}

    def recent_output(self, vm_id: str) -> str:
        unit = unit_name(vm_id)
        try:
            lines = run(
                ["journalctl", "-u", unit, "-n", "5", "--no-pager", "-o", "cat"],
                f"read the log of {unit}",
            ).strip()
        except CommandFailed:
            lines = ""
        return f"{lines or 'no output'} (all of it: journalctl -u {unit})"

    def _reset_if_failed(self, vm_id: str) -> None:
        # A failed unit keeps its old failure in `systemctl status` and the
        # unit list; clear it so what is shown is this VM's present.
        if self.status(vm_id, None).status == "failed":
            unit = unit_name(vm_id)
            run(["systemctl", "reset-failed", unit], f"reset the failed unit {unit}")


@dataclass(frozen=True)
class _Child:
    process: subprocess.Popen[bytes]
    argv: list[str]


# Guests this process started, so their exit status is collected (no zombies)
# and their end can be awaited. Module-level: a second VMService in the same
# process (tests) must reap the first one's children too.
_children: dict[int, _Child] = {}


def guest_argv(data_dir: Path, vm_id: str) -> list[str]:
    # -P: do not put the working directory on sys.path; a VM's files never shadow our modules.
    return [sys.executable, "-P", "-m", GUEST_MODULE, "--data-dir", str(data_dir), "--vm-id", vm_id]


def guest_of(cmdline: list[str], data_dir: Path) -> str | None:
    """The VM id a process with ``cmdline`` serves for ``data_dir``, or None."""
    if GUEST_MODULE not in cmdline:
        return None
    args = cmdline[cmdline.index(GUEST_MODULE) + 1 :]
    pairs = dict(zip(args[::2], args[1::2], strict=False))
    vm_id = pairs.get("--vm-id", "")
    if pairs.get("--data-dir") == str(data_dir) and VM_ID_RE.fullmatch(vm_id):
        return vm_id
    return None


def _live_cmdline(pid: int) -> list[str] | None:
    """The command line of live process ``pid``; None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # Field 3, after the parenthesised command name (which may hold spaces).
    if stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"]):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


class ProcessBackend(_ProcessGuest):
    """Each guest in a detached process group (start_new_session), outside systemd.

    The pid is recorded, and a guest is only trusted (adopted or signalled)
    when /proc shows it is our guest program for this DATA_DIR and VM id, so
    a reused pid never makes us adopt or kill a stranger.
    """

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir

    def start(self, vm_id: str) -> int | None:
        vm_dir = self._data_dir / "vms" / vm_id
        argv = guest_argv(self._data_dir, vm_id)
        with (vm_dir / GUEST_LOG_NAME).open("ab") as log:
            child = subprocess.Popen(
                argv,
                cwd=vm_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        # A VM never runs lowered: a daemon starting one while it is (reconciling at
        # its start) gives it the priority the daemon was given (scalebox/priority.py).
        with contextlib.suppress(OSError):  # gone already, or not ours to raise
            os.setpriority(os.PRIO_PROCESS, child.pid, priority.given_nice())
        _children[child.pid] = _Child(child, argv)
        return child.pid

    def stop(self, vm_id: str, pid: int | None) -> None:
        pids = {p for p in (pid,) if p is not None and self._serves(p, vm_id)}
        pids |= {p for other, p in self._scan().items() if other == vm_id}
        for p in pids:
            self._signal(p, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in pids:
            if not self._wait_gone(p, vm_id, deadline):
                self._signal(p, signal.SIGKILL)
                self._wait_gone(p, vm_id, time.monotonic() + STOP_TIMEOUT)

    def status(self, vm_id: str, pid: int | None) -> GuestStatus:
        if pid is not None and self._serves(pid, vm_id):
            return GuestStatus("running", pid)
        return GuestStatus("stopped", None)

    def status_many(self, last_pids: Mapping[str, int | None]) -> dict[str, GuestStatus]:
        return {vm_id: self.status(vm_id, pid) for vm_id, pid in last_pids.items()}

    def list_running(self) -> dict[str, int | None]:
        return dict(self._scan())

    def recent_output(self, vm_id: str) -> str:
        path = self._data_dir / "vms" / vm_id / GUEST_LOG_NAME
        try:
            lines = path.read_text(errors="replace").strip().splitlines()[-5:]
        except OSError:
            lines = []
        return " | ".join(lines) or "no output"

    def _scan(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                cmdline = _live_cmdline(int(entry.name))
                vm_id = guest_of(cmdline, self._data_dir) if cmdline else None
                if vm_id:
                    found[vm_id] = int(entry.name)
        # Our own children count even while /proc does not show their command yet.
        for pid, child in list(_children.items()):
            vm_id = guest_of(child.argv, self._data_dir)
            if vm_id and vm_id not in found and child.process.poll() is None:
                found[vm_id] = pid
        return found

    def _serves(self, pid: int, vm_id: str) -> bool:
        child = _children.get(pid)
        if child is not None:
            if child.process.poll() is None:
                # Our own child: right after Popen its /proc cmdline may still
                # be empty (exec in progress), but we know what it runs.
                return guest_of(child.argv, self._data_dir) == vm_id
            del _children[pid]  # reaped: its pid may be reused from now on
            return False
        cmdline = _live_cmdline(pid)
        return cmdline is not None and guest_of(cmdline, self._data_dir) == vm_id

    def _signal(self, pid: int, signum: signal.Signals) -> None:
        try:
            os.killpg(pid, signum)  # the guest leads its own group: its children go too
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _wait_gone(self, pid: int, vm_id: str, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if not self._serves(pid, vm_id):
                return True
            time.sleep(0.02)
        return False
