"""fetch: streamed, capped, resumable downloads over real loopback HTTP."""

from __future__ import annotations

import contextlib
import gzip
import os
import pty
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

import scalebox
from scalebox.errors import UsageError
from scalebox.update import fetch as fetch_module
from scalebox.update.fetch import (
    FetchError,
    PlainHttpRefused,
    fetch,
    make_client,
)
from scalebox.update.limits import Limits
from tests.tls import make_tls
from tests.unit.loopback_http import (
    Server,
    send_body,
    send_range,
    serve,
    unused_port,
)

BODY = os.urandom(300_000)
HALF = 100_000


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as srv:
        yield srv


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with make_client(allow_http=True, timeout=httpx.Timeout(2.0, connect=2.0)) as c:
        yield c


class Sleeps(list[float]):
    """Records the backoff pauses instead of sleeping them, so retry tests run fast."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_downloads_the_whole_file_and_leaves_no_part(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_body(req, BODY)
    dest = tmp_path / "dl" / "a.tar.gz"
    assert fetch(server.url("/a.tar.gz"), dest, client, progress=False) == dest
    assert dest.read_bytes() == BODY
    assert not (tmp_path / "dl" / "a.tar.gz.part").exists()
    sent = server.requests_to("/a.tar.gz")[0].headers
    assert sent["user-agent"] == f"scalebox-update/{scalebox.__version__}"
    assert "range" not in sent
    assert "authorization" not in sent


def test_a_cut_connection_is_resumed_with_range(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    calls: list[int] = []

    def flaky(req: BaseHTTPRequestHandler) -> None:
        calls.append(1)
        send_range(req, BODY, cut_after=HALF if len(calls) == 1 else None)

    server.routes["/a.tar.gz"] = flaky
    sleeps = Sleeps()
    dest = tmp_path / "a.tar.gz"
    fetch(server.url("/a.tar.gz"), dest, client, progress=False, sleep=sleeps)
    assert dest.read_bytes() == BODY
    ranges = [s.headers.get("range") for s in server.requests_to("/a.tar.gz")]
    assert ranges == [None, f"bytes={HALF}-"]
    assert sleeps == []  # the cut attempt made progress: resume at once


def test_a_part_left_by_an_earlier_run_is_resumed(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_range(req, BODY)
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(BODY[:HALF])
    fetch(server.url("/a.tar.gz"), dest, client, progress=False)
    assert dest.read_bytes() == BODY
    assert [s.headers.get("range") for s in server.seen] == [f"bytes={HALF}-"]


def test_a_file_that_changed_since_the_part_began_is_fetched_whole(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    """If-Range: a part of the old file is never glued to the rest of a new one."""
    old, new = BODY, os.urandom(len(BODY))
    server.routes["/a.tar.gz"] = lambda req: send_body(
        req, old, cut_after=HALF, headers={"ETag": '"v1"'}
    )
    dest = tmp_path / "a.tar.gz"
    with pytest.raises(FetchError):
        fetch(server.url("/a.tar.gz"), dest, client, retries=0, progress=False)
    assert (tmp_path / "a.tar.gz.part").read_bytes() == old[:HALF]

    server.routes["/a.tar.gz"] = lambda req: send_range(req, new, etag='"v2"')
    fetch(server.url("/a.tar.gz"), dest, client, progress=False)
    assert dest.read_bytes() == new
    last = server.seen[-1].headers
    assert (last.get("range"), last.get("if-range")) == (f"bytes={HALF}-", '"v1"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz"]  # no part, no validator


def test_a_resume_of_the_same_file_sends_its_validator(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    calls: list[int] = []

    def cut_once(req: BaseHTTPRequestHandler) -> None:
        calls.append(1)
        send_range(req, BODY, cut_after=HALF if len(calls) == 1 else None, etag='"v1"')

    server.routes["/a.tar.gz"] = cut_once
    dest = tmp_path / "a.tar.gz"
    fetch(server.url("/a.tar.gz"), dest, client, progress=False)
    assert dest.read_bytes() == BODY
    assert server.seen[-1].headers.get("if-range") == '"v1"'
    assert server.seen[-1].headers.get("range") == f"bytes={HALF}-"


@pytest.mark.parametrize("etag", ['"v\xe9"', '"' + "v" * 2000 + '"'], ids=["latin-1", "2000-chars"])
def test_an_etag_that_cannot_be_sent_back_is_not_kept(
    server: Server, client: httpx.Client, tmp_path: Path, etag: str
) -> None:
    """An ETag with a non-ASCII byte, kept for If-Range, made every later run end in a
    UnicodeEncodeError traceback, for as long as the partial download was kept. The
    resume then goes without If-Range (the signature still checks every byte)."""
    calls: list[int] = []

    def cut_once(req: BaseHTTPRequestHandler) -> None:
        calls.append(1)
        send_range(req, BODY, cut_after=HALF if len(calls) == 1 else None, etag=etag)

    server.routes["/a.tar.gz"] = cut_once
    dest = tmp_path / "a.tar.gz"
    fetch(server.url("/a.tar.gz"), dest, client, progress=False)
    assert dest.read_bytes() == BODY
    assert server.seen[-1].headers.get("range") == f"bytes={HALF}-"
    assert "if-range" not in server.seen[-1].headers


def test_a_server_that_ignores_range_restarts_from_zero(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_body(req, BODY)  # always 200, whole file
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(b"x" * HALF)
    fetch(server.url("/a.tar.gz"), dest, client, progress=False)
    assert dest.read_bytes() == BODY


def test_416_for_a_part_that_is_already_whole_finishes_it(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_range(req, BODY)
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(BODY)
    fetch(server.url("/a.tar.gz"), dest, client, progress=False)
    assert dest.read_bytes() == BODY
    assert len(server.seen) == 1


def test_416_for_a_part_longer_than_the_file_starts_over(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_range(req, BODY)
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(BODY + b"stale tail")
    fetch(server.url("/a.tar.gz"), dest, client, progress=False, sleep=Sleeps())
    assert dest.read_bytes() == BODY
    assert [s.headers.get("range") for s in server.seen] == [f"bytes={len(BODY) + 10}-", None]


def test_a_download_that_never_completes_says_where_it_stopped_and_keeps_the_part(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    # Ignores Range and always drops the line at HALF: no attempt can get further.
    server.routes["/a.tar.gz"] = lambda req: send_body(req, BODY, cut_after=HALF)
    sleeps = Sleeps()
    dest = tmp_path / "a.tar.gz"
    with pytest.raises(FetchError) as info:
        fetch(server.url("/a.tar.gz"), dest, client, retries=3, progress=False, sleep=sleeps)
    err = info.value
    assert f"stopped at {HALF} of {len(BODY)} bytes" in err.what
    assert server.url("/a.tar.gz") in err.what
    assert err.hint is not None
    assert "run scalebox-update again to resume" in err.hint
    assert not dest.exists()
    assert (tmp_path / "a.tar.gz.part").stat().st_size == HALF
    # The first attempt made progress (free); three more failed; the fourth failure ends it.
    assert len(server.seen) == 5
    assert len(sleeps) == 3

    # "Run again to resume": the next run continues from the kept part.
    server.routes["/a.tar.gz"] = lambda req: send_range(req, BODY)
    fetch(server.url("/a.tar.gz"), dest, client, progress=False)
    assert dest.read_bytes() == BODY
    assert server.seen[-1].headers.get("range") == f"bytes={HALF}-"


def test_a_server_dribbling_a_few_bytes_per_connection_is_given_up_on(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    """Progress makes a retry free, but not forever."""
    server.routes["/a.tar.gz"] = lambda req: send_range(req, BODY[:10_000], cut_after=10)
    sleeps = Sleeps()
    with pytest.raises(FetchError) as info:
        fetch(server.url("/a.tar.gz"), tmp_path / "a", client, progress=False, sleep=sleeps)
    assert "of 10000 bytes" in info.value.what
    assert len(server.seen) < 100
    assert len(sleeps) == 4


def test_a_500_is_retried_after_a_backoff_pause(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    calls: list[int] = []

    def fails_once(req: BaseHTTPRequestHandler) -> None:
        calls.append(1)
        if len(calls) == 1:
            send_body(req, b"oops", status=500)
        else:
            send_body(req, BODY)

    server.routes["/a.tar.gz"] = fails_once
    sleeps = Sleeps()
    dest = tmp_path / "a.tar.gz"
    fetch(server.url("/a.tar.gz"), dest, client, progress=False, sleep=sleeps)
    assert dest.read_bytes() == BODY
    assert len(calls) == 2
    assert len(sleeps) == 1
    assert 0.25 <= sleeps[0] <= 0.5


def test_a_server_that_keeps_failing_with_5xx_gives_up_after_the_retries(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_body(req, b"busy", status=503)
    sleeps = Sleeps()
    with pytest.raises(FetchError) as info:
        fetch(server.url("/a.tar.gz"), tmp_path / "a", client, retries=2, sleep=sleeps)
    assert "after 3 attempts" in info.value.what
    assert "503" in info.value.what
    assert len(sleeps) == 2
    assert sleeps[1] > sleeps[0] / 2  # pauses grow (within jitter)


@pytest.mark.parametrize(("status", "words"), [(404, "does not exist"), (403, "refused access")])
def test_a_4xx_is_never_retried(
    server: Server, client: httpx.Client, tmp_path: Path, status: int, words: str
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_body(req, b"no", status=status)
    sleeps = Sleeps()
    with pytest.raises(FetchError) as info:
        fetch(server.url("/a.tar.gz"), tmp_path / "a", client, sleep=sleeps)
    assert words in info.value.what
    assert str(status) in info.value.what
    assert info.value.hint
    assert len(server.seen) == 1
    assert sleeps == []


def test_a_too_large_content_length_is_refused_before_reading_the_body(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/big"] = lambda req: send_body(req, BODY)
    sleeps = Sleeps()
    with pytest.raises(FetchError) as info:
        fetch(server.url("/big"), tmp_path / "big", client, max_bytes=HALF, sleep=sleeps)
    assert "larger than" in info.value.what
    assert str(len(BODY)) in info.value.what
    assert len(server.seen) == 1
    assert sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_a_body_without_length_is_cut_off_at_the_cap(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    def endless(req: BaseHTTPRequestHandler) -> None:
        # HTTP/1.0 style: no Content-Length, the body ends when the connection does.
        req.send_response(200)
        req.end_headers()
        chunk = b"z" * 65536
        try:
            for _ in range(200):  # 12.5 MiB, far beyond the cap below
                req.wfile.write(chunk)
        except OSError:
            pass  # the client hung up: what we want

    server.routes["/endless"] = endless
    with pytest.raises(FetchError) as info:
        fetch(server.url("/endless"), tmp_path / "e", client, max_bytes=HALF, sleep=Sleeps())
    assert "larger than" in info.value.what
    assert len(server.seen) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_content_encoding_is_not_undone_the_bytes_sent_are_stored(
    server: Server, client: httpx.Client, tmp_path: Path, encoding: str
) -> None:
    """A server that encodes the tarball although identity was asked: a 1 MB answer of
    gzip(512 MiB) decoded by httpx cost 250 MB of memory (./do bench-hostile). What is
    stored is what was sent, counted against the cap, as Content-Length and Range count it."""
    zeros = bytes(64 * 1024 * 1024)
    inflating = gzip.compress(zeros, 9) if encoding == "gzip" else zlib.compress(zeros, 9)
    server.routes["/a.tar.gz"] = lambda req: send_body(
        req, inflating, headers={"Content-Encoding": encoding}
    )
    dest = tmp_path / "dl" / "a.tar.gz"
    fetch(server.url("/a.tar.gz"), dest, client, progress=False, max_bytes=HALF * 10)
    assert dest.read_bytes() == inflating


def test_a_stalled_server_times_out_and_is_retried(server: Server, tmp_path: Path) -> None:
    def stalls(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Length", str(len(BODY)))
        req.end_headers()
        req.wfile.write(BODY[:1000])
        req.wfile.flush()
        server.stopping.wait(10)

    server.routes["/slow"] = stalls
    sleeps = Sleeps()
    dest = tmp_path / "slow"
    with (
        make_client(allow_http=True, timeout=0.3) as client,
        pytest.raises(FetchError) as info,
    ):
        fetch(server.url("/slow"), dest, client, retries=1, progress=False, sleep=sleeps)
    assert "timed out" in info.value.what
    assert f"stopped at 1000 of {len(BODY)} bytes" in info.value.what
    assert len(sleeps) == 1


def test_an_unreachable_server_is_retried_then_reported(
    client: httpx.Client, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{unused_port()}/a.tar.gz"
    sleeps = Sleeps()
    with pytest.raises(FetchError) as info:
        fetch(url, tmp_path / "a", client, retries=2, sleep=sleeps)
    assert f"could not download {url} after 3 attempts" in info.value.what
    assert "cannot connect" in info.value.what
    assert info.value.hint is not None
    assert "run scalebox-update again" in info.value.hint
    assert len(sleeps) == 2
    assert list(tmp_path.iterdir()) == []


def test_an_untrusted_certificate_is_named_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real TLS on loopback: a certificate from an unknown CA fails at once, saying so."""
    make_tls(tmp_path / "tls")
    with serve(tls=tmp_path / "tls") as server:
        server.routes["/a"] = lambda req: send_body(req, BODY)
        sleeps = Sleeps()
        with make_client() as strict, pytest.raises(FetchError) as info:
            fetch(server.url("/a"), tmp_path / "a", strict, progress=False, sleep=sleeps)
        assert "TLS certificate of 127.0.0.1" in info.value.what
        assert "not trusted" in info.value.what
        assert info.value.hint is not None
        assert "SSL_CERT_FILE" in info.value.hint
        assert sleeps == []  # retrying cannot fix a certificate
        # The same server, its CA trusted the way an operator would: the download works.
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "tls" / "ca.pem"))
        with make_client() as trusting:
            got = fetch(server.url("/a"), tmp_path / "a", trusting, progress=False)
        assert got.read_bytes() == BODY


def test_plain_http_is_refused_unless_allowed(server: Server, tmp_path: Path) -> None:
    server.routes["/a"] = lambda req: send_body(req, BODY)
    with make_client() as strict, pytest.raises(PlainHttpRefused) as info:
        fetch(server.url("/a"), tmp_path / "a", strict)
    assert "plain http" in info.value.what
    assert info.value.hint is not None
    assert "SCALEBOX_ALLOW_HTTP=1" in info.value.hint
    assert server.seen == []  # refused before a single byte went out


def test_the_token_goes_to_the_api_origin_only_even_across_redirects(tmp_path: Path) -> None:
    with serve() as api, serve() as assets:
        assets.routes["/a.tar.gz"] = lambda req: send_body(req, BODY)
        api.routes["/download/a.tar.gz"] = lambda req: send_body(
            req, b"", status=302, headers={"Location": assets.url("/a.tar.gz")}
        )
        with make_client("s3cret", api_base=api.base, allow_http=True) as client:
            client.get(api.url("/ping"))
            fetch(api.url("/download/a.tar.gz"), tmp_path / "a", client, progress=False)
            # Even a header set by hand is stripped on the way to another origin.
            client.get(assets.url("/a.tar.gz"), headers={"Authorization": "Bearer s3cret"})
    assert (tmp_path / "a").read_bytes() == BODY
    assert {s.headers.get("authorization") for s in api.seen} == {"Bearer s3cret"}
    assert len(assets.seen) == 2
    assert all("authorization" not in s.headers for s in assets.seen)


def test_progress_on_demand_reports_the_file(
    server: Server, client: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_body(req, BODY)
    fetch(server.url("/a.tar.gz"), tmp_path / "scalebox-9.9.9-x.tar.gz", client, progress=True)
    err = capsys.readouterr().err
    assert "scalebox-9.9.9-x.tar.gz" in err
    assert (tmp_path / "scalebox-9.9.9-x.tar.gz").read_bytes() == BODY


def test_progress_is_off_when_stderr_is_not_a_terminal(
    server: Server, client: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_body(req, BODY)
    fetch(server.url("/a.tar.gz"), tmp_path / "quiet.tar.gz", client)
    assert capsys.readouterr().err == ""


def test_file_urls_and_paths_are_copied(client: httpx.Client, tmp_path: Path) -> None:
    src = tmp_path / "src dir" / "scalebox-1.0-x.tar.gz"
    src.parent.mkdir()
    src.write_bytes(BODY)
    by_path = fetch(str(src), tmp_path / "out" / "p.tar.gz", client)
    by_url = fetch(src.as_uri(), tmp_path / "out" / "u.tar.gz", client)
    assert by_path.read_bytes() == BODY
    assert by_url.read_bytes() == BODY
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.tar.gz", "u.tar.gz"]


def test_a_local_file_over_the_cap_is_refused(client: httpx.Client, tmp_path: Path) -> None:
    src = tmp_path / "big.tar.gz"
    src.write_bytes(BODY)
    with pytest.raises(FetchError) as info:
        fetch(str(src), tmp_path / "out" / "big.tar.gz", client, max_bytes=HALF)
    assert "larger than" in info.value.what
    assert list((tmp_path / "out").iterdir()) == []


def test_a_missing_local_file_says_which(client: httpx.Client, tmp_path: Path) -> None:
    missing = tmp_path / "nope.tar.gz"
    with pytest.raises(FetchError) as info:
        fetch(missing.as_uri(), tmp_path / "out" / "x", client)
    assert str(missing) in info.value.what
    assert "does not exist" in info.value.what
    assert info.value.hint is not None
    assert "SCALEBOX_RELEASE_URL" in info.value.hint


# --- deadlines: a server that drips bytes ---------------------------------------------


def drip(req: BaseHTTPRequestHandler, stop: threading.Event, every: float = 0.2) -> None:
    """200 with the full Content-Length, then one byte every ``every`` seconds."""
    req.send_response(200)
    req.send_header("Content-Length", str(len(BODY)))
    req.end_headers()
    for byte in BODY:
        if stop.wait(every):
            return
        try:
            req.wfile.write(bytes([byte]))
            req.wfile.flush()
        except OSError:
            return


def test_a_dripping_server_is_refused_below_the_minimum_rate(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/a.tar.gz"] = lambda req: drip(req, server.stopping)
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(
            server.url("/a.tar.gz"),
            tmp_path / "dl" / "a.tar.gz",
            client,
            progress=False,
            limits=Limits(total=60, min_rate=1000, window=1.5),
        )
    assert time.monotonic() - started < 10
    assert "below the minimum of 1000 bytes/s" in info.value.what
    assert "nothing was changed" in info.value.what
    assert "SCALEBOX_DOWNLOAD_MIN_RATE" in str(info.value.hint)
    assert not (tmp_path / "dl" / "a.tar.gz").exists()


def test_the_total_time_limit_covers_every_attempt(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    """Fast enough per window, but never done: the total limit ends it."""
    server.routes["/a.tar.gz"] = lambda req: drip(req, server.stopping, every=0.01)
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"took more than 2 s \(SCALEBOX_DOWNLOAD_TIMEOUT\)"):
        fetch(
            server.url("/a.tar.gz"),
            tmp_path / "a.tar.gz",
            client,
            progress=False,
            limits=Limits(total=2, min_rate=10, window=1),
        )
    assert time.monotonic() - started < 6


def drip_headers(req: BaseHTTPRequestHandler, stop: threading.Event, every: float = 0.2) -> None:
    """A status line, then one byte of an endless header every ``every`` seconds: no read
    ever times out and no body byte ever arrives (h11 accepts 100 KB of header: days)."""
    req.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
    while not stop.wait(every):
        try:
            req.wfile.write(b"a")
            req.wfile.flush()
        except OSError:
            return


def test_the_total_time_limit_covers_a_server_that_drips_its_headers(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/a.tar.gz"] = lambda req: drip_headers(req, server.stopping)
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"took more than 2 s \(SCALEBOX_DOWNLOAD_TIMEOUT\)"):
        fetch(
            server.url("/a.tar.gz"),
            tmp_path / "dl" / "a.tar.gz",
            client,
            progress=False,
            limits=Limits(total=2, min_rate=10, window=1),
        )
    assert time.monotonic() - started < 6
    assert not (tmp_path / "dl" / "a.tar.gz").exists()


def test_limits_from_the_environment() -> None:
    assert Limits.from_env({}) == Limits()
    env = {"SCALEBOX_DOWNLOAD_TIMEOUT": "90", "SCALEBOX_DOWNLOAD_MIN_RATE": "0"}
    assert Limits.from_env(env) == Limits(total=90, min_rate=0)
    for bad in ("soon", "-1", "nan", "inf", "9" * 5000):
        with pytest.raises(UsageError, match="SCALEBOX_DOWNLOAD_TIMEOUT"):
            Limits.from_env({"SCALEBOX_DOWNLOAD_TIMEOUT": bad})


# --- root-only download area, whatever the umask ----------------------------------------


def test_downloads_are_root_only_even_with_umask_000(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    server.routes["/a.tar.gz"] = lambda req: send_body(req, BODY, cut_after=HALF)
    dest = tmp_path / "downloads" / "a.tar.gz"
    old = os.umask(0)
    try:
        with pytest.raises(FetchError):
            fetch(server.url("/a.tar.gz"), dest, client, progress=False, retries=0)
        src = tmp_path / "local.tar.gz"
        src.write_bytes(BODY)
        fetch(str(src), tmp_path / "downloads" / "b.tar.gz", client, progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "downloads").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "downloads" / "a.tar.gz.part").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "downloads" / "b.tar.gz").stat().st_mode & 0o777 == 0o600


def test_an_existing_open_download_area_is_made_root_only(
    client: httpx.Client, tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir(mode=0o777)
    downloads.chmod(0o777)
    src = tmp_path / "local.tar.gz"
    src.write_bytes(BODY)
    fetch(str(src), downloads / "b.tar.gz", client, progress=False)
    assert downloads.stat().st_mode & 0o777 == 0o700


def test_a_fifo_is_refused_without_blocking(client: httpx.Client, tmp_path: Path) -> None:
    fifo = tmp_path / "release.tar.gz"
    os.mkfifo(fifo)
    with pytest.raises(FetchError, match=r"is a FIFO \(named pipe\), not a release file"):
        fetch(str(fifo), tmp_path / "dl" / "a.tar.gz", client, progress=False)


def test_a_terminal_that_hangs_up_under_the_progress_bar_loses_the_bar_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rich writes the bar's last frame as it stops: on a terminal that had hung up
    that raised EIO after the download was complete, and it was reported as the
    disk's fault ("cannot write the download ... free disk space")."""
    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w", buffering=1)

    def read_the_terminal() -> None:  # as a terminal does, until it is gone
        with contextlib.suppress(OSError):
            while os.read(master, 4096):
                pass

    reader = threading.Thread(target=read_the_terminal, daemon=True)
    reader.start()
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        with fetch_module._progress_bar("scalebox-1.0.0-x86_64.tar.gz", True) as bar:
            bar.start(100, 0)
            bar.advance(50)
            time.sleep(0.3)  # a frame or two drawn
            os.close(master)  # the SSH session drops
            time.sleep(0.3)
            bar.advance(50)
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            terminal.close()
        reader.join(5)
    assert not reader.is_alive()
