"""scalebox.priority: work that can wait runs nicer, every thread, and goes back after.

Each case runs in a child process: nice values belong to the process that sets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
with priority.background(warnings.append):
    inside = nice_of_threads()
after = nice_of_threads()
stop.set()
worker.join()
print(json.dumps({"before": before, "inside": inside, "after": after, "warnings": warnings}))
"""


def _probe() -> dict[str, list[int]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return dict(json.loads(done.stdout))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_root_runs_the_block_ten_steps_nicer_on_every_thread_then_goes_back() -> None:
    given = os.getpriority(os.PRIO_PROCESS, 0)
    seen = _probe()
    assert seen == {
        "before": [given],
        "inside": [min(given + 10, 19)],
        "after": [given],
        "warnings": [],
    }
