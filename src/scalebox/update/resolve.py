"""Where the release to install comes from.

In order: ``SCALEBOX_RELEASE_URL`` (an https URL, a file:// URL or a local
path), then ``--to VERSION`` (the GitHub release tagged vVERSION or VERSION),
else the latest GitHub release of the configured repository. From a GitHub
release we take the asset built for this machine's arch.

Nothing here changes the system: every failure is a ResolveError that says
what went wrong and what to do, raised before any download starts.
"""

from __future__ import annotations

import json
import platform
import re
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from scalebox.errors import ScaleboxError
from scalebox.retry import backoff_delays
from scalebox.update import local, versions
from scalebox.update.fetch import (
    ALLOW_HTTP_HINT,
    DEFAULT_API_BASE,
    DEFAULT_TIMEOUT,
    TRANSIENT_ERRORS,
    FetchError,
    certificate_problem,
    make_client,
)
from scalebox.update.limits import API_TOTAL, DeadlinePassed, Limits, Pace, deadline

DEFAULT_REPO = "The-Agentic-Journey/Scalebox"
_REPO_NAME = re.compile(r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+")
_ASSET_NAME = re.compile(r"scalebox-(?P<version>.+)-(?P<arch>[^-]+)\.tar\.gz")
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_OTHER_SOURCE_HINT = "or install a tarball directly: SCALEBOX_RELEASE_URL=<url or path>"
# A GitHub release object is a few KB (even with a long body and many assets).
MAX_API_BYTES = 1024 * 1024
_API_CHUNK = 64 * 1024


class ResolveError(ScaleboxError):
    """The release to install could not be determined; nothing was changed."""


@dataclass(frozen=True)
class Source:
    """Where to look for a release: the environment and flags, gathered by the caller."""

    release_url: str | None
    to_version: str | None
    repo: str
    api_base: str
    github_token: str | None
    allow_http: bool
    arch: str


@dataclass(frozen=True)
class Candidate:
    """A release to fetch.

    ``version`` is None when only a URL is known; the version then comes from
    the verified RELEASE.json. ``asset_name`` is a safe file name for the
    download. ``origin`` says where it came from, for messages and history.
    """

    version: str | None
    url: str
    asset_name: str
    origin: str


def host_arch() -> str:
    """This machine's arch as release tarballs name it (uname -m: x86_64, aarch64)."""
    return platform.machine()


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def source_from_env(
    environ: Mapping[str, str],
    *,
    to_version: str | None = None,
    allow_http: bool = False,
    arch: str | None = None,
) -> Source:
    """Gather a Source from the environment and the --to / --allow-http flags.

    Empty variables count as unset.
    """
    return Source(
        release_url=environ.get("SCALEBOX_RELEASE_URL") or None,
        to_version=to_version or None,
        repo=environ.get("SCALEBOX_UPDATE_REPO") or DEFAULT_REPO,
        api_base=(environ.get("SCALEBOX_GITHUB_API") or DEFAULT_API_BASE).rstrip("/"),
        github_token=environ.get("GITHUB_TOKEN") or None,
        allow_http=allow_http or _flag(environ.get("SCALEBOX_ALLOW_HTTP")),
        arch=arch or host_arch(),
    )


def client_for(source: Source, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT) -> httpx.Client:
    """The updater's HTTP client for this source: its token goes to its API origin only."""
    return make_client(
        source.github_token,
        api_base=source.api_base,
        allow_http=source.allow_http,
        timeout=timeout,
    )


def resolve(
    source: Source,
    client: httpx.Client,
    *,
    retries: int = 2,
    sleep: Callable[[float], None] = time.sleep,
) -> Candidate:
    """The release to install, by the order in the module docstring. Raises ResolveError."""
    if source.release_url:
        return _from_release_url(source.release_url.strip(), source.allow_http)
    api = _GitHub(source, client, retries, sleep)
    if source.to_version:
        return api.tagged(source.to_version)
    return api.latest()


# A URL as the API gives it: printable ASCII, no spaces (RFC 3986), of a sane length.
_PLAIN_URL = re.compile(r"[\x21-\x7e]{1,2048}")


def _shown(text: str, limit: int = 80) -> str:
    """A name or URL from outside, fit for a message: cut short, control characters
    (terminal escapes, bidi overrides, newlines) shown escaped, never sent to the terminal."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text if text.isprintable() else repr(text)


def _file_name(url_path: str) -> str:
    name = urllib.parse.unquote(url_path.rstrip("/").rpartition("/")[2])
    # The name becomes a path under downloads/: nothing that could climb out.
    safe = len(name) <= 200 and _SAFE_FILE_NAME.fullmatch(name)
    return name if safe else "scalebox-release.tar.gz"


def _check_scheme(url: str, what: str, allow_http: bool) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "https":
        return
    if scheme == "http":
        if allow_http:
            return
        raise ResolveError(f"refusing plain http {what}: {url}", ALLOW_HTTP_HINT)
    raise ResolveError(
        f"{what} {url} is not an http(s) URL",
        "use an https:// URL (SCALEBOX_RELEASE_URL also takes file:///path or a path)",
    )


def _from_release_url(url: str, allow_http: bool) -> Candidate:
    origin = "SCALEBOX_RELEASE_URL"
    parsed = urllib.parse.urlsplit(url)
    if "://" not in url or parsed.scheme.lower() == "file":
        if "://" in url:
            if parsed.netloc not in ("", "localhost"):
                raise ResolveError(
                    f"SCALEBOX_RELEASE_URL={url} names a file on another host",
                    "use file:///path for a file on this server, or an https URL",
                )
            path = Path(urllib.parse.unquote(parsed.path))
        else:
            path = Path(url).expanduser()
        # A file:// URL's %00 decodes to a NUL, which os.stat refuses with a ValueError.
        nul = "\0" in str(path)
        reason = "holds a NUL byte, which no file name can" if nul else local.describe(path)
        if reason is not None:
            raise ResolveError(
                f"SCALEBOX_RELEASE_URL={url} {reason}; nothing was changed",
                "give the path (or file:///path) of a scalebox-<version>-<arch>.tar.gz file",
            )
        path = path.resolve()
        return Candidate(
            version=None, url=str(path), asset_name=_file_name(path.name), origin=origin
        )
    _check_scheme(url, "SCALEBOX_RELEASE_URL", allow_http)
    return Candidate(version=None, url=url, asset_name=_file_name(parsed.path), origin=origin)


def _reset_time(resp: httpx.Response) -> str:
    reset = resp.headers.get("X-RateLimit-Reset", "")
    if not re.fullmatch(r"[0-9]{1,12}", reset):
        return ""
    try:
        at = datetime.fromtimestamp(int(reset), UTC)
    except (OverflowError, OSError, ValueError):
        return ""
    return " (it resets at " + at.strftime("%H:%M UTC") + ")"


class _Transient(Exception):
    """A network fault that another attempt may fix."""


def _decoded(encoding: str, raw: Iterator[bytes]) -> Iterator[bytes]:
    """The body's bytes, decompressed in bounded steps whatever its ratio."""
    if encoding in ("", "identity"):
        yield from raw
        return
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise httpx.DecodingError(f"unsupported Content-Encoding {encoding[:40]!r}")
    inflate = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or zlib header
    for chunk in raw:
        data = inflate.decompress(chunk, _API_CHUNK)
        yield data
        while inflate.unconsumed_tail:
            yield inflate.decompress(inflate.unconsumed_tail, _API_CHUNK)


class _NotFound(Exception):
    """The API answered 404 for this URL."""


class _GitHub:
    """The few calls to the GitHub Releases API the updater makes."""

    def __init__(
        self,
        source: Source,
        client: httpx.Client,
        retries: int,
        sleep: Callable[[float], None],
    ) -> None:
        self.source = source
        self.client = client
        self.retries = retries
        self.sleep = sleep
        self.base = source.api_base.rstrip("/")
        self.repo = source.repo
        _check_scheme(self.base, "releases API (SCALEBOX_GITHUB_API)", source.allow_http)
        if not _REPO_NAME.fullmatch(self.repo):
            raise ResolveError(
                f"SCALEBOX_UPDATE_REPO={self.repo!r} is not a GitHub repository name",
                f"use owner/name, for example {DEFAULT_REPO}",
            )

    def latest(self) -> Candidate:
        try:
            release = self._get(f"/repos/{self.repo}/releases/latest")
        except _NotFound:
            self._fail_if_no_repo()
            raise ResolveError(
                f"{self.repo} has no published release yet (at {self.base})",
                f"publish a release, or {_OTHER_SOURCE_HINT}",
            ) from None
        return self._candidate(release, "latest GitHub release")

    def tagged(self, version: str) -> Candidate:
        try:
            wanted = versions.parse(version)
        except versions.InvalidVersion as exc:
            raise ResolveError(f"--to: {exc.what}", exc.hint) from exc
        bare = version.removeprefix("v")
        tags = [f"v{bare}", bare]
        for tag in tags:
            try:
                release = self._get(f"/repos/{self.repo}/releases/tags/{tag}")
            except _NotFound:
                continue
            candidate = self._candidate(release, "GitHub release")
            if candidate.version is None or versions.parse(candidate.version) != wanted:
                raise ResolveError(
                    f"release tag {tag} of {self.repo} is version {candidate.version}, "
                    f"not {version}",
                    "check the release's tag and assets on GitHub",
                )
            return candidate
        self._fail_if_no_repo()
        raise ResolveError(
            f"{self.repo} has no release {bare} (no tag {' or '.join(tags)} at {self.base})",
            f"run `scalebox-update --check` for the latest version, or {_OTHER_SOURCE_HINT}",
        )

    def _fail_if_no_repo(self) -> None:
        try:
            self._get(f"/repos/{self.repo}")
        except _NotFound:
            raise ResolveError(
                f"no repository {self.repo} at {self.base} (404)",
                "check SCALEBOX_UPDATE_REPO (owner/name) and SCALEBOX_GITHUB_API; "
                "a private repository also needs GITHUB_TOKEN",
            ) from None

    def _candidate(self, release: dict[str, Any], kind: str) -> Candidate:
        tag = release.get("tag_name")
        assets = release.get("assets")
        if not isinstance(tag, str) or not isinstance(assets, list):
            raise self._garbage("a release without tag_name and assets")
        try:
            version = str(versions.parse(tag))
        except versions.InvalidVersion as exc:
            raise ResolveError(
                f"release tag of {self.repo}: {exc.what}",
                f"tag releases v<version>, for example v0.2.0; {_OTHER_SOURCE_HINT}",
            ) from exc
        names = []
        for asset in assets:
            if not isinstance(asset, dict):
                raise self._garbage("an asset that is not an object")
            name, url = asset.get("name"), asset.get("browser_download_url")
            if not isinstance(name, str) or not isinstance(url, str):
                raise self._garbage("an asset without name and browser_download_url")
            names.append(name)
            if self._is_ours(name, version):
                if not _PLAIN_URL.fullmatch(url):
                    raise self._garbage(
                        f"the download URL of {_shown(name)} is not a plain URL: {_shown(url)}"
                    )
                _check_scheme(url, f"download URL of {_shown(name)}", self.source.allow_http)
                return Candidate(
                    version=version,
                    url=url,
                    asset_name=_file_name(name),
                    origin=f"{kind} {tag} of {self.repo}",
                )
        expected = f"scalebox-{version}-{self.source.arch}.tar.gz"
        # Names from outside: a few of them, each cut short, in the message.
        names = [_shown(n) for n in names[:10]]
        raise ResolveError(
            f"release {tag} of {self.repo} has no build for {self.source.arch}: "
            f"expected {expected}, found {', '.join(names) or 'no assets'}",
            f"pick another release with --to VERSION, {_OTHER_SOURCE_HINT}",
        )

    def _is_ours(self, name: str, version: str) -> bool:
        match = _ASSET_NAME.fullmatch(name)
        if match is None or match["arch"] != self.source.arch:
            return False
        try:
            return versions.parse(match["version"]) == versions.parse(version)
        except versions.InvalidVersion:
            return False

    def _garbage(self, detail: str) -> ResolveError:
        return ResolveError(
            f"the releases API at {self.base} answered with something that is not "
            f"a GitHub release ({detail})",
            f"check SCALEBOX_GITHUB_API points at a GitHub API, {_OTHER_SOURCE_HINT}",
        )

    def _get(self, path: str) -> dict[str, Any]:
        url = self.base + path
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
        if self.source.github_token:
            # Also set by client_for's client; a client built another way strips it
            # unless this is its own API origin, so it never reaches other hosts.
            headers["Authorization"] = f"Bearer {self.source.github_token}"
        delays = backoff_delays(self.retries)
        for attempt in range(self.retries + 1):
            try:
                resp, body = self._fetch(url, headers)
            except _Transient as exc:
                if attempt < self.retries:
                    self.sleep(delays[attempt])
                    continue
                raise ResolveError(
                    f"cannot reach the releases API at {url}: {exc}",
                    f"check the network and SCALEBOX_GITHUB_API, {_OTHER_SOURCE_HINT}",
                ) from exc
            if resp.status_code >= 500 and attempt < self.retries:
                self.sleep(delays[attempt])
                continue
            return self._json(url, resp, body)
        raise AssertionError("unreachable: the loop returns or raises")

    def _fetch(self, url: str, headers: dict[str, str]) -> tuple[httpx.Response, bytes]:
        """One GET, its body read up to MAX_API_BYTES and within API_TOTAL seconds."""
        pace = Pace(Limits(total=API_TOTAL, min_rate=0))
        # identity: a compressed answer could inflate a thousandfold past any check.
        headers = {**headers, "Accept-Encoding": "identity"}
        try:
            # pace counts body chunks; deadline also ends a read blocked on dripped headers.
            with deadline(API_TOTAL), self.client.stream("GET", url, headers=headers) as resp:
                encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
                body = bytearray()
                for chunk in _decoded(encoding, resp.iter_raw(_API_CHUNK)):
                    body += chunk
                    if len(body) > MAX_API_BYTES:
                        raise ResolveError(
                            f"the releases API at {url} sent more than {MAX_API_BYTES} bytes; "
                            "refused (a GitHub release is a few KB)",
                            f"check SCALEBOX_GITHUB_API points at a GitHub API, "
                            f"{_OTHER_SOURCE_HINT}",
                        )
                    if (late := pace.received(len(chunk))) is not None:
                        raise ResolveError(
                            f"the releases API at {url} answered too slowly: "
                            f"{late.replace(' (SCALEBOX_DOWNLOAD_TIMEOUT)', '')}",
                            f"check the network and SCALEBOX_GITHUB_API, {_OTHER_SOURCE_HINT}",
                        )
                return resp, bytes(body)
        except DeadlinePassed:
            raise ResolveError(
                f"the releases API at {url} answered too slowly: it took more than {API_TOTAL:g} s",
                f"check the network and SCALEBOX_GITHUB_API, {_OTHER_SOURCE_HINT}",
            ) from None
        except TRANSIENT_ERRORS as exc:
            if (problem := certificate_problem(exc, url)) is not None:
                raise ResolveError(problem.what, problem.hint) from exc
            raise _Transient(str(exc) or type(exc).__name__) from exc
        except FetchError as exc:  # plain http refused on a redirect
            raise ResolveError(exc.what, exc.hint) from exc
        except (httpx.HTTPError, zlib.error) as exc:
            raise ResolveError(
                f"the releases API request {url} failed: {exc}",
                f"check SCALEBOX_GITHUB_API, {_OTHER_SOURCE_HINT}",
            ) from exc

    def _json(self, url: str, resp: httpx.Response, body: bytes) -> dict[str, Any]:
        status = resp.status_code
        if status == 404:
            raise _NotFound(url)
        if status == 401:
            raise ResolveError(
                f"the releases API at {url} rejected GITHUB_TOKEN (401)",
                "check GITHUB_TOKEN, or unset it for a public repository",
            )
        if status in (403, 429):
            limited = status == 429 or resp.headers.get("X-RateLimit-Remaining") == "0"
            if limited or b"rate limit" in body.lower():
                hint = (
                    "wait, or use a token with a higher limit"
                    if self.source.github_token
                    else "set GITHUB_TOKEN (any token raises the limit), or wait"
                )
                raise ResolveError(
                    f"GitHub API rate limit reached ({status} from {url}){_reset_time(resp)}",
                    f"{hint}; {_OTHER_SOURCE_HINT}",
                )
            raise ResolveError(
                f"the releases API refused access to {url} ({status})",
                "set GITHUB_TOKEN to a token that may read " + self.repo,
            )
        if status != 200:
            raise ResolveError(
                f"the releases API answered {status} {resp.reason_phrase} for {url}",
                f"try again later, {_OTHER_SOURCE_HINT}",
            )
        try:
            data = json.loads(body)
        except RecursionError:
            raise self._garbage("JSON nested too deeply") from None
        except ValueError as exc:  # not JSON, not UTF-8, or an int of too many digits
            text = body[:60].decode(errors="replace")
            raise self._garbage(f"not JSON: {text!r}") from exc
        if not isinstance(data, dict):
            raise self._garbage(f"JSON {type(data).__name__}, not an object")
        return data
