"""What keeps the daemon serving first: work that can wait runs nicer (scalebox.priority,
every thread, and back after), and a starting daemon freezes its heap before it serves.

Each case runs in a child process: nice values and the collector belong to the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scalebox import priority
from scalebox.daemon import serving
from tests.conftest import local_scaleboxd, write_config

PROBE = """
import json, os, threading
from pathlib import Path
from scalebox import priority

def nice_of_threads():
    return sorted({os.getpriority(os.PRIO_PROCESS, int(t.name))
                   for t in Path("/proc/self/task").iterdir()})

stop = threading.Event()
worker = threading.Thread(target=stop.wait)  # a thread that exists before: it must follow
worker.start()
before = nice_of_threads()
warnings = []
priority.lower_process(warnings.append)
priority.lower_process(warnings.append)  # a second call changes nothing
inside = nice_of_threads()
priority.restore_process(warnings.append)
after = nice_of_threads()
priority.restore_process(warnings.append)  # nor does a second restore
again = nice_of_threads()
stop.set()
worker.join()
print(json.dumps({"before": before, "inside": inside, "after": after, "again": again,
                  "warnings": warnings}))
"""


def _in_a_child(code: str, *args: str) -> Any:
    """Run ``code`` in a new Python process, in a session of its own (so that no case
    changes the test runner's); the last line it printed, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        start_new_session=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


SESSION_PROBE = """
import json, os, sys
from scalebox import priority

os.setpriority(os.PRIO_PROCESS, 0, int(sys.argv[2]))  # as a unit's Nice= would have
warnings = []
before = priority.session_nice()
given = priority.lower(warnings.append, priority.Session[sys.argv[1]])
inside = (os.getpriority(os.PRIO_PROCESS, 0), priority.session_nice())
priority.restore(given, warnings.append)
after = (os.getpriority(os.PRIO_PROCESS, 0), priority.session_nice())
print(json.dumps({"before": before, "inside": inside, "after": after, "warnings": warnings}))
"""

needs_autogroup = pytest.mark.skipif(
    os.geteuid() != 0 or priority.session_nice() is None,
    reason="needs root and a kernel scheduling by autogroup (kernel.sched_autogroup_enabled=1)",
)


@needs_autogroup
@pytest.mark.parametrize(
    ("session", "unit_nice", "waiting", "lowered", "restored"),
    [
        # A process sharing its session (sudo's): the session's own value comes back.
        ("SHARED", 3, 13, 10, 0),
        # A service leads its session: it takes the unit's Nice= (3 here) once ready.
        ("OWN", 3, 13, 13, 3),
        # A unit's negative Nice= (the handover instance's -5) is for serving: its start
        # waits at 10 like any other, not at -5 + 10.
        ("OWN", -5, 10, 10, -5),
        # Run from a shell or a test runner: the session is left alone.
        ("LEAVE", 3, 13, 0, 0),
    ],
)
def test_the_session_is_lowered_too_for_nice_orders_nothing_across_sessions(
    session: str, unit_nice: int, waiting: int, lowered: int, restored: int
) -> None:
    """With autogroup scheduling a thread's nice counts only within its session, and every
    systemd service is a session of its own: lowering only the threads changed nothing
    against the daemon serving (seen: two CPU-bound sessions, one at nice 10, got the same
    share). Each child starts in a new session, whose autogroup nice is 0."""
    seen = _in_a_child(SESSION_PROBE, session, str(unit_nice))
    assert seen == {
        "before": 0,
        "inside": [waiting, lowered],
        "after": [unit_nice, restored],
        "warnings": [],
    }


KILLED_PROBE = """
import json, os, subprocess, sys
from scalebox import priority

priority.SESSION_MEMOS = sys.argv[1]
# An updater run killed (SIGKILL: no restore) while it had this session lowered.
killed = subprocess.Popen(
    [sys.executable, "-c", "import sys, time; from scalebox import priority; "
     "priority.SESSION_MEMOS = sys.argv[1]; priority.lower(print, priority.Session.SHARED); "
     "print('lowered', flush=True); time.sleep(60)", sys.argv[1]],
    stdout=subprocess.PIPE, text=True,
)
assert killed.stdout.readline().strip() == "lowered"
killed.kill()
killed.wait()
left = priority.session_nice()
warnings = []
given = priority.lower(warnings.append, priority.Session.SHARED)
inside = priority.session_nice()
priority.restore(given, warnings.append)
print(json.dumps({"left": left, "inside": inside, "after": priority.session_nice(),
                  "memos": os.listdir(sys.argv[1]), "warnings": warnings}))
"""


@needs_autogroup
def test_the_next_run_gives_back_what_a_killed_run_left_lowered(tmp_path: Path) -> None:
    """A SIGKILL skips every restore: a root shell's session stayed at nice 10, and the
    next run in it lowered from there (to 19) and gave back 10. The nice it found is
    kept beside the session while lowered, so the next run goes back to that."""
    seen = _in_a_child(KILLED_PROBE, str(tmp_path / "memos"))
    assert seen == {"left": 10, "inside": 10, "after": 0, "memos": [], "warnings": []}


CHILD_PROBE = """
import json
from scalebox import priority, runner

warnings = []
given = priority.lower(warnings.append, priority.Session.SHARED)
# The program's first act is to read its autogroup: its session has the caller's nice
# before the program starts, not once the caller gets round to it.
probe = ["cat", "/proc/self/autogroup"]
own = runner.run_program(probe, timeout=10, new_session=True)
shared = runner.run_program(probe, timeout=10)
mine = priority.session_nice()
priority.restore(given, warnings.append)
after = runner.run_program(probe, timeout=10, new_session=True)
print(json.dumps({"own": own.stdout.split(), "shared": shared.stdout.split(),
                  "after": after.stdout.split(), "mine": mine, "warnings": warnings}))
"""


@needs_autogroup
def test_a_program_run_in_a_session_of_its_own_keeps_the_callers_lower_priority() -> None:
    """A new session is a new autogroup at nice 0: the wheel install the updater runs
    in its own session (a second on every core) competed with the daemon serving as an
    equal, while the updater itself ran lowered. run_program gives it the caller's, in
    the child before its program starts: set by the lowered caller afterwards, a child
    beside two busy sessions ran 3.4-3.6 ms of CPU at nice 0 in 9 of 15 starts."""
    seen = _in_a_child(CHILD_PROBE)
    assert seen["warnings"] == []
    assert seen["mine"] == 10
    # "/autogroup-123 nice 10": a session of its own, at the caller's session nice.
    assert seen["own"][1:] == ["nice", "10"]
    assert seen["own"][0] != seen["shared"][0]
    assert seen["shared"][1:] == ["nice", "10"]  # the caller's own session
    assert seen["after"][1:] == ["nice", "0"]  # the caller back at 0: nothing written


ENTRY_PROBE = """
import json, os, sys
from scalebox import priority

seen = {}

class Watch:
    \"\"\"Notes the priority at the moment the updater's main module, and httpcore (which
    httpx imports only at its first Client()), are imported.\"\"\"
    def find_spec(self, name, path=None, target=None):
        if name in ("scalebox.update.main", "httpcore"):
            seen[name] = (os.getpriority(os.PRIO_PROCESS, 0), priority.session_nice())
        return None

sys.meta_path.insert(0, Watch())
sys.argv = ["scalebox-update", "--version"]
from scalebox.update import entry
code = entry.main()
seen["after"] = (os.getpriority(os.PRIO_PROCESS, 0), priority.session_nice())
seen["code"] = code
print(json.dumps(seen))
"""


@needs_autogroup
def test_the_updaters_imports_run_nicer_before_its_first_step() -> None:
    """`scalebox-update` imports ~0.4 s of CPU (click, httpx, rich, cryptography, httpcore)
    before any step; the entry point lowers the process and its session first, then goes
    back."""
    given = os.getpriority(os.PRIO_PROCESS, 0)
    seen = _in_a_child(ENTRY_PROBE)
    assert seen["code"] == 0
    assert seen["scalebox.update.main"] == [min(given + 10, 19), 10]
    assert seen["httpcore"] == [min(given + 10, 19), 10]
    assert seen["after"] == [given, 0]


DAEMON_ENTRY_PROBE = """
import json, os, sys
from scalebox import priority

seen = {}
WATCHED = {"scalebox.daemon.main": "importing", "scalebox.daemon.vms.guest": "guest"}

class Watch:
    \"\"\"Notes the priority when the daemon's main module, or a VM's program, is imported.\"\"\"
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED:
            seen[WATCHED[name]] = (os.getpriority(os.PRIO_PROCESS, 0), priority.session_nice())
        return None

sys.meta_path.insert(0, Watch())
sys.argv = ["scaleboxd", "--config", sys.argv[1] + "/missing.conf", *sys.argv[2:]]
from scalebox.daemon import entry
seen["code"] = entry.main()  # the config is missing: exits 2 before it would serve
print(json.dumps(seen))
"""


@needs_autogroup
@pytest.mark.parametrize(
    ("args", "others", "importing", "guest"),
    [
        # It will serve beside a daemon serving: lowered before main's imports.
        ([], True, "lowered", None),
        (["--handover"], True, "lowered", None),
        # Nobody serves (boot, `systemctl restart`): every client waits for this start.
        ([], False, "as started", None),
        (["--run-guest", "vm-1"], True, "as started", "as started"),  # a VM's: never lowered
        # A spelling the entry point does not know (argparse takes a prefix): lowered
        # at first, and back before the VM's program is even imported.
        (["--run-g", "vm-1"], True, "lowered", "given back"),
    ],
)
def test_a_daemon_start_gives_way_from_its_first_import_only_to_a_daemon_serving(
    tmp_path: Path, args: list[str], others: bool, importing: str, guest: str | None
) -> None:
    """The interpreter's start and main.py's imports (~60 ms of CPU) ran at the unit's
    priority in a new session at nice 0, beside the daemon serving, twice per update.
    A start with nobody serving must not give way: lowered, on a busy host, it took
    10-30 s while clients waited in the socket's queue."""
    given = os.getpriority(os.PRIO_PROCESS, 0)
    waiting = min(max(given, 0) + 10, 19)
    # (the process's nice, its session's): the child leads a new session, at 0.
    expected = {
        "lowered": [waiting, waiting],
        "as started": [given, 0],
        "given back": [given, given],
        None: None,
    }
    with contextlib.ExitStack() as stack:
        if others:  # what a daemon serving with this config holds (daemon/serving.py)
            holder = serving.Serving(str(tmp_path / "missing.conf"))
            assert holder.hold() is None
            stack.callback(holder.release)
        seen = _in_a_child(DAEMON_ENTRY_PROBE, str(tmp_path), *args)
    assert seen["code"] == 2
    assert seen["importing"] == expected[importing]
    assert seen.get("guest") == expected[guest]


GUEST_PROBE = """
import json, os, sys
from pathlib import Path
from scalebox import priority
from scalebox.daemon.vms.backend import ProcessBackend

data = Path(sys.argv[1])
(data / "vms" / "vm-1").mkdir(parents=True)
priority.lower_process(print, priority.Session.OWN)  # as a daemon reconciling at its start
pid = ProcessBackend(data).start("vm-1")  # kept unreaped: its stat stays readable
with open(f"/proc/{pid}/stat") as f:
    nice = int(f.read().rsplit(")", 1)[1].split()[16])  # field 19
try:
    os.kill(pid, 9)  # it exits by itself (no vm.json); never leave it running
except ProcessLookupError:
    pass
print(json.dumps({"guest": nice, "daemon": os.getpriority(os.PRIO_PROCESS, 0)}))
"""


@needs_autogroup
def test_a_stand_in_vm_started_by_a_lowered_daemon_runs_at_the_daemons_given_priority(
    tmp_path: Path,
) -> None:
    given = os.getpriority(os.PRIO_PROCESS, 0)
    seen = _in_a_child(GUEST_PROBE, str(tmp_path))
    assert seen == {"guest": given, "daemon": min(max(given, 0) + 10, 19)}


def test_only_the_programs_that_serve_are_lowered_at_start() -> None:
    from scalebox.daemon.entry import serves  # noqa: PLC0415

    assert serves(["--config", "/etc/scaleboxd/config"])
    assert serves(["--config", "/etc/scaleboxd/config", "--handover"])
    for other in (
        ["--config", "c", "--run-guest", "vm-1"],
        ["--run-guest=vm-1"],
        ["--check-config"],
        ["--check-config=/etc/scaleboxd/config"],
        ["--version"],
        ["-h"],
        ["--help"],
    ):
        assert not serves(other), other


AT_MOST_PROBE = """
import json, os, sys, threading, time
from scalebox import priority

def now():
    return (os.getpriority(os.PRIO_PROCESS, 0), priority.session_nice())

def threads():
    return sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")})

os.setpriority(os.PRIO_PROCESS, 0, int(sys.argv[1]))  # as the unit's Nice= would have
warnings = []
seen = {}
priority.lower_process(warnings.append, priority.Session.OWN, at_most=0.3)
seen["lowered"] = now()
deadline = time.monotonic() + 30  # the timer's thread runs lowered: give it time
while priority.lowered() and time.monotonic() < deadline:
    time.sleep(0.05)
seen["late"] = now()
# A thread made while the timer restored may have inherited the lowered nice:
# the restore at READY must still put every thread back.
stop = threading.Event()
worker = threading.Thread(target=stop.wait)
worker.start()
os.setpriority(os.PRIO_PROCESS, worker.native_id, 10)
priority.restore_process(warnings.append)
seen["ready"] = now()
seen["threads"] = threads()
# Restored in time: the timer is cancelled, and never ends a later lowering.
priority.lower_process(warnings.append, priority.Session.OWN, at_most=0.3)
priority.restore_process(warnings.append)
priority.lower_process(warnings.append, priority.Session.OWN, at_most=60)
time.sleep(0.6)
seen["again"] = now()
priority.restore_process(warnings.append)
stop.set()
worker.join()
seen["warnings"] = warnings
print(json.dumps(seen))
"""


@needs_autogroup
@pytest.mark.parametrize(
    ("unit_nice", "waiting", "relaxed"),
    [
        (0, 10, 0),
        # The handover unit's Nice=-5 is for serving: a start that stopped giving way
        # must not outrank the daemon serving, so it goes on at 0 until READY.
        (-5, 10, 0),
    ],
)
def test_giving_way_ends_by_itself_so_a_saturated_cpu_never_starves_a_start(
    unit_nice: int, waiting: int, relaxed: int
) -> None:
    """On a server whose CPU busy VMs saturate, a lowered start got a few percent of a
    core: a second of work took past systemd's TimeoutStartSec=. ``at_most`` bounds it."""
    seen = _in_a_child(AT_MOST_PROBE, str(unit_nice))
    assert seen["lowered"] == [waiting, waiting]
    assert seen["late"] == [relaxed, relaxed]
    assert seen["ready"] == [unit_nice, unit_nice]
    assert seen["threads"] == [unit_nice]
    assert seen["again"] == [waiting, waiting]
    assert len(seen["warnings"]) == 1, seen["warnings"]
    assert "still busy after 0.3 s" in seen["warnings"][0]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_root_runs_ten_steps_nicer_on_every_thread_until_it_goes_back() -> None:
    given = os.getpriority(os.PRIO_PROCESS, 0)
    seen = _in_a_child(PROBE)
    assert seen == {
        "before": [given],
        "inside": [min(given + 10, 19)],
        "after": [given],
        "again": [given],
        "warnings": [],
    }


INTERRUPTED_RESTORE = """
import json, os
from scalebox import priority

real = priority.restore
calls = []

def stopped_once(given, warn):
    calls.append(1)
    if len(calls) == 1:
        raise KeyboardInterrupt  # a signal the caller turns into an exception, right here
    real(given, warn)

priority.restore = stopped_once
priority.lower_process(print)
try:
    priority.restore_process(print)
except KeyboardInterrupt:
    pass
stuck = os.getpriority(os.PRIO_PROCESS, 0)
priority.restore_process(print)  # the rollback's: it must still know what to restore
print(json.dumps([stuck, os.getpriority(os.PRIO_PROCESS, 0)]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_a_restore_stopped_by_a_signal_is_done_by_the_next_one() -> None:
    """It forgot what to restore before restoring it: a Ctrl-C in between left the
    process lowered, and every later restore (a rollback's) did nothing."""
    given = os.getpriority(os.PRIO_PROCESS, 0)
    assert _in_a_child(INTERRUPTED_RESTORE) == [min(given + 10, 19), given]


def test_the_daemon_freezes_what_its_start_made_so_collections_never_walk_it() -> None:
    """freeze_heap() before serving: the ~50,000 objects of FastAPI, pydantic and uvicorn
    leave the collector's generations, which a full collection would walk (a 20-30 ms stop
    of the event loop on the 2-core server), and collections are on again after it."""
    probe = (
        "import gc, json\n"
        "from scalebox.daemon.app import create_app\n"
        "from scalebox.daemon.main import freeze_heap\n"
        "gc.disable()  # as serve() does\n"
        "before = len(gc.get_objects())\n"
        "freeze_heap()\n"
        "print(json.dumps([before, gc.get_freeze_count(), len(gc.get_objects()),\n"
        "                  gc.isenabled()]))\n"
    )
    before, frozen, left, enabled = _in_a_child(probe)
    assert before > 10_000
    assert frozen >= before
    assert left < 100
    assert enabled


START_PROBE = """
import gc, json, os, sys
import scalebox.daemon.main as daemon

collections = []
real_serve, real_freeze = daemon.serve, daemon.freeze_heap

def observed_serve(*args, **kwargs):
    gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info))
    return real_serve(*args, **kwargs)

def freeze_and_stop():
    seen = {"collections": len(collections), "enabled": gc.isenabled(),
            "objects": len(gc.get_objects())}
    real_freeze()
    seen["enabled_after"] = gc.isenabled()
    print(json.dumps(seen), flush=True)
    os._exit(0)  # the probe ends here: serving is not what it looks at

# Both observed, then run as they are.
daemon.serve, daemon.freeze_heap = observed_serve, freeze_and_stop
sys.exit(daemon.main(["--config", sys.argv[1]]))
"""


def test_a_daemon_start_makes_no_garbage_collection_before_it_freezes(tmp_path: Path) -> None:
    """The start's imports made the collector walk their ~50,000 objects 140 times (two
    full collections), 140 ms of a 840 ms start competing with the daemon serving during
    an update, for fewer than 1,000 objects freed. A real start, from serve() up to
    freeze_heap(); main() parses its arguments before, on a heap of a few thousand."""
    config, _ = write_config(tmp_path)
    seen = _in_a_child(START_PROBE, str(config))
    assert seen["objects"] > 10_000  # FastAPI, pydantic and uvicorn were imported
    assert seen["collections"] == 0
    assert not seen["enabled"]
    assert seen["enabled_after"]


@needs_autogroup
@pytest.mark.parametrize("others", [True, False])
def test_a_daemon_that_stopped_serving_exits_lowered_only_beside_a_daemon_serving(
    tmp_path: Path, others: bool
) -> None:
    """Once it stops serving, a daemon's state save and exit (in an update: the old
    main daemon's beside the handover instance, the handover instance's at Nice=-5
    beside the new one) give way; with nobody else serving (`systemctl restart`, a
    shutdown) the next start waits for them, and they run at the daemon's priority."""
    daemon = local_scaleboxd(tmp_path)
    assert daemon.config_path is not None
    waiting = min(max(os.getpriority(os.PRIO_PROCESS, 0), 0) + 10, 19)
    daemon.start()
    with contextlib.ExitStack() as stack:
        stack.callback(daemon.close)
        if others:  # what the other daemon serving with this config holds
            holder = serving.Serving(str(daemon.config_path))
            assert holder.hold() is None
            stack.callback(holder.release)
        assert daemon.stop() == 0
    log = daemon.stderr_text()
    assert "state saved" in log
    lowered = f"saving the state and exiting at nice {waiting} (session {waiting})"
    assert (lowered in log) is others, log[-2000:]
    assert ("another scaleboxd serves: saving" in log) is others


EXIT_PROBE = """
import logging, sys, threading, time
from pathlib import Path
from scalebox.daemon.main import exit_now

out = Path(sys.argv[1])

class Torn:
    def __del__(self):
        out.with_suffix(".teardown").write_text("freed")

torn = Torn()  # freed by the interpreter's teardown, if it runs
def late():
    time.sleep(0.3)
    out.write_text("joined")
threading.Thread(target=late).start()  # not a daemon thread: waited for
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
logging.getLogger("probe").info("last words")
print("buffered", end="")
exit_now(3)
"""


def test_a_daemon_exits_without_the_interpreters_teardown_but_waits_and_flushes(
    tmp_path: Path,
) -> None:
    """exit_now: its non-daemon threads finish, logging and stdout are flushed, the exit
    code is kept; the teardown (freeing every object, ~6 ms of CPU) is skipped."""
    out = tmp_path / "thread"
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert out.read_text() == "joined"
    assert "last words" in done.stderr
    assert done.stdout == "buffered"
    assert not out.with_suffix(".teardown").exists()
