"""The HTTP client's translation of answers the real daemon never gives.

A well-behaved scaleboxd does not answer 500, HTML or redirects on purpose,
so these cases use httpx.MockTransport (a plain function standing in for the
server); everything the daemon does answer is tested against it in test_e2e.
The timeout case uses a real loopback socket that accepts and never answers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from scalebox.cli import output
from scalebox.cli.client import Client
from scalebox.cli.errors import (
    EXIT_UNREACHABLE,
    ApiError,
    AuthRefused,
    Unreachable,
    exit_code_for,
)
from scalebox.cli.main import listed, ssh_argv

URL = "http://127.0.0.1:8080"


def answering(status: int, *, json: object = None, text: str | None = None) -> httpx.MockTransport:
    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=json, text=text)

    return httpx.MockTransport(handler)


def test_server_error_shows_the_servers_text_on_one_line() -> None:
    transport = answering(500, json={"error": "disk\nfull"})
    with Client(URL, "t", transport=transport) as client, pytest.raises(ApiError) as caught:
        client.list_vms()
    assert caught.value.what == "disk full (HTTP 500)"
    assert exit_code_for(caught.value) == 1
    assert "journalctl -u scaleboxd" in str(caught.value.hint)


def test_an_answer_that_is_not_json_is_an_api_error_naming_the_url() -> None:
    transport = answering(200, text="<html>hello</html>")
    with Client(URL, "t", transport=transport) as client, pytest.raises(ApiError) as caught:
        client.list_templates()
    assert "is not a JSON object" in caught.value.what
    assert "points at scaleboxd" in str(caught.value.hint)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "-1E+999"])
def test_an_answer_with_a_number_json_has_not_is_malformed(constant: str) -> None:
    """Python's parser takes them; --json passed them on and broke jq downstream."""
    transport = answering(200, text=f'{{"vms": [], "total": {constant}}}')
    with Client(URL, "t", transport=transport) as client, pytest.raises(ApiError) as caught:
        client.list_vms()
    assert "is not a JSON object" in caught.value.what


def test_a_redirect_is_not_followed_so_the_token_stays_here() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "http://203.0.113.9/vms"})

    transport = httpx.MockTransport(handler)
    with Client(URL, "t", transport=transport) as client, pytest.raises(ApiError) as caught:
        client.list_vms()
    assert seen == [f"{URL}/vms"]
    assert "(HTTP 302)" in caught.value.what
    assert "to http://203.0.113.9/vms" in caught.value.what
    assert "token was not sent there" in str(caught.value.hint)


def test_a_503_that_outlasts_the_retries_says_nothing_changed() -> None:
    # No Retry-After: not retried, and the hint says a retry is safe.
    transport = answering(503, json={"error": "scaleboxd is stopping"})
    with Client(URL, "t", transport=transport) as client, pytest.raises(ApiError) as caught:
        client.create_vm({"template": "debian-base", "ssh_public_key": "k"})
    assert caught.value.what == "scaleboxd is stopping (HTTP 503)"
    assert "changed nothing" in str(caught.value.hint)


def test_every_request_carries_the_bearer_token_and_quotes_names() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    with Client(URL, "sb-secret", transport=httpx.MockTransport(handler)) as client:
        client.delete_vm("a?b#c")
    assert seen[0].headers["Authorization"] == "Bearer sb-secret"
    assert seen[0].url.raw_path == b"/vms/a%3Fb%23c"


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A real loopback server that accepts connections and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_server_that_does_not_answer_times_out_as_unreachable(silent_server: str) -> None:
    timeout = httpx.Timeout(0.3, connect=0.3)
    with Client(silent_server, "t", timeout=timeout) as client, pytest.raises(Unreachable) as e:
        client.health()
    assert e.value.what.startswith(f"the Scalebox server at {silent_server} did not answer in time")
    assert exit_code_for(e.value) == EXIT_UNREACHABLE


def test_a_change_that_timed_out_is_not_said_to_be_safe_to_retry(silent_server: str) -> None:
    """'then retry' after a POST /vms that the server may still carry out made a
    second VM, or a 409 for the first one's name."""
    timeout = httpx.Timeout(0.3, connect=0.3)
    with Client(silent_server, "t", timeout=timeout) as client, pytest.raises(Unreachable) as e:
        client.create_vm({"template": "debian-base", "ssh_public_key": "k"})
    assert e.value.hint is not None
    assert e.value.hint.startswith("the request was sent and may still be carried out")
    assert "then retry" not in e.value.hint


def test_ctrl_c_exits_130_not_the_api_error_code() -> None:
    """A real `scalebox status` waiting on a silent server, interrupted with SIGINT."""
    exe = Path(sys.executable).with_name("scalebox")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        env = {**os.environ, "SCALEBOX_URL": url, "SCALEBOX_TOKEN": "sb-" + "0" * 48}
        child = subprocess.Popen(
            [str(exe), "status"], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            # Ready when the whole request has arrived: the CLI now waits for an answer.
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    assert chunk, request
                    request += chunk
                assert request.startswith(b"GET /health ")
                child.send_signal(signal.SIGINT)
                _out, err = child.communicate(timeout=30)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert "scalebox: interrupted" in err


def test_an_answer_cut_off_after_a_change_was_sent_is_not_called_unreachable() -> None:
    """A real loopback server reads the whole POST, sends 9 bytes of its answer and
    closes: "cannot reach the server ... check that scaleboxd is running" invited a
    blind retry of a create that may have been made."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"

        def answer_in_part() -> None:
            conn, _ = server.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request or not request.endswith(b"}"):
                    request += conn.recv(4096)
                conn.sendall(b"HTTP/1.1 ")

        threading.Thread(target=answer_in_part, daemon=True).start()
        with Client(url, "t") as client, pytest.raises(Unreachable) as e:
            client.create_vm({"template": "debian-base", "ssh_public_key": "k"})
    assert e.value.what.startswith(f"the connection to the Scalebox server at {url} broke")
    assert e.value.hint is not None
    assert e.value.hint.startswith("the request was sent and may still be carried out")


@pytest.mark.parametrize(
    "vm", [{"ip": "evil@10.0.0.1", "ssh_port": 22}, {"ip": "a b", "ssh_port": 22},
           {"ip": "10.0.0.1", "ssh_port": 70000}, {"ip": "-oProxyCommand=x", "ssh_port": 22}],
)  # fmt: skip
def test_ssh_fields_from_the_server_must_be_an_address_and_a_port(vm: dict[str, object]) -> None:
    """ "evil@host" chose the login user; the server's text is not an argument of ours."""
    with pytest.raises(ApiError, match=r"has no (valid address|SSH port)"):
        ssh_argv(vm, None, (), ())
    assert ssh_argv({"ip": "::1", "ssh_port": 22}, None, (), ())[-1] == "user@::1"


def test_server_text_reaches_the_terminal_as_text_not_as_controls_or_markup() -> None:
    """An escape sequence in a VM's name set the terminal's title; "[link=...]" in a
    table cell drew a link and "[/oops]" raised a traceback (rich markup)."""
    console = Console(record=True, force_terminal=True, width=200)
    cells = ["\x1b]0;PWNED\x07name", "[link=http://evil.example]click[/link]", "[/oops]"]
    output.render_rich_table(("A", "B", "C"), [cells], console)
    shown = console.export_text()
    assert "\\x1b]0;PWNED\\x07name" in shown
    assert "[link=http://evil.example]click[/link]" in shown and "[/oops]" in shown
    assert "\x1b]0;" not in shown
    assert output.text("a\u202eb\x00") == "a\\u202eb\\x00"
    with pytest.raises(ApiError, match="no list of objects under 'vms'"):
        listed({"vms": ["abc"]}, "vms")


def test_a_401_to_a_request_without_a_token_says_the_url_leads_elsewhere() -> None:
    """`scalebox status` sends no token (/health and /info are public): a 401 there came
    from a URL with a path too many, and "the server refused the token" misled."""
    public = answering(401, json={"error": "missing"})
    with Client(URL, transport=public) as client, pytest.raises(ApiError) as e:
        client.health()
    assert "asks for a token for /health, which scaleboxd answers without one" in e.value.what
    assert e.value.hint is not None and "no path after the port" in e.value.hint
    private = answering(401, json={"error": "bad"})
    with Client(URL, "t", transport=private) as client, pytest.raises(AuthRefused):
        client.list_vms()
