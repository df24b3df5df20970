"""resolve: which release to install, from a real GitHub-style API on loopback."""

from __future__ import annotations

import gzip
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from scalebox.update.fetch import fetch, make_client
from scalebox.update.resolve import (
    DEFAULT_REPO,
    Candidate,
    ResolveError,
    Source,
    client_for,
    resolve,
    source_from_env,
)
from tests.unit.loopback_http import Server, send_body, send_json, serve, unused_port

REPO = "acme/scalebox"
ARCH = "x86_64"
TARBALL = os.urandom(50_000)


class Sleeps(list[float]):
    """Records the backoff pauses instead of sleeping them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def release(
    server: Server, tag: str, arches: tuple[str, ...] = (ARCH, "aarch64")
) -> dict[str, object]:
    version = tag.removeprefix("v")
    assets = []
    for arch in arches:
        name = f"scalebox-{version}-{arch}.tar.gz"
        assets.append(
            {"name": name, "browser_download_url": server.url(f"/download/{tag}/{name}"), "size": 1}
        )
    assets.append({"name": "SHA256SUMS", "browser_download_url": server.url("/sums")})
    return {"tag_name": tag, "name": f"Scalebox {version}", "draft": False, "assets": assets}


def github(server: Server) -> None:
    """A repository with releases v0.1.0, v0.2.0 (latest) and 0.3.0rc1 (tagged without v)."""
    server.routes[f"/repos/{REPO}"] = lambda req: send_json(req, {"full_name": REPO})
    server.routes[f"/repos/{REPO}/releases/latest"] = lambda req: send_json(
        req, release(server, "v0.2.0")
    )
    for tag in ("v0.1.0", "v0.2.0", "0.3.0rc1"):
        server.routes[f"/repos/{REPO}/releases/tags/{tag}"] = lambda req, tag=tag: send_json(
            req, release(server, tag)
        )
        name = f"scalebox-{tag.removeprefix('v')}-{ARCH}.tar.gz"
        server.routes[f"/download/{tag}/{name}"] = lambda req: send_body(req, TARBALL)


@pytest.fixture
def api() -> Iterator[Server]:
    with serve() as srv:
        github(srv)
        yield srv


def source(api: Server, **changes: object) -> Source:
    base = Source(
        release_url=None,
        to_version=None,
        repo=REPO,
        api_base=api.base,
        github_token=None,
        allow_http=True,  # the loopback server speaks plain http
        arch=ARCH,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def run(src: Source, sleep: Sleeps | None = None) -> Candidate:
    with client_for(src, timeout=2.0) as client:
        return resolve(src, client, sleep=Sleeps() if sleep is None else sleep)


def error(src: Source, sleep: Sleeps | None = None) -> ResolveError:
    with pytest.raises(ResolveError) as info:
        run(src, sleep)
    assert info.value.hint, "every error says what to do next"
    return info.value


def test_latest_release_and_the_asset_for_this_arch(api: Server) -> None:
    got = run(source(api))
    assert got == Candidate(
        version="0.2.0",
        url=api.url(f"/download/v0.2.0/scalebox-0.2.0-{ARCH}.tar.gz"),
        asset_name=f"scalebox-0.2.0-{ARCH}.tar.gz",
        origin=f"latest GitHub release v0.2.0 of {REPO}",
    )
    sent = api.requests_to(f"/repos/{REPO}/releases/latest")[0].headers
    assert sent["accept"] == "application/vnd.github+json"
    assert sent["user-agent"].startswith("scalebox-update/")
    assert "authorization" not in sent


def test_the_other_arch_gets_its_own_asset(api: Server) -> None:
    got = run(source(api, arch="aarch64"))
    assert got.asset_name == "scalebox-0.2.0-aarch64.tar.gz"
    assert got.url.endswith("/scalebox-0.2.0-aarch64.tar.gz")


def test_to_version_finds_the_v_tag(api: Server) -> None:
    got = run(source(api, to_version="0.1.0"))
    assert got.version == "0.1.0"
    assert got.origin == f"GitHub release v0.1.0 of {REPO}"
    assert api.requests_to(f"/repos/{REPO}/releases/latest") == []


def test_to_version_falls_back_to_the_bare_tag(api: Server) -> None:
    got = run(source(api, to_version="0.3.0rc1"))
    assert got.version == "0.3.0rc1"
    assert got.asset_name == f"scalebox-0.3.0rc1-{ARCH}.tar.gz"
    tried = [s.path for s in api.seen if "/tags/" in s.path]
    assert tried == [
        f"/repos/{REPO}/releases/tags/v0.3.0rc1",
        f"/repos/{REPO}/releases/tags/0.3.0rc1",
    ]


def test_release_url_wins_over_to_and_the_api(api: Server) -> None:
    url = "https://downloads.example/scalebox-0.9.0-x86_64.tar.gz"
    got = run(source(api, release_url=url, to_version="0.1.0", allow_http=False))
    assert got == Candidate(
        version=None,
        url=url,
        asset_name="scalebox-0.9.0-x86_64.tar.gz",
        origin="SCALEBOX_RELEASE_URL",
    )
    assert api.seen == []  # no request at all: the URL says everything


def test_release_url_may_be_a_path_or_a_file_url(api: Server, tmp_path: Path) -> None:
    tarball = tmp_path / "scalebox-0.9.0-x86_64.tar.gz"
    tarball.write_bytes(TARBALL)
    for given in (str(tarball), tarball.as_uri()):
        got = run(source(api, release_url=given))
        assert got.url == str(tarball)
        assert got.version is None
        assert got.asset_name == tarball.name


def test_a_missing_release_file_is_refused(api: Server, tmp_path: Path) -> None:
    err = error(source(api, release_url=str(tmp_path / "nope.tar.gz")))
    assert "nope.tar.gz" in err.what
    assert "does not exist" in err.what


def test_plain_http_release_url_is_refused_unless_allowed(api: Server) -> None:
    url = api.url(f"/download/v0.2.0/scalebox-0.2.0-{ARCH}.tar.gz")
    err = error(source(api, release_url=url, allow_http=False))
    assert "plain http" in err.what
    assert url in err.what
    assert err.hint is not None
    assert "SCALEBOX_ALLOW_HTTP=1" in err.hint
    assert "--allow-http" in err.hint
    assert run(source(api, release_url=url, allow_http=True)).url == url


def test_a_plain_http_api_is_refused_unless_allowed(api: Server) -> None:
    err = error(source(api, allow_http=False))
    assert "plain http" in err.what
    assert "SCALEBOX_GITHUB_API" in err.what
    assert api.seen == []


def test_an_asset_url_that_is_not_http_is_refused(api: Server) -> None:
    name = f"scalebox-0.2.0-{ARCH}.tar.gz"
    api.routes[f"/repos/{REPO}/releases/latest"] = lambda req: send_json(
        req,
        {
            "tag_name": "v0.2.0",
            "assets": [{"name": name, "browser_download_url": f"ftp://mirror.example/{name}"}],
        },
    )
    err = error(source(api))
    assert f"download URL of {name}" in err.what
    assert "not an http(s) URL" in err.what


def test_no_asset_for_this_arch_lists_what_there_is(api: Server) -> None:
    err = error(source(api, arch="riscv64"))
    assert "has no build for riscv64" in err.what
    assert "expected scalebox-0.2.0-riscv64.tar.gz" in err.what
    assert f"scalebox-0.2.0-{ARCH}.tar.gz, scalebox-0.2.0-aarch64.tar.gz, SHA256SUMS" in err.what
    assert err.hint is not None
    assert "--to" in err.hint


def test_an_unknown_version_says_so(api: Server) -> None:
    err = error(source(api, to_version="9.9.9"))
    assert f"{REPO} has no release 9.9.9" in err.what
    assert "v9.9.9 or 9.9.9" in err.what


def test_a_to_that_is_not_a_version_is_refused_before_any_request(api: Server) -> None:
    err = error(source(api, to_version="latest-and-greatest"))
    assert "--to: 'latest-and-greatest' is not a version" in err.what
    assert api.seen == []


def test_a_missing_repository_says_so(api: Server) -> None:
    err = error(source(api, repo="acme/nothing"))
    assert "no repository acme/nothing" in err.what
    assert "404" in err.what
    assert err.hint is not None
    assert "SCALEBOX_UPDATE_REPO" in err.hint


def test_a_repository_without_releases_says_so(api: Server) -> None:
    api.routes["/repos/acme/empty"] = lambda req: send_json(req, {"full_name": "acme/empty"})
    err = error(source(api, repo="acme/empty"))
    assert "acme/empty has no published release yet" in err.what
    assert err.hint is not None
    assert "SCALEBOX_RELEASE_URL" in err.hint


def test_a_bad_repository_name_is_refused_before_any_request(api: Server) -> None:
    err = error(source(api, repo="../../etc"))
    assert "not a GitHub repository name" in err.what
    assert api.seen == []


def test_rate_limit_mentions_github_token(api: Server) -> None:
    def limited(req: BaseHTTPRequestHandler) -> None:
        body = b'{"message": "API rate limit exceeded for 127.0.0.1."}'
        send_body(
            req,
            body,
            status=403,
            headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1700000000"},
        )

    api.routes[f"/repos/{REPO}/releases/latest"] = limited
    err = error(source(api))
    assert "rate limit" in err.what
    assert "403" in err.what
    assert "22:13 UTC" in err.what  # when it resets
    assert err.hint is not None
    assert "GITHUB_TOKEN" in err.hint


def test_a_403_that_is_not_the_rate_limit_asks_for_a_token(api: Server) -> None:
    api.routes[f"/repos/{REPO}/releases/latest"] = lambda req: send_json(
        req, {"message": "Resource not accessible"}, status=403
    )
    err = error(source(api))
    assert "refused access" in err.what
    assert err.hint is not None
    assert "GITHUB_TOKEN" in err.hint


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"<html>proxy login</html>", "not JSON"),
        (b"[1, 2, 3]", "JSON list"),
        (b'{"message": "hi"}', "without tag_name and assets"),
        (
            b'{"tag_name": "v0.2.0", "assets": [{"name": 3}]}',
            "without name and browser_download_url",
        ),
        (
            b'{"tag_name": "nightly", "assets": []}',
            "release tag of acme/scalebox: 'nightly' is not a version",
        ),
    ],
)
def test_garbage_from_the_api_is_refused(api: Server, body: bytes, words: str) -> None:
    api.routes[f"/repos/{REPO}/releases/latest"] = lambda req: send_body(req, body)
    err = error(source(api))
    assert words in err.what


def test_an_unreachable_api_is_retried_then_reported() -> None:
    base = f"http://127.0.0.1:{unused_port()}"
    src = Source(None, None, REPO, base, None, allow_http=True, arch=ARCH)
    sleeps = Sleeps()
    err = error(src, sleeps)
    assert f"cannot reach the releases API at {base}/repos/{REPO}/releases/latest" in err.what
    assert err.hint is not None
    assert "SCALEBOX_RELEASE_URL" in err.hint
    assert len(sleeps) == 2


def test_a_5xx_from_the_api_is_retried(api: Server) -> None:
    calls: list[int] = []
    good = api.routes[f"/repos/{REPO}/releases/latest"]

    def flaky(req: BaseHTTPRequestHandler) -> None:
        calls.append(1)
        if len(calls) == 1:
            send_body(req, b"unicorn", status=502)
        else:
            good(req)

    api.routes[f"/repos/{REPO}/releases/latest"] = flaky
    sleeps = Sleeps()
    assert run(source(api), sleeps).version == "0.2.0"
    assert len(sleeps) == 1


def test_the_token_reaches_the_api_and_never_the_download_host(tmp_path: Path) -> None:
    with serve() as api, serve() as assets:
        github(api)
        name = f"scalebox-0.2.0-{ARCH}.tar.gz"
        assets.routes[f"/{name}"] = lambda req: send_body(req, TARBALL)
        api.routes[f"/repos/{REPO}/releases/latest"] = lambda req: send_json(
            req,
            {
                "tag_name": "v0.2.0",
                "assets": [{"name": name, "browser_download_url": assets.url(f"/{name}")}],
            },
        )
        src = source(api, github_token="ghp_test")
        with client_for(src, timeout=2.0) as client:
            candidate = resolve(src, client)
            path = fetch(candidate.url, tmp_path / candidate.asset_name, client, progress=False)
    assert path.read_bytes() == TARBALL
    assert [s.headers.get("authorization") for s in api.seen] == ["Bearer ghp_test"]
    assert [s.headers.get("authorization") for s in assets.seen] == [None]


def test_a_client_made_for_another_api_origin_keeps_the_token_to_itself(api: Server) -> None:
    """The client strips Authorization from every origin but its own api_base."""
    src = source(api, github_token="ghp_test")
    with make_client("ghp_test", allow_http=True) as github_com_client:  # api.github.com
        resolve(src, github_com_client)
    assert all("authorization" not in s.headers for s in api.seen)
    with httpx.Client() as plain:  # no rules of its own: resolve adds the token itself
        resolve(src, plain)
    assert api.seen[-1].headers.get("authorization") == "Bearer ghp_test"


def test_source_from_env_reads_the_documented_variables() -> None:
    env = {
        "SCALEBOX_RELEASE_URL": "",
        "SCALEBOX_UPDATE_REPO": "acme/box",
        "SCALEBOX_GITHUB_API": "https://ghe.example/api/v3/",
        "GITHUB_TOKEN": "t",
        "SCALEBOX_ALLOW_HTTP": "1",
    }
    src = source_from_env(env, to_version="0.2.0", arch="aarch64")
    assert src == Source(
        release_url=None,
        to_version="0.2.0",
        repo="acme/box",
        api_base="https://ghe.example/api/v3",
        github_token="t",
        allow_http=True,
        arch="aarch64",
    )
    defaults = source_from_env({})
    assert defaults.repo == DEFAULT_REPO == "The-Agentic-Journey/Scalebox"
    assert defaults.api_base == "https://api.github.com"
    assert defaults.allow_http is False
    assert defaults.github_token is None
    assert defaults.arch  # uname -m of this machine
    assert source_from_env({}, allow_http=True).allow_http is True
    assert source_from_env({"SCALEBOX_ALLOW_HTTP": "0"}).allow_http is False


# --- hostile local sources and API answers -------------------------------------------


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p.mkdir(), "is a directory, not a release file"),
        (os.mkfifo, "is a FIFO (named pipe), not a release file"),
        (
            lambda p: p.symlink_to("/dev/null"),
            "is a symbolic link to /dev/null, which is a character device",
        ),
        (lambda p: p.symlink_to(p.parent), "which is a directory"),
        (lambda p: p.symlink_to(p.parent / "gone"), "which does not exist"),
    ],
    ids=["directory", "fifo", "symlink-to-device", "symlink-to-directory", "dangling-symlink"],
)
def test_a_local_source_that_is_not_a_regular_file_says_what_it_is(
    api: Server, tmp_path: Path, make: object, words: str
) -> None:
    path = tmp_path / "scalebox-1.0.0-x86_64.tar.gz"
    make(path)  # type: ignore[operator]
    err = error(source(api, release_url=str(path)))
    assert words in err.what
    assert "nothing was changed" in err.what


def test_a_socket_as_local_source_says_socket(api: Server, tmp_path: Path) -> None:
    path = tmp_path / "s.tar.gz"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        err = error(source(api, release_url=f"file://{path}"))
    assert "is a socket, not a release file" in err.what


def test_a_file_url_with_a_nul_byte_is_refused_not_a_traceback(api: Server) -> None:
    """%00 in a file:// URL decodes to a NUL, which os.stat refuses with a ValueError."""
    err = error(source(api, release_url="file:///tmp/a%00b.tar.gz"))
    assert "holds a NUL byte" in err.what
    assert "nothing was changed" in err.what


def endless(req: BaseHTTPRequestHandler) -> None:
    """200 without a length, then bytes until the client goes away."""
    req.send_response(200)
    req.send_header("Content-Type", "application/json")
    req.end_headers()
    chunk = b"[" * 65536
    try:
        for _ in range(100_000):
            req.wfile.write(chunk)
    except OSError:
        pass


# 64 MiB of spaces in about 64 KB: past the cap a thousandfold once inflated.
BOMB = gzip.compress(b" " * (64 * 1024 * 1024), compresslevel=9)


def gzip_bomb(req: BaseHTTPRequestHandler) -> None:
    send_body(req, BOMB, headers={"Content-Encoding": "gzip"})


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        (endless, "sent more than 1048576 bytes"),
        (gzip_bomb, "sent more than 1048576 bytes"),
        (lambda req: send_body(req, b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
        (lambda req: send_body(req, b'{"tag_name": ' + b"9" * 5000 + b"}"), "not JSON"),
        (
            lambda req: send_body(req, b'{"tag_name": "v' + b"9" * 5000 + b'", "assets": []}'),
            "is not a version",
        ),
        (lambda req: send_body(req, b"\xff\xfe not utf-8"), "not JSON"),
    ],
    ids=["endless-body", "gzip-bomb", "deeply-nested", "huge-int", "absurd-tag", "not-utf8"],
)
def test_a_hostile_api_answer_is_a_refusal_not_a_crash(
    api: Server, handler: object, words: str
) -> None:
    api.routes[f"/repos/{REPO}/releases/latest"] = handler  # type: ignore[assignment]
    err = error(source(api))
    assert words in err.what


def test_an_absurd_rate_limit_reset_is_left_out(api: Server) -> None:
    api.routes[f"/repos/{REPO}/releases/latest"] = lambda req: send_body(
        req,
        b'{"message": "API rate limit exceeded"}',
        status=403,
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "9" * 5000},
    )
    err = error(source(api))
    assert "rate limit reached" in err.what
    assert "resets" not in err.what


def test_an_api_that_drips_its_headers_is_cut_off_at_its_time_limit(
    api: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One header byte every 0.2 s: no read times out, and before, no body byte ever came
    to be counted against the 60 s limit (h11 takes 100 KB of header: 5 hours here)."""
    monkeypatch.setattr("scalebox.update.resolve.API_TOTAL", 2.0)

    def drip_headers(req: BaseHTTPRequestHandler) -> None:
        req.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        while not api.stopping.wait(0.2):
            try:
                req.wfile.write(b"a")
                req.wfile.flush()
            except OSError:
                return

    api.routes[f"/repos/{REPO}/releases/latest"] = drip_headers
    started = time.monotonic()
    err = error(source(api))
    assert time.monotonic() - started < 6
    assert "answered too slowly: it took more than 2 s" in err.what


@pytest.mark.parametrize(
    ("assets", "arch", "shown"),
    [
        # A terminal escape in an asset name: the listing of what there is.
        (
            [{"name": "\x1b]0;owned\x07\x1b[2J", "browser_download_url": "https://x/a"}],
            ARCH,
            "\\x1b",
        ),
        # ... and in the download URL of our own asset.
        (
            [{"name": f"scalebox-0.2.0-{ARCH}.tar.gz", "browser_download_url": "\x1b[2Jhttps://x"}],
            ARCH,
            "not a plain URL",
        ),
        (
            [{"name": f"scalebox-0.2.0-{ARCH}.tar.gz", "browser_download_url": "https://x/\u202e"}],
            ARCH,
            "not a plain URL",
        ),
    ],
    ids=["name", "url-escape", "url-bidi"],
)
def test_control_characters_from_the_api_never_reach_the_terminal(
    api: Server, assets: list[dict[str, str]], arch: str, shown: str
) -> None:
    """Names and URLs from the API answer are printed in messages: an escape sequence in
    one would retitle, clear or rewrite the operator's terminal."""
    api.routes[f"/repos/{REPO}/releases/latest"] = lambda req: send_json(
        req, {"tag_name": "v0.2.0", "assets": assets}
    )
    err = error(source(api, arch=arch))
    assert shown in err.what
    assert str(err.what).isprintable(), err.what
