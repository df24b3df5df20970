"""What keeps the daemon serving first: work that can wait runs nicer (scalebox.priority,
every thread, and back after), and a starting daemon freezes its heap before it serves.

Each case runs in a child process: nice values and the collector belong to the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

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


def _in_a_child(code: str) -> Any:
    """Run ``code`` in a new Python process; what it printed, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return json.loads(done.stdout)


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


def test_the_daemon_freezes_what_its_start_made_so_collections_never_walk_it() -> None:
    """freeze_heap() before serving: the ~50,000 objects of FastAPI, pydantic and uvicorn
    leave the collector's generations, which a full collection would walk (a 20-30 ms stop
    of the event loop on the 2-core server)."""
    probe = (
        "import gc, json\n"
        "from scalebox.daemon.app import create_app\n"
        "from scalebox.daemon.main import freeze_heap\n"
        "before = len(gc.get_objects())\n"
        "frozen = freeze_heap()\n"
        "print(json.dumps([before, frozen, len(gc.get_objects())]))\n"
    )
    before, frozen, left = _in_a_child(probe)
    assert before > 10_000
    assert frozen >= before * 0.9  # all but the garbage the collection freed
    assert left < 100
