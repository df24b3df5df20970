"""A steady HTTP load from the host: a few paced workers, each result timed and classified.

    load = Load(lambda: m.url(8080, "/health"), workers=4, keep_alive=False)
    with load.running():
        ...                                 # the update
    print(load.stats().line())

Each worker sends one GET, waits for its answer, then waits out the rest of
its interval, so the offered rate is at most workers / interval. With
open_loop a request is started every interval whatever happened to the
earlier ones (each in its own thread), so a stall cannot lower the rate and
hide the latency it causes. The URL function runs before every request
(m.url() re-checks the route to the machine). With keep_alive each worker
reuses one connection, as an API client would; otherwise every request opens
a new one. Bounded: the load stops on leaving running(), at max_seconds, or
after max_requests.

The client is h11 (the HTTP/1.1 protocol library under httpx and uvicorn)
on a plain socket, not httpx: the client's own CPU is timed as the server's,
and httpx's per request was 1.1-1.4 ms of CPU on a fresh loopback
connection against 0.53-0.55 ms for this (400 requests each, twice,
interleaved). At the bench's ~130 fresh connections a second that is a
tenth of a core of the 2-core host, and a longer tail on every request.
The server sees the same: one GET on an HTTP/1.1 connection that the
client keeps or closes after the answer.

With own_process the load runs in a child process (forked, so the URL
function needs no pickling) and its samples come back when running() ends
(LoadLost if the child died before handing them back).
Several loads in one process share one GIL: a request's answer then waits
for the other loads' threads, and that wait is timed as the server's.
Measured on the bench's three loads for 60 s with no update, beside a
separate plain-socket probe: in one process the longest requests were
30-61 ms while the probe's were 10-27 ms; a process per load, 12-15 ms
(one 36 ms), the probe's 14 ms. And a load's process collects, then freezes,
what it made every FREEZE_EVERY seconds, so that no collection walks all its
samples: a minute into a load, one collection took 25 ms (at most 1.1 ms,
collected and frozen every half second).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import h11

from scalebox.errors import ScaleboxError
from tools.machine import die_with_parent

OK = "ok"
FREEZE_EVERY = 0.5  # seconds; see _child


def _settle_heap() -> None:
    """Collect, then freeze what is left, so that later collections walk only what comes after.

    A full collection stops every thread of a load while it walks, and their
    answers wait, timed as the server's: 25 ms a minute into a load. Settled
    every half second, each walk is over half a second of objects. Frozen
    objects are still freed when their last reference goes; only a cycle
    made after its objects were frozen would stay.
    """
    gc.collect()
    gc.freeze()


class LoadLost(ScaleboxError):
    """A load run in its own process did not hand back its samples."""


@dataclass(frozen=True)
class Sample:
    sent: float  # time.time() when the request started
    seconds: float  # until the answer or the error
    kind: str  # "ok", or what went wrong: "refused", "reset", "timeout", "HTTP 502", ...
    version: str = ""  # /health's "version" when answered


class _ConnectFailed(Exception):
    """The connection could not be opened (``__cause__`` says why)."""


class _Disconnected(Exception):
    """The server closed the connection before its whole answer came."""


# Why a request failed, by the exception's class: the first that matches names it.
_KINDS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (TimeoutError, "timeout"),
    ((_Disconnected, h11.RemoteProtocolError), "disconnected without answer"),
    (ConnectionResetError, "reset"),
    (OSError, "read error"),
    (ScaleboxError, "route check failed"),
    (ValueError, "bad URL"),
)


def classify(exc: BaseException) -> str:
    """A short name for why a request failed."""
    if isinstance(exc, _ConnectFailed):
        cause = exc.__cause__
        if isinstance(cause, TimeoutError):
            return "timeout"
        return "refused" if isinstance(cause, ConnectionRefusedError) else "connect error"
    kinds = (kind for classes, kind in _KINDS if isinstance(exc, classes))
    return next(kinds, type(exc).__name__)


class Client:
    """GET over HTTP/1.1 (h11 on a plain socket), one request at a time.

    With ``keep_alive`` the connection is reused while the server keeps it
    open; a connection the server closed while idle (a daemon that stops
    closes its idle ones) is replaced before the request, as httpx's pool
    does, and not counted as a failure. Without it, every request opens a
    connection and closes it after the answer.
    """

    def __init__(self, *, keep_alive: bool, timeout: float) -> None:
        self.keep_alive = keep_alive
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._conn: h11.Connection | None = None
        self._where: tuple[str, int] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._conn = self._where = None

    def get(self, url: str) -> tuple[int, bytes]:
        """The answer's status and body; raises OSError, _ConnectFailed, _Disconnected,
        h11.ProtocolError (ValueError for a URL this client cannot ask)."""
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"{url}: only http:// is spoken here")
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sock, conn = self._connection((host, port))
        # As httpx asked (less its Accept-Encoding, which /health never uses): an
        # HTTP/1.1 request keeps the connection, so the server never closes it first;
        # without keep_alive this client closes it after the answer, as httpx did.
        headers = [("Host", parts.netloc), ("Accept", "*/*"), ("User-Agent", "scalebox-load")]
        request = h11.Request(method="GET", target=target, headers=headers)
        try:
            # A failed send is not the end, as in httpcore: the server may have
            # answered, or closed; what it did is read below.
            with contextlib.suppress(OSError):
                sock.sendall(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
            status, body = self._answer(sock, conn)
        except BaseException:
            self.close()
            raise
        if self.keep_alive and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.close()
        return status, body

    def _connection(self, where: tuple[str, int]) -> tuple[socket.socket, h11.Connection]:
        sock, conn = self._sock, self._conn
        if sock is not None and conn is not None and where == self._where:
            idle = select.poll()  # not select(): a descriptor over 1023 is fine
            idle.register(sock, select.POLLIN)
            if not idle.poll(0):  # idle and open: an EOF or stray bytes would be readable
                return sock, conn
        self.close()
        try:
            sock = socket.create_connection(where, timeout=self.timeout)
        except OSError as exc:
            raise _ConnectFailed(str(exc)) from exc
        self._sock, self._conn, self._where = sock, h11.Connection(h11.CLIENT), where
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as httpx's does
        return sock, self._conn

    @staticmethod
    def _answer(sock: socket.socket, conn: h11.Connection) -> tuple[int, bytes]:
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                if not data and conn.their_state is h11.SEND_RESPONSE:
                    raise _Disconnected("closed before answering")
                conn.receive_data(data)  # b"": the end of the stream, told to h11
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise _Disconnected("closed in the middle of the answer")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (0.0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Stats:
    sent: int
    answered: int
    failures: dict[str, int]
    p50: float
    p99: float
    max: float
    versions: dict[str, int]

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def line(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.failures.items())) or "none"
        return (
            f"{self.sent} sent, {self.answered} answered, {self.failed} failed ({kinds}); "
            f"latency p50 {self.p50 * 1000:.0f} ms, p99 {self.p99 * 1000:.0f} ms, "
            f"max {self.max * 1000:.0f} ms"
        )


def summarize(samples: list[Sample]) -> Stats:
    answered = [s for s in samples if s.kind == OK]
    seconds = [s.seconds for s in answered]
    return Stats(
        sent=len(samples),
        answered=len(answered),
        failures=dict(Counter(s.kind for s in samples if s.kind != OK)),
        p50=percentile(seconds, 0.50),
        p99=percentile(seconds, 0.99),
        # The longest wait any client saw, answered or not.
        max=max((s.seconds for s in samples), default=0.0),
        versions=dict(Counter(s.version for s in answered)),
    )


@dataclass
class Load:
    url: Callable[[], str]
    workers: int = 4
    keep_alive: bool = False
    open_loop: bool = False
    interval: float = 0.02  # per worker: at most one request started per interval
    timeout: float = 30.0  # per request
    max_seconds: float = 900.0
    max_requests: int = 200_000
    own_process: bool = False  # in a child process: samples arrive when running() ends
    samples: list[Sample] = field(default_factory=list)
    _answered: int = 0
    _shared: Any = None  # the child's running count of answers, read by answered()
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        if self.own_process:
            with self._in_child():
                yield self
            return
        with self._threads():
            yield self

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        target = self._open_loop if self.open_loop else self._worker
        count = 1 if self.open_loop else self.workers
        threads = [
            threading.Thread(target=target, daemon=True, name=f"load-{i}") for i in range(count)
        ]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            self._stop.set()
            deadline = time.monotonic() + self.timeout + 5  # one wait for them all
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    @contextlib.contextmanager
    def _in_child(self) -> Iterator[None]:
        context = multiprocessing.get_context("fork")
        # Two pipes: a message on `stop` tells the child to stop (a
        # multiprocessing.Event would hang set() on a child that died waiting on
        # it; an EOF would never come while a load forked later holds a copy of
        # this end), and the samples come back on the other.
        stop_end, stop = context.Pipe(duplex=False)
        receiver, sender = context.Pipe(duplex=False)
        self._shared = context.Value("q", self._answered, lock=False)
        child = context.Process(
            target=self._child,
            args=(os.getpid(), stop_end, sender, (stop, receiver)),
            name="load",
            daemon=True,
        )
        try:
            child.start()
        except BaseException:
            self._shared = None
            stop.close()
            receiver.close()
            raise
        finally:
            stop_end.close()
            sender.close()
        taken: list[tuple[Any, ...]] | None = None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # BrokenPipeError: the child is gone
                stop.send(None)
            stop.close()
            with contextlib.suppress(EOFError, OSError):
                # The child's threads have timeout + 5 s to end, then it sends.
                if receiver.poll(self.timeout + 15):
                    taken = receiver.recv()
            receiver.close()
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
            with self._lock:
                self.samples.extend(Sample(*fields) for fields in taken or [])
                self._answered = sum(s.kind == OK for s in self.samples)
                self._shared = None
        if taken is None:
            raise LoadLost(
                f"the load process (pid {child.pid}) ended with exit code {child.exitcode} "
                "without handing back its samples",
                "see its output above; this load's figures would be empty",
            )

    def _child(
        self, parent: int, stop: Connection, sender: Connection, parents: tuple[Connection, ...]
    ) -> None:  # pragma: no cover - runs in the child
        # The parent stops the load; a Ctrl-C is the parent's to handle. SIGTERM
        # kills at once (not the parent's handler: the bench's raises SystemExit,
        # which would wait for the threads). The load dies with the thread that
        # started it (PR_SET_PDEATHSIG): call running() from a long-lived thread.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for end in parents:
            end.close()  # the parent's ends of the two pipes
        if not die_with_parent():
            os._exit(1)
        if os.getppid() != parent:
            os._exit(1)  # the parent died before prctl: nobody to hand the samples to
        first = len(self.samples)  # a Load run before: only this run's go back
        deadline = time.monotonic() + self.max_seconds
        _settle_heap()  # what it was forked with (the caller's heap), before any request
        with self._threads():
            # Until the parent says stop; meanwhile what the load made (its samples, its
            # threads) is settled every FREEZE_EVERY seconds.
            while not stop.poll(FREEZE_EVERY) and time.monotonic() < deadline:
                _settle_heap()
        sender.send([astuple(s) for s in self.samples[first:]])
        sender.close()

    def taken(self) -> list[Sample]:
        """The samples so far (a copy); with own_process, none until running() ends."""
        with self._lock:
            return list(self.samples)

    def answered(self) -> int:
        """How many requests were answered so far: a count kept as they come, for a
        controller that polls it while the load runs (stats() sorts every sample,
        holding the GIL that the load's threads need to time their answers). With
        own_process, the child's count until running() ends."""
        if self._shared is not None:
            return int(self._shared.value)
        return self._answered

    def stats(self, since: float = 0.0) -> Stats:
        """The figures of the samples so far (see taken())."""
        with self._lock:
            return summarize([s for s in self.samples if s.sent >= since])

    def _client(self) -> Client:
        # No proxy, whatever the environment says: traffic goes only to url().
        return Client(keep_alive=self.keep_alive, timeout=self.timeout)

    def _record(self, client: Client) -> None:
        sample = self._one(client)
        with self._lock:
            self.samples.append(sample)
            self._answered += sample.kind == OK
            if self._shared is not None:
                self._shared.value = self._answered  # one writer: this child

    def _worker(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with self._client() as client:
            for _ in range(self.max_requests // max(1, self.workers)):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                begun = time.monotonic()
                self._record(client)
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - begun)))

    def _open_loop(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        senders: list[threading.Thread] = []
        for _ in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            # A client per request: each is one connection, never shared between threads.
            sender = threading.Thread(target=self._send_one, daemon=True)
            sender.start()
            senders = [s for s in senders if s.is_alive()]  # a minute made thousands
            senders.append(sender)
            self._stop.wait(self.interval)
        for sender in senders:
            sender.join(self.timeout + 5)

    def _send_one(self) -> None:
        with self._client() as client:
            self._record(client)

    def _one(self, client: Client) -> Sample:
        try:
            url = self.url()  # the route check, outside the timed part
        except ScaleboxError as exc:
            return Sample(time.time(), 0.0, classify(exc))
        sent, start = time.time(), time.monotonic()
        try:
            status, body = client.get(url)
        except Exception as exc:  # noqa: BLE001 - each failure is a sample, never a dead worker
            return Sample(sent, time.monotonic() - start, classify(exc))
        seconds = time.monotonic() - start
        if status != 200:
            return Sample(sent, seconds, f"HTTP {status}")
        try:
            version = str(json.loads(body).get("version", ""))
        except (ValueError, AttributeError):
            return Sample(sent, seconds, "answer is not the /health JSON")
        return Sample(sent, seconds, OK, version)
