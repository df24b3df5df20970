"""The transaction under faults, on real systemd: signals, a full disk, a hang-up.

Each test starts ``scalebox-update --json`` inside the machine in a session
of its own (``setsid``), as a login shell runs a foreground command, stopped
at a step boundary by the fault-injection seam (SCALEBOX_UPDATE_STOP_AT, see
scalebox.update.journal). While it is stopped the test injects the fault:
it fills or write-protects a file system, or sends signals to the whole
process group (``kill -INT -PGID``, which is what a terminal's Ctrl-C does),
then lets it continue. Each test ends with the issue's checks
(``Server.assert_intact``) and the exit code docs/operations.md promises for
that outcome; the expected outcome of each case is written here by hand.
"""

from __future__ import annotations

import json
import time

from tools.releases import CRASH, A, B

from .update_helpers import Server, tarball

RUN = "/run/faults-updater"  # pid, out, err, rc of the updater under test
STATE = "/var/lib/scalebox-update"

START = """
rm -rf {run}; mkdir -p {run}
( setsid -w bash -c 'echo $$ >{run}/pid; \
    exec env SCALEBOX_UPDATE_STOP_AT={step} {env} scalebox-update --json {args}' \
    </dev/null {redirect}; echo $? >{run}/rc ) </dev/null >/dev/null 2>&1 &
for _ in $(seq 1 6000); do
  if [ -s {run}/pid ]; then
    state=$(sed 's/.*) //' /proc/$(cat {run}/pid)/stat 2>/dev/null | cut -d' ' -f1)
    if [ "$state" = T ]; then exit 0; fi
  fi
  if [ -s {run}/rc ]; then echo "the updater ended before {step}:"; cat {run}/err; exit 1; fi
  sleep 0.05
done
echo "the updater never stopped at {step}"; exit 1
"""


def start_stopped(
    s: Server,
    step: str,
    release: str,
    args: str = "",
    redirect: str = f">{RUN}/out 2>{RUN}/err",
) -> int:
    """Start the updater in its own session, stopped right after ``step`` began; its PID.

    The PID is also the process group's: ``setsid`` made the updater the
    leader of a new session, as a shell does for a foreground job.
    """
    env = f"SCALEBOX_RELEASE_URL={tarball(release)}"
    script = START.format(run=RUN, step=step, env=env, args=args, redirect=redirect)
    started = s.sh(script, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    return int(s.sh(f"cat {RUN}/pid").stdout)


def finish(s: Server, timeout: float = 300) -> tuple[int, dict[str, object], str]:
    """Wait for the updater to end: its exit code, its --json result and its stderr."""
    deadline = time.monotonic() + timeout
    while s.sh(f"test -s {RUN}/rc", check=False).returncode != 0:
        assert time.monotonic() < deadline, s.sh(f"cat {RUN}/err", check=False).stdout
        time.sleep(0.2)
    code = int(s.sh(f"cat {RUN}/rc").stdout)
    out = s.sh(f"cat {RUN}/out 2>/dev/null || true").stdout.strip().splitlines()
    err = s.sh(f"cat {RUN}/err 2>/dev/null || true").stdout
    print(err)
    return code, (json.loads(out[-1]) if out else {}), err


def history(s: Server) -> list[dict[str, object]]:
    text = s.sh(f"cat {STATE}/history.jsonl 2>/dev/null || true").stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def state_on_tmpfs(s: Server, size: str = "200M") -> None:
    """Put /var/lib/scalebox-update on a file system of its own (its files copied over)."""
    s.sh(
        f"mkdir -p {STATE} && cp -a {STATE} /root/state-copy && "
        f"mount -t tmpfs -o size={size},mode=0755 tmpfs {STATE} && "
        f"cp -a /root/state-copy/. {STATE}/"
    )


def fill(s: Server, where: str) -> None:
    """Fill the file system of ``where`` to the last block."""
    s.sh(f"dd if=/dev/zero of={where}/filler bs=1M status=none; sync; true", check=False)
    probe = s.sh(f"echo x > {where}/probe", check=False)
    assert probe.returncode != 0, "the file system is not full"


def assert_no_traceback(err: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("scalebox-update: error:") <= 1, err


def assert_updated_then_recover(
    s: Server, outcome: tuple[int, dict[str, object], str], *, cause: str, clear_fault: str
) -> None:
    """B serves, verified, and the truth is "updated" with what is left; recover finishes it.

    ``cause`` is the OSError text the commit met; ``clear_fault`` a shell line
    that removes the fault before ``scalebox-update recover`` runs.
    """
    code, result, err = outcome
    assert_no_traceback(err)
    assert (code, result["result"]) == (0, "updated"), err
    assert cause in str(result["unfinished"]), result
    assert "scalebox-update recover" in str(result["unfinished"])
    assert s.health() == B
    assert not any(e["to"] == B and e["result"] == "updated" for e in history(s))
    s.sh(clear_fault)
    code, recovered, err = s.update("recover")
    assert code == 0, err
    assert recovered["message"] == f"recovered: finished committing the verified update to {B}"
    assert history(s)[-1]["result"] == "updated"
    assert history(s)[-1]["to"] == B
    s.assert_intact(B)


# --- defect 1: a full disk after the switch ---------------------------------------


def test_full_disk_after_the_switch_still_rolls_back_and_exits_3(server: Server) -> None:
    """The journal cannot record "verify": the updater rolls back from memory, verified."""
    state_on_tmpfs(server)
    pid = start_stopped(server, "switch", B)
    fill(server, STATE)
    server.sh(f"kill -CONT {pid}")
    code, result, err = finish(server)
    assert_no_traceback(err)
    assert (code, result["result"]) == (3, "rolled back"), err
    assert "could not write the journal" in err
    assert "No space left on device" in str(result["message"])
    # The history could not take the line either, and the updater said so.
    assert "could not record 'rolled back'" in err
    assert not any(e["to"] == B and e["result"] == "updated" for e in history(server))
    server.assert_intact(A)
    # Space back: the next run works as usual.
    server.sh(f"rm -f {STATE}/filler")
    code, _, err = server.update("--check", env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert code == 10, err


# --- defect 2: signals and an unwritable disk during commit -------------------------


def test_signals_during_commit_do_not_stop_it(server: Server) -> None:
    pid = start_stopped(server, "commit", B)
    # As a terminal and a shutdown would send them, to the whole process group.
    server.sh(f"kill -INT -{pid}; kill -TERM -{pid}; kill -HUP -{pid}; kill -CONT -{pid}")
    code, result, err = finish(server)
    assert_no_traceback(err)
    assert (code, result["result"], result["unfinished"]) == (0, "updated", None), err
    assert history(server)[-1]["result"] == "updated"
    assert history(server)[-1]["to"] == B
    server.assert_intact(B)


def test_read_only_state_during_commit_says_updated_and_recover_finishes(
    server: Server,
) -> None:
    pid = start_stopped(server, "commit", B)
    server.sh(f"mount --bind {STATE} {STATE} && mount -o remount,bind,ro {STATE}")
    server.sh(f"kill -CONT {pid}")
    assert_updated_then_recover(
        server, finish(server), cause="Read-only file system", clear_fault=f"umount {STATE}"
    )


# --- defect 3: Ctrl-C during a rollback ----------------------------------------------


def test_ctrl_c_during_the_rollback_does_not_stop_it(server: Server) -> None:
    """Ctrl-C, again and again, reaches the whole process group while the rollback runs."""
    pid = start_stopped(server, "rollback", CRASH)
    server.sh(
        f"( while [ ! -s {RUN}/rc ]; do kill -INT -{pid} 2>/dev/null; sleep 0.05; done ) "
        f"</dev/null >/dev/null 2>&1 & kill -CONT {pid}"
    )
    code, result, err = finish(server)
    assert_no_traceback(err)
    assert (code, result["result"]) == (3, "rolled back"), err
    assert "SIGINT ignored" in err  # the signals did arrive during the rollback
    assert history(server)[-1]["result"] == "rolled back"
    server.assert_intact(A)


# --- defect 4: the terminal hangs up --------------------------------------------------


def test_a_hang_up_does_not_stop_the_update(server: Server) -> None:
    """SIGHUP to the group, and the terminal's reader gone: the update finishes and says so."""
    server.sh(
        "rm -f /run/tty && mkfifo /run/tty && "
        "{ cat /run/tty >/dev/null </dev/null 2>&1 & echo $! >/run/tty.reader; }"
    )
    pid = start_stopped(server, "switch", B, redirect=">/run/tty 2>&1")
    # The reader goes away (writes now fail with EPIPE), and the session gets SIGHUP.
    server.sh("kill $(cat /run/tty.reader); sleep 0.2")
    server.sh(f"kill -HUP -{pid}; kill -CONT -{pid}")
    code, _, _ = finish(server)
    assert code == 0
    assert history(server)[-1]["result"] == "updated"
    assert history(server)[-1]["to"] == B
    server.assert_intact(B)


# --- defect 6: a full disk, a read-only releases/ before the switch ----------------


def test_full_disk_and_read_only_releases_are_refused_in_one_line(server: Server) -> None:
    before = server.snapshot()
    server.sh(
        "mount --bind /opt/scalebox/releases /opt/scalebox/releases && "
        "mount -o remount,bind,ro /opt/scalebox/releases"
    )
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    server.sh("umount /opt/scalebox/releases")
    assert_no_traceback(err)
    assert (code, result["result"]) == (1, "refused"), err
    assert "Read-only file system: /opt/scalebox/releases" in str(result["message"])
    assert "remount it read-write" in str(result["hint"])
    assert history(server)[-1]["result"] == "refused"
    assert "Read-only file system" in str(history(server)[-1]["reason"])
    server.assert_intact(A, before)

    # The backup cannot be written: refused in one line, nothing changed.
    state_on_tmpfs(server)
    pid = start_stopped(server, "backup", B)
    fill(server, STATE)
    server.sh(f"kill -CONT {pid}")
    code, result, err = finish(server)
    assert_no_traceback(err)
    assert (code, result["result"]) == (1, "refused"), err
    assert "No space left on device" in str(result["message"])
    # (The history's last page still had room for the line.)
    assert history(server)[-1]["result"] == "refused"
    assert "No space left on device" in str(history(server)[-1]["reason"])
    server.sh(f"rm -f {STATE}/filler")
    server.assert_intact(A, before)
