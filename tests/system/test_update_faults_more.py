"""More faults on real systemd: refusals before the transaction, a disk full to the
last byte during commit, signals at other steps, a closed stdout.

Same method as test_update_faults.py (whose helpers this uses): the updater
is stopped at a step boundary, the fault is injected, the updater goes on;
each expected outcome is written here by hand.
"""

from __future__ import annotations

from tools.releases import A, B

from .test_update_faults import (
    RUN,
    STATE,
    assert_no_traceback,
    assert_updated_then_recover,
    finish,
    history,
    start_stopped,
    state_on_tmpfs,
)
from .update_helpers import Server, tarball


def test_a_refusal_before_the_transaction_is_in_the_history(server: Server) -> None:
    """A read-only downloads/ refuses in one line, and `history` shows the refusal."""
    before = server.snapshot()
    server.sh(
        f"mkdir -p {STATE}/downloads && mount --bind {STATE}/downloads {STATE}/downloads && "
        f"mount -o remount,bind,ro {STATE}/downloads"
    )
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert_no_traceback(err)
    assert (code, result["result"]) == (1, "refused"), err
    assert "before it began: Read-only file system" in str(result["message"])
    last = history(server)[-1]
    assert (last["result"], last["action"], last["from"]) == ("refused", "update", A)
    assert "Read-only file system" in str(last["reason"])
    shown = server.sh("scalebox-update history").stdout.splitlines()[-1]
    assert "refused" in shown and "Read-only file system" in shown, shown

    # The whole state directory read-only: the history cannot take the line either,
    # which is said on stderr; still one error line, exit 1, no traceback.
    server.sh(f"umount {STATE}/downloads")
    lines = len(history(server))
    server.sh(f"mount --bind {STATE} {STATE} && mount -o remount,bind,ro {STATE}")
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    server.sh(f"umount {STATE}")
    assert_no_traceback(err)
    assert code == 1, err
    assert result["result"] in {"refused", "busy"}, result
    assert "Read-only file system" in str(result["message"]), result
    assert len(history(server)) == lines
    server.assert_intact(A, before)


def test_a_disk_full_to_the_last_byte_during_commit(server: Server) -> None:
    """The history's last page full too: "updated", truthfully, and recover finishes it."""
    state_on_tmpfs(server)
    pid = start_stopped(server, "commit", B)
    # Fill the file system, then the history file's last page, until ENOSPC.
    server.sh(
        f"dd if=/dev/zero of={STATE}/filler bs=1M status=none; "
        f"dd if=/dev/zero of={STATE}/filler2 bs=4k status=none; "
        f"while printf '\\n' >>{STATE}/history.jsonl; do :; done 2>/dev/null; true",
        check=False,
    )
    assert server.sh(f"printf '\\n' >>{STATE}/history.jsonl", check=False).returncode != 0
    server.sh(f"kill -CONT {pid}")
    assert_updated_then_recover(
        server,
        finish(server),
        cause="No space left on device",
        clear_fault=f"rm -f {STATE}/filler {STATE}/filler2",
    )


def test_sigterm_before_the_switch_refuses_and_after_it_rolls_back(server: Server) -> None:
    """SIGTERM to the group at stage: exit 1, nothing changed; at verify: exit 3."""
    before = server.snapshot()
    pid = start_stopped(server, "stage", B)
    server.sh(f"kill -TERM -{pid}; kill -CONT -{pid}")
    code, result, err = finish(server)
    assert_no_traceback(err)
    assert code == 1, err
    assert result["exit_code"] == 1, result
    assert history(server)[-1]["result"] == "refused"
    server.assert_intact(A, before)

    pid = start_stopped(server, "verify", B)
    server.sh(f"kill -INT -{pid}; kill -INT -{pid}; kill -CONT -{pid}")
    code, result, err = finish(server)
    assert_no_traceback(err)
    assert (code, result["result"], result["exit_code"]) == (3, "rolled back", 3), err
    # The signal stopped it, not B: said so, and B is not held failed in the pruning.
    assert f"stopped before {B} was judged" in str(result["message"]), result
    assert (history(server)[-1]["result"], history(server)[-1]["release_failed"]) == (
        "rolled back",
        False,
    )
    server.assert_intact(A)


def test_stdout_a_closed_pipe_changes_nothing_of_the_outcome(server: Server) -> None:
    """`scalebox-update --json | head -c1`: the update finishes, exit 0, no traceback."""
    done = server.sh(
        f"set -o pipefail; SCALEBOX_RELEASE_URL={tarball(B)} "
        f"scalebox-update --json 2>{RUN}-err | head -c1 >/dev/null; "
        "echo rc=${PIPESTATUS[0]}",
        check=False,
    )
    err = server.sh(f"cat {RUN}-err", check=False).stdout
    assert_no_traceback(err)
    assert "rc=0" in done.stdout, done.stdout + err
    assert history(server)[-1]["result"] == "updated"
    server.assert_intact(B)


def test_a_read_only_opt_at_the_switch_rolls_back_with_nothing_moved(server: Server) -> None:
    """`current` cannot move: the old release still runs, so the result is exit 3, not 4."""
    pid = start_stopped(server, "switch", B)
    server.sh("mount --bind /opt/scalebox /opt/scalebox && mount -o remount,bind,ro /opt/scalebox")
    server.sh(f"kill -CONT {pid}")
    code, result, err = finish(server)
    server.sh("umount -l /opt/scalebox")  # the restarted daemon runs from the bind mount
    assert_no_traceback(err)
    assert (code, result["result"], result["exit_code"]) == (3, "rolled back", 3), err
    assert "Read-only file system" in str(result["message"])
    assert history(server)[-1]["result"] == "rolled back"
    assert history(server)[-1]["release_failed"] is False  # this server's disk, not B
    server.assert_intact(A)


def test_the_config_deleted_at_the_switch_is_restored_by_the_rollback(server: Server) -> None:
    """Another admin removes the config mid-update: B cannot start; A comes back, config too."""
    pid = start_stopped(server, "switch", B)
    server.sh(f"rm /etc/scaleboxd/config; kill -CONT {pid}")
    code, result, err = finish(server)
    assert_no_traceback(err)
    assert (code, result["result"], result["exit_code"]) == (3, "rolled back", 3), err
    assert history(server)[-1]["result"] == "rolled back"
    server.assert_intact(A)


def test_another_admin_stopping_scaleboxd_during_verify(server: Server) -> None:
    """The outcome may be either, but the exit code, history and server must agree."""
    pid = start_stopped(server, "verify", B)
    server.sh(f"systemctl stop scaleboxd; kill -CONT {pid}")
    code, result, err = finish(server)
    assert_no_traceback(err)
    assert code in {0, 3}, err
    assert result["exit_code"] == code
    expected = {0: ("updated", B), 3: ("rolled back", A)}[code]
    assert (history(server)[-1]["result"], result["result"]) == (expected[0], expected[0])
    server.assert_intact(expected[1])


def test_ctrl_c_held_down_before_the_switch_still_cleans_up(server: Server) -> None:
    """SIGINT after SIGINT to the group once the build is done: none stops the cleanup."""
    before = server.snapshot()
    pid = start_stopped(server, "backup", B)
    server.sh(
        f"( while [ ! -s {RUN}/rc ]; do kill -INT -{pid} 2>/dev/null; sleep 0.01; done ) "
        f"</dev/null >/dev/null 2>&1 & sleep 0.3; kill -CONT {pid}"
    )
    code, result, err = finish(server)
    assert_no_traceback(err)
    assert (code, result["exit_code"]) == (1, 1), err
    assert history(server)[-1]["result"] == "refused"
    server.assert_intact(A, before)
