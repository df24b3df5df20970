"""The CLI's client retries an answer that asks for it (503 + Retry-After), within a budget.

httpx's MockTransport plays the server: the daemon's 503 + Retry-After cases
(a stopping daemon, an update's handover instance) are hard to hit at a
chosen moment with a real one; tests/system/test_update_handover.py shows
the handover instance answering them.
"""

from __future__ import annotations

import httpx
import pytest

from scalebox.cli.client import RETRY_BUDGET, Client
from scalebox.cli.errors import ApiError

BUSY = {"error": "scaleboxd is handing over to another version; the VM was not made"}


def _client(answers: list[httpx.Response], slept: list[float]) -> tuple[Client, list[str]]:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return answers.pop(0) if len(answers) > 1 else answers[0]

    client = Client("http://scaleboxd.test", "t", transport=httpx.MockTransport(handle),
                    sleep=slept.append)  # fmt: skip
    return client, seen


def test_a_create_answered_503_retry_after_is_sent_again_and_succeeds() -> None:
    slept: list[float] = []
    busy = httpx.Response(503, json=BUSY, headers={"Retry-After": "1"})
    client, seen = _client([busy, busy, httpx.Response(201, json={"id": "vm-1"})], slept)
    assert client.create_vm({"template": "debian-base"}) == {"id": "vm-1"}
    assert (seen, slept) == (["POST"] * 3, [1, 1])


def test_retries_stop_at_the_budget_and_say_what_the_server_said() -> None:
    slept: list[float] = []
    client, seen = _client([httpx.Response(503, json=BUSY, headers={"Retry-After": "1"})], slept)
    with pytest.raises(ApiError, match="handing over"):
        client.create_vm({"template": "debian-base"})
    assert sum(slept) == RETRY_BUDGET
    assert len(seen) == RETRY_BUDGET + 1


def test_a_503_without_retry_after_is_not_retried() -> None:
    slept: list[float] = []
    client, seen = _client([httpx.Response(503, json={"error": "no free ssh port"})], slept)
    with pytest.raises(ApiError, match="no free ssh port"):
        client.create_vm({"template": "debian-base"})
    assert (seen, slept) == (["POST"], [])
