"""A daemon's warm-up says when its own first requests were not answered well
(scalebox/daemon/httpserver.py warm_up)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.types import Message, Receive, Scope, Send

from scalebox.daemon import httpserver

TOKEN = "sb-" + "t" * 40


async def _answer(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_every_answer_is_read_with_its_status_and_the_token_is_sent() -> None:
    seen: list[tuple[str, str, dict[bytes, bytes], Message]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["method"], scope["path"], dict(scope["headers"]), await receive()))
        await _answer(send, 200)

    assert asyncio.run(httpserver._get(app, "/vms", [(b"authorization", b"Bearer x")])) == 200
    [(method, path, headers, first)] = seen
    assert (method, path) == ("GET", "/vms")
    assert headers[b"authorization"] == b"Bearer x"
    assert first == {"type": "http.request", "body": b"", "more_body": False}


def test_a_warm_up_answered_with_an_error_is_logged_with_its_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    paths: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        paths.append(scope["path"])
        await _answer(send, 200 if scope["path"] == "/health" else 401)

    with caplog.at_level(logging.WARNING, logger="scaleboxd"):
        httpserver.warm_up(app, TOKEN)
    assert paths == ["/health", "/vms"]
    assert "warm-up requests failed (GET /vms answered 401)" in caplog.text


def test_a_warm_up_that_gets_no_answer_gives_up_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpserver, "WARM_UP_TIMEOUT", 0.2)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(30)

    with caplog.at_level(logging.WARNING, logger="scaleboxd"):
        httpserver.warm_up(app, TOKEN)
    assert "warm-up requests failed (no answer within 0.2 s)" in caplog.text


def test_a_warm_up_whose_app_raises_names_the_error(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("state file unreadable")

    with caplog.at_level(logging.WARNING, logger="scaleboxd"):
        httpserver.warm_up(app, TOKEN)
    assert "warm-up requests failed (RuntimeError: state file unreadable)" in caplog.text


def test_a_token_outside_latin_1_is_sent_as_utf_8_and_never_quoted_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Starlette reads headers as Latin-1, so such a token fails for every client: the
    warm-up gets the same 401 rather than an encoding error quoting the token."""
    token = "sb-" + "€" * 20
    sent: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        given = dict(scope["headers"]).get(b"authorization")
        if given is not None:
            sent.append(given)
        ok = given is None or given.decode("latin-1") == f"Bearer {token}"
        await _answer(send, 200 if ok else 401)

    with caplog.at_level(logging.WARNING, logger="scaleboxd"):
        httpserver.warm_up(app, token)
    assert sent == [f"Bearer {token}".encode()]
    assert "warm-up requests failed (GET /vms answered 401)" in caplog.text
    assert "€" not in caplog.text
