"""Work that can wait gives way to the daemon serving: a lower CPU priority, then back.

During an update the serving daemon shares a small server with work that
can wait: the updater downloading, verifying and building the next release,
and the next daemon importing Python and reconciling VMs before it serves
(each about a second of CPU). With both cores busy a request waits for the
CPU. So that work runs ``NICER`` steps nicer than the process was started
with (a unit's ``Nice=``, 0 by default; and at nice ``NICER`` at least),
and goes back to it when it is over: the daemon just before it tells
systemd it is ready, the updater before it switches (from then on the
service is at stake; once the new daemon is verified, the commit and the
pruning can wait again). Only root can go back (CAP_SYS_NICE); any other
user keeps its priority throughout.

Two levels, because nice alone orders nothing between sessions:

- Nice values are per thread on Linux: both steps set every thread.
- With autogroup scheduling (``kernel.sched_autogroup_enabled=1``, the
  default of Debian's kernels), every session is one CPU group and a
  thread's nice orders it only against threads of its own session. systemd
  starts every service in a session of its own, so the updater's nice and a
  starting daemon's nice changed nothing against the daemon serving. The
  session's nice (``/proc/self/autogroup``) is what orders sessions, so
  it is lowered and restored too: ``Session.OWN`` for a process that leads
  its session (a service: the session is its own, and the unit's ``Nice=``
  becomes the session's, so it holds against other sessions too),
  ``Session.SHARED`` for one that shares it (``sudo scalebox-update``: the
  session's own value comes back), ``Session.LEAVE`` to leave it alone.
"""

from __future__ import annotations

# Light imports only (no pathlib, no dataclasses: ~30 ms of CPU): scaleboxd's entry
# point imports this module before it lowers the process, at full priority.
import _thread
import contextlib
import enum
import os
from collections.abc import Callable

TYPE_CHECKING = False  # typing's own costs an import; mypy reads this name as typing's
if TYPE_CHECKING:
    import threading

NICER = 10
MAX_NICE = 19
MIN_NICE = -20
AUTOGROUP = "/proc/self/autogroup"
AUTOGROUP_ENABLED = "/proc/sys/kernel/sched_autogroup_enabled"
# A shared session's nice from before it was lowered, one file per session (autogroup),
# while lowered: what the next run in that session goes back to if this one is killed.
SESSION_MEMOS = "/run/scalebox-priority"

Warn = Callable[[str], None]


class Session(enum.Enum):
    """What lower() does with the nice of the process's session (its autogroup)."""

    LEAVE = "leave"  # not the process's to change (run from a shell or a test runner)
    SHARED = "shared"  # lowered, then back to the value it had
    OWN = "own"  # the process leads it: lowered, then set to the process's own nice


class Given:
    """What restore() goes back to."""

    __slots__ = ("memo", "nice", "session")

    def __init__(self, nice: int, session: int | None = None, memo: str | None = None) -> None:
        self.nice = nice  # every thread's
        self.session = session  # the session's (autogroup); None: it was not changed
        self.memo = memo  # the session's memo (SESSION_MEMOS), removed once restored

    def __repr__(self) -> str:
        return f"Given(nice={self.nice}, session={self.session})"


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:  # noqa: PTH123 -- no pathlib: see the imports
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:  # noqa: PTH123
        f.write(text)


def _threads() -> list[int]:
    try:
        return [int(task) for task in os.listdir("/proc/self/task")]  # noqa: PTH208
    except OSError:
        return [0]  # 0: the calling thread


def _set(nice: int) -> None:
    for tid in _threads():
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def session_nice() -> int | None:
    """The nice of this process's session (its autogroup); None without autogroup scheduling."""
    return _autogroup()[1]


def _autogroup() -> tuple[str, int | None]:
    """This process's autogroup, by name ("autogroup-123", unique while the system
    runs), and its nice; None without autogroup scheduling."""
    try:
        if _read(AUTOGROUP_ENABLED).strip() != "1":
            return "", None
        # "/autogroup-123 nice 0"
        fields = _read(AUTOGROUP).split()
    except OSError:
        return "", None  # a kernel without CONFIG_SCHED_AUTOGROUP
    if len(fields) == 3 and fields[1] == "nice":
        with contextlib.suppress(ValueError):
            return fields[0].strip("/"), int(fields[2])
    return "", None


def set_session_nice(nice: int) -> None:
    """Set the nice of this process's session (its autogroup); root only to raise it."""
    _write(AUTOGROUP, f"{nice}\n")


def session_setup(nice: int | None) -> Callable[[], None] | None:
    """What a child started in a session of its own runs before its program (Popen's
    ``preexec_fn``) so that its session has ``nice``, the caller's session nice; None
    when there is nothing to set (0, what a new session has, or no autogroup).

    A new session is a new autogroup, always at nice 0 whatever its parent's:
    so a program the updater runs in a session of its own (the wheel install,
    a Python start) took the CPU from the daemon serving as an equal, all the
    while the updater itself ran lowered. Set by the parent once the child had
    started, the child's first milliseconds still ran at 0, and on a busy
    server many more: a lowered parent waits for a core to set it (a child
    watching its own session beside two busy sessions at nice 0 ran 3.4-3.6 ms
    of CPU at nice 0 in 9 of 15 starts). Run in the child after setsid() and
    before exec, it is never at 0. Plain system calls only: the child of a
    process with threads must not take a lock another thread may have held at
    the fork (an io object's, the import lock). Best effort: a failure leaves
    the session at 0, as before.
    """
    if not nice:
        return None
    text = f"{nice}\n".encode("ascii")

    def setup() -> None:
        try:
            fd = os.open(AUTOGROUP, os.O_WRONLY)
            try:
                os.write(fd, text)
            finally:
                os.close(fd)
        except OSError:
            pass

    return setup


def _clamp(nice: int) -> int:
    return max(MIN_NICE, min(nice, MAX_NICE))


def _waiting(given: int) -> int:
    """The nice of work that can wait: ``NICER`` steps nicer than ``given``, and at nice
    ``NICER`` at least (never a higher priority). A unit's negative ``Nice=`` (the
    handover instance's -5) is for serving; its start, a second of imports, gives way
    like any other (at -5 + 10 it still took a quarter of a contended CPU from the
    daemon serving)."""
    return _clamp(max(given, 0) + NICER)


def lower(warn: Warn, session: Session = Session.LEAVE) -> Given | None:
    """Make the process (and, per ``session``, its session) ``NICER`` (see _waiting); what
    restore() needs.

    None (nothing changed) when the process could not raise its priority again.
    """
    if os.geteuid() != 0:
        return None
    given = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        _set(_waiting(given))
    except OSError as exc:
        warn(f"cannot lower the CPU priority ({exc.strerror}); going on at the one it has")
        with contextlib.suppress(OSError):
            _set(given)  # the threads changed before the failure
        return None
    group, before = ("", None) if session is Session.LEAVE else _autogroup()
    if before is None:
        return Given(given)
    memo = None
    if session is Session.SHARED and group:
        memo = os.path.join(SESSION_MEMOS, group)  # noqa: PTH118 -- no pathlib: see the imports
        before = _left_lowered(memo, before)
    base = given if session is Session.OWN else before
    if memo is not None:  # first: a kill right after the lowering finds it written
        memo = _remember(memo, base, _waiting(base))
    try:
        set_session_nice(_waiting(base))
    except OSError as exc:
        warn(
            f"cannot lower the CPU priority of this session ({exc.strerror}); only the "
            "process's own is lower, which orders it only within its session"
        )
        _forget(memo)
        return Given(given)
    return Given(given, base, memo)


def _left_lowered(memo: str, now: int) -> int:
    """The session nice to go back to: the one a run killed while it had the session
    lowered found (its memo, if the session is still at the nice it set), else ``now``.
    A SIGKILL skips every restore: the admin's root shell stayed at nice 10, and the
    next run lowered it from there, to 19, and gave back 10."""
    try:
        found, lowered = (int(field) for field in _read(memo).split()[:2])
    except (OSError, ValueError):
        return now
    return found if lowered == now else now


def _remember(memo: str, before: int, lowered: int) -> str | None:
    """Write the memo (best effort: without it a killed run leaves its session lowered,
    as before); the memo, if written. Its last field is this process's: restore removes
    only a memo that is still its own, never a later run's."""
    try:
        os.makedirs(SESSION_MEMOS, mode=0o700, exist_ok=True)  # noqa: PTH103
        fd = os.open(memo, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"{before} {lowered} {os.getpid()}\n".encode("ascii"))
        finally:
            os.close(fd)
    except OSError:
        return None
    return memo


def _forget(memo: str | None) -> None:
    """Remove the memo if this process wrote it (a later run in the session may have
    written its own since, which must stay)."""
    if memo is None:
        return
    with contextlib.suppress(OSError, ValueError, IndexError):
        if int(_read(memo).split()[2]) == os.getpid():
            os.unlink(memo)  # noqa: PTH108


def restore(given: Given | None, warn: Warn) -> None:
    """Back to the priority ``lower()`` found; a failure is only reported."""
    if given is None:
        return
    try:
        _set(given.nice)
    except OSError as exc:
        warn(
            f"cannot restore the CPU priority (nice {given.nice}): {exc.strerror}; it stays "
            "lower until the process ends (restart it to serve at full priority)"
        )
    if given.session is None:
        return
    try:
        set_session_nice(given.session)
    except OSError as exc:
        warn(
            f"cannot restore the CPU priority of this session (nice {given.session}): "
            f"{exc.strerror}; it stays lower until the session ends (restart the service, "
            f"or as root run `echo {given.session} > /proc/$$/autogroup` in a shell of it)"
        )
        return
    _forget(given.memo)


# What lower_process() found, until restore_process(); the timer that ends the giving
# way early, and whether it has (the process then runs at ``_relaxed(given)``).
_lowered: dict[str, Given | None] = {}
_timer: list[threading.Timer] = []  # threading is imported only when one is started
_expired: set[int] = set()  # id() of the Given whose at_most has passed
_guard = _thread.allocate_lock()  # the timer's thread and the caller's restore race


def lower_process(
    warn: Warn, session: Session = Session.LEAVE, *, at_most: float | None = None
) -> None:
    """lower() until restore_process(), from anywhere in the process; a second call is a no-op.

    ``at_most``: seconds after which the process stops giving way by itself, whatever
    it is doing. Giving way must never become starving: on a server whose CPU is
    saturated (busy VMs, each a session at nice 0) a lowered process gets a few
    percent of a core, and work of a second takes a minute, past the timeouts of
    whoever waits for it (systemd's TimeoutStartSec=, the updater's steps). It then
    runs at its given priority but never above nice 0 (a negative ``Nice=`` is for
    serving); restore_process() still puts every thread back to the given one.
    """
    with _guard:
        if "given" in _lowered:
            return
        given = _lowered["given"] = lower(warn, session)
    if given is None or at_most is None:
        return
    import threading  # noqa: PLC0415 - lowered by now; ~2 ms of CPU not every caller needs

    timer = threading.Timer(at_most, _stop_giving_way, (given, at_most, warn))
    timer.daemon = True
    timer.name = "priority-at-most"
    with _guard:
        _timer.append(timer)
    timer.start()


def _relaxed(given: Given) -> Given:
    """The priority of a process that stopped giving way: its given one, at most nice 0."""
    session = None if given.session is None else max(given.session, 0)
    return Given(max(given.nice, 0), session)


def _stop_giving_way(given: Given, seconds: float, warn: Warn) -> None:
    # Under the guard: a restore_process() meanwhile waits for this one, then puts every
    # thread (one made while this ran too) back to the given priority.
    with _guard:
        if _lowered.get("given") is not given or id(given) in _expired:
            return  # restored meanwhile (and maybe lowered again, with a timer of its own)
        restore(_relaxed(given), warn)
        _expired.add(id(given))
    warn(
        f"still busy after {seconds:g} s at a lower CPU priority; going on at normal "
        "priority, so that a saturated CPU cannot starve it"
    )


def lowered() -> bool:
    """Whether lower_process() lowered this process, and it still gives way."""
    with _guard:
        given = _lowered.get("given")
        return given is not None and id(given) not in _expired


def given_nice() -> int:
    """The nice this process was given: what restore_process() goes back to, or the one it
    has when it is not lowered (what a program it starts for good should run at)."""
    given = _lowered.get("given")
    return given.nice if given is not None else os.getpriority(os.PRIO_PROCESS, 0)


def restore_process(warn: Warn) -> None:
    """Undo lower_process(), if it ran; else nothing."""
    with _guard:
        lowered = "given" in _lowered
        if lowered:
            # Forgotten only once restored: a signal raised in between (the updater
            # turns SIGINT into an exception) leaves it for the next call to restore,
            # a rollback's, rather than the process lowered for good.
            restore(_lowered["given"], warn)
        _lowered.pop("given", None)
        _expired.clear()
        timers, _timer[:] = list(_timer), []
    for timer in timers:
        timer.cancel()
