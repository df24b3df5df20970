"""kill -9 of scalebox-update at every step boundary, then recovery, on real systemd.

The updater is stopped exactly at a step boundary by its fault-injection seam
(SCALEBOX_UPDATE_STOP_AT, see scalebox.update.journal): it sends itself
SIGSTOP right after the journal names the step, the test waits until the
process is stopped, then SIGKILLs it. So even steps that last milliseconds
are hit deterministically, and every step in journal.STEPS is covered (a new
step is tested as soon as it exists).

Each step is recovered twice on one machine: first as at the next boot, by
scalebox-update-recover.service (install.sh enabled it; a volatile nspawn
machine cannot really reboot, so the test checks it is enabled and starts
it), then by the next `scalebox-update` run. Before the verification had
finished, recovery rolls back to A (or drops an update that had changed
nothing); from commit on it finishes the update. The end checks are the
issue's: the expected version healthy, config and DATA_DIR unchanged, the
running VM's unit untouched.
"""

from __future__ import annotations

import json

import pytest
from tools.releases import CRASH, A, B

from scalebox.update.journal import STEPS

from .update_helpers import Server, tarball

JOURNAL = "/var/lib/scalebox-update/journal.json"

# What recovery must do after a kill at each step, written by hand from the
# design (docs/architecture.md), not computed by the code under test:
# before the switch the update is dropped (a half-migrated config put back
# from the backup first); from the switch until the new release is verified
# it is rolled back; once verified only the bookkeeping is finished; a
# rollback is run again.
DISCARDED, ROLLED_BACK, COMMITTED = "discarded", "rolled back", "committed"
EXPECTED = {
    "stage": DISCARDED,
    "backup": DISCARDED,
    "migrate": DISCARDED,
    "switch": ROLLED_BACK,
    "handover": ROLLED_BACK,  # two daemons serve: the new release's handover instance goes
    "verify": ROLLED_BACK,
    "commit": COMMITTED,
    "rollback": ROLLED_BACK,
}


def _expected(journal: dict[str, object]) -> str:
    step = str(journal["step"])
    assert step in EXPECTED, f"journal step {step!r} is new: write its outcome into EXPECTED"
    return EXPECTED[step]


# Runs inside the machine: start the updater stopped at STEP, wait for the
# stop, SIGKILL it, and report how it ended.
KILL_AT = """
SCALEBOX_UPDATE_STOP_AT={step} {command} </dev/null >/tmp/killed-update.log 2>&1 &
pid=$!
state=""
for _ in $(seq 1 1800); do
  state=$(sed 's/.*) //' /proc/$pid/stat 2>/dev/null | cut -d' ' -f1)
  case "$state" in
    T) break ;;
    ""|Z) echo "the updater ended before reaching {step}:"; cat /tmp/killed-update.log; exit 1 ;;
  esac
  sleep 0.05
done
if [ "$state" != T ]; then echo "the updater never stopped at {step}"; exit 1; fi
kill -9 $pid
wait $pid
echo "exit $?"
"""


def _kill_at(server: Server, step: str, command: str) -> dict[str, object]:
    """Run ``command`` (a scalebox-update run), kill -9 it right after ``step`` began."""
    killed = server.sh(KILL_AT.format(step=step, command=command), check=False)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert killed.stdout.strip().endswith("exit 137"), killed.stdout  # 128 + SIGKILL
    journal: dict[str, object] = json.loads(server.sh(f"cat {JOURNAL}").stdout)
    assert journal["step"] == step
    # The kill hit the boundary itself: `current` is swapped only once the switch is done.
    switched = step in ("handover", "verify", "commit", "rollback")
    live = journal["to_release" if switched else "from_release"]
    assert server.sh("readlink /opt/scalebox/current").stdout.strip() == f"releases/{live}"
    return journal


def _recovered_message(journal: dict[str, object]) -> str:
    """What recovery must report for the transaction ``journal`` describes."""
    to, old = journal["to_version"], journal["from_version"]
    outcome = _expected(journal)
    if outcome == COMMITTED:
        return f"recovered: finished committing the verified update to {to}"
    if outcome == DISCARDED:
        undone = " (its migrations were undone: the config is as it was)"
        undone = undone if journal["step"] == "migrate" else ""
        return (
            f"recovered: the interrupted update to {to} had changed nothing{undone}; "
            f"{old} still runs"
        )
    return f"recovered: rolled back the interrupted update to {to}; {old} is healthy"


def _expected_version(journal: dict[str, object]) -> str:
    committed = _expected(journal) == COMMITTED
    return str(journal["to_version"] if committed else journal["from_version"])


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_every_step_is_recovered_at_boot_and_by_the_next_run(
    server: Server, step: str
) -> None:
    # "rollback" is only reached when the new release fails: CRASH exits at start.
    update = f"SCALEBOX_RELEASE_URL={tarball(CRASH if step == 'rollback' else B)} scalebox-update"

    # 1. The boot-time unit. install.sh enabled it, so a reboot would start it.
    journal = _kill_at(server, step, update)
    enabled = server.sh("systemctl is-enabled scalebox-update-recover.service")
    assert enabled.stdout.strip() == "enabled"
    server.sh("systemctl start scalebox-update-recover.service")
    said = server.sh("journalctl -u scalebox-update-recover.service -o cat --no-pager").stdout
    print(said)
    assert _recovered_message(journal) in said
    version = _expected_version(journal)
    server.assert_intact(version)

    # 2. The next scalebox-update run, whatever it was asked to do, finishes it first.
    # From B (a committed recovery) the killed transaction is a --rollback to A.
    again = update if version == A else "scalebox-update --rollback"
    journal = _kill_at(server, step, again)
    code, result, err = server.update("--check", env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    print(result.get("recovered"))
    assert code == 10, err  # A runs again, so B is an update available
    assert result["recovered"] == _recovered_message(journal)
    assert _expected_version(journal) == A
    server.assert_intact(A)
    assert server.update("recover")[1]["result"] == "nothing to recover"
