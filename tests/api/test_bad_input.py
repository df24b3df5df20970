"""Bad input gets a clear 4xx JSON error and changes nothing a client can see."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.conftest import SSH_KEY, assert_error, raw_request, state_of
from tests.conftest import Scaleboxd

GOOD = {"template": "debian-base", "ssh_public_key": SSH_KEY}


@pytest.fixture
def unchanged(scaleboxd: Scaleboxd) -> Iterator[None]:
    """The test's requests must leave VMs and templates exactly as they were."""
    before = state_of(scaleboxd)
    yield
    assert state_of(scaleboxd) == before


def post_vms(server: Scaleboxd, body: bytes, **headers: str) -> Any:
    return raw_request(server, "POST", "/vms", body=body, headers=headers)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"template": "debian-base",', ["body", "JSON"]),
        (b"not json at all", ["body", "JSON"]),
        (b"[1, 2, 3]", ["body", "JSON object"]),
        (b'"a string"', ["body"]),
        (b"null", ["body"]),
        (b"", ["body"]),
        (b"{}", ["template", "required"]),
        (json.dumps({"template": "debian-base"}).encode(), ["ssh_public_key", "required"]),
        (json.dumps({**GOOD, "template": 5}).encode(), ["template"]),
        (json.dumps({**GOOD, "ssh_public_key": ["k"]}).encode(), ["ssh_public_key"]),
        (json.dumps({**GOOD, "ssh_public_key": ""}).encode(), ["ssh_public_key"]),
        (json.dumps({**GOOD, "ssh_public_key": "a\nb"}).encode(), ["ssh_public_key"]),
        (json.dumps({**GOOD, "vcpu_count": "2"}).encode(), ["vcpu_count"]),
        (json.dumps({**GOOD, "vcpu_count": 2.5}).encode(), ["vcpu_count"]),
        (json.dumps({**GOOD, "vcpu_count": True}).encode(), ["vcpu_count"]),
        (json.dumps({**GOOD, "vcpu_count": -1}).encode(), ["vcpu_count"]),
        (json.dumps({**GOOD, "vcpu_count": 10**30}).encode(), ["vcpu_count"]),
        (json.dumps({**GOOD, "mem_size_mib": 2**63}).encode(), ["mem_size_mib"]),
        (json.dumps({**GOOD, "disk_size_gib": 10**18}).encode(), ["disk_size_gib"]),
        (b'{"template": "debian-base", "ssh_public_key": "k", "vcpu_count": 1e400}', ["vcpu"]),
        (json.dumps({**GOOD, "name": "a/b"}).encode(), ["name"]),
        (json.dumps({**GOOD, "name": ".."}).encode(), ["name"]),
        (json.dumps({**GOOD, "name": "x" * 65}).encode(), ["name"]),
        (json.dumps({**GOOD, "name": 7}).encode(), ["name"]),
        (json.dumps({**GOOD, "template": "../debian-base"}).encode(), ["template"]),
        (json.dumps({**GOOD, "template": "debian-base/.."}).encode(), ["template"]),
    ],
)
def test_bad_create_body_is_a_400_naming_the_problem(
    scaleboxd: Scaleboxd, unchanged: None, body: bytes, words: list[str]
) -> None:
    assert_error(post_vms(scaleboxd, body), 400, *words)


def test_a_number_too_long_to_parse_is_a_400(scaleboxd: Scaleboxd, unchanged: None) -> None:
    body = b'{"template": "debian-base", "ssh_public_key": "k", "vcpu_count": ' + b"9" * 5000 + b"}"
    assert_error(post_vms(scaleboxd, body), 400, "body")


def test_a_body_that_is_not_json_typed_is_a_400(scaleboxd: Scaleboxd, unchanged: None) -> None:
    body = json.dumps(GOOD).encode()
    form = post_vms(scaleboxd, body, **{"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(form, 400, "Content-Type: application/json")


def test_oversized_body_is_a_413(scaleboxd: Scaleboxd, unchanged: None) -> None:
    body = json.dumps({**GOOD, "ssh_public_key": "ssh-ed25519 " + "A" * 70_000}).encode()
    assert_error(post_vms(scaleboxd, body), 413, "larger than")


def test_oversized_chunked_body_is_a_413(scaleboxd: Scaleboxd, unchanged: None) -> None:
    """Without Content-Length the daemon counts the bytes as they arrive."""

    def chunks() -> Iterator[bytes]:
        yield b'{"template": "debian-base", "ssh_public_key": "'
        for _ in range(100):
            yield b"A" * 1024
        yield b'"}'

    with scaleboxd.client() as client:
        response = client.post(
            "/vms", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "larger than")


def test_snapshot_body_errors(scaleboxd: Scaleboxd, unchanged: None) -> None:
    for body, word in [
        (b"{", "JSON"),
        (b"{}", "template_name"),
        (b'{"template_name": 1}', "template_name"),
        (b'{"template_name": "a/b"}', "template_name"),
        (b'{"template_name": ".."}', "template_name"),
    ]:
        response = raw_request(scaleboxd, "POST", "/vms/vm-000000000000/snapshot", body=body)
        assert_error(response, 400, word)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/vms/a%2Fb"),
        ("DELETE", "/vms/a%2Fb"),
        ("GET", "/vms/../templates"),
        ("DELETE", "/vms/.."),
        ("DELETE", "/templates/.."),
        ("DELETE", "/templates/a%2F..%2Fb"),
        ("POST", "/vms/..%2F..%2Fetc/snapshot"),
    ],
)
def test_paths_with_slash_or_dotdot_are_rejected(
    scaleboxd: Scaleboxd, unchanged: None, method: str, path: str
) -> None:
    body = b'{"template_name": "t"}' if method == "POST" else None
    response = raw_request(scaleboxd, method, path, body=body)
    assert 400 <= response.status < 500
    assert "error" in response.json()


@pytest.mark.parametrize(
    ("header", "status", "word"),
    [
        (None, 401, "missing"),
        ("Bearer sb-wrong-token-0000000000000000", 401, "invalid"),
        ("Bearer ", 400, "malformed"),
        ("Basic dXNlcjpwYXNz", 400, "malformed"),
        ("sb-0123456789abcdef0123456789", 400, "malformed"),
        ("Bearer two words", 400, "malformed"),
        ("Bearer sb-\u00e9\u00e9\u00e9", 401, "invalid"),
    ],
)
def test_missing_wrong_or_malformed_token(
    scaleboxd: Scaleboxd, unchanged: None, header: str | None, status: int, word: str
) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path, body in [
        ("GET", "/vms", None),
        ("GET", "/templates", None),
        ("POST", "/vms", json.dumps(GOOD).encode()),
        ("DELETE", "/templates/debian-base", None),
        ("DELETE", "/vms/vm-000000000000", None),
        ("POST", "/vms/x/snapshot", b'{"template_name": "t"}'),
        ("GET", "/no-such-route", None),
    ]:
        response = raw_request(scaleboxd, method, path, body=body, headers=headers, token="")
        assert_error(response, status, word)
        assert response.headers["content-type"] == "application/json"
        # A 401 names the scheme it wants (RFC 9110).
        assert response.headers.get("www-authenticate") == ("Bearer" if status == 401 else None)


def test_auth_is_checked_before_the_body(scaleboxd: Scaleboxd, unchanged: None) -> None:
    """An anonymous client learns nothing from a bad body: it gets 401, not 400 or 413."""
    response = raw_request(scaleboxd, "POST", "/vms", body=b"{" * 100_000, token="")
    assert_error(response, 401)


def test_the_token_is_never_echoed(scaleboxd: Scaleboxd) -> None:
    wrong = "sb-this-is-not-the-token-but-secret"
    response = raw_request(scaleboxd, "GET", "/vms", token=wrong)
    assert wrong.encode() not in response.body
    assert scaleboxd.token.encode() not in response.body


def _endless_head(server: Scaleboxd) -> tuple[bytes, int]:
    """Send a header that never ends, 4 KiB at a time, until the daemon answers (at most
    1 MiB); then read its answer to the end. Returns (answer, filler bytes sent)."""
    url = httpx.URL(server.url)
    with socket.create_connection((url.host, url.port or 80), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: scaleboxd\r\nX-Filler: ")
        sent = 0
        while sent < 1024 * 1024 and not select.select([sock], [], [], 0.01)[0]:
            sock.sendall(b"a" * 4096)
            sent += 4096
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, sent


def test_a_request_head_that_never_ends_is_a_400_once_over_16_kib(
    scaleboxd: Scaleboxd, unchanged: None
) -> None:
    """h11 refuses a request head still incomplete past 16 KiB, so a client cannot make
    the daemon hold an endless header; httptools, which uvicorn would pick if it were
    installed, holds any size (daemon/main.py names h11)."""
    answer, sent = _endless_head(scaleboxd)
    assert answer.startswith(b"HTTP/1.1 400 "), (sent, answer[:200])
    assert sent <= 64 * 1024, f"the daemon took {sent} bytes of one header before refusing"
    with scaleboxd.client() as client:
        assert client.get("/health").status_code == 200


def test_whole_number_floats_are_the_numbers_they_name(scaleboxd: Scaleboxd, make_vm: Any) -> None:
    """2.0 is 2 in JSON and to the old daemon (JavaScript has one number type); clients
    that compute sizes send it. 2.5, "2" and true stay 400s (above)."""
    vm = make_vm(vcpu_count=2.0, mem_size_mib=256.0, disk_size_gib=1.0)
    scaleboxd.require_local("reads the VM's record in DATA_DIR")
    assert scaleboxd.data_dir is not None
    [saved] = [
        v
        for v in json.loads((scaleboxd.data_dir / "state.json").read_text())["vms"]
        if v["id"] == vm["id"]
    ]
    assert (saved["vcpu_count"], saved["mem_size_mib"], saved["disk_size_gib"]) == (2, 256, 1)
    assert all(type(saved[k]) is int for k in ("vcpu_count", "mem_size_mib", "disk_size_gib"))
