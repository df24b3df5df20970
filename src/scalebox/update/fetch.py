"""Get a release tarball's bytes onto disk, safely: the updater's one HTTP door.

``make_client`` builds the one ``httpx.Client`` the updater uses (timeouts,
User-Agent, the GitHub token only for the API's own origin, plain http refused
even after a redirect). ``fetch`` streams a URL into ``dest.part`` and renames
it to ``dest`` only when every byte arrived: it resumes a partial file with a
Range request, retries connection errors, 5xx answers and cut-off transfers
with exponential backoff, never retries a 4xx, and refuses anything larger than
``max_bytes``. file:// URLs and plain paths are copied under the same cap.

Nothing here trusts the bytes: the caller verifies signature and hashes next.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol, cast

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

import scalebox
from scalebox.errors import ScaleboxError
from scalebox.fsutil import flush_durable, fsync_dir, fsync_file
from scalebox.retry import backoff_delays
from scalebox.update import local
from scalebox.update.limits import DeadlinePassed, Limits, Pace, deadline
from scalebox.update.paths import private_dir

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 512 * MiB
DEFAULT_API_BASE = "https://api.github.com"
# connect: a dead host fails fast; read: the longest silence we accept mid-transfer.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_COPY_CHUNK = MiB
_MAX_ATTEMPTS = 64

ALLOW_HTTP_HINT = (
    "use an https URL, or set SCALEBOX_ALLOW_HTTP=1 (or pass --allow-http) "
    "if you trust every network hop to the server"
)


class FetchError(ScaleboxError):
    """A release could not be downloaded or copied; nothing was changed."""


class PlainHttpRefused(FetchError):
    """A request (possibly a redirect) would go over unencrypted http."""


def user_agent() -> str:
    return f"scalebox-update/{scalebox.__version__}"


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, url.port or default)


def make_client(
    token: str | None = None,
    *,
    api_base: str = DEFAULT_API_BASE,
    allow_http: bool = False,
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
) -> httpx.Client:
    """The updater's HTTP client.

    ``token`` (GITHUB_TOKEN) is sent only to ``api_base``'s origin (scheme,
    host, port); an Authorization header is removed from every request, or
    redirect, to any other origin, so asset hosts never see a token. With
    ``allow_http`` false every request, including a redirect target, must be
    https.
    """
    api_origin = _origin(httpx.URL(api_base))

    def on_request(request: httpx.Request) -> None:
        if request.url.scheme == "http" and not allow_http:
            raise PlainHttpRefused(
                f"refusing to fetch {request.url} over plain http", ALLOW_HTTP_HINT
            )
        if _origin(request.url) != api_origin:
            request.headers.pop("Authorization", None)
        elif token:
            request.headers["Authorization"] = f"Bearer {token}"

    return httpx.Client(
        timeout=timeout,
        follow_redirects=True,
        headers={"User-Agent": user_agent()},
        event_hooks={"request": [on_request]},
    )


class _Progress(Protocol):
    def start(self, total: int | None, done: int) -> None: ...
    def advance(self, n: int) -> None: ...


class _NoProgress:
    def start(self, total: int | None, done: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


class _LosableStderr(io.TextIOBase):
    """sys.stderr for the progress bar: a terminal that is gone loses the bar, nothing else.

    rich writes the bar's last frame as it stops; on a terminal that hung up that
    write failed with EIO, after the download was complete, and the OSError was
    taken for the disk's ("cannot write the download ... free disk space").
    """

    def __init__(self) -> None:
        super().__init__()
        # Taken now: while the bar runs, rich puts a proxy of its own in sys.stderr.
        self._stream = sys.stderr

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream.fileno()


@contextlib.contextmanager
def _progress_bar(name: str, show: bool) -> Iterator[_Progress]:
    if not show:
        yield _NoProgress()
        return
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=cast("IO[str]", _LosableStderr())),  # TextIOBase: an IO[str]
        transient=False,
    )
    task = bar.add_task(name, total=None)

    class _Rich:
        def start(self, total: int | None, done: int) -> None:
            bar.update(task, total=total, completed=done)

        def advance(self, n: int) -> None:
            bar.advance(task, n)

    with bar:
        yield _Rich()


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, total: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.total = total


# What another attempt may fix. Not UnsupportedProtocol, LocalProtocolError and
# the like (also TransportErrors): those are a bad URL or a bug, not a bad link.
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _too_big(url: str, size: int, max_bytes: int) -> FetchError:
    return FetchError(
        f"{url} is larger than the {max_bytes // MiB} MiB limit ({size} bytes or more); refused",
        "a Scalebox release is far smaller: check the URL; the limit protects the disk",
    )


def _validator_path(part: Path) -> Path:
    """Beside a partial download: the ETag or Last-Modified of the file it is part of."""
    return part.with_name(part.name + ".validator")


# What an If-Range header can carry back: printable ASCII, of a sane length.
_VALIDATOR = re.compile(r"[\x20-\x7e]{1,1024}")


def _remember_validator(resp: httpx.Response, part: Path) -> None:
    # If-Range takes a strong ETag or a Last-Modified date; a weak ETag ("W/...")
    # cannot promise byte-identical content, so it is not kept. Nor is one that
    # could not be sent back (httpx would fail to encode it on every resume).
    etag = resp.headers.get("ETag", "")
    validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
    sidecar = _validator_path(part)
    if validator and _VALIDATOR.fullmatch(validator):
        with _private_file(sidecar, "wb") as f:
            f.write(validator.encode())
    else:
        sidecar.unlink(missing_ok=True)


def _kept_validator(part: Path) -> str | None:
    """The validator kept beside ``part``, if there is one that can be sent."""
    try:
        text = _validator_path(part).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _VALIDATOR.fullmatch(text) else None


def _private_file(path: Path, mode: str) -> IO[bytes]:
    """Open a download file root-only (0600), whatever the umask; never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if mode == "ab" else os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)


def _finish(part: Path, dest: Path) -> Path:
    fsync_file(part)
    part.replace(dest)
    _validator_path(part).unlink(missing_ok=True)
    fsync_dir(dest.parent)
    return dest


def _local_source(url: str) -> Path | None:
    """The file a file:// URL or a plain path names; None for a network URL."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise FetchError(
                f"{url} names a file on another host ({parsed.netloc})",
                "use file:///path for a file on this server, or an https URL",
            )
        return Path(urllib.request.url2pathname(parsed.path))
    if "://" not in url:
        return Path(url)
    return None


def _copy_local(src: Path, dest: Path, max_bytes: int) -> Path:
    part = _part_path(dest)
    try:
        with local.open_regular(src) as inp:
            size = os.fstat(inp.fileno()).st_size
            if size > max_bytes:
                raise _too_big(str(src), size, max_bytes)
            copied = 0
            with _private_file(part, "wb") as out:
                # The file may still be growing: the cap applies to what is read.
                while chunk := inp.read(_COPY_CHUNK):
                    copied += len(chunk)
                    if copied > max_bytes:
                        raise _too_big(str(src), copied, max_bytes)
                    out.write(chunk)
    except local.NotARegularFile as exc:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"release file {src} {exc}; nothing was changed",
            "point SCALEBOX_RELEASE_URL at the scalebox-<version>-<arch>.tar.gz file itself "
            "(an https URL, file:///path or a path)",
        ) from None
    except FetchError:
        part.unlink(missing_ok=True)
        raise
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"cannot copy {src} to {dest}: {exc.strerror or exc}",
            "check that the file is readable and the disk has room, then run again",
        ) from exc
    return _finish(part, dest)


# ASCII digits, at most 18 (an exabyte): header values come from outside.
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)")
_LENGTH = re.compile(r"[0-9]{1,18}")


def _where_body_goes(
    resp: httpx.Response, url: str, part: Path, have: int, max_bytes: int
) -> tuple[int, int | None] | None:
    """From the answer's status: (offset the body starts at, total size), or None
    when the partial file is already the whole file.

    Raises _Retryable for what another attempt may fix, FetchError for what it won't.
    """
    status = resp.status_code
    if status == 416:
        # Range not satisfiable: either the partial file is already whole,
        # or it is not a prefix of this file at all.
        whole = re.fullmatch(r"bytes \*/([0-9]{1,18})", resp.headers.get("Content-Range", ""))
        if whole and int(whole[1]) == have:
            return None
        part.unlink(missing_ok=True)
        raise _Retryable(f"the server would not resume at byte {have}; starting over")
    if status >= 500:
        raise _Retryable(f"the server answered {status} {resp.reason_phrase}")
    if status >= 400:
        raise _client_error(url, status, resp.reason_phrase)
    if status == 206:
        resumed = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
        if resumed is None or int(resumed[1]) != have:
            part.unlink(missing_ok=True)
            raise _Retryable("the server resumed at the wrong byte; starting over")
        start, total = have, None if resumed[3] == "*" else int(resumed[3])
    elif status == 200:
        # The server ignored Range (or there was none): start from zero.
        length = resp.headers.get("Content-Length", "")
        start, total = 0, int(length) if _LENGTH.fullmatch(length) else None
    else:
        raise FetchError(
            f"{url} answered {status} {resp.reason_phrase} instead of the file",
            "check the URL; it should lead to the release tarball itself",
        )
    if total is not None and total > max_bytes:
        part.unlink(missing_ok=True)
        raise _too_big(url, total, max_bytes)
    return start, total


def _too_slow(url: str, reason: str, pace: Pace) -> FetchError:
    return FetchError(
        f"download of {url} refused: {reason}; nothing was changed", pace.limits.hint()
    )


def _http_attempt(  # noqa: PLR0917 - one caller, _retrying_download
    url: str, part: Path, client: httpx.Client, max_bytes: int, bar: _Progress, pace: Pace
) -> None:
    """One GET into ``part``, resuming it if it exists; complete when it returns."""
    have = part.stat().st_size if part.exists() else 0
    if have > max_bytes:
        part.unlink()
        have = 0
    # identity: Content-Length and Range then count the very bytes we store.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = _kept_validator(part)
        if validator is not None:
            # The server sends the whole file instead if it changed since the part began.
            headers["If-Range"] = validator
    with client.stream("GET", url, headers=headers) as resp:
        plan = _where_body_goes(resp, url, part, have, max_bytes)
        if plan is None:
            return
        got, total = plan
        if got == 0:
            _remember_validator(resp, part)
        bar.start(total, got)
        pace.restart_window()
        with _private_file(part, "ab" if got else "wb") as out:
            try:
                # Unsized: chunks as they arrive, so a cut keeps every byte received.
                # Raw: a Content-Encoding sent anyway is not undone; a gzip answer would
                # inflate a thousandfold in memory, and Range counts the bytes sent.
                for chunk in resp.iter_raw():
                    if (slow := pace.received(len(chunk))) is not None:
                        _flush(out)
                        raise _too_slow(url, slow, pace)
                    got += len(chunk)
                    if got > max_bytes:
                        out.close()
                        part.unlink(missing_ok=True)
                        raise _too_big(url, got, max_bytes)
                    out.write(chunk)
                    bar.advance(len(chunk))
            except TRANSIENT_ERRORS as exc:
                _flush(out)
                raise _Retryable(_describe(exc, got, total), total) from exc
        if total is not None and got < total:
            raise _Retryable(f"the connection ended at {got} of {total} bytes", total)


def _flush(out: IO[bytes]) -> None:
    # Keep what did arrive: the next attempt resumes after it.
    flush_durable(out)


def _client_error(url: str, status: int, reason: str) -> FetchError:
    if status == 404:
        return FetchError(
            f"{url} does not exist (404)",
            "check the release URL or version; `scalebox-update --check` shows what is available",
        )
    if status in (401, 403):
        return FetchError(
            f"{url} refused access ({status} {reason})",
            "check that the release is public, or that GITHUB_TOKEN may read it",
        )
    return FetchError(f"{url} answered {status} {reason}", "check the release URL, then run again")


def _describe(exc: httpx.HTTPError, got: int, total: int | None) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connecting timed out"
    if isinstance(exc, httpx.TimeoutException):
        return "the server stopped sending (read timed out)"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})"
    if total is not None and got < total:
        return f"the connection was cut at {got} of {total} bytes"
    return f"{type(exc).__name__}: {exc}"


def certificate_problem(exc: BaseException, url: str) -> FetchError | None:
    """A FetchError when ``exc`` comes from a TLS certificate that did not verify, else None.

    Retrying cannot fix an untrusted certificate, and "check the network" would
    send the operator the wrong way.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            host = urllib.parse.urlsplit(url).netloc
            return FetchError(
                f"the TLS certificate of {host} is not trusted: "
                f"{cause.verify_message or cause.reason}; nothing was changed",
                "if that server is yours, set SSL_CERT_FILE to a CA bundle that includes "
                "its issuer and run scalebox-update again",
            )
        cause = cause.__cause__ or cause.__context__
    return None


def _retrying_download(
    url: str,
    dest: Path,
    client: httpx.Client,
    *,
    max_bytes: int,
    retries: int,
    show: bool,
    sleep: Callable[[float], None],
    pace: Pace,
) -> Path:
    part = _part_path(dest)
    delays = backoff_delays(retries)
    failures = 0
    attempts = 0
    reason = ""
    total: int | None = None
    with _progress_bar(dest.name, show) as bar:
        while True:
            if (late := pace.over_time()) is not None:
                raise _too_slow(url, late, pace)
            attempts += 1
            before = part.stat().st_size if part.exists() else 0
            try:
                _http_attempt(url, part, client, max_bytes, bar, pace)
            except _Retryable as retry:
                reason = retry.reason
                total = retry.total if retry.total is not None else total
            except TRANSIENT_ERRORS as exc:
                if (problem := certificate_problem(exc, url)) is not None:
                    raise problem from exc
                reason = _describe(exc, 0, None)
            else:
                return _finish(part, dest)
            # An attempt that added bytes to the partial file costs no retry, so a
            # link that drops every few MB still finishes; _MAX_ATTEMPTS stops a
            # server that dribbles a few bytes per connection.
            after = part.stat().st_size if part.exists() else 0
            if after > before and attempts < _MAX_ATTEMPTS:
                continue
            failures += 1
            if failures > retries:
                break
            sleep(delays[failures - 1])

    have = part.stat().st_size if part.exists() else 0
    if have:
        of_total = f" of {total}" if total is not None else ""
        raise FetchError(
            f"download of {url} stopped at {have}{of_total} bytes "
            f"after {attempts} attempts ({reason})",
            "the partial download is kept; run scalebox-update again to resume",
        )
    raise FetchError(
        f"could not download {url} after {attempts} attempts: {reason}",
        "check the network and the URL, then run scalebox-update again",
    )


def fetch(
    candidate_url: str,
    dest: Path,
    client: httpx.Client,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    retries: int = 4,
    progress: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
    limits: Limits | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Put the bytes at ``candidate_url`` into ``dest`` and return ``dest``.

    ``candidate_url`` is an http(s) URL, a file:// URL or a plain path.
    ``dest`` appears only once complete (written as ``dest.part``, renamed); a
    ``dest.part`` left by an interrupted run is resumed. ``progress`` None shows
    a progress bar only when stderr is a terminal. ``limits`` (None: from the
    environment, limits.py) bound the time the whole download may take and
    its transfer rate. ``dest``'s directory is made root-only (0700) and every
    file in it 0600: the bytes are untrusted until verified. Raises FetchError.
    """
    source = _local_source(candidate_url)
    show = sys.stderr.isatty() if progress is None else progress
    pace = Pace(limits if limits is not None else Limits.from_env(os.environ), clock)
    try:
        private_dir(dest.parent)
        if source is not None:
            return _copy_local(source, dest, max_bytes)
        # Pace checks the total between chunks; this also ends a read blocked on a drip.
        with deadline(pace.limits.total):
            return _retrying_download(
                candidate_url,
                dest,
                client,
                max_bytes=max_bytes,
                retries=retries,
                show=show,
                sleep=sleep,
                pace=pace,
            )
    except DeadlinePassed:
        raise _too_slow(candidate_url, pace.overdue(), pace) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise FetchError(
            f"could not download {candidate_url}: {exc}",
            "check the URL, then run scalebox-update again",
        ) from exc
    except OSError as exc:
        raise FetchError(
            f"cannot write the download to {dest}: {exc.strerror or exc}",
            f"free disk space or fix permissions in {dest.parent}, then run again to resume",
        ) from exc
