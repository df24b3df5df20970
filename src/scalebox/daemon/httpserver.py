"""The HTTP server of scaleboxd: uvicorn, telling systemd when it is ready and stops.

Apart from main.py so that ``scaleboxd --run-guest`` (each VM's unit) imports
none of it: uvicorn and starlette cost a VM a quarter of a second of its boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
from collections.abc import Generator

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

import scalebox
from scalebox import priority
from scalebox.daemon import systemd
from scalebox.daemon.serving import Serving

log = logging.getLogger("scaleboxd")

# How long a connection accepted just before SIGTERM has to send its request.
ACCEPT_GRACE_SECONDS = 0.3
# A nicety: never worth holding READY back long (the updater waits 15 s for it).
# Past it the daemon serves anyway; a handler still running in a worker thread
# then (the one systemctl call of GET /vms) finishes in the background.
WARM_UP_TIMEOUT = 3.0
WARM_UP_CLIENT = ("warm-up", 0)  # the access log's client of these requests
# How long a client has to send a whole request, from connecting or from the
# previous answer on the connection (RequestDeadline).
REQUEST_SECONDS = 30.0


def warm_up(app: ASGIApp, token: str) -> None:
    """Answer a few reads in-process before serving, so that no client pays for a first.

    A fresh daemon's first request took 40-50 ms, against ~1 ms for the next:
    anyio's worker threads and their imports, FastAPI's caches. During a
    handover that first request is a user's, and every request that arrived
    meanwhile waits for it. Done here, before READY=1, it is the daemon's own
    (logged with the client "warm-up"); nothing it asks changes anything. The
    worker threads belong to this warm-up's event loop and end with it; the
    imports and caches stay. A failure is only logged: the daemon serves anyway.

    The app is called directly, as an ASGI server would: httpx's ASGI
    transport did this before, but importing httpx imports its command line
    too (rich, pygments): 91 ms of every start (python -X importtime), twice
    per update.
    """

    async def reads() -> list[str]:
        # UTF-8, as clients send it: a token outside Latin-1 then gets the 401 every
        # client gets, where encoding it as the server decodes would raise an error
        # that quotes one of its characters into the log.
        bearer = [(b"authorization", f"Bearer {token}".encode())]
        answers = [(path, await _get(app, path, headers)) for path, headers in
                   (("/health", []), ("/vms", bearer))]  # fmt: skip
        return [f"GET {path} answered {status}" for path, status in answers if status != 200]

    try:
        problems = asyncio.run(asyncio.wait_for(reads(), WARM_UP_TIMEOUT))
    except TimeoutError:
        problems = [f"no answer within {WARM_UP_TIMEOUT:g} s"]
    except Exception as exc:  # noqa: BLE001 - serving matters more than warming up
        problems = [f"{type(exc).__name__}: {exc}"]
    if problems:
        log.warning(
            "warm-up requests failed (%s); the first requests may be slower", "; ".join(problems)
        )


async def _get(app: ASGIApp, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    """One GET with no body through ``app``: the status it answered (0 for none)."""
    answered = asyncio.Event()
    requested = False
    status = 0

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await answered.wait()  # as a client that stays connected until the answer
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered.set()

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"warm-up"), *headers],
        "client": WARM_UP_CLIENT,
        "server": ("warm-up", 80),
    }
    await app(scope, receive, send)
    return status


class CloseWhenDraining:
    """ASGI wrapper: once ``draining`` is set, every response carries Connection: close."""

    def __init__(self, app: ASGIApp, draining: threading.Event) -> None:
        self.app = app
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining.is_set():
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


class RequestDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request does not come.

    uvicorn times a connection out only once it has answered on it (5 s idle,
    timeout_keep_alive), and any byte cancels that: a connection that never sent
    a request, or sent one a byte at a time, stayed open for good, holding one of
    the daemon's file descriptors. Here a client has ``seconds`` from connecting,
    and again from each answer, to send its whole request (head and body); then
    the connection is closed. A request fully received is never cut, however long
    the daemon takes to answer it, nor one whose body the daemon stopped reading.
    """

    seconds = REQUEST_SECONDS
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what h11 cannot read (a bad request line or header),
        as JSON like every other error of the API instead of uvicorn's plain text."""
        body = json.dumps({
            "error": "invalid HTTP request: it could not be read as HTTP/1.1",
            "hint": "send a well-formed HTTP/1.1 request (request line, headers, body)",
        }).encode()  # fmt: skip
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.seconds, self._overdue)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _overdue(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        theirs = self.conn.their_state
        if theirs is h11.SEND_BODY and self.flow.read_paused:
            self._arm()  # the daemon stopped reading the body, not the client sending it
            return
        answering = self.cycle is not None and not self.cycle.response_complete
        if theirs is h11.SEND_BODY or (theirs is h11.IDLE and not answering):
            log.info(
                "closing a connection from %s: no whole request within %g s",
                self.client[0] if self.client else "-",
                self.seconds,
            )
            self.transport.close()
        # Otherwise the request is in: the deadline is armed again after its answer.


class Server(uvicorn.Server):
    """uvicorn's server, telling systemd when it is ready and when it stops."""

    def __init__(
        self,
        config: uvicorn.Config,
        early_signals: list[int],
        draining: threading.Event,
        serving: Serving,
        *,
        handover: bool = False,
    ) -> None:
        super().__init__(config)
        self.early_signals = early_signals
        self.draining = draining
        self.serving = serving  # a daemon that starts meanwhile gives way to this one
        self.handover = handover

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.early_signals:  # arrived between VM reconciliation and uvicorn's handlers
            self.should_exit = True
        if self.started and not self.should_exit:
            priority.restore_process(log.warning)  # the unit's priority (scalebox/priority.py)
            problem = self.serving.hold()
            if problem:
                log.warning("%s; a daemon starting meanwhile will not give way to it", problem)
            role = " (handover instance, read-only)" if self.handover else ""
            systemd.notify(f"READY=1\nSTATUS=serving, version {scalebox.__version__}{role}")
            log.info("scaleboxd %s ready%s", scalebox.__version__, role)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.serving.release()  # it stops accepting: a daemon starting now serves alone
        systemd.notify("STOPPING=1")
        log.info("stopping: finishing in-flight requests")
        # Stop accepting first: connections still in the kernel's queue then wait
        # for the next process on systemd's socket. uvicorn closes every accepted
        # connection whose request has not been read yet, so give the ones just
        # accepted a moment to deliver their request before it looks. Meanwhile
        # every answer says "Connection: close", so keep-alive clients that send
        # in this moment reconnect (into the queue) instead of having an idle
        # connection closed under a request they are about to write.
        self.draining.set()
        for server in self.servers:
            server.close()
        await asyncio.sleep(ACCEPT_GRACE_SECONDS)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal after a graceful stop, which would kill
        # the process before the VM state is saved; only record it here.
        originals = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)
