"""Verify: is scaleboxd really up, with the expected version, and does it stay up?

1. systemd reports the unit active (Type=notify: the process has sent READY=1);
2. GET /health answers 200 with ``"version"`` equal to the expected one, so
   the old process cannot pass for the new one;
3. for a stability window the main PID, the restart count and the
   active state stay the same, and /health keeps answering.

Polls every 0.2 s, with an overall deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from scalebox.update.errors import UpdateError, VerifyError
from scalebox.update.systemd import SERVICE, ServiceManager, UnitState

POLL = 0.2
WRONG_VERSION_GRACE = 1.0  # seconds of a wrong answer before giving up


@dataclass(frozen=True)
class Check:
    health_url: str
    expected_version: str
    stability_window: float = 5.0
    timeout: float = 60.0


def probe(client: httpx.Client, url: str) -> str | None:
    """The version /health reports, '' when it answers without one, None when it does not answer."""
    try:
        response = client.get(url, timeout=1.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("version", "")) if isinstance(body, dict) else ""


def _describe(state: UnitState) -> str:
    return f"{state.active}/{state.sub}, main PID {state.main_pid}"


def verify(
    service: ServiceManager,
    client: httpx.Client,
    check: Check,
    report: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> UnitState:
    """Return the unit state once healthy and stable; raise VerifyError saying what failed."""
    deadline = clock() + check.timeout
    wrong_since: float | None = None
    last = "no answer yet"
    while True:
        try:
            state = service.state(SERVICE)
        except UpdateError as exc:
            raise VerifyError(f"cannot read the state of scaleboxd: {exc.what}") from None
        if state.active == "failed":
            raise VerifyError(
                f"scaleboxd {check.expected_version} failed to start ({_describe(state)})",
                "see `journalctl -u scaleboxd -n 50`",
            )
        if state.running:
            version = probe(client, check.health_url)
            if version == check.expected_version:
                break
            if version is not None:
                last = f"/health reports version {version!r}"
                wrong_since = wrong_since if wrong_since is not None else clock()
                if clock() - wrong_since >= WRONG_VERSION_GRACE:
                    raise VerifyError(
                        f"scaleboxd answers but {last}, expected {check.expected_version!r}",
                        "the release's /health does not report its own version",
                    )
            else:
                last = f"unit {_describe(state)}, /health does not answer"
        else:
            last = f"unit {_describe(state)}"
        if clock() >= deadline:
            raise VerifyError(
                f"scaleboxd {check.expected_version} was not healthy within "
                f"{check.timeout:.0f} s ({last})",
                "see `journalctl -u scaleboxd -n 50`",
            )
        sleep(POLL)

    report(
        f"scaleboxd {check.expected_version} is healthy (main PID {state.main_pid}); "
        f"watching it for {check.stability_window:g} s"
    )
    healthy = state
    window_end = clock() + check.stability_window
    while clock() < window_end:
        sleep(POLL)
        state = service.state(SERVICE)
        moved = (
            not state.running
            or state.main_pid != healthy.main_pid
            or state.restarts != healthy.restarts
        )
        answer = None if moved else probe(client, check.health_url)
        if moved or answer != check.expected_version:
            seconds = check.stability_window - max(0.0, window_end - clock())
            cause = (
                f"unit {_describe(state)} (was main PID {healthy.main_pid})"
                if moved
                else f"/health answered {answer!r}"
            )
            raise VerifyError(
                f"scaleboxd {check.expected_version} did not stay healthy: after "
                f"{seconds:.1f} s {cause}",
                "see `journalctl -u scaleboxd -n 50`",
            )
    return healthy
