"""A local systemd test server: a Debian 12 image booted with systemd-nspawn.

    with Machine.boot(release_dir=Path("builds")) as m:
        m.run(["systemctl", "is-system-running"])
        httpx.get(m.url(8080, "/health"))          # url() checks the route first

Each machine has its own network namespace (see tools/netns.py), a volatile
overlay (every boot is a fresh server; the cached image is never written) and
real systemd as PID 1. ``Machine.boot(persistent=True)`` boots a copy of the
image instead, kept across ``power_cut()`` and ``power_on()`` (a power loss:
the machine's init and nspawn killed together, then the same root booted
again) and removed at teardown like the rest. It is always torn down: on
return, on any exception, on Ctrl-C and on SIGTERM. A run killed with
SIGKILL (or mid-teardown) loses its container with it (PDEATHSIG), and the
machine's reaper, a process of its own session, removes the rest within a
second (see reap()); should the reaper be killed too, the stale sweep that
every boot (and `./do machine down --stale`) runs first does.

CLI (`./do machine ...`): up [--release DIR], shell NAME [CMD...], down NAME...
| --stale | --all, list.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from scalebox.errors import ScaleboxError
from scalebox.fsutil import atomic_write
from tools import cgroups, image, netns
from tools.netns import Slot

BOOT_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
# How much of a machine's journal a failed system test shows (tests/system/conftest.py).
JOURNAL_LINES = 300
LOG_DIR = image.CACHE_DIR / "logs"
REPO = Path(__file__).resolve().parents[1]  # where `python -m tools.machine` runs
ROOTS_DIR = image.CACHE_DIR / "roots"  # persistent machines' root copies, one per slot
MACHINE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
}
PR_SET_PDEATHSIG = 1


class MachineError(ScaleboxError):
    """A test machine could not boot, run a command, or be torn down."""


# --- processes ------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The kernel's start time of a live process (None when gone or a zombie).

    Recorded with each pid so that a reused pid is never mistaken for ours.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int | None, started: int | None) -> bool:
    return pid is not None and started is not None and start_time(pid) == started


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _is_namespace_init(pid: int) -> bool:
    """True for the PID 1 of a child PID namespace ("NSpid: <host pid> 1")."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) >= 2 and ids[-1] == "1"
    return False


def find_init(nspawn_pid: int) -> int | None:
    """The container's init: the descendant of nspawn that is PID 1 of its namespace."""
    todo = _children(nspawn_pid)
    for _ in range(200):
        if not todo:
            return None
        pid = todo.pop(0)
        if _is_namespace_init(pid):
            return pid
        todo += _children(pid)
    return None


def _wait_gone(pid: int, started: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid, started):
            return True
        time.sleep(0.1)
    return not is_alive(pid, started)


def _kill(pid: int, started: int | None, sig: signal.Signals) -> None:
    if is_alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in a freshly forked child


def die_with_parent() -> bool:  # pragma: no cover - runs in the child after fork
    """SIGTERM this process when the thread that forked it ends (PR_SET_PDEATHSIG): if
    the harness is SIGKILLed, what it started goes with it instead of lingering.
    False when the kernel refused."""
    return bool(_LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Teardown must finish: a second Ctrl-C must not leave half a machine."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `finally` and `with` blocks run their cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    saved = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


# --- state files -----------------------------------------------------------------


def read_state(slot: Slot, state_dir: Path = netns.STATE_DIR) -> dict[str, Any] | None:
    try:
        data = json.loads(slot.state_file(state_dir).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(slot: Slot, state: dict[str, Any], state_dir: Path) -> None:
    atomic_write(slot.state_file(state_dir), json.dumps(state, indent=2) + "\n")


def _state_slots(state_dir: Path) -> list[Slot]:
    if not state_dir.is_dir():
        return []
    slots = []
    for path in sorted(state_dir.glob(f"{netns.PREFIX}*.json")):
        with contextlib.suppress(netns.NetnsError):
            slots.append(netns.parse_name(path.stem))
    return sorted(slots, key=lambda s: s.n)


def is_stale(state: dict[str, Any], state_age: float) -> bool:
    """Whether a machine's state says nobody will ever tear it down.

    Stale: its nspawn is dead; or its owner is dead and it was not kept on
    purpose (--keep-vm / `machine up`). A state file still being written
    (unreadable and young) is not stale yet.
    """
    if not state:
        return state_age > 60
    if "nspawn_pid" in state and not is_alive(state["nspawn_pid"], state.get("nspawn_start")):
        return True
    return not state.get("keep") and not is_alive(state.get("owner_pid"), state.get("owner_start"))


@contextlib.contextmanager
def host_lock(state_dir: Path = netns.STATE_DIR) -> Iterator[None]:
    """Hold the host-wide lock under which machines are judged stale and destroyed.

    Test runs share the host (pytest-xdist workers, two `./do` runs): without
    it one run's sweep could judge a machine whose owner is tearing it down
    (its nspawn already gone) stale, and its `ip netns del` could land after
    the slot was freed and claimed again, deleting the new machine's network.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "lock").open("a") as lock:  # not sb*.json: never a slot
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def destroy(slot: Slot, state_dir: Path = netns.STATE_DIR, timeout: float = STOP_TIMEOUT) -> None:
    """Stop machine ``slot`` (SIGTERM, then SIGKILL), delete its network, free N."""
    with host_lock(state_dir):
        _destroy(slot, state_dir, timeout)


def _destroy(slot: Slot, state_dir: Path, timeout: float) -> None:
    """destroy(), for callers that hold host_lock()."""
    state = read_state(slot, state_dir)
    if state is None:
        raise MachineError(
            f"no machine {slot.name}: {slot.state_file(state_dir)} does not exist",
            "`./do machine list` shows the machines this harness runs",
        )
    pid, started = state.get("nspawn_pid"), state.get("nspawn_start")
    if isinstance(pid, int):
        _kill(pid, started, signal.SIGTERM)
        if not _wait_gone(pid, started, timeout):
            _kill(pid, started, signal.SIGKILL)
            _wait_gone(pid, started, 5)
    init_pid, init_start = state.get("init_pid"), state.get("init_start")
    if isinstance(init_pid, int):
        # Killing a namespace's PID 1 kills every process in it.
        _kill(init_pid, init_start, signal.SIGKILL)
        _wait_gone(init_pid, init_start, 5)
    netns.delete_network(slot)
    cgroups.remove(slot.name)
    root = state.get("root_dir")
    if isinstance(root, str) and Path(root).parent == ROOTS_DIR:
        shutil.rmtree(root, ignore_errors=True)
    netns.release_slot(slot, state_dir)


def sweep_stale(state_dir: Path = netns.STATE_DIR) -> list[str]:
    """Tear down machines left by killed runs; only ones with our state files."""
    removed = []
    with host_lock(state_dir):
        for slot in _state_slots(state_dir):
            state = read_state(slot, state_dir)
            if state is None:
                continue
            try:
                age = time.time() - slot.state_file(state_dir).stat().st_mtime
            except FileNotFoundError:
                continue
            if is_stale(state, age):
                _destroy(slot, state_dir, timeout=10)
                removed.append(slot.name)
    return removed


REAP_POLL = 0.5  # seconds between a reaper's looks at its machine's owner


def reap(slot: Slot, token: str, state_dir: Path = netns.STATE_DIR) -> bool:
    """Wait for the owner of boot ``token`` of ``slot`` to end; tear the machine down if
    the owner left it (True), or return once the owner tore it down (False).

    Each machine (not kept ones) has a reaper, a process of its own session
    started by boot(). A harness killed mid-teardown (SIGKILL; an xdist worker
    its controller ends after a timeout) left the machine's network namespace,
    veth and state behind until the next run's sweep, and that next run could
    collide with them; the container itself dies with its owner (PDEATHSIG).
    """
    while True:
        state = read_state(slot, state_dir)
        if state is None or state.get("token") != token:
            return False  # torn down by its owner (or already by a sweep)
        if not is_alive(state.get("owner_pid"), state.get("owner_start")):
            with host_lock(state_dir):
                state = read_state(slot, state_dir)
                if state is None or state.get("token") != token:
                    return False
                _destroy(slot, state_dir, timeout=10)
            return True
        time.sleep(REAP_POLL)


# Run once a machine with all capabilities is up: see Machine._as_root_server.
ROOT_SERVER_SETUP = (
    "mount --bind /proc/sys/net /proc/sys/net && mount -o remount,bind,rw /proc/sys/net && "
    "{ [ -e /dev/loop-control ] || mknod -m 600 /dev/loop-control c 10 237; } && "
    "for i in $(seq 0 255); do [ -e /dev/loop$i ] || mknod -m 660 /dev/loop$i b 7 $i; done"
)


# --- the machine ------------------------------------------------------------------


# The machines this process has booted and not yet torn down, oldest first: what a
# failed test's report shows the journals of.
LIVE: list[Machine] = []


class Machine:
    """One booted test server. Make it with ``Machine.boot()``."""

    def __init__(
        self, slot: Slot, image_dir: Path, release_dir: Path | None, state_dir: Path
    ) -> None:
        # Set by boot() before _start(): a root server's capabilities, extra read-only binds.
        self.all_capabilities = False
        self.extra_binds: tuple[tuple[Path, str], ...] = ()
        self.slot = slot
        self.image_dir = image_dir
        self.release_dir = release_dir
        self.state_dir = state_dir
        self.log_path = LOG_DIR / f"{slot.name}.console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        self.boot_seconds: float | None = None
        self.root_dir: Path | None = None  # a persistent machine's own root
        self._network_up = False
        self._state: dict[str, Any] = {}
        self._reaper: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return self.slot.name

    @property
    def ip(self) -> str:
        """The machine's address, unchecked; use address() or url() before sending."""
        return self.slot.machine_ip

    # ---- life cycle

    @classmethod
    @contextlib.contextmanager
    def boot(
        cls,
        release_dir: Path | None = None,
        *,
        keep: bool = False,
        timeout: float = BOOT_TIMEOUT,
        state_dir: Path = netns.STATE_DIR,
        all_capabilities: bool = False,
        binds_ro: Sequence[tuple[Path, str]] = (),
        persistent: bool = False,
    ) -> Iterator[Machine]:
        """Boot a fresh machine; tear it down on leaving the block unless ``keep``.

        ``all_capabilities`` gives the machine every capability a real root
        server has (nspawn's --capability=all), which containers inside it
        need (veth, mounts), plus a writable /proc/sys/net and /dev/loop* nodes
        (see _as_root_server); ``binds_ro`` binds host paths read-only (host, inside).
        ``persistent``: its root is a copy of the image that survives
        ``power_cut()``/``power_on()``; teardown deletes it.
        """
        for name in sweep_stale(state_dir):
            _say(f"removed the stale machine {name} of a killed run")
        image_dir = image.ensure_image()
        with sigterm_raises():
            owner_pid = os.getpid()
            owner = {
                "owner_pid": owner_pid,
                "owner_start": start_time(owner_pid),
                "keep": keep,
                "token": uuid.uuid4().hex,  # which boot this slot's state belongs to
            }
            slot = netns.claim_slot(owner, state_dir)
            machine = cls(slot, image_dir, release_dir, state_dir)
            machine.all_capabilities = all_capabilities
            machine.extra_binds = tuple(binds_ro)
            machine._state = {"name": slot.name, **owner}
            booted = False
            try:
                if not keep:
                    machine._start_reaper()
                if persistent:
                    machine._make_root()
                machine._start(keep=keep)
                machine._wait_running(timeout)
                booted = True
                LIVE.append(machine)
                yield machine
            finally:
                if machine in LIVE:
                    LIVE.remove(machine)
                if keep and booted:
                    _say(machine.keep_instructions())
                else:
                    machine.teardown()

    def _start_reaper(self) -> None:
        """reap() in a process of its own session, which outlives this one (see reap)."""
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "tools.machine", "reap", self.name, str(self._state["token"])],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "SCALEBOX_DEV_STATE": str(self.state_dir)},
        )
        self._save(reaper_pid=self._reaper.pid, reaper_start=start_time(self._reaper.pid))

    def _make_root(self) -> None:
        root = ROOTS_DIR / self.name
        self._save(root_dir=str(root))  # saved first: a killed run's sweep removes it
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.image_dir), str(root)], check=True)
        self.root_dir = root

    def power_cut(self) -> None:
        """Kill the machine's init and nspawn together, as a power cut stops everything.

        The host still holds the machine's unsynced writes in its page cache,
        so this proves recovery from a stop at any instant, not durability:
        that must come from fsync in the code.
        """
        if self.root_dir is None:
            raise MachineError("power_cut needs a persistent machine", "boot(persistent=True)")
        init, nspawn = self.init_pid, self.nspawn
        init_start = self._state.get("init_start")
        # Forget the pids first: a dead nspawn in the state file would make
        # another run's stale sweep tear the powered-off machine down.
        for key in ("nspawn_pid", "nspawn_start", "init_pid", "init_start"):
            self._state.pop(key, None)
        self._save()
        if init is not None:
            _kill(init, init_start, signal.SIGKILL)
        if nspawn is not None:
            nspawn.kill()
            nspawn.wait(30)
        if init is not None:
            _wait_gone(init, init_start, 10)
        self.init_pid = None

    def power_on(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Boot the same root again after ``power_cut``."""
        self._start(keep=bool(self._state.get("keep")))
        self._wait_running(timeout)

    def _save(self, **changes: Any) -> None:
        self._state.update(changes)
        _write_state(self.slot, self._state, self.state_dir)

    def _start(self, *, keep: bool) -> None:
        if self.release_dir is not None and not self.release_dir.is_dir():
            raise MachineError(
                f"release folder {self.release_dir} does not exist",
                "build it first (`./do tarball`) or pass an existing folder",
            )
        _say(f"booting {self.name} at {self.ip} from {self.image_dir.name}")
        started = time.monotonic()
        if not self._network_up:
            netns.create_network(self.slot)
            self._network_up = True
        self._save(
            ip=self.ip,
            image=str(self.image_dir),
            log=str(self.log_path),
            release_dir=str(self.release_dir) if self.release_dir else None,
            created=time.time(),
        )
        argv = [
            "systemd-nspawn",
            "--quiet",
            # The host has no systemd-machined and systemd is not its PID 1.
            "--register=no",
            "--keep-unit",
            f"--machine={self.name}",
            f"--network-namespace-path={self.slot.netns_path}",
            "--console=read-only",
        ]
        if self.root_dir is None:
            # Writes go to a tmpfs overlay: every boot is a fresh server.
            argv.append("--volatile=overlay")
        if self.release_dir is not None:
            argv.append(f"--bind-ro={self.release_dir.resolve()}:/mnt/release")
        for host_path, inside in self.extra_binds:
            argv.append(f"--bind-ro={host_path.resolve()}:{inside}")
        if self.all_capabilities:
            argv.append("--capability=all")
        argv += ["-D", str(self.root_dir or self.image_dir), "-b"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        own = cgroups.prepare(self.name)  # not the cgroup tree of another machine

        def in_own_cgroups() -> None:  # pragma: no cover - runs in the child after fork
            cgroups.join(own)
            if not keep:
                die_with_parent()

        with self.log_path.open("wb") as log:
            # Own session: a Ctrl-C on the terminal reaches only the harness,
            # which then shuts the container down in order.
            self.nspawn = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=in_own_cgroups,  # noqa: PLW1509
            )
        self._save(nspawn_pid=self.nspawn.pid, nspawn_start=start_time(self.nspawn.pid))
        self._boot_started = started

    def _wait_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            self._check_nspawn_alive()
            if self.init_pid is None:
                self.init_pid = find_init(self.nspawn_pid)
                if self.init_pid is not None:
                    self._save(init_pid=self.init_pid, init_start=start_time(self.init_pid))
            if self.init_pid is not None:
                result = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = result.stdout.strip()
                if state in ("running", "degraded"):
                    break
            time.sleep(0.2)
        else:
            raise MachineError(
                f"{self.name} did not finish booting within {timeout:.0f} s "
                f"(systemctl is-system-running: {state or 'no answer'})\n{self.log_tail()}",
                f"the console log is {self.log_path}",
            )
        self.boot_seconds = time.monotonic() - self._boot_started
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False)
            _say(f"{self.name} is degraded; failed units:\n{failed.stdout.rstrip()}")
        _say(f"{self.name} is {state} after {self.boot_seconds:.1f} s")
        if self.all_capabilities:
            self._as_root_server()

    def _as_root_server(self) -> None:
        """What a real root server has that a machine lacks even with every capability.

        nspawn mounts the machine's /proc/sys read-only; a server's root writes it
        (scaleboxd turns on ip_forward). Only net/ is made writable: it is the
        machine's own network namespace's, the rest is the shared host kernel's.
        A server's udev makes /dev/loopN when the kernel adds one; a machine's
        /dev is a tmpfs without udev, so the nodes (for VM disk images) are made
        here; the loop devices themselves are the host kernel's.
        """
        self.run(["bash", "-c", ROOT_SERVER_SETUP])

    @property
    def nspawn_pid(self) -> int:
        if self.nspawn is None:
            raise MachineError(f"{self.name} was never started", "use Machine.boot()")
        return self.nspawn.pid

    def _check_nspawn_alive(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is not None:
            raise MachineError(
                f"systemd-nspawn for {self.name} exited with code {self.nspawn.returncode}"
                f"\n{self.log_tail()}",
                f"the console log is {self.log_path}",
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def teardown(self) -> None:
        """Stop the container, delete its network, free its slot. Safe to call twice.

        Under host_lock(), and only while the slot's state is still this boot's:
        if another run's sweep removed it, the slot may be someone else's now.
        """
        with _signals_ignored(), host_lock(self.state_dir):
            if self.nspawn is not None and self.nspawn.poll() is None:
                self.nspawn.terminate()
                try:
                    self.nspawn.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    _say(f"{self.name} did not stop within {STOP_TIMEOUT:.0f} s; killing it")
                    self.nspawn.kill()
                    self.nspawn.wait(10)
            state = read_state(self.slot, self.state_dir)
            if state is not None and state.get("token") == self._state.get("token"):
                _destroy(self.slot, self.state_dir, timeout=5)
        if self._reaper is not None:
            # The slot is released: it sees that within REAP_POLL and exits.
            try:
                self._reaper.wait(REAP_POLL * 4 + 10)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait(5)

    def keep_instructions(self) -> str:
        return (
            f"kept machine {self.name} at {self.ip} (console log {self.log_path})\n"
            f"  shell:     ./do machine shell {self.name}\n"
            f"         or: nsenter -t {self.init_pid} -a /bin/bash -l\n"
            f"  API:       http://{self.ip}:8080\n"
            f"  tear down: ./do machine down {self.name}"
        )

    # ---- using it

    def address(self) -> str:
        """The machine's IP, after checking the host routes it through our veth."""
        netns.guard(self.slot)
        return self.ip

    def url(self, port: int = 8080, path: str = "") -> str:
        """``http://<machine>:<port><path>``, after the route guard."""
        return f"http://{self.address()}:{port}{path}"

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the machine (all its namespaces) and capture its output."""
        if self.init_pid is None:
            raise MachineError(f"{self.name} has not booted", "use Machine.boot()")
        cmd = ["nsenter", "-t", str(self.init_pid), "-a", "--", *argv]
        try:
            # A session of its own, as `sudo` gives a command: scalebox-update lowers its
            # session's CPU priority until the switch, and one killed with SIGKILL (the
            # crash tests) must not leave the test runner's session lowered.
            result = subprocess.run(
                cmd,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=MACHINE_ENV,
                check=False,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise MachineError(
                f"`{shlex.join(argv)}` in {self.name} did not finish within {timeout:.0f} s",
                "run it by hand: " + self.shell_hint(),
            ) from exc
        if check and result.returncode != 0:
            raise MachineError(
                f"`{shlex.join(argv)}` in {self.name} exited with code {result.returncode}:\n"
                + _indent(result.stdout + result.stderr),
                f"{self.name} is torn down when its run ends; to look inside, keep a machine "
                "(`./do check --keep-vm`, or `./do machine up --release DIR` and repeat the "
                "step) and enter it with `./do machine shell NAME`",
            )
        return result

    def journal(self, lines: int = JOURNAL_LINES) -> str:
        """The last ``lines`` of the machine's journal since boot, or why there are none.

        Never raises: it is read when something has already gone wrong.
        """
        try:
            done = self.run(
                ["journalctl", "-b", "--no-pager", "-o", "short-monotonic", "-n", str(lines)],
                check=False,
                timeout=15,
            )
        except Exception as exc:  # noqa: BLE001 - whatever it is, the failure it explains comes first
            return f"(no journal: {exc})"
        return done.stdout + done.stderr

    def shell_hint(self) -> str:
        return f"./do machine shell {self.name}"

    def copy_in(self, source: Path, dest: str) -> None:
        """Copy a host file into the machine (its overlay; gone after teardown)."""
        if self.init_pid is None:
            raise MachineError(f"{self.name} has not booted", "use Machine.boot()")
        target = Path(f"/proc/{self.init_pid}/root") / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _indent(text: str, lines: int = 40) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


def _say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


# --- CLI -------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    with Machine.boot(args.release, keep=True):
        pass
    return 0


def _kept_init_pid(slot: Slot, state_dir: Path) -> int:
    state = read_state(slot, state_dir)
    if not state or not is_alive(state.get("init_pid"), state.get("init_start")):
        raise MachineError(
            f"machine {slot.name} is not running",
            "`./do machine list` shows the running ones; `./do machine up` boots one",
        )
    pid = state["init_pid"]
    assert isinstance(pid, int)
    return int(pid)


def _cmd_shell(args: argparse.Namespace) -> int:
    slot = netns.parse_name(args.name)
    pid = _kept_init_pid(slot, netns.STATE_DIR)
    command = args.command or ["/bin/bash", "-l"]
    env = {**MACHINE_ENV, "TERM": os.environ.get("TERM", "xterm")}
    os.execvpe("nsenter", ["nsenter", "-t", str(pid), "-a", "--", *command], env)  # noqa: S606
    return 0  # not reached


def _cmd_down(args: argparse.Namespace) -> int:
    if args.stale:
        removed = sweep_stale()
        _say(f"removed {', '.join(removed)}" if removed else "no stale machines")
        return 0
    slots = _state_slots(netns.STATE_DIR) if args.all else [netns.parse_name(n) for n in args.names]
    if not slots:
        raise MachineError("no machine named", "give names (`./do machine list`), --stale or --all")
    for slot in slots:
        destroy(slot)
        _say(f"{slot.name} is down")
    return 0


def _cmd_reap(args: argparse.Namespace) -> int:
    reap(netns.parse_name(args.name), args.token, netns.STATE_DIR)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    slots = _state_slots(netns.STATE_DIR)
    if not slots:
        print("no machines")
    for slot in slots:
        state = read_state(slot, netns.STATE_DIR) or {}
        running = is_alive(state.get("nspawn_pid"), state.get("nspawn_start"))
        owner = "kept" if state.get("keep") else f"owner pid {state.get('owner_pid')}"
        print(
            f"{slot.name}  {slot.machine_ip}  {'running' if running else 'dead'}  "
            f"nspawn pid {state.get('nspawn_pid')}  init pid {state.get('init_pid')}  {owner}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./do machine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="boot a machine and keep it running")
    up.add_argument("--release", type=Path, help="host folder bound read-only at /mnt/release")
    up.set_defaults(func=_cmd_up)
    shell = sub.add_parser("shell", help="a shell (or a command) inside a running machine")
    shell.add_argument("name")
    shell.add_argument("command", nargs=argparse.REMAINDER)
    shell.set_defaults(func=_cmd_shell)
    down = sub.add_parser("down", help="tear machines down")
    down.add_argument("names", nargs="*")
    down.add_argument("--stale", action="store_true", help="only those of killed runs")
    down.add_argument("--all", action="store_true", help="every machine of this harness")
    down.set_defaults(func=_cmd_down)
    ls = sub.add_parser("list", help="machines of this harness")
    ls.set_defaults(func=_cmd_list)
    reaper = sub.add_parser("reap")  # started by Machine.boot(), not by people
    reaper.add_argument("name")
    reaper.add_argument("token")
    reaper.set_defaults(func=_cmd_reap)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ScaleboxError as exc:
        print(f"machine: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
