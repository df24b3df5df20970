"""Whether another scaleboxd serves: the shared lock on the config's folder (daemon/serving.py).

Real locks (flock) held by real processes: the lock must vanish with its holder,
even one killed by SIGKILL, or a daemon would give way to nobody.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from scalebox import config
from scalebox.daemon import serving

HOLDER = """
import sys
from scalebox.daemon import serving
held = serving.Serving(sys.argv[1])
print(held.hold() or "held", flush=True)
sys.stdin.read()  # until the test ends it
"""


def _holder(config_file: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(config_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def test_nobody_serves_until_a_daemon_holds_the_lock_and_again_once_it_releases(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "config"
    assert not serving.others_serve(str(conf))
    first, second = serving.Serving(str(conf)), serving.Serving(str(conf))
    assert first.hold() is None
    assert second.hold() is None  # two serve at once during a handover: both shared
    assert serving.others_serve(str(conf))
    first.release()
    assert serving.others_serve(str(conf))  # the second still serves
    second.release()
    assert not serving.others_serve(str(conf))
    second.release()  # a second release changes nothing


def test_a_daemon_killed_while_serving_leaves_no_lock_behind(tmp_path: Path) -> None:
    conf = tmp_path / "config"
    child = _holder(conf)
    try:
        assert serving.others_serve(str(conf))
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert not serving.others_serve(str(conf))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_daemons_with_another_config_are_another_server(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    held = serving.Serving(str(tmp_path / "a" / "config"))
    assert held.hold() is None
    try:
        assert serving.others_serve(str(tmp_path / "a" / "config"))
        assert not serving.others_serve(str(tmp_path / "b" / "config"))
    finally:
        held.release()


def test_the_config_file_replaced_under_a_serving_daemon_keeps_it_serving(
    tmp_path: Path,
) -> None:
    """A migration writes a new config file (a new inode) while the daemon serves."""
    conf = tmp_path / "config"
    conf.write_text("A=1\n")
    held = serving.Serving(str(conf))
    assert held.hold() is None
    try:
        replacement = tmp_path / "config.new"
        replacement.write_text("A=2\n")
        replacement.replace(conf)
        assert serving.others_serve(str(conf))
    finally:
        held.release()


def test_a_missing_folder_means_nobody_serves_and_holding_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "config"
    assert not serving.others_serve(str(missing))
    problem = serving.Serving(str(missing)).hold()
    assert problem is not None
    assert str(missing) in problem
    assert "No such file or directory" in problem


def test_the_entry_point_reads_the_config_the_daemon_will_use() -> None:
    assert str(config.DEFAULT_PATH) == serving.DEFAULT_CONFIG
    assert serving.config_in([]) == serving.DEFAULT_CONFIG
    assert serving.config_in(["--config", "/srv/a"]) == "/srv/a"
    assert serving.config_in(["--config=/srv/b", "--handover"]) == "/srv/b"
    assert serving.config_in(["--config", "/srv/a", "--config=/srv/c"]) == "/srv/c"  # the last
    assert serving.config_in(["--config"]) == serving.DEFAULT_CONFIG  # argparse refuses it
