"""tools/loadgen.py against a real HTTP server on a loopback port, and its arithmetic."""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tools.bench import (
    LoadFigures,
    RunFigures,
    UpdaterRun,
    _merge_marks,
    report,
    step_durations,
)
from tools.loadgen import FREEZE_EVERY, Client, Load, LoadLost, Sample, percentile, summarize

from scalebox import priority


class _Health(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps connections alive when the client asks
    queries: list[str] = []  # noqa: RUF012 - what the clients sent after "?", in order

    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "version": "9.9.9"}).encode()
        path, _, query = self.path.partition("?")
        if query:
            self.queries.append(query)
        code = 200 if path == "/health" else 503
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _wait_for(load: Load, count: int) -> None:
    """Until ``count`` requests have a result (max_requests stops the load there), at most 10 s."""
    deadline = time.monotonic() + 10
    while load.stats().sent < count and time.monotonic() < deadline:
        time.sleep(0.01)


def _twenty_requests(server: str, mode: str, *, own_process: bool = False) -> Load:
    """A load of 20 GET /health in ``mode``: "new connection", "keep-alive" or "open loop"."""
    return Load(
        lambda: server + "/health",
        workers=2,
        interval=0.01,
        keep_alive=mode == "keep-alive",
        open_loop=mode == "open loop",
        max_requests=20,
        own_process=own_process,
    )


MODES = ["new connection", "keep-alive", "open loop"]


@pytest.mark.parametrize("mode", MODES)
def test_every_request_is_answered_and_timed(server: str, mode: str) -> None:
    load = _twenty_requests(server, mode)
    with load.running():
        _wait_for(load, 20)
    stats = load.stats()
    assert stats.sent == 20
    assert (stats.answered, stats.failures) == (20, {})
    assert load.answered() == 20  # the running count agrees with the samples
    assert stats.versions == {"9.9.9": 20}
    assert 0 < stats.p50 <= stats.p99 <= stats.max < 5


@pytest.mark.parametrize("mode", MODES)
def test_a_load_in_its_own_process_hands_back_every_sample(server: str, mode: str) -> None:
    load = _twenty_requests(server, mode, own_process=True)
    with load.running():
        deadline = time.monotonic() + 10
        while load.answered() < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert load.answered() == 20  # counted in the child as they came
        assert load.taken() == []  # the samples are still the child's
    assert multiprocessing.active_children() == []
    stats = load.stats()
    assert (stats.sent, stats.answered, stats.failures) == (20, 20, {})
    assert load.answered() == 20
    assert stats.versions == {"9.9.9": 20}
    assert 0 < stats.p50 <= stats.max < 5


def test_a_load_process_freezes_what_it_made_so_collections_never_walk_its_samples(
    server: str,
) -> None:
    """A full collection in the load's process stops all its threads while it walks every
    sample and thread made so far (25 ms measured a minute into a load), and the answers
    waiting meanwhile were timed as the server's. The URL function runs in the load's
    process: each request carries that process's count of frozen objects."""
    _Health.queries.clear()
    load = Load(
        lambda: f"{server}/health?frozen={gc.get_freeze_count()}",
        workers=1,
        interval=0.01,
        own_process=True,
    )

    def counts() -> list[int]:
        return [int(q.removeprefix("frozen=")) for q in list(_Health.queries)]

    with load.running():
        time.sleep(2 * FREEZE_EVERY)  # at least one freeze after the first request
        deadline = time.monotonic() + 20  # a busy CI host: more time, same verdict
        while time.monotonic() < deadline and not (
            len(seen := counts()) >= 5 and max(seen) > seen[0]
        ):
            time.sleep(0.05)
    assert load.stats().failed == 0
    seen = counts()
    assert len(seen) >= 5
    assert max(seen) > seen[0]  # what it made meanwhile was frozen


def test_loads_in_processes_side_by_side_each_stop_when_told(server: str) -> None:
    # The second load's process is forked while the first runs, so it holds copies
    # of the first one's pipe ends; the first is stopped while the second runs on.
    first, second = (
        Load(lambda: server + "/health", workers=1, interval=0.01, own_process=True)
        for _ in range(2)
    )
    first_running = contextlib.ExitStack()
    with first_running, contextlib.ExitStack() as second_running:
        first_running.enter_context(first.running())
        second_running.enter_context(second.running())
        deadline = time.monotonic() + 10
        while min(first.answered(), second.answered()) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        first_running.close()
        assert time.monotonic() - started < 10  # not the wait for a child that missed "stop"
        assert first.stats().answered >= 5
    assert second.stats().answered >= 5
    assert multiprocessing.active_children() == []


def test_a_load_process_that_dies_is_an_error_not_empty_figures(server: str) -> None:
    calls = iter(range(1000))

    def url() -> str:
        if next(calls) == 5:
            os._exit(7)  # in the load's own process: it dies mid-run
        return server + "/health"

    load = Load(url, workers=1, interval=0.01, own_process=True)
    with (
        pytest.raises(LoadLost, match="exit code 7 without handing back its samples"),
        load.running(),
    ):
        deadline = time.monotonic() + 10
        while load.answered() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
    assert multiprocessing.active_children() == []
    assert load.answered() == 0  # nothing came back; the count says so


def test_refused_and_wrong_answers_are_failures_by_kind(server: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens here once the probe is closed
    urls = iter([f"http://127.0.0.1:{closed}/health", server + "/nope"] * 3)
    load = Load(lambda: next(urls), workers=1, interval=0.0, max_requests=6)
    with load.running():
        _wait_for(load, 6)
    assert load.stats().failures == {"refused": 3, "HTTP 503": 3}
    assert load.stats().answered == 0
    assert load.answered() == 0


class _RawServer:
    """A listening socket on loopback whose every connection is handled by ``serve``
    (in a thread), for the ways a server can fail a client that http.server has no
    way to show: closing at once, resetting, never answering, closing while idle."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/health"
        self.accepted = 0
        self._serve = serve
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); a close alone does not
        self.listener.close()
        self._thread.join(5)
        assert not self._thread.is_alive()


ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n"
    b'{"status": "ok", "version": "1"}'
)


def _read_request(conn: socket.socket) -> bool:
    """Read one request head; False at the end of the stream."""
    seen = b""
    while b"\r\n\r\n" not in seen:
        data = conn.recv(4096)
        if not data:
            return False
        seen += data
    return True


def _answer_once_then_close_when_idle(conn: socket.socket) -> None:
    with conn:
        if _read_request(conn):
            conn.sendall(ANSWER)
            time.sleep(0.05)  # then idle: closed, as a stopping daemon closes its idle ones


def _close_without_answering(conn: socket.socket) -> None:
    with conn:
        _read_request(conn)


def _reset_after_the_request(conn: socket.socket) -> None:
    _read_request(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # with linger 0: an RST, not a FIN


def _never_answer(conn: socket.socket) -> None:
    with conn:
        _read_request(conn)
        time.sleep(2)


@pytest.mark.parametrize(
    ("serve", "kind"),
    [
        (_close_without_answering, "disconnected without answer"),
        (_reset_after_the_request, "reset"),
        (_never_answer, "timeout"),
    ],
)
def test_a_server_that_fails_the_request_is_a_failure_of_its_kind(
    serve: Callable[[socket.socket], None], kind: str
) -> None:
    server = _RawServer(serve)
    try:
        load = Load(lambda: server.url, workers=1, interval=0.0, timeout=0.5, max_requests=2)
        with load.running():
            _wait_for(load, 2)
    finally:
        server.close()
    assert load.stats().failures == {kind: 2}
    assert load.stats().sent == 2


def test_a_kept_alive_connection_the_server_closed_while_idle_is_replaced_not_failed() -> None:
    server = _RawServer(_answer_once_then_close_when_idle)
    try:
        load = Load(lambda: server.url, workers=1, interval=0.2, keep_alive=True, max_requests=3)
        with load.running():
            _wait_for(load, 3)
    finally:
        server.close()
    assert (load.stats().answered, load.stats().failures) == (3, {})
    assert server.accepted == 3  # each request found the last connection closed


def test_a_request_the_client_cannot_make_is_a_failure_not_a_dead_worker(server: str) -> None:
    urls = iter(["http://127.0.0.1:99999/health", "https://127.0.0.1/health", server + "/health"])
    load = Load(lambda: next(urls), workers=1, interval=0.0, max_requests=3)
    with load.running():
        _wait_for(load, 3)
    assert load.stats().failures == {"bad URL": 2}
    assert load.stats().answered == 1  # the worker went on


def test_a_kept_alive_connection_on_a_descriptor_over_1023_is_reused(server: str) -> None:
    """select() refuses descriptors over 1023; the bench's hosts allow far more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1200
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"this host allows only {hard} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with Client(keep_alive=True, timeout=5) as client:
            first = client.get(server + "/health")
            sock = client._sock
            assert sock is not None
            assert sock.fileno() > 1023
            assert client.get(server + "/health") == first
            assert client._sock is sock
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_kept_alive_connection_carries_every_request_while_the_server_keeps_it(
    server: str,
) -> None:
    with Client(keep_alive=True, timeout=5) as client:
        first = client.get(server + "/health")
        sock = client._sock
        assert client.get(server + "/health") == first
        assert client._sock is sock  # the same connection
    assert first[0] == 200
    assert json.loads(first[1])["version"] == "9.9.9"


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.5) == 0.0
    stats = summarize([Sample(0, 0.1, "ok", "1"), Sample(0, 2.0, "timeout")])
    assert (stats.max, stats.failed, stats.p99) == (2.0, 1, 0.1)


def test_step_durations_come_from_the_updaters_step_times() -> None:
    run = UpdaterRun(
        started=100.0,
        ended=120.5,
        exit_code=0,
        result={
            "step_times": {
                "stage": 101,
                "backup": 110,
                "switch": 110.5,
                "verify": 112,
                "commit": 119,
                "end": 120,
            }
        },
        lines=[],
        peak_rss_mb=60.0,
    )
    assert step_durations(run) == {
        "preflight+fetch+verify": 1.0,
        "stage": 9.0,
        "backup": 0.5,
        "switch": 1.5,
        "verify": 7.0,
        "commit": 1.0,
        "exit": 0.5,
    }


def test_the_stage_time_is_the_updaters_own_built_line() -> None:
    lines = [(1.0, "scalebox-update: building releases/1.1.0 (offline)"),
             (2.5, "scalebox-update: built releases/1.1.0 in 1.42 s")]  # fmt: skip
    assert UpdaterRun(0.0, 3.0, 0, {}, lines, 60.0).built_s == 1.42
    assert UpdaterRun(0.0, 3.0, 0, {}, lines[:1], 60.0).built_s is None  # reused, not built


def test_marks_closer_than_a_span_are_drawn_as_one() -> None:
    marks = [(10.0, "switch"), (1.0, "stage"), (10.01, "backup"), (12.0, "verify")]
    assert _merge_marks(marks, span=0.1) == [(1.0, "stage"), (10.0, "switch+backup"),
                                             (12.0, "verify")]  # fmt: skip


def _load(max_ms: float, failed: int = 0, p99_ms: float = 2.0) -> LoadFigures:
    return LoadFigures("x", 100, 100 - failed, failed, {"refused": failed} if failed else {},
                       1.0, p99_ms, max_ms)  # fmt: skip


def test_the_report_divides_each_run_by_its_own_baseline_and_keeps_the_worst() -> None:
    runs = []
    cases = [(50, 25, 1000, 100), (20, 30, 400, 200)]
    for index, (quiet, again, restart, update) in enumerate(cases, 1):
        r = RunFigures(index, f"m{index}", (1.5, 1.0, 0.5))
        r.quiet, r.quiet_again = [_load(quiet)], [_load(again)]
        r.restart, r.restart_wall_s = [_load(restart)], 2.0
        r.update.loads = [_load(update, failed=index - 1, p99_ms=2.0 + 1.5 * index)]
        r.update.wall_s = 8.0
        r.update.built_s = 1.5 + index
        r.idle_built_s = 0.9 * index
        runs.append(r)
    text, summary = report(runs)
    worst = summary["worst"]
    assert worst["A->B: max latency ÷ no update (worst run)"] == "10.0"  # run 2: 200 / 20
    assert worst["A->B: max latency ÷ no update (all runs)"] == "4.0"  # 200 / 50
    assert worst["control: no update ÷ no update again (worst run)"] == "2.0"  # run 1: 50 / 25
    assert worst["A->B: p99 latency ÷ no update (worst run)"] == "2.5"  # run 2: 5 / 2
    assert worst["A->B: max latency ÷ bare restart's"] == "0.5"
    assert worst["A->B: wall time ÷ bare restart"] == "4.0"
    assert worst["A->B: failed requests (all loads)"] == "1"
    assert worst["A->B: stage time under load (releases/1.1.0)"] == "3.50 s"
    assert worst["stage time with no load (--stage 1.2.0)"] == "1.80 s"  # met: 1.8 < 2
    assert summary["misses"] == [
        "A->B: failed requests (all loads)",
        "A->B: max latency ÷ no update (worst run)",
        "A->B: max latency ÷ no update (all runs)",
        "A->B: stage time under load (releases/1.1.0)",
    ]
    assert "host loadavg run 1: 1.50, run 2: 1.50" in text


PRIORITY_PROBE = """
import json, os
from pathlib import Path
from scalebox import priority
from tools.bench import load_at_full_priority

os.setpriority(os.PRIO_PROCESS, 0, 5)
priority.set_session_nice(10)  # as a killed updater could have left it
with load_at_full_priority():
    during = [os.getpriority(os.PRIO_PROCESS, 0), priority.session_nice()]
after = [os.getpriority(os.PRIO_PROCESS, 0), priority.session_nice()]
print(json.dumps([during, after]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can raise a CPU priority again")
def test_the_bench_measures_at_full_priority_from_a_lowered_shell() -> None:
    """A load client in a lowered session is starved by the updater it measures, so the
    bench runs it at nice 0 in a session at 0, and puts the shell's values back."""
    if priority.session_nice() is None:
        pytest.skip("this kernel schedules without autogroups")
    done = subprocess.run(
        [sys.executable, "-c", PRIORITY_PROBE],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,  # its own session, to lower and check
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert json.loads(done.stdout.splitlines()[-1]) == [[0, 0], [5, 10]]
