"""A real HTTP server on 127.0.0.1 for the updater's resolve and fetch tests.

Each test registers plain handler functions per path; the server records every
request (path and headers) so a test can assert what was really sent. Handlers
may misbehave on purpose: cut the connection mid-body, stall, lie about sizes.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class Server:
    base: str
    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    # Set on teardown so stalled handlers return at once.
    stopping: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return self.base + path

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


@contextmanager
def serve(tls: Path | None = None) -> Iterator[Server]:
    """A threaded HTTP server on 127.0.0.1; with ``tls`` (a tests.tls.make_tls folder), HTTPS."""
    server_box: list[Server] = []

    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            srv = server_box[0]
            srv.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
            route = srv.routes.get(self.path)
            if route is None:
                send_json(self, {"message": "Not Found"}, status=404)
                return
            route(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls / "server.pem", tls / "server.key")
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    host, port = httpd.server_address[:2]
    scheme = "https" if tls is not None else "http"
    server = Server(base=f"{scheme}://{host!s}:{port}")
    server_box.append(server)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def send_json(req: BaseHTTPRequestHandler, data: object, status: int = 200) -> None:
    body = json.dumps(data).encode()
    req.send_response(status)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def send_body(
    req: BaseHTTPRequestHandler,
    body: bytes,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    declared_length: int | None = None,
    cut_after: int | None = None,
) -> None:
    """Answer with ``body``; with ``cut_after`` send only that many bytes, then
    drop the connection although Content-Length promised more."""
    req.send_response(status)
    length = len(body) if declared_length is None else declared_length
    req.send_header("Content-Length", str(length))
    for name, value in (headers or {}).items():
        req.send_header(name, value)
    req.end_headers()
    if cut_after is None:
        req.wfile.write(body)
        return
    req.wfile.write(body[:cut_after])
    req.wfile.flush()
    req.close_connection = True
    req.connection.shutdown(socket.SHUT_RDWR)


def range_start(req: BaseHTTPRequestHandler) -> int | None:
    """The N of a ``Range: bytes=N-`` header, or None."""
    value = req.headers.get("Range")
    if not value or not value.startswith("bytes=") or not value.endswith("-"):
        return None
    return int(value[len("bytes=") : -1])


def send_range(
    req: BaseHTTPRequestHandler,
    body: bytes,
    *,
    cut_after: int | None = None,
    etag: str | None = None,
) -> None:
    """Serve ``body`` like a real file server: ``Range: bytes=N-`` gets 206 (or 416),
    unless an ``If-Range`` names another ``etag`` than the file's: then all of it."""
    start = range_start(req)
    if_range = req.headers.get("If-Range")
    if start is None or (if_range is not None and if_range != etag):
        send_body(req, body, cut_after=cut_after, headers={"ETag": etag} if etag else None)
        return
    if start >= len(body):
        req.send_response(416)
        req.send_header("Content-Range", f"bytes */{len(body)}")
        req.send_header("Content-Length", "0")
        req.end_headers()
        return
    rest = body[start:]
    headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
    if etag:
        headers["ETag"] = etag
    send_body(req, rest, status=206, headers=headers, cut_after=cut_after)


def unused_port() -> int:
    """A loopback port that nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
