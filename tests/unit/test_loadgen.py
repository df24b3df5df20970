"""tools/loadgen.py against a real HTTP server on a loopback port, and its arithmetic."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tools.bench import UpdaterRun, step_durations
from tools.loadgen import Load, Sample, percentile, summarize


class _Health(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps connections alive when the client asks

    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "version": "9.9.9"}).encode()
        code = 200 if self.path == "/health" else 503
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


@pytest.mark.parametrize("mode", ["new connection", "keep-alive", "open loop"])
def test_every_request_is_answered_and_timed(server: str, mode: str) -> None:
    load = Load(
        lambda: server + "/health",
        workers=2,
        interval=0.01,
        keep_alive=mode == "keep-alive",
        open_loop=mode == "open loop",
        max_requests=20,
    )
    with load.running():
        _wait_for(load, 20)
    stats = load.stats()
    assert stats.sent == 20
    assert (stats.answered, stats.failures) == (20, {})
    assert stats.versions == {"9.9.9": 20}
    assert 0 < stats.p50 <= stats.p99 <= stats.max < 5


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
