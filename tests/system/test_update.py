"""scalebox-update on a real systemd server (an nspawn machine).

Releases are real signed tarballs made by `./do tarball` (A, B, and a B that
crashes at start, built from a modified copy of the sources). Every test ends
with what the issue asks: the expected version healthy, /etc/scaleboxd/config
byte-identical, DATA_DIR unchanged, and a running VM's unit with the same
main PID (update_helpers.Server.assert_intact). Other update tests:
test_update_sources.py (https URL, releases API), test_update_refused.py
(everything refused before any change), test_update_crash.py (kill -9 at
every step boundary, then recovery).
"""

from __future__ import annotations

import json
import subprocess

import pytest
from tools.releases import CRASH, DIES, HANG, REJECTS, WRONG, A, B

from .update_helpers import Server, tarball


def test_update_a_to_b_from_a_tarball_then_rollback_to_a(server: Server) -> None:
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert code == 0, err
    assert result["result"] == "updated"
    assert (result["installed"], result["target"]) == (A, B)
    server.assert_intact(B)

    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert (code, result["result"]) == (0, "up to date"), err

    # Only says: --dry-run changes nothing with --rollback either.
    code, result, err = server.update("--rollback", "--dry-run")
    assert (code, result["result"], result["target"]) == (0, "dry run", A), err
    assert result["message"].startswith(f"would roll back {B} -> {A} (releases/")
    server.assert_intact(B)
    code, result, err = server.update("--rollback", "--check")
    assert code == 2, err
    assert "cannot be combined with --rollback" in err
    server.assert_intact(B)

    code, result, err = server.update("--rollback")
    assert code == 0, err
    assert (result["installed"], result["target"]) == (B, A)
    server.assert_intact(A)
    history = server.sh("scalebox-update history --json").stdout.strip().splitlines()
    assert [(json.loads(h)["to"], json.loads(h)["result"]) for h in history] == [
        (B, "updated"),
        (A, "updated"),
    ]


@pytest.mark.parametrize(
    ("version", "why"),
    [
        (CRASH, "start scaleboxd-handover.service failed"),
        (HANG, "start scaleboxd-handover.service did not become ready"),
        (WRONG, "/health reports version '0.0.0+impostor'"),
        (DIES, "did not stay healthy"),
    ],
    ids=["crashes-at-start", "hangs", "wrong-version", "dies-after-3s"],
)
def test_failing_release_is_rolled_back(server: Server, version: str, why: str) -> None:
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(version)}")
    assert code == 3, err
    assert result["result"] == "rolled back"
    assert why in str(result["message"])
    assert f"Rolled back to {A}, which is healthy" in str(result["message"])
    server.assert_intact(A)
    last = json.loads(server.sh("scalebox-update history --json").stdout.strip().splitlines()[-1])
    assert (last["to"], last["result"], last["release_failed"]) == (version, "rolled back", True)


def test_release_that_rejects_the_config_is_refused_before_any_change(server: Server) -> None:
    before = server.snapshot()
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(REJECTS)}")
    assert code == 1, err
    assert "NEW_REQUIRED_KEY is not set" in str(result["message"])
    server.assert_intact(A, unchanged=before)  # scaleboxd not even restarted


def test_downgrade_is_refused_unless_allowed(server: Server) -> None:
    code, _, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert code == 0, err
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(A)}")
    assert code == 1
    assert f"older than the installed {B}" in str(result["message"])
    server.assert_intact(B)
    code, result, err = server.update("--allow-downgrade", env=f"SCALEBOX_RELEASE_URL={tarball(A)}")
    assert code == 0, err
    server.assert_intact(A)


def test_check_reports_an_available_update(server: Server) -> None:
    code, result, _ = server.update("--check", env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert (code, result["result"], result["installed"], result["target"]) == (
        10,
        "update available",
        A,
        B,
    )
    server.assert_intact(A)


def test_second_concurrent_run_is_refused_naming_the_first(server: Server) -> None:
    first = subprocess.Popen(
        [
            "nsenter",
            "-t",
            str(server.machine.init_pid),
            "-a",
            "--",
            "bash",
            "-c",
            f"SCALEBOX_RELEASE_URL={tarball(B)} scalebox-update",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        holder = ""
        for _ in range(100):
            holder = server.sh(
                "cat /var/lib/scalebox-update/lock 2>/dev/null", check=False
            ).stdout.strip()
            if holder:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert holder, "the first run never took the lock"
        code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
        assert code == 5
        assert f"PID {holder}" in err
        assert result["result"] == "busy"
    finally:
        assert first.wait(timeout=600) == 0
    server.assert_intact(B)
