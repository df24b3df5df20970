"""A stand-in for systemd, for the updater's unit tests (systemd is not PID 1 on this host).

It is a test double only where nothing real can run: the processes are real
(a small HTTP server per release), reached over real loopback sockets, and the
releases, units and config are real files under tmp_path. What it imitates is
systemd's part: ``restart`` starts ``current/venv/bin/scaleboxd`` and returns
once it answers (as Type=notify would), or fails when it exits first. The
service's PID lives in a file, so a second updater process sees the same
service, as it would with systemd. The system tests use the real systemd.
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
from collections.abc import Sequence
from pathlib import Path

import httpx

from scalebox.update.errors import CommandError
from scalebox.update.paths import Paths
from scalebox.update.systemd import HANDOVER, SERVICE, UnitState

FAKE_SCALEBOXD = """\
#!{python}
# A release's scaleboxd for the updater tests: BEHAVIOUR decides how it fails.
import http.server, json, os, sys, threading, time
VERSION, REPORTED, BEHAVIOUR = {version!r}, {reported!r}, {behaviour!r}
args = sys.argv[1:]
if "--check-config" in args:
    if os.environ.get("FAKE_KILL_PARENT_AT_CHECK") == "1":
        os.kill(os.getppid(), 9)
    if os.environ.get("FAKE_CHECK_KILLED") == "1":
        os.kill(os.getpid(), 9)  # the OOM killer, say
    if os.environ.get("FAKE_SIGINT_PARENT_AT_CHECK") == "1":
        os.kill(os.getppid(), 2)  # an admin's Ctrl-C while the check runs
        time.sleep(30)  # the updater must stop the check, not wait it out
    if BEHAVIOUR == "reject-config":
        print("config: NEW_KEY is required", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
config = args[args.index("--config") + 1]
port = 8080
for line in open(config):
    if line.startswith("API_PORT="):
        port = int(line.split("=", 1)[1])
if BEHAVIOUR == "crash":
    sys.exit(3)
if BEHAVIOUR == "hang":
    time.sleep(3600)
if BEHAVIOUR == "die-after":
    threading.Timer(1.0, lambda: os._exit(1)).start()

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"status": "ok", "version": REPORTED}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

http.server.HTTPServer.allow_reuse_address = True
server = http.server.HTTPServer(("127.0.0.1", port), Health)
# Serving: the shared lock on the config's folder a real daemon holds (daemon/serving.py).
import fcntl
serving = os.open(os.path.dirname(os.path.abspath(config)), os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(serving, fcntl.LOCK_SH)
server.serve_forever()
"""


REPO = Path(__file__).resolve().parents[2]


def run_crashing_child(
    code: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run updater ``code`` in a Python child that is expected to die by SIGKILL.

    In a session of its own, as sudo gives the updater: one killed while it has its
    session lowered (priority.Session.SHARED) cannot leave the test runner's lowered.
    """
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env or {**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_release(
    paths: Paths, version: str, *, behaviour: str = "ok", reported: str | None = None
) -> Path:
    """A complete release directory whose scaleboxd is FAKE_SCALEBOXD."""
    root = paths.release_dir(version)
    (root / "venv" / "bin").mkdir(parents=True)
    (root / "units").mkdir()
    units = ["scalebox-vm@.service", "scaleboxd.service"]
    (root / "RELEASE.json").write_text(
        json.dumps({"version": version, "python": [], "units": units})
    )
    (root / "units" / "scaleboxd.service").write_text(f"[Service]\n# release {version}\n")
    (root / "units" / "scalebox-vm@.service").write_text("[Service]\n# same in every release\n")
    exe = root / "venv" / "bin" / "scaleboxd"
    exe.write_text(
        FAKE_SCALEBOXD.format(
            python=sys.executable,
            version=version,
            reported=reported or version,
            behaviour=behaviour,
        )
    )
    exe.chmod(0o755)
    (root / ".complete").write_text(f"{version}\n")
    return root


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class ProcessService:
    """systemd's part for one service, scaleboxd, run as a plain process (see module doc)."""

    def __init__(self, paths: Paths, state_dir: Path) -> None:
        self.paths = paths
        self.pid_file = state_dir / "service.pid"
        self.all_pids = state_dir / "service.all-pids"
        # The unit files as "systemd" last loaded them: at the first construction
        # (boot), then at every daemon_reload, shared by every updater process.
        self.loaded = state_dir / "service.loaded-units"
        if not self.loaded.exists():
            self.loaded.write_text(json.dumps(self._unit_files()))
        self.calls: list[str] = []

    def _unit_files(self) -> dict[str, str]:
        """Every installed unit file and drop-in, by path, with its content."""
        root = self.paths.systemd_dir
        if not root.is_dir():
            return {}
        return {
            str(f.relative_to(root)): f.read_text(errors="replace")
            for f in sorted(root.rglob("*"))
            if f.is_file()
        }

    def reload_reason(self, units: Sequence[str]) -> str | None:
        """Why a reload is due: a file of ``units`` (or a drop-in of one) differs from
        what was loaded; else None."""
        loaded = json.loads(self.loaded.read_text())
        now = self._unit_files()

        def of(files: dict[str, str], unit: str) -> dict[str, str]:
            return {k: v for k, v in files.items() if k == unit or k.startswith(f"{unit}.d/")}

        changed = [u for u in units if of(loaded, u) != of(now, u)]
        return f"{changed[0]} changed on disk" if changed else None

    def _pid(self) -> int:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return 0

    def daemon_reload(self) -> None:
        self.calls.append("daemon-reload")
        self.loaded.write_text(json.dumps(self._unit_files()))

    def reset_failed(self, unit: str) -> None:
        self.calls.append(f"reset-failed {unit}")

    def start(self, unit: str, timeout: float) -> None:
        # The releases made here ship no handover unit, so only scaleboxd is started.
        self.restart(unit, timeout)

    def stop(self, unit: str = SERVICE, timeout: float = 10.0) -> None:
        self.calls.append(f"stop {unit}")
        if unit == SERVICE:
            self._kill()

    def _kill(self) -> None:
        pid = self._pid()
        if pid and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.02)
        self.pid_file.unlink(missing_ok=True)

    def restart(self, unit: str, timeout: float) -> None:
        self.calls.append(f"restart {unit}")
        if unit != SERVICE:
            return
        self._kill()
        exe = self.paths.current / "venv" / "bin" / "scaleboxd"
        proc = subprocess.Popen(
            [str(exe), "--config", str(self.paths.config)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid_file.write_text(str(proc.pid))
        with self.all_pids.open("a") as f:
            f.write(f"{proc.pid}\n")
        deadline = time.monotonic() + min(timeout, 10.0)
        port = self._port()
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise CommandError(
                    f"restart {unit} failed (exit 1): main process exited, code {proc.returncode}"
                )
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5)
            except httpx.HTTPError:
                time.sleep(0.05)
            else:
                return  # what READY=1 means to systemd
        raise CommandError(f"restart {unit} did not finish within {timeout:.0f} s")

    def _port(self) -> int:
        for line in self.paths.config.read_text().splitlines():
            if line.startswith("API_PORT="):
                return int(line.partition("=")[2])
        return 8080

    def state(self, unit: str) -> UnitState:
        if unit == HANDOVER:
            return UnitState("inactive", "dead", 0, 0)  # never started: no release ships it here
        pid = self._pid()
        if pid and _alive(pid):
            return UnitState("active", "running", pid, 0)
        return UnitState("failed" if pid else "inactive", "dead", 0, 0)

    def kill_everything(self) -> None:
        """Teardown: every process this double (in any updater process) ever started."""
        with contextlib.suppress(OSError):
            for line in self.all_pids.read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(line), signal.SIGKILL)
