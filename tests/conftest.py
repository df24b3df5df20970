"""Shared fixtures: a real scaleboxd process on a loopback port.

``scaleboxd`` (one per session) and ``fresh_scaleboxd`` (one per test) start
``python -m scalebox.daemon.main --config F --bind 127.0.0.1`` with a random
token, a temporary DATA_DIR and a free port, wait for /health and yield a
``Scaleboxd`` handle. Teardown stops the daemon and kills every VM guest it
left (found by its command line, which names this config file), so nothing
keeps running.

With SCALEBOX_URL and SCALEBOX_TOKEN set, both fixtures yield that external
server instead; tests that need its files, its log or a restart call
``require_local()`` and are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from scalebox import priority
from scalebox.config import KEYS
from scalebox.update import interrupt
from tests.interrupt import WORKER, forward_to_workers, tear_down_on_sigterm

# A test run started in the background by a script (`./do test &`) inherits SIGINT
# ignored, which Python and every program it starts then keep: the tests that
# press Ctrl-C (SIGINT) on the CLI and the updater would wait for nothing. Programs
# started from here get the default again (a handled signal is reset at exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
tear_down_on_sigterm()


_RUN_SESSION_NICE: list[int | None] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.environ.get(WORKER):  # the run itself, not an xdist worker
        _RUN_SESSION_NICE.append(priority.session_nice())
    forward_to_workers(session.config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run puts back the session's nice it started with, so the shell is never left
    lowered, not even by a test that the check below did not see (one it interrupted)."""
    if os.environ.get(WORKER) or not _RUN_SESSION_NICE:
        return
    after = _put_back_session_nice(_RUN_SESSION_NICE[0])
    if after is not None:
        sys.stderr.write(
            f"\nthe test run's session was left at nice {after}; put back to "
            f"{_RUN_SESSION_NICE[0]}\n"
        )


def _put_back_session_nice(before: int | None) -> int | None:
    """Set the session's nice back to ``before``; the value it had instead, or None when
    it had not changed (or autogroups are off)."""
    after = priority.session_nice()
    if before is None or after == before:
        return None
    priority.set_session_nice(before)
    return after


@pytest.fixture(autouse=True)
def _session_priority_kept() -> Iterator[None]:
    """No test leaves the test runner's session (its autogroup) at another CPU priority.

    The updater lowers the session it shares (``priority.Session.SHARED``) and
    restores it on every way out but SIGKILL. A child killed that way while
    sharing the runner's session left the session at nice 10, and the next
    lowering went from there: every later test, and a bench started from the
    same shell, ran at nice 10 or 19 against the machine's processes. Such a
    child must get a session of its own (``start_new_session=True``), as
    ``sudo`` gives the updater one. The fixture puts the value back, then fails.
    Under xdist too: each worker leads a session of its own (tests/interrupt.py).
    """
    before = priority.session_nice()
    yield
    after = _put_back_session_nice(before)
    if after is not None:
        pytest.fail(
            f"this test left the test runner's session at nice {after} (was {before}): "
            "a child that shares the session was killed while lowered; start it with "
            "start_new_session=True"
        )


@pytest.fixture(autouse=True)
def _signals_kept() -> Iterator[None]:
    """No test leaves the updater's signal handling changed for the next test.

    A test that runs ``transaction.install`` without main's ``interrupt.catching``
    scope leaves the outcome settled (main's scope would clear it). The next
    test's scope then ended as a settled run's does, ignoring SIGINT, SIGTERM
    and SIGHUP for the rest of the worker's life: a later signal test failed
    now and then under xdist, depending on which tests shared its worker. The
    settled flag is cleared here, as a new run starts with it clear; any other
    leftover (a scope, a shield or a deferral not ended, a changed handler) is
    put back and fails the test that left it.
    """
    handlers = {s: signal.getsignal(s) for s in interrupt.HANDLED}
    interrupt.unsettle()
    yield
    interrupt.unsettle()
    left = [
        what
        for what, at_rest in (
            ("a catching() scope not ended", interrupt._catching_depth == 0),
            ("a shielded() block not ended", interrupt._shield_depth == 0),
            ("a deferred() block not ended", interrupt._deferring is None),
            ("a stop under way", not interrupt._stopping and not interrupt._deferred),
        )
        if not at_rest
    ]
    for s, handler in handlers.items():
        if signal.getsignal(s) is not handler:
            left.append(f"the {signal.Signals(s).name} handler changed")
            signal.signal(s, handler)
    if left:
        interrupt._catching_depth = interrupt._shield_depth = 0
        interrupt._deferring, interrupt._stopping = None, False
        interrupt._deferred.clear()
        interrupt._noted.clear()
        pytest.fail(f"this test left the updater's signal handling changed: {'; '.join(left)}")


STARTUP_SECONDS = 30
STOP_SECONDS = 30
# Variables that must not leak from the developer's shell into the daemon:
# config keys (the environment overrides the file) and systemd's protocols.
_SCRUBBED_ENV = (*KEYS, "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
DAEMON_COMMAND = [sys.executable, "-m", "scalebox.daemon.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(size: int = 100) -> tuple[int, int]:
    """A random block of ports below Linux's ephemeral range, none of them in use now."""
    for _ in range(50):
        low = secrets.randbelow(30000 - 20000 - size) + 20000
        if all(_port_free(p) for p in range(low, low + size, 10)):
            return low, low + size - 1
    raise RuntimeError("no free block of ports for VM ssh ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def guest_pids(config_path: Path, data_dir: Path) -> list[int]:
    """PIDs of VM guests of this daemon, found by their command line.

    Under systemd a guest runs as ``scaleboxd --config PATH --run-guest ID``;
    outside it as ``python -m scalebox.daemon.vms.guest --data-dir DATA_DIR ...``.
    """
    pids = []
    config, data = str(config_path).encode(), str(data_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"--run-guest" in argv and config in argv) or (
            b"scalebox.daemon.vms.guest" in argv and data in argv
        ):
            pids.append(int(entry.name))
    return pids


def kill_guests(config_path: Path, data_dir: Path) -> list[int]:
    killed = guest_pids(config_path, data_dir)
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # Guests run in their own process group; take the whole group.
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


@dataclass
class Scaleboxd:
    """A scaleboxd under test: started here (local) or SCALEBOX_URL (external)."""

    url: str
    token: str
    data_dir: Path | None = None
    config_path: Path | None = None
    stderr_path: Path | None = None
    bind: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    _stderr: IO[bytes] | None = field(default=None, repr=False)

    @property
    def local(self) -> bool:
        return self.config_path is not None

    def require_local(self, why: str = "needs a scaleboxd started by the tests") -> None:
        if not self.local:
            pytest.skip(f"{why}; SCALEBOX_URL points at an external server")

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """An HTTP client with the bearer token (or ``token``; '' sends none)."""
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    @property
    def pid(self) -> int:
        self.require_local()
        assert self.process is not None
        return self.process.pid

    def stderr_text(self) -> str:
        """Everything the daemon wrote to stderr, across restarts."""
        self.require_local("needs the daemon's log")
        assert self.stderr_path is not None
        return self.stderr_path.read_text(errors="replace")

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        assert self.config_path is not None and self.stderr_path is not None
        self._stderr = self.stderr_path.open("ab")
        self.process = subprocess.Popen(
            [
                *DAEMON_COMMAND,
                "--config",
                str(self.config_path),
                "--bind",
                self.bind,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            env=daemon_env(extra_env),
            start_new_session=True,  # so stop() can take the daemon's whole group
        )
        self.wait_healthy()

    def wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"scaleboxd exited with {self.process.returncode} while starting:\n"
                    + self.stderr_text()[-3000:]
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("scaleboxd did not answer /health in time:\n" + self.stderr_text())

    def stop(self) -> int | None:
        """SIGTERM the daemon (never its VMs) and wait; returns its exit code."""
        self.require_local()
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return process.returncode

    def restart(self, extra_env: dict[str, str] | None = None) -> None:
        """SIGTERM, wait, start again with the same config and data."""
        self.require_local("restarts the daemon")
        self.stop()
        self.start(extra_env)

    def close(self) -> None:
        if not self.local:
            return
        try:
            self.stop()
        finally:
            assert self.config_path is not None and self.data_dir is not None
            kill_guests(self.config_path, self.data_dir)


def write_config(directory: Path, **overrides: str) -> tuple[Path, dict[str, str]]:
    """A config in ``directory`` with a random token, DATA_DIR and loopback ports."""
    port_min, port_max = free_port_range()
    values = {
        "API_TOKEN": f"sb-{secrets.token_hex(24)}",
        "API_PORT": str(free_port()),
        "DATA_DIR": str(directory / "data"),
        "PORT_MIN": str(port_min),
        "PORT_MAX": str(port_max),
        "HOST_IP": "127.0.0.1",
        "VM_DOMAIN": "vms.test",
        # The fast rootless API tests run stand-in guests (the default is nspawn).
        "VM_BACKEND": "process",
        **overrides,
    }
    path = directory / "config"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    return path, values


def local_scaleboxd(directory: Path, **overrides: str) -> Scaleboxd:
    config_path, values = write_config(directory, **overrides)
    return Scaleboxd(
        url=f"http://127.0.0.1:{values['API_PORT']}",
        token=values["API_TOKEN"],
        data_dir=Path(values["DATA_DIR"]),
        config_path=config_path,
        stderr_path=directory / "scaleboxd.stderr",
    )


def external_scaleboxd() -> Scaleboxd | None:
    url, token = os.environ.get("SCALEBOX_URL"), os.environ.get("SCALEBOX_TOKEN")
    if url and token:
        return Scaleboxd(url=url.rstrip("/"), token=token)
    return None


@contextlib.contextmanager
def running_scaleboxd(directory: Path) -> Iterator[Scaleboxd]:
    external = external_scaleboxd()
    if external is not None:
        yield external
        return
    server = local_scaleboxd(directory)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def scaleboxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scaleboxd]:
    """One real scaleboxd shared by the session; tests must clean up what they create."""
    with running_scaleboxd(tmp_path_factory.mktemp("scaleboxd")) as server:
        yield server


@pytest.fixture
def fresh_scaleboxd(tmp_path: Path) -> Iterator[Scaleboxd]:
    """A real scaleboxd of this test alone (restart it, read its log, break its files)."""
    with running_scaleboxd(tmp_path) as server:
        yield server
