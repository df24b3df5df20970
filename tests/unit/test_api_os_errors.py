"""What a client reads when the daemon cannot write a file: a full or read-only
disk said as such, never the server's paths (scalebox/daemon/app.py).

The VM service here is a stand-in that raises the OSError a full disk raises;
tests/unit/test_vms.py makes a real full disk for the service's own handling.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from typing import Any

import pytest
from starlette.types import Message

from scalebox.config import ServerConfig
from scalebox.daemon.app import create_app

TOKEN = "t" * 32


class FailingService:
    def __init__(self, error: OSError) -> None:
        self.error = error

    def list_templates(self) -> Any:
        raise self.error


def _get(error: OSError) -> tuple[int, dict[str, str]]:
    app = create_app(ServerConfig(api_token=TOKEN), FailingService(error), logging.getLogger("t"))
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "GET", "path": "/templates", "raw_path": b"/templates",
        "query_string": b"", "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
        "http_version": "1.1", "scheme": "http", "server": ("t", 1), "client": ("c", 2),
        "root_path": "",
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_a_507_that_names_it_and_no_path(code: int) -> None:
    status, body = _get(OSError(code, "No space left on device", "/var/lib/scalebox/x"))
    assert status == 507
    assert (
        body["error"] == "the server's disk is full (No space left on device); nothing was changed"
    )
    assert "delete VMs or templates" in body["hint"]
    assert "/var/lib" not in json.dumps(body)


def test_a_read_only_disk_is_said_and_other_file_errors_name_their_reason() -> None:
    status, body = _get(OSError(errno.EROFS, "Read-only file system", "/var/lib/scalebox/x"))
    assert (status, body["error"]) == (
        500,
        "the server's data directory is read-only (Read-only file system); nothing was changed",
    )
    status, body = _get(OSError(errno.EIO, "Input/output error", "/var/lib/scalebox/x"))
    assert (status, body["error"]) == (
        500,
        "the server could not read or write a file (Input/output error)",
    )
    assert "journalctl -u scaleboxd" in body["hint"]
