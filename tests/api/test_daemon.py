"""scaleboxd as a process: command line, config, logs, signals, systemd protocols, VM survival.

Every test here needs a daemon started by the tests (its files, its log, its
signals) and is skipped with that reason when SCALEBOX_URL points elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import scalebox
from scalebox import priority
from scalebox.daemon import serving
from tests.api.conftest import SSH_KEY, guest_answer, run_scaleboxd, wait_until
from tests.conftest import Scaleboxd, daemon_env, guest_pids, kill_guests, write_config


@pytest.fixture
def local(fresh_scaleboxd: Scaleboxd) -> Scaleboxd:
    fresh_scaleboxd.require_local()
    return fresh_scaleboxd


def create_vm(server: Scaleboxd, **body: Any) -> dict[str, Any]:
    with server.client() as client:
        response = client.post(
            "/vms", json={"template": "debian-base", "ssh_public_key": SSH_KEY, **body}
        )
    assert response.status_code == 201, response.text
    return dict(response.json())


def only_guest_pid(server: Scaleboxd) -> int:
    assert server.config_path is not None and server.data_dir is not None
    pids = guest_pids(server.config_path, server.data_dir)
    assert len(pids) == 1, pids
    return pids[0]


# -- command line ---------------------------------------------------------------


def test_version_flag_prints_what_health_reports(local: Scaleboxd) -> None:
    done = run_scaleboxd("--version")
    assert done.returncode == 0
    with local.client() as client:
        assert done.stdout == client.get("/health").json()["version"] + "\n"
    assert done.stdout.strip() == scalebox.__version__


def test_check_config_accepts_a_valid_config_and_prints_warnings(tmp_path: Path) -> None:
    config, values = write_config(tmp_path, SPELLING_MISTAKE="1")
    done = run_scaleboxd("--check-config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"config OK: {config}" in done.stdout
    assert "SPELLING_MISTAKE" in done.stdout
    assert not Path(values["DATA_DIR"]).exists(), "a check must not create directories"


def test_check_config_uses_the_config_option_when_no_path_is_given(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path)
    done = run_scaleboxd("--config", str(config), "--check-config")
    assert done.returncode == 0, done.stderr
    assert f"config OK: {config}" in done.stdout


def test_check_config_rejects_a_bad_value_with_its_key_and_line(tmp_path: Path) -> None:
    config, values = write_config(tmp_path)
    config.write_text(config.read_text() + "MAX_DISK_SIZE_GIB=lots\n")
    done = run_scaleboxd("--check-config", str(config))
    assert done.returncode == 2
    assert "MAX_DISK_SIZE_GIB" in done.stderr
    assert f"line {len(values) + 1}" in done.stderr
    assert done.stdout == ""
    assert not Path(values["DATA_DIR"]).exists()


def test_check_config_rejects_a_missing_file_and_a_missing_token(tmp_path: Path) -> None:
    done = run_scaleboxd("--check-config", str(tmp_path / "nope"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr
    (tmp_path / "empty").write_text("# nothing\n")
    done = run_scaleboxd("--check-config", str(tmp_path / "empty"))
    assert done.returncode == 2
    assert "API_TOKEN" in done.stderr


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path)
    done = run_scaleboxd("--check-config", str(config), env={"API_PORT": "not-a-port"})
    assert done.returncode == 2
    assert "environment variable API_PORT" in done.stderr


def test_start_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    config, values = write_config(tmp_path, PORT_MIN="30000", PORT_MAX="20000")
    done = run_scaleboxd("--config", str(config))
    assert done.returncode == 2
    assert "PORT_MIN" in done.stderr
    assert not Path(values["DATA_DIR"]).exists()


def test_start_logs_config_warnings(local: Scaleboxd) -> None:
    assert local.config_path is not None
    local.config_path.write_text(local.config_path.read_text() + "OLD_KEY=1\n")
    local.restart()
    assert "unknown key OLD_KEY" in local.stderr_text()


# -- logs -------------------------------------------------------------------------


def test_the_token_never_appears_in_the_log(local: Scaleboxd) -> None:
    wrong = f"sb-{secrets.token_hex(24)}"
    with local.client() as client:
        vm = client.post("/vms", json={"template": "debian-base", "ssh_public_key": SSH_KEY})
        assert vm.status_code == 201
        client.get(f"/vms/{vm.json()['id']}")
        client.get("/no-such-route", params={"x": "1"})
        client.post("/vms", content=b"{")
    with local.client(token=wrong) as client:
        assert client.get("/vms").status_code == 401
    local.restart()
    log = local.stderr_text()
    assert "POST /vms 201" in log, "the access log names method, path and status"
    assert "GET /vms 401" in log
    assert local.token not in log
    assert local.token[3:] not in log
    assert wrong not in log
    assert "Authorization" not in log and "Bearer" not in log


def test_a_path_cannot_forge_a_line_of_the_log(local: Scaleboxd) -> None:
    """The access log wrote the decoded path: an encoded newline began a line of the
    caller's choosing (anyone's: no token needed), an escape sequence reached the
    terminal, and a path of any length was logged whole."""
    forged = "/nope%0AINFO%20scaleboxd.api:%20deleted%20VM%20vm-000000000000%1b%5B2J"
    with local.client(token="") as client:
        assert client.get(forged).status_code == 401
        assert client.get("/x" * 2000).status_code == 401
    assert wait_until(lambda: "GET /x/x" in local.stderr_text())
    log = local.stderr_text()
    assert f"GET {forged} 401" in log
    assert not any(line.startswith("INFO scaleboxd.api: deleted") for line in log.splitlines())
    assert "\x1b" not in log
    long_line = next(line for line in log.splitlines() if "GET /x/x" in line)
    assert "/x" * 100 + "... 401" in long_line and len(long_line) < 400


def test_an_unexpected_failure_is_a_json_500_and_one_traceback(local: Scaleboxd) -> None:
    """A real fault (DATA_DIR/templates replaced by a file) reaches the client as JSON."""
    assert local.data_dir is not None
    templates = local.data_dir / "templates"
    templates.rename(local.data_dir / "templates.away")
    templates.write_text("not a directory\n")
    try:
        with local.client() as client:
            response = client.get("/templates")
        assert response.status_code == 500
        body = response.json()
        assert body["error"] == "the server could not read or write a file (Not a directory)"
        assert "scaleboxd log" in body["hint"]
        assert "Traceback" not in response.text
    finally:
        templates.unlink()
        (local.data_dir / "templates.away").rename(templates)
    # The answer leaves before uvicorn logs the exception.
    assert wait_until(lambda: "Traceback" in local.stderr_text())
    time.sleep(0.2)
    log = local.stderr_text()
    assert log.count("Traceback") == 1, log
    assert "NotADirectoryError" in log
    assert "GET /templates 500" in log
    with local.client() as client:
        assert client.get("/templates").status_code == 200


# -- state and VMs across restarts -------------------------------------------------


def test_a_vm_guest_survives_a_daemon_restart_and_is_readopted(local: Scaleboxd) -> None:
    vm = create_vm(local)
    pid = only_guest_pid(local)
    assert guest_answer(local, vm["ssh_port"])["vm"] == vm["id"]
    old_daemon = local.pid

    local.restart()

    assert local.pid != old_daemon
    assert only_guest_pid(local) == pid
    assert guest_answer(local, vm["ssh_port"]) == {
        "vm": vm["id"],
        "file": "hello from debian-base\n",
    }
    with local.client() as client:
        again = client.get(f"/vms/{vm['id']}").json()
    assert again["status"] == "running"
    assert again["ssh_port"] == vm["ssh_port"]
    readopted = [line for line in local.stderr_text().splitlines() if "adopt" in line]
    assert any(vm["id"] in line for line in readopted), readopted


def test_an_orphan_guest_is_cleaned_up_with_a_log_line(local: Scaleboxd) -> None:
    assert local.data_dir is not None
    vm = create_vm(local)
    pid = only_guest_pid(local)
    local.stop()
    assert Path(f"/proc/{pid}").exists(), "stopping the daemon must not stop a VM"
    # A state that no longer lists it (a delete cut off after its save); a missing
    # state file is rebuilt from the VMs' records instead (tests/unit/test_vms.py).
    (local.data_dir / "state.json").write_text('{"format": 1, "vms": []}\n')

    local.start()

    assert wait_until(lambda: not Path(f"/proc/{pid}").exists())
    orphan_lines = [line for line in local.stderr_text().splitlines() if "orphan" in line]
    assert any(vm["id"] in line for line in orphan_lines), local.stderr_text()
    with local.client() as client:
        assert client.get("/vms").json()["vms"] == []
        assert client.get(f"/vms/{vm['id']}").status_code == 404


def test_a_corrupt_state_file_is_logged_and_the_daemon_still_starts(local: Scaleboxd) -> None:
    assert local.data_dir is not None
    vm = create_vm(local)
    local.stop()
    (local.data_dir / "state.json").write_text('{"vms": [tor')

    local.start()

    assert "corrupt" in local.stderr_text()
    with local.client() as client:
        assert client.get("/health").status_code == 200
        assert client.get(f"/vms/{vm['id']}").status_code == 200, "nothing silently deleted"


def test_run_guest_serves_one_vm_as_the_vm_unit_runs_it(local: Scaleboxd) -> None:
    """`scaleboxd --config PATH --run-guest ID` is scalebox-vm@.service's ExecStart."""
    assert local.config_path is not None and local.data_dir is not None
    vm = create_vm(local)
    local.stop()
    kill_guests(local.config_path, local.data_dir)
    with pytest.raises(OSError):
        guest_answer(local, vm["ssh_port"])
    guest = subprocess.Popen(
        [
            sys.executable, "-m", "scalebox.daemon.main",
            "--config", str(local.config_path), "--run-guest", vm["id"],
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=daemon_env(),
    )  # fmt: skip
    try:
        assert wait_until(lambda: _answers(local, vm["ssh_port"]), timeout=20)
        assert guest_answer(local, vm["ssh_port"]) == {
            "vm": vm["id"],
            "file": "hello from debian-base\n",
        }
        guest.send_signal(signal.SIGTERM)
        assert guest.wait(10) == 0
    finally:
        if guest.poll() is None:
            guest.kill()
        guest.wait()
        assert guest.stderr is not None
        guest.stderr.close()
    bad = run_scaleboxd("--config", str(local.config_path), "--run-guest", "../etc")
    assert bad.returncode != 0


def _answers(server: Scaleboxd, port: int) -> bool:
    try:
        guest_answer(server, port)
    except OSError:
        return False
    return True


def test_a_failed_start_leaves_the_state_file_alone(local: Scaleboxd) -> None:
    """Saving on the way out of a failed start would overwrite the state with nothing."""
    assert local.data_dir is not None and local.config_path is not None
    vm = create_vm(local)
    local.stop()
    state_file = local.data_dir / "state.json"
    saved = state_file.read_bytes()
    templates = local.data_dir / "templates"
    templates.rename(local.data_dir / "templates.away")
    templates.write_text("not a directory\n")
    try:
        failed = run_scaleboxd("--config", str(local.config_path), "--bind", "127.0.0.1")
    finally:
        templates.unlink()
        (local.data_dir / "templates.away").rename(templates)
    assert failed.returncode != 0
    assert state_file.read_bytes() == saved
    local.start()
    with local.client() as client:
        assert client.get(f"/vms/{vm['id']}").json()["status"] == "running"


# -- signals ------------------------------------------------------------------------


def test_sigterm_finishes_an_in_flight_request_and_saves_state(local: Scaleboxd) -> None:
    """A create whose body is still arriving when SIGTERM comes is answered, then saved."""
    assert local.process is not None
    body = json.dumps(
        {"template": "debian-base", "ssh_public_key": SSH_KEY, "name": "in-flight"}
    ).encode()
    port = int(local.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(
            b"POST /vms HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {local.token}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.5)  # the daemon has the request and waits for the rest of the body
        local.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert local.process.poll() is None, "it must wait for the request in flight"
        conn.sendall(body[10:])
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    assert b" 201 " in status_line, response
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["name"] == "in-flight"
    assert local.process.wait(30) == 0
    assert "state saved" in local.stderr_text()

    local.start()
    with local.client() as client:
        assert client.get("/vms/in-flight").json()["status"] == "running"


def test_keep_alive_clients_are_told_to_reconnect_while_the_daemon_stops(local: Scaleboxd) -> None:
    """After SIGTERM, answers on a kept-alive connection carry Connection: close, none fail.

    A client that sends on an idle kept-alive connection just as the daemon
    closes it gets a reset; telling clients to reconnect first avoids that.
    """
    assert local.process is not None
    with local.client() as client:
        assert client.get("/health").status_code == 200  # the connection is now kept alive
        local.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        answers = []
        while time.monotonic() < deadline:
            response = client.get("/health")  # an error here is the failure this test guards
            answers.append(response.status_code)
            if response.headers.get("connection") == "close":
                break
            time.sleep(0.01)
    assert answers and set(answers) == {200}
    assert response.headers.get("connection") == "close", "no answer asked the client to reconnect"
    assert local.process.wait(30) == 0


# -- systemd: socket activation and sd_notify ---------------------------------------


# What systemd does before exec: the socket becomes fd 3 and LISTEN_PID the
# pid of the process that is exec'd (the same pid: exec keeps it).
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket like systemd's, under an abstract name ('@...')."""
    name = f"scalebox-test-notify-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(30)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def read_notification(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


def test_socket_activation_and_ready_notification(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """scaleboxd serves on the socket passed as fd 3 and says READY=1 only when it answers."""
    notify, notify_name = notify_socket
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    config, values = write_config(tmp_path)  # its API_PORT is not the socket's port
    assert int(values["API_PORT"]) != port
    fd = listener.fileno()
    argv = [sys.executable, "-c", ACTIVATE, str(fd), "-m", "scalebox.daemon.main"]
    stderr_path = tmp_path / "stderr"

    # A client that connects before the daemon runs waits in the kernel's queue.
    early = socket.create_connection(("127.0.0.1", port), timeout=30)
    early.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with stderr_path.open("wb") as stderr:
        daemon = subprocess.Popen(
            [*argv, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            pass_fds=(fd,),
            env=daemon_env({"LISTEN_FDS": "1", "NOTIFY_SOCKET": notify_name}),
            start_new_session=True,
        )
    listener.close()  # the daemon has its own copy now, as with systemd
    try:
        ready = read_notification(notify)
        assert ready.get("READY") == "1", ready
        # READY=1 means it answers now: no retry loop.
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert health.json() == {"status": "ok", "version": scalebox.__version__}
        early_answer = b""
        while chunk := early.recv(4096):
            early_answer += chunk
        assert b"200 OK" in early_answer.split(b"\r\n")[0]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{values['API_PORT']}/health", timeout=2)
        log = stderr_path.read_text()
        assert "passed by systemd" in log
        assert f"systemd passed a socket on port {port}" in log, "API_PORT differs: warned"

        # VM guests must not inherit the activation variables.
        token = values["API_TOKEN"]
        created = httpx.post(
            f"http://127.0.0.1:{port}/vms",
            json={"template": "debian-base", "ssh_public_key": SSH_KEY},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        guests = guest_pids(config, Path(values["DATA_DIR"]))
        assert len(guests) == 1
        environ = Path(f"/proc/{guests[0]}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith((b"LISTEN_FDS=", b"LISTEN_PID="))]

        daemon.send_signal(signal.SIGTERM)
        stopping = read_notification(notify)
        assert stopping.get("STOPPING") == "1", stopping
        assert daemon.wait(30) == 0
    finally:
        early.close()
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        kill_guests(config, Path(values["DATA_DIR"]))


def _nice_values(pid: int) -> set[int]:
    """The nice value of every thread of ``pid`` (field 19 of /proc/PID/task/TID/stat)."""
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            values.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
    return values


def _session_nice(pid: int) -> int | None:
    """The nice of the session (autogroup) of ``pid``: "/autogroup-N nice X"."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _start_watching_priority(
    tmp_path: Path, notify: socket.socket, notify_name: str
) -> tuple[subprocess.Popen[bytes], Path, set[int], set[int | None]]:
    """Start a daemon as its unit does (scaleboxd's entry point, a session of its own)
    and sample every thread's nice and its session's until READY=1."""
    notify.settimeout(0.005)
    config, _ = write_config(tmp_path)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "scalebox.daemon.entry", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=daemon_env({"NOTIFY_SOCKET": notify_name}),
        start_new_session=True,
    )
    seen: set[int] = set()
    sessions: set[int | None] = set()
    ready: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while not ready and time.monotonic() < deadline and daemon.poll() is None:
        seen |= _nice_values(daemon.pid)
        sessions.add(_session_nice(daemon.pid))
        with contextlib.suppress(TimeoutError):
            ready = read_notification(notify)
    assert ready.get("READY") == "1", (ready, daemon.poll())
    return daemon, config, seen, sessions


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_a_daemon_starting_beside_one_serving_runs_nicer_until_it_is_ready(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """While it imports and reconciles it gives way to the daemon serving beside it (an
    update's handover); from READY=1 on every thread is back at the priority it was given."""
    notify, notify_name = notify_socket
    given = os.getpriority(os.PRIO_PROCESS, 0)  # the child inherits it, as from Nice=
    beside = serving.Serving(str(tmp_path / "config"))  # what the daemon serving holds
    assert beside.hold() is None
    try:
        daemon, _, seen, sessions = _start_watching_priority(tmp_path, notify, notify_name)
        try:
            assert min(given + 10, 19) in seen, seen
            assert _nice_values(daemon.pid) == {given}
            if priority.session_nice() is not None:
                # It leads its session, as under systemd: the session (autogroup) was
                # lowered too, and then takes the nice the daemon was started with.
                assert min(given + 10, 19) in sessions, sessions
                assert _session_nice(daemon.pid) == given
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
        finally:
            _stop(daemon)
    finally:
        beside.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_a_daemon_starting_alone_never_gives_way_and_holds_the_lock_while_it_serves(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """At boot or on `systemctl restart` every client waits for this start: lowered, on a
    busy host, it took 10-30 s (./do check). Serving, it makes the next start give way;
    stopping, it no longer does."""
    notify, notify_name = notify_socket
    given = os.getpriority(os.PRIO_PROCESS, 0)
    daemon, config, seen, sessions = _start_watching_priority(tmp_path, notify, notify_name)
    try:
        assert seen == {given}, seen
        if priority.session_nice() is not None:
            assert sessions - {None} == {0}, sessions  # a new session's, never lowered
        assert serving.others_serve(str(config))
        notify.settimeout(10)
        daemon.send_signal(signal.SIGTERM)
        stopping = read_notification(notify)
        assert stopping.get("STOPPING") == "1", stopping
        assert not serving.others_serve(str(config))  # released as it stops accepting
        assert daemon.wait(30) == 0
    finally:
        _stop(daemon)


def test_a_daemon_answers_its_own_first_requests_before_it_says_ready(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """A fresh daemon's first request costs 40-50 ms (anyio's worker threads, FastAPI's
    caches): during a handover that was a user's request, and all that came meanwhile
    waited. The daemon now makes those first requests itself, before READY=1, in-process
    and logged with the client "warm-up"."""
    notify, notify_name = notify_socket
    config, _ = write_config(tmp_path)
    stderr = tmp_path / "scaleboxd.stderr"
    with stderr.open("wb") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "scalebox.daemon.main", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=daemon_env({"NOTIFY_SOCKET": notify_name}),
            start_new_session=True,
        )
    try:
        ready = read_notification(notify)
        assert ready.get("READY") == "1", (ready, daemon.poll())
        logged = stderr.read_text()
        assert "warm-up GET /health 200" in logged, logged
        assert "warm-up GET /vms 200" in logged, logged
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        logged = stderr.read_text()
        # Both before "ready": no client's request was among them.
        assert logged.index("warm-up GET /vms") < logged.index(" ready"), logged
        assert "warm-up requests failed" not in logged, logged
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


def test_without_listen_pid_match_it_binds_its_own_port(tmp_path: Path) -> None:
    """LISTEN_FDS meant for another process (wrong LISTEN_PID) is ignored."""
    server_dir = tmp_path / "s"
    server_dir.mkdir()
    from tests.conftest import local_scaleboxd  # noqa: PLC0415

    server = local_scaleboxd(server_dir)
    try:
        server.start(extra_env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
        with server.client() as client:
            assert client.get("/health").status_code == 200
        assert "passed by systemd" not in server.stderr_text()
    finally:
        server.close()
