"""Verify: is scaleboxd really up, with the expected version, and does it stay up?

1. systemd reports the unit active (Type=notify: the process has sent READY=1);
2. GET /health answers 200 with ``"version"`` equal to the expected one, so
   the old process cannot pass for the new one;
3. for a stability window the main PID, the restart count and the
   active state stay the same, and /health keeps answering.

Polls every 0.2 s, with an overall deadline. In the stability window the
main process is watched through a pidfd, which says at once when it ends,
so systemd's state is read only then and at the window's end: each
`systemctl show` cost ~12 ms of CPU (~8 ms the program, ~4 ms systemd),
25 of them per window at the updater's full priority beside the new daemon
serving. Without a pidfd (a kernel before 5.3, or a main PID not visible
from here) the state is read every poll.

An update's window may give way (``give_way``): its polls and its end's
state read then wait for the CPU behind the daemon serving. A lowered probe
that gets no answer is no verdict: a probe starved of the CPU on a
saturated server would roll a healthy release back. The updater goes back
to full priority and asks again, and the answer it gets there decides.
Every other verdict (the main process ended, systemd's state moved, a wrong
version) is certain whatever the priority.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from scalebox import priority
from scalebox.update.errors import UpdateError, VerifyError
from scalebox.update.interrupt import Interrupted
from scalebox.update.systemd import SERVICE, ServiceManager, UnitState

POLL = 0.2
WRONG_VERSION_GRACE = 1.0  # seconds of a wrong answer before giving up
# Seconds of "inactive, nothing queued" before giving up. Every caller has just
# started the unit (or seen it serve), so nothing will start it again: somebody
# stopped it, or its process exited with status 0. Waiting out the whole timeout
# (60 s) for that told the operator nothing new. A client's connection to the
# socket would start it within this grace (socket activation).
STOPPED_GRACE = 2.0


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


class _Watch:
    """The end of one process, seen through its pidfd; ``exact`` False: no pidfd, and
    ``wait`` only sleeps (the caller must read systemd's state every time)."""

    def __init__(self, pid: int) -> None:
        self._poll: select.poll | None = None
        self._fd: int | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            # No pidfd_open (kernel < 5.3, not Linux), or no such process here (it
            # ended already, or another PID namespace): poll systemd instead.
            return
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    @property
    def exact(self) -> bool:
        return self._poll is not None

    def wait(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the process ends; whether it has ended."""
        if self._poll is None:
            time.sleep(seconds)
            return False
        return bool(self._poll.poll(seconds * 1000))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def _watching(pid: int) -> Iterator[_Watch]:
    watch = _Watch(pid)
    try:
        yield watch
    finally:
        watch.close()


def _describe(state: UnitState) -> str:
    return f"{state.active}/{state.sub}, main PID {state.main_pid}"


def verify(
    service: ServiceManager,
    client: httpx.Client,
    check: Check,
    report: Callable[[str], None],
    *,
    give_way: Callable[[], object] | None = None,
) -> UnitState:
    """Return the unit state once healthy and stable; raise VerifyError saying what failed.

    ``give_way``: called as the stability window begins, to lower the updater for it
    (an update's; a rollback's window never waits). The caller restores the priority.
    """
    clock = time.monotonic
    deadline = clock() + check.timeout
    wrong_since: float | None = None
    stopped_since: float | None = None
    last = "no answer yet"
    while True:
        try:
            state = service.state(SERVICE)
        except Interrupted:
            raise
        except UpdateError as exc:
            raise VerifyError(f"cannot read the state of scaleboxd: {exc.what}") from None
        stopped = state.active == "inactive" and not state.queued
        stopped_since = (stopped_since or clock()) if stopped else None
        _refuse_ended(state, check, clock() - (stopped_since or clock()))
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
        time.sleep(POLL)

    report(
        f"scaleboxd {check.expected_version} is healthy (main PID {state.main_pid}); "
        f"watching it for {check.stability_window:g} s"
    )
    if give_way is not None:
        give_way()
    _stays_healthy(service, client, check, state, report)
    return state


def _refuse_ended(state: UnitState, check: Check, stopped_for: float) -> None:
    """Raise VerifyError when the unit will not come up by itself: it failed, or it has
    been inactive with nothing queued for ``stopped_for`` >= STOPPED_GRACE seconds."""
    if state.active == "failed":
        raise VerifyError(
            f"scaleboxd {check.expected_version} failed to start ({_describe(state)})",
            "see `journalctl -u scaleboxd -n 50`",
        )
    if stopped_for >= STOPPED_GRACE:
        raise VerifyError(
            f"scaleboxd {check.expected_version} stopped before it was healthy "
            f"({_describe(state)}, no start queued): something else stopped it "
            f"(`systemctl stop`), or its process exited with status {state.exit_status}",
            "see `journalctl -u scaleboxd -n 50`",
        )


def _stays_healthy(
    service: ServiceManager,
    client: httpx.Client,
    check: Check,
    healthy: UnitState,
    report: Callable[[str], None],
) -> None:
    """The stability window: raise VerifyError once the daemon moves or stops answering.
    systemd's state is read when the main process ends, at the window's end, and on
    every poll only without a pidfd."""
    clock = time.monotonic
    window_end = clock() + check.stability_window
    with _watching(healthy.main_pid) as watch:
        last = False
        while not last:
            left = window_end - clock()
            ended = watch.wait(min(POLL, max(left, 0.0)))
            if ended:
                priority.restore_process(report)  # a rollback follows: no more waiting
            last = clock() >= window_end
            state = service.state(SERVICE) if ended or last or not watch.exact else healthy
            moved = (
                ended  # certain, even before systemd has noticed
                or not state.running
                or state.main_pid != healthy.main_pid
                or state.restarts != healthy.restarts
            )
            answer = None if moved else probe(client, check.health_url)
            if answer is None and not moved and priority.lowered():
                # Maybe starved of the CPU, not unanswered: ask again at full
                # priority, and watch the rest of the window from there.
                report(
                    "/health did not answer while the updater gave way; "
                    "asking again at full priority"
                )
                priority.restore_process(report)
                answer = probe(client, check.health_url)
            if moved or answer != check.expected_version:
                seconds = check.stability_window - max(0.0, window_end - clock())
                if ended and state.main_pid == healthy.main_pid:
                    cause = f"main PID {healthy.main_pid} ended (unit {state.active}/{state.sub})"
                elif moved:
                    cause = f"unit {_describe(state)} (was main PID {healthy.main_pid})"
                else:
                    cause = f"/health answered {answer!r}"
                raise VerifyError(
                    f"scaleboxd {check.expected_version} did not stay healthy: after "
                    f"{seconds:.1f} s {cause}",
                    "see `journalctl -u scaleboxd -n 50`",
                )
