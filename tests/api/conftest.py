"""Helpers of the API tests: raw HTTP (exact paths and bytes), state snapshots, guests."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Scaleboxd

# A real public key (its private half was thrown away): an nspawn server, as ./do check
# runs the suite against, accepts only what really is a key.
SSH_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPcHiGf2WQ4uBjh5d9ZfFqOW9CFMBHuZckQwtZ58OfqC test@scalebox"
)


@dataclass(frozen=True)
class RawResponse:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    server: Scaleboxd,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = None,
) -> RawResponse:
    """Send exactly ``path`` and ``body`` (httpx would normalise '..' and encode)."""
    parts = urlsplit(server.url)
    conn_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = conn_class(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    all_headers = {"Content-Type": "application/json"} if body is not None else {}
    token = server.token if token is None else token
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return RawResponse(
            response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
        )
    finally:
        conn.close()


def state_of(server: Scaleboxd) -> tuple[Any, Any]:
    """What a client can see: the VM list and the template list."""
    with server.client() as client:
        vms = client.get("/vms")
        templates = client.get("/templates")
    assert vms.status_code == 200 and templates.status_code == 200
    return vms.json(), templates.json()


def assert_error(response: httpx.Response | RawResponse, status: int, *words: str) -> str:
    """The response is ``status`` with a JSON {"error": ...} that contains ``words``."""
    actual = response.status_code if isinstance(response, httpx.Response) else response.status
    body = response.json()
    assert actual == status, body
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    for word in words:
        assert word in body["error"], body
    return str(body["error"])


def guest_answer(server: Scaleboxd, port: int) -> dict[str, Any]:
    """Connect to a VM's ssh_port and read the guest's one JSON line."""
    host = urlsplit(server.url).hostname or "127.0.0.1"
    with socket.create_connection((host, port), timeout=5) as conn:
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return dict(json.loads(data))


@pytest.fixture
def make_vm(scaleboxd: Scaleboxd) -> Iterator[Any]:
    """Create VMs on the shared daemon and delete them after the test."""
    created: list[tuple[Scaleboxd, str]] = []

    def make(server: Scaleboxd = scaleboxd, **body: Any) -> dict[str, Any]:
        body = {"template": "debian-base", "ssh_public_key": SSH_KEY, **body}
        with server.client() as client:
            response = client.post("/vms", json=body)
        assert response.status_code == 201, response.text
        vm = dict(response.json())
        created.append((server, vm["id"]))
        return vm

    yield make
    for server, vm_id in created:
        if server.local and server.process is None:
            continue  # that daemon is gone; its fixture kills the guests
        with server.client() as client:
            client.delete(f"/vms/{vm_id}")


def run_scaleboxd(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``scaleboxd ARGS`` (as python -m, so the tested sources are used) to completion."""
    from tests.conftest import daemon_env  # noqa: PLC0415

    return subprocess.run(
        [sys.executable, "-m", "scalebox.daemon.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(env),
        check=False,
    )


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
