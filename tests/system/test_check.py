"""./do check itself: a broken release fails the check and still leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tools import netns

ROOT = Path(__file__).resolve().parents[2]


def test_a_corrupt_tarball_fails_the_check_and_tears_down(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root to boot an nspawn machine")
    broken = tmp_path / "scalebox-0.0.1-x86_64.tar.gz"
    broken.write_bytes(b"\x1f\x8b" + os.urandom(4096))  # gzip magic, then noise
    child = subprocess.Popen(
        [sys.executable, "-m", "tools.check", "--tarball", str(broken)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    summary, errors = child.communicate(timeout=300)
    assert child.returncode == 1, errors[-2000:]
    assert "FAIL" in summary and "install.sh" in summary
    assert "not run" in summary
    assert "./do check FAILED" in summary
    # Other runs may boot machines meanwhile; only this check's own must be gone.
    left = [
        path.name
        for path in netns.STATE_DIR.glob("sb*.json")
        if json.loads(path.read_text() or "{}").get("owner_pid") == child.pid
    ]
    assert left == [], f"the check left machines behind: {left}"
