"""A connection whose request does not come is closed (httpserver.RequestDeadline).

uvicorn times a connection out only after it has answered on it, and any byte
resets that: a connection that sent nothing, or a byte now and then, stayed open
for good and held one of the daemon's file descriptors (seen: a silent one and
one sending a byte a second were both still open after 20 s). Real uvicorn on a
real loopback socket, with the deadline shortened to DEADLINE; the last test
runs the real daemon with its own 30 s deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.types import Receive, Scope, Send

from scalebox.daemon import httpserver
from tests.conftest import local_scaleboxd

DEADLINE = 0.6


class ShortDeadline(httpserver.RequestDeadline):
    seconds = DEADLINE


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body, waits what ?wait= says, then answers how many bytes came."""
    assert scope["type"] == "http"
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    query = scope["query_string"].decode()
    if query.startswith("wait="):
        await asyncio.sleep(float(query.removeprefix("wait=")))
    body = str(size).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def server() -> Iterator[int]:
    """uvicorn serving ``app`` with the short deadline on a loopback port."""
    listening = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, loop="asyncio", http=ShortDeadline, log_config=None, lifespan="off"
    )
    serving = uvicorn.Server(config)
    thread = threading.Thread(target=serving.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not serving.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield listening.getsockname()[1]
    finally:
        serving.should_exit = True
        thread.join(10)
        listening.close()


def closed_after(sock: socket.socket, limit: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closed ``sock`` (None: still open at ``limit``).

    With ``trickle``, one byte of it is sent every tenth of a second meanwhile.
    """
    began = time.monotonic()
    sock.settimeout(0.1)
    sent = 0
    while time.monotonic() - began < limit:
        if sent < len(trickle):
            with contextlib.suppress(OSError):
                sock.send(trickle[sent : sent + 1])
            sent += 1
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - began
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - began
    return None


def request_and_close(port: int, target: str) -> bytes:
    """GET ``target`` with Connection: close; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def read_answer(sock: socket.socket) -> bytes:
    """One answer (head and Content-Length's body) from a kept-alive connection."""
    answer = b""

    def more() -> bytes:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; it had sent {answer!r}"
        return chunk

    while b"\r\n\r\n" not in answer:
        answer += more()
    head, body = answer.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        body += more()
    return body


def test_a_connection_that_sends_nothing_is_closed() -> None:
    with server() as port, socket.create_connection(("127.0.0.1", port)) as silent:
        took = closed_after(silent, DEADLINE * 5)
        assert took is not None, "a silent connection is still open"
        assert took >= DEADLINE * 0.9


def test_a_request_sent_a_byte_at_a_time_is_cut() -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with server() as port, socket.create_connection(("127.0.0.1", port)) as slow:
        took = closed_after(slow, DEADLINE * 5, trickle=head)
        assert took is not None, "a trickled head kept the connection open"


def test_a_body_sent_a_byte_at_a_time_is_cut() -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n"
    with server() as port, socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(head)
        took = closed_after(slow, DEADLINE * 5, trickle=b"b" * 200)
        assert took is not None, "a trickled body kept the connection open"


def test_a_request_taking_longer_than_the_deadline_to_answer_is_answered() -> None:
    with server() as port:
        answer = request_and_close(port, f"/?wait={DEADLINE * 3}")
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.endswith(b"\r\n\r\n0")


def test_a_kept_alive_connection_gets_the_whole_deadline_again_after_each_answer() -> None:
    with server() as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(3):
            time.sleep(DEADLINE * 0.7)  # each under the deadline, together over it
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert read_answer(sock) == b"3"


def test_scaleboxd_closes_a_connection_that_sends_nothing(tmp_path: Path) -> None:
    daemon = local_scaleboxd(tmp_path)
    daemon.start()
    try:
        daemon.wait_healthy()
        port = int(daemon.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as silent:
            took = closed_after(silent, httpserver.REQUEST_SECONDS + 10)
        assert took is not None, "scaleboxd kept a silent connection open"
        assert took >= httpserver.REQUEST_SECONDS * 0.9
        assert "no whole request within 30 s" in daemon.stderr_text()
    finally:
        daemon.close()
