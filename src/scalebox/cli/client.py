"""The one HTTP door of the CLI: a thin client of the scaleboxd API.

Every method returns the API's JSON unchanged (``--json`` prints it as is).
httpx exceptions and error answers are translated here, at the boundary, into
the CLI's errors: Unreachable, AuthRefused, NotFound, ApiError. Tests may pass
an httpx transport; the CLI uses the real network.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from scalebox.cli import output
from scalebox.cli.errors import ApiError, AuthRefused, NotFound, Unreachable

# Connecting to a live server takes milliseconds; creating a VM copies a disk.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)

Json = dict[str, Any]

_HINTS = {
    400: "check the command's options (see `scalebox COMMAND --help`)",
    403: "the server does not allow this",
    409: "choose another name; `scalebox template list` shows the names in use",
    503: "the server most likely changed nothing: retry in a minute (it may be restarting "
    "or being updated), or, if it ran out of ports or addresses, delete VMs you no longer need",
    507: "free space on the server: delete VMs or templates you no longer need",
}
_SERVER_FAULT_HINT = "the server failed; its log says why (journalctl -u scaleboxd)"


def _segment(value: str) -> str:
    """Quote one path segment so that a name can never address another route."""
    return quote(value, safe="")


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    # "[Errno 111] Connection refused" reads better without the errno.
    return re.sub(r"^\[Errno -?\d+\]\s*", "", text).strip()


def _one_line(text: str, limit: int = 300) -> str:
    line = output.printable(" ".join(text.split()))  # no escape sequence from a server
    return line if len(line) <= limit else line[: limit - 1] + "…"


# Transport errors that mean the request never reached the server.
UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)

# How long, in all, the client waits on answers that ask it to retry (503 + Retry-After).
RETRY_BUDGET = 10


def _retry_after(response: httpx.Response) -> int:
    """Seconds a 503 asks to wait before the same request again (0: do not retry)."""
    raw = response.headers.get("Retry-After", "") if response.status_code == 503 else ""
    return int(raw) if raw.isdigit() and 0 < int(raw) <= RETRY_BUDGET else 0


class Client:
    """scaleboxd's REST API at ``url``, authenticated with ``token``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        token_source: str = "",
        transport: httpx.BaseTransport | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self._sleep = sleep
        self._token_source = token_source
        self._sends_token = token is not None
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        # Redirects are not followed: a redirect would carry the token to another host.
        self._http = httpx.Client(
            base_url=url,
            headers=headers,
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API ---------------------------------------------------------

    def health(self) -> Json:
        return self._json(self._request("GET", "/health"))

    def info(self) -> Json:
        return self._json(self._request("GET", "/info"))

    def list_vms(self) -> Json:
        return self._json(self._request("GET", "/vms"))

    def get_vm(self, id_or_name: str) -> Json:
        return self._json(
            self._request("GET", f"/vms/{_segment(id_or_name)}", not_found=_vm_gone(id_or_name))
        )

    def create_vm(self, body: Json) -> Json:
        template = str(body.get("template", ""))
        not_found = (
            f"template '{template}' not found",
            "`scalebox template list` shows the templates",
        )
        hints = {
            400: "--vcpu, --mem and --disk set vcpu_count, mem_size_mib and disk_size_gib; "
            "see `scalebox vm create --help`"
        }
        return self._json(
            self._request("POST", "/vms", body=body, not_found=not_found, hints=hints)
        )

    def delete_vm(self, id_or_name: str) -> None:
        self._request("DELETE", f"/vms/{_segment(id_or_name)}", not_found=_vm_gone(id_or_name))

    def snapshot_vm(self, id_or_name: str, template_name: str) -> Json:
        return self._json(
            self._request(
                "POST",
                f"/vms/{_segment(id_or_name)}/snapshot",
                body={"template_name": template_name},
                not_found=_vm_gone(id_or_name),
            )
        )

    def list_templates(self) -> Json:
        return self._json(self._request("GET", "/templates"))

    def delete_template(self, name: str) -> None:
        self._request(
            "DELETE",
            f"/templates/{_segment(name)}",
            not_found=(f"template '{name}' not found", "`scalebox template list` shows them"),
            hints={403: "new VMs are made from it; delete only templates you made"},
        )

    # -- translation of answers into errors --------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Json | None = None,
        not_found: tuple[str, str] | None = None,
        hints: dict[int, str] | None = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, json=body)
            waited = 0
            # 503 with Retry-After: the daemon made no change and asks to try again
            # (it is stopping, or an update's handover instance answered).
            while (pause := _retry_after(response)) and waited + pause <= RETRY_BUDGET:
                self._sleep(pause)
                waited += pause
                response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise self._unreachable(method, exc) from exc
        if response.is_success:
            return response
        message = self._error_text(response)
        status = response.status_code
        if status == 401 and not self._sends_token:
            # /health and /info need no token on scaleboxd: a 401 for them says the URL
            # leads elsewhere (a path too many: scaleboxd answers 401 to any unknown route).
            raise ApiError(
                f"the server at {self.url} asks for a token for {path}, which scaleboxd "
                "answers without one",
                "check that the URL (SCALEBOX_URL or `scalebox login`) points at scaleboxd "
                "itself, with no path after the port",
                status,
            )
        if status == 401:
            source = f" from {self._token_source}" if self._token_source else ""
            raise AuthRefused(
                f"the server refused the token{source}",
                "run `scalebox login` to store a valid one",
                status,
            )
        if status == 404 and not_found is not None:
            raise NotFound(not_found[0], not_found[1], status)
        if status == 404:
            raise NotFound(f"{method} {path}: {message}", "check SCALEBOX_URL", status)
        if response.is_redirect:
            # Not followed: the token would go wherever the Location says.
            where = _one_line(response.headers.get("Location", ""), 200) or "elsewhere"
            raise ApiError(
                f"the server at {self.url} redirects {path} to {where} (HTTP {status})",
                "scaleboxd does not redirect: if you trust the new address, point "
                "SCALEBOX_URL (or `scalebox login`) at it; the token was not sent there",
                status,
            )
        hint = (hints or {}).get(status) or _HINTS.get(
            status, _SERVER_FAULT_HINT if status >= 500 else None
        )
        raise ApiError(f"{message} (HTTP {status})", hint, status)

    def _unreachable(self, method: str, exc: httpx.TransportError) -> Unreachable:
        """What a transport error means, and whether a retry is safe to suggest."""
        # A change that was sent may still be made (a timeout, or a connection cut
        # in the answer): a blind retry could make a second VM or find the first
        # one's name taken.
        unsent = isinstance(exc, UNSENT)
        if method != "GET" and not unsent:
            next_step = (
                "the request was sent and may still be carried out: see `scalebox vm "
                "list` and `scalebox template list` before you retry"
            )
        elif isinstance(exc, httpx.TimeoutException):
            next_step = "check that scaleboxd is running and not overloaded, then retry"
        else:
            next_step = (
                "check the URL (SCALEBOX_URL or `scalebox login`) and that scaleboxd is running"
            )
        if isinstance(exc, httpx.TimeoutException):
            what = f"the Scalebox server at {self.url} did not answer in time"
        elif unsent:
            what = f"cannot reach the Scalebox server at {self.url}"
        else:
            what = f"the connection to the Scalebox server at {self.url} broke"
        return Unreachable(f"{what} ({_reason(exc)})", next_step)

    def _error_text(self, response: httpx.Response) -> str:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            return _one_line(payload["error"])
        if response.text.strip():
            return _one_line(response.text)
        return response.reason_phrase or "error"

    def _json(self, response: httpx.Response) -> Json:
        try:
            payload = response.json(parse_constant=_not_json, parse_float=_finite)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise ApiError(
                f"the server at {self.url} answered {response.request.url.path} "
                "with something that is not a JSON object",
                "check that the URL points at scaleboxd",
                response.status_code,
            )
        return payload


def _not_json(constant: str) -> object:
    """Python's parser takes NaN and Infinity, which are not JSON: passed on by --json,
    they broke the program reading it (jq refuses them). Such an answer is malformed."""
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    """A float, which a number too large for one (1e400) is not: it became Infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number")
    return value


def _vm_gone(id_or_name: str) -> tuple[str, str]:
    return (f"VM '{id_or_name}' not found", "`scalebox vm list` shows the VMs")
