"""The whole transaction on real files and real processes under tmp_path.

systemd's part is played by ProcessService (tests/unit/update_service_double.py,
a double because systemd is not PID 1 here); the system tests run the same
transaction against the real systemd in a machine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from scalebox import priority
from scalebox.update import commit as commit_step
from scalebox.update import (
    health,
    history,
    interrupt,
    journal,
    plan,
    preflight,
    stage,
    switch,
    transaction,
)
from scalebox.update import main as update_main
from scalebox.update.context import Context
from scalebox.update.errors import RolledBack, UpdateError, VerifyError
from scalebox.update.paths import Paths
from scalebox.update.systemd import SERVICE, UnitState
from scalebox.update.transaction import Target
from tests.unit.update_service_double import (
    ProcessService,
    free_port,
    make_release,
    run_crashing_child,
)

REPO = Path(__file__).resolve().parents[2]


class Server:
    def __init__(self, root: Path) -> None:
        self.paths = Paths(root)
        self.service = ProcessService(self.paths, root)
        self.lines: list[str] = []
        self.http = httpx.Client(trust_env=False)

    def ctx(self, window: float = 0.6) -> Context:
        return Context(
            paths=self.paths,
            service=self.service,
            http=self.http,
            report=self.lines.append,
            stability_window=window,
            restart_timeout=10,
            verify_timeout=5,
        )

    def health(self) -> str:
        port = self.paths.config.read_text().split("API_PORT=")[1].split()[0]
        return str(self.http.get(f"http://127.0.0.1:{port}/health").json()["version"])

    def fingerprint(self) -> dict[str, str]:
        """Hashes of everything an update must leave as it was after a rollback."""
        files = [self.paths.config, *sorted(self.paths.systemd_dir.iterdir())]
        out = {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
        out["current"] = str(self.paths.current.readlink())
        return out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A server with release 0.1.0 installed and running, and 0.2.0 staged next to it."""
    s = Server(tmp_path)
    p = s.paths
    make_release(p, "0.1.0")
    p.config.parent.mkdir(parents=True)
    p.config.write_text(f"API_TOKEN=sb-{'0' * 48}\nAPI_PORT={free_port()}\n")
    p.config.chmod(0o600)
    p.systemd_dir.mkdir(parents=True)
    for unit in (p.release_dir("0.1.0") / "units").iterdir():
        (p.systemd_dir / unit.name).write_bytes(unit.read_bytes())
    p.version_file.write_text("0.1.0\n")
    (p.current).symlink_to("releases/0.1.0")
    s.service.restart(SERVICE, 10)
    try:
        yield s
    finally:
        s.service.kill_everything()
        s.http.close()


def _install(s: Server, version: str, window: float = 0.6) -> transaction.Outcome:
    return transaction.install(
        s.ctx(window),
        action="update",
        from_version="0.1.0",
        from_release="0.1.0",
        target=Target(version, None),
    )


def test_update_switches_verifies_and_commits(server: Server) -> None:
    make_release(server.paths, "0.2.0")
    config_before = server.paths.config.read_bytes()
    outcome = _install(server, "0.2.0")
    assert outcome.result == history.UPDATED
    assert server.health() == "0.2.0"
    assert str(server.paths.current.readlink()) == "releases/0.2.0"
    assert server.paths.version_file.read_text() == "0.2.0\n"
    assert (server.paths.systemd_dir / "scaleboxd.service").read_text().endswith("0.2.0\n")
    assert server.paths.config.read_bytes() == config_before
    assert journal.read(server.paths.journal) is None
    assert not server.paths.backup_dir("x").parent.exists() or not any(
        server.paths.backups.iterdir()
    )
    [entry] = history.read(server.paths.history)
    assert (entry.from_version, entry.to_version, entry.result) == ("0.1.0", "0.2.0", "updated")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_once_verified_the_commit_waits_for_the_cpu(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the switch until the new daemon is healthy the updater runs at its own
    priority; once healthy, its stability window (the polls, the state read at its end),
    the commit and the pruning run 10 steps nicer, and the transaction ends back at its
    own priority."""
    make_release(server.paths, "0.2.0")
    given = os.getpriority(os.PRIO_PROCESS, 0)
    lowered = min(max(given, 0) + priority.NICER, priority.MAX_NICE)
    polls: list[int] = []
    probes: list[int] = []
    committing: list[int] = []
    state, commit, probe = server.service.state, commit_step.commit, health.probe

    def noting(unit: str) -> UnitState:
        polls.append(os.getpriority(os.PRIO_PROCESS, 0))
        return state(unit)

    def probing(client: httpx.Client, url: str) -> str | None:
        probes.append(os.getpriority(os.PRIO_PROCESS, 0))
        return probe(client, url)

    def committed(ctx: Context, j: journal.Journal) -> list[str]:
        committing.append(os.getpriority(os.PRIO_PROCESS, 0))
        return commit(ctx, j)

    monkeypatch.setattr(server.service, "state", noting)
    monkeypatch.setattr(health, "probe", probing)
    monkeypatch.setattr(commit_step, "commit", committed)
    try:
        assert _install(server, "0.2.0", window=1.0).result == history.UPDATED
    finally:
        priority.restore_process(print)  # never leave the test runner lowered
    # The wait for healthy at full priority; the window's end lowered.
    assert polls[0] == given and polls[-1] == lowered, polls
    assert probes[0] == given and probes[-1] == lowered, probes
    assert probes.count(lowered) >= 3  # 1 s of polls every 0.2 s
    assert committing == [lowered]
    assert os.getpriority(os.PRIO_PROCESS, 0) == given


def _window_giving_way(s: Server, window: float, paused: float) -> tuple[list[str], int]:
    """health.verify with a window that gives way, the daemon SIGSTOPped for ``paused``
    seconds as it begins: the lines reported, and the priority the window ended at."""
    pid = s.service.state(SERVICE).main_pid
    lines: list[str] = []
    waking: list[subprocess.Popen[bytes]] = []

    def give_way() -> None:
        priority.lower_process(print)
        os.kill(pid, signal.SIGSTOP)
        waking.append(subprocess.Popen(["sh", "-c", f"sleep {paused}; kill -CONT {pid}"]))

    try:
        health.verify(s.service, s.http, _health_check(s, window), lines.append, give_way=give_way)
        return lines, os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        os.kill(pid, signal.SIGCONT)
        for process in waking:
            process.kill()
            process.wait()
        priority.restore_process(print)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_a_window_probe_unanswered_while_giving_way_is_asked_again_at_full_priority(
    server: Server,
) -> None:
    """A probe that waited for the CPU is no verdict: the daemon paused past the first
    lowered probe's 1 s timeout, and answering again by the second, is not rolled back;
    the window goes on at full priority."""
    given = os.getpriority(os.PRIO_PROCESS, 0)
    lines, ended_at = _window_giving_way(server, window=3.0, paused=1.5)
    assert ended_at == given
    assert any("asking again at full priority" in line for line in lines), lines


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_a_window_probe_unanswered_at_full_priority_too_fails_the_window(
    server: Server,
) -> None:
    with pytest.raises(VerifyError, match=r"did not stay healthy: .*/health answered None"):
        _window_giving_way(server, window=5.0, paused=4.0)


def _health_check(s: Server, window: float) -> health.Check:
    port = s.paths.config.read_text().split("API_PORT=")[1].split()[0]
    return health.Check(f"http://127.0.0.1:{port}/health", "0.1.0", window, timeout=5)


def test_the_stability_window_asks_systemd_only_at_its_end_while_the_daemon_lives(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each `systemctl show` costs ~12 ms of CPU beside the daemon serving; the main
    process is watched through a pidfd instead of asking every 0.2 s (6 reads here)."""
    reads: list[str] = []
    real = server.service.state
    monkeypatch.setattr(server.service, "state", lambda unit: reads.append(unit) or real(unit))
    started = time.monotonic()
    state = health.verify(server.service, server.http, _health_check(server, 1.0), print)
    assert time.monotonic() - started >= 1.0
    assert state.main_pid == real(SERVICE).main_pid
    assert reads == [SERVICE, SERVICE]  # the wait for healthy, the window's end


def test_without_a_pidfd_of_the_main_process_the_window_polls_systemd() -> None:
    """A PID gone already, or in another PID namespace, has no pidfd: the window then
    reads systemd's state every poll, as before pidfds, rather than call it ended."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    with health._watching(gone.pid) as watch:
        assert not watch.exact
        started = time.monotonic()
        assert watch.wait(0.05) is False
        assert time.monotonic() - started >= 0.05
    with health._watching(os.getpid()) as watch:
        assert watch.exact
        assert watch.wait(0.01) is False  # this process lives on


def test_a_main_process_that_ends_in_the_window_is_seen_at_once(server: Server) -> None:
    pid = server.service.state(SERVICE).main_pid
    started = time.monotonic()
    killer = subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -KILL {pid}"])
    try:
        with pytest.raises(VerifyError, match=rf"did not stay healthy: .*main PID {pid}"):
            health.verify(server.service, server.http, _health_check(server, 30.0), print)
    finally:
        killer.wait()
    assert time.monotonic() - started < 2.0  # not the window's 30 s


@pytest.mark.parametrize("queued", [False, True])
def test_a_unit_stopped_before_it_is_healthy_is_judged_without_waiting_out_the_timeout(
    server: Server, monkeypatch: pytest.MonkeyPatch, queued: bool
) -> None:
    """Another admin's `systemctl stop` between the restart and the first answer: nothing
    starts the unit again, so the verdict comes after STOPPED_GRACE, not after the whole
    timeout (60 s in an update). A start queued behind another job is waited for.
    systemd's answer is stood in for here; tests/system/test_update_faults_more.py
    stops the real scaleboxd."""
    stopped = UnitState("inactive", "dead", 0, 0, queued=queued)
    monkeypatch.setattr(server.service, "state", lambda unit: stopped)
    monkeypatch.setattr(health, "STOPPED_GRACE", 0.5)
    check = replace(_health_check(server, 1.0), timeout=2.0)
    expected = "was not healthy within 2 s" if queued else "stopped before it was healthy"
    with pytest.raises(VerifyError, match=expected) as caught:
        health.verify(server.service, server.http, check, print)
    assert ("no start queued" in caught.value.what) is not queued


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_a_main_process_that_ends_in_a_window_giving_way_is_judged_at_full_priority(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of the main process is a verdict, and a rollback follows: systemd's state
    is then read at full priority (a rollback never waits for the CPU)."""
    given = os.getpriority(os.PRIO_PROCESS, 0)
    pid = server.service.state(SERVICE).main_pid
    reads: list[int] = []
    state = server.service.state
    monkeypatch.setattr(
        server.service,
        "state",
        lambda unit: reads.append(os.getpriority(os.PRIO_PROCESS, 0)) or state(unit),
    )
    killer = subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -KILL {pid}"])
    try:
        with pytest.raises(VerifyError, match=rf"did not stay healthy: .*main PID {pid}"):
            health.verify(
                server.service,
                server.http,
                _health_check(server, 30.0),
                print,
                give_way=lambda: priority.lower_process(print),
            )
    finally:
        killer.wait()
        priority.restore_process(print)
    assert reads[-1] == given


@pytest.mark.parametrize(
    ("behaviour", "reported", "why"),
    [
        ("crash", None, "main process exited"),
        ("hang", None, "did not finish"),
        ("ok", "0.1.0", "reports version '0.1.0'"),
        ("die-after", None, "did not stay healthy"),
    ],
)
def test_failing_release_is_rolled_back_exactly(
    server: Server, behaviour: str, reported: str | None, why: str
) -> None:
    make_release(server.paths, "0.2.0", behaviour=behaviour, reported=reported)
    before = server.fingerprint()
    with pytest.raises(RolledBack, match=why) as caught:
        _install(server, "0.2.0", window=2.0)
    assert "Rolled back to 0.1.0, which is healthy" in caught.value.what
    assert server.fingerprint() == before
    assert server.health() == "0.1.0"
    assert server.paths.version_file.read_text() == "0.1.0\n"
    assert journal.read(server.paths.journal) is None
    [entry] = history.read(server.paths.history)
    assert entry.result == "rolled back"
    assert entry.reason is not None
    assert why in entry.reason


def test_release_that_rejects_the_config_is_refused_with_service_untouched(
    server: Server,
) -> None:
    make_release(server.paths, "0.2.0", behaviour="reject-config")
    before = server.fingerprint()
    pid = server.service.state(SERVICE).main_pid
    with pytest.raises(UpdateError, match="NEW_KEY is required"):
        _install(server, "0.2.0")
    assert server.fingerprint() == before
    assert server.service.state(SERVICE).main_pid == pid
    assert "restart scaleboxd.service" not in server.service.calls[1:]
    assert journal.read(server.paths.journal) is None
    assert [e.result for e in history.read(server.paths.history)] == ["refused"]


def test_a_ctrl_c_during_the_config_check_is_told_as_a_ctrl_c_not_as_a_bad_config(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config check wrapped every failure as "release X rejects the live config"
    with the hint "fix the config", a Ctrl-C too: the admin was sent to a config
    that had nothing wrong with it."""
    make_release(server.paths, "0.2.0")
    before = server.fingerprint()
    pid = server.service.state(SERVICE).main_pid
    monkeypatch.setenv("FAKE_SIGINT_PARENT_AT_CHECK", "1")
    started = time.monotonic()
    with interrupt.catching(), pytest.raises(interrupt.Interrupted) as caught:
        _install(server, "0.2.0")
    assert time.monotonic() - started < 20  # the check was stopped, not waited out
    assert caught.value.what == "interrupted by SIGINT"
    assert "rejects" not in str(caught.value)
    assert caught.value.hint is not None
    assert "run scalebox-update again" in caught.value.hint
    assert server.fingerprint() == before
    assert server.service.state(SERVICE).main_pid == pid
    assert journal.read(server.paths.journal) is None
    entries = history.read(server.paths.history)
    assert [e.result for e in entries] == ["refused"]


def test_a_config_check_that_was_killed_is_not_blamed_on_the_config(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_release(server.paths, "0.2.0")
    before = server.fingerprint()
    monkeypatch.setenv("FAKE_CHECK_KILLED", "1")
    with pytest.raises(UpdateError) as caught:
        _install(server, "0.2.0")
    assert "config check" in caught.value.what
    assert "(exit -9)" in caught.value.what
    assert "rejects" not in caught.value.what
    assert caught.value.hint is not None
    assert "says nothing about the config" in caught.value.hint
    assert server.fingerprint() == before
    assert [e.result for e in history.read(server.paths.history)] == ["refused"]


def test_a_refusal_whose_cleanup_fails_too_is_told_and_recorded(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cleanup's OSError (a disk gone read-only) took the refusal's place, and its
    history line was skipped."""
    make_release(server.paths, "0.2.0", behaviour="reject-config")

    def read_only(ctx: Context, j: journal.Journal) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(ctx.paths.journal))

    monkeypatch.setattr(transaction, "_discard", read_only)
    with pytest.raises(UpdateError) as caught:
        _install(server, "0.2.0")
    assert "rejects the live config" in caught.value.what
    assert any("could not clean up (Read-only file system" in x for x in server.lines)
    [entry] = history.read(server.paths.history)
    assert entry.result == "refused"
    assert "rejects the live config" in str(entry.reason)


def _state_after_a_sigint(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking systemd for the unit state is where a Ctrl-C lands: it sends one first."""
    ask = server.service.state

    def interrupted_state(unit: str) -> UnitState:
        signal.raise_signal(signal.SIGINT)
        return ask(unit)

    monkeypatch.setattr(server.service, "state", interrupted_state)


def test_a_ctrl_c_while_the_checks_ask_systemd_stays_a_ctrl_c(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preflight and the health check turned it into "cannot ask systemd" errors."""
    _state_after_a_sigint(server, monkeypatch)
    with interrupt.catching(), pytest.raises(interrupt.Interrupted) as in_preflight:
        preflight.check(server.ctx())
    with interrupt.catching(), pytest.raises(interrupt.Interrupted) as in_verify:
        health.verify(server.service, server.http, _health_check(server, 0.5), print)
    for caught in (in_preflight, in_verify):
        assert caught.value.what == "interrupted by SIGINT"


def test_unit_added_by_the_new_release_is_removed_on_rollback(server: Server) -> None:
    new = make_release(server.paths, "0.2.0", behaviour="crash")
    (new / "units" / "scalebox-extra.service").write_text("[Service]\n")
    with pytest.raises(RolledBack):
        _install(server, "0.2.0")
    assert not (server.paths.systemd_dir / "scalebox-extra.service").exists()


def test_commit_prunes_to_three_and_never_the_failed_one(server: Server) -> None:
    make_release(server.paths, "0.0.9")
    make_release(server.paths, "0.0.8")
    make_release(server.paths, "0.2.0")
    _install(server, "0.2.0")
    left = sorted(r.name for r in stage.list_releases(server.paths))
    assert left == ["0.0.9", "0.1.0", "0.2.0"]


# --- kill -9 at step boundaries, then recovery -------------------------------------


def test_recovery_names_what_was_interrupted_an_update_or_a_rollback(server: Server) -> None:
    """A power cut early in `--rollback` was told as "the interrupted update"."""
    j = journal.Journal(
        id=journal.new_id(), action="rollback", from_version="0.1.0", from_release="0.1.0",
        to_version="0.2.0", to_release="0.2.0", step="stage", built_release=False,
    )  # fmt: skip
    journal.begin(server.paths.journal, j)
    said = transaction.recover(server.ctx())
    assert (
        said == "recovered: the interrupted rollback to 0.2.0 had changed nothing; 0.1.0 still runs"
    )


CHILD = """
import os, signal, sys
from pathlib import Path
import httpx
from scalebox.update import transaction
from scalebox.update.context import Context
from scalebox.update.paths import Paths
from tests.unit.update_service_double import ProcessService

root, kill_at = Path(sys.argv[1]), sys.argv[2]

def die(where):
    if where == kill_at:
        signal.raise_signal(signal.SIGKILL)

class Dying(ProcessService):
    def daemon_reload(self):
        die("daemon-reload"); super().daemon_reload()
    def restart(self, unit, timeout):
        super().restart(unit, timeout); die("after-restart")
    def state(self, unit):
        die("verify"); return super().state(unit)

def report(line):
    print(line, flush=True)
    if line.startswith("pruning"):
        die("commit")

paths = Paths(root)
ctx = Context(paths=paths, service=Dying(paths, root), http=httpx.Client(trust_env=False),
              report=report, stability_window=0.5, restart_timeout=10, verify_timeout=5)
transaction.install(ctx, action="update", from_version="0.1.0", from_release="0.1.0",
                    target=transaction.Target("0.2.0", None))
"""


@pytest.mark.parametrize(
    ("kill_at", "step", "ends_on"),
    [
        ("check-config", "stage", "0.1.0"),
        ("daemon-reload", "switch", "0.1.0"),
        ("after-restart", "switch", "0.1.0"),
        ("verify", "verify", "0.1.0"),
        ("commit", "commit", "0.2.0"),
    ],
)
def test_kill_9_at_a_step_is_recovered_by_the_next_run(
    server: Server, kill_at: str, step: str, ends_on: str
) -> None:
    make_release(server.paths, "0.0.7")
    make_release(server.paths, "0.0.8")  # something for the commit to prune
    make_release(server.paths, "0.2.0")
    before = server.fingerprint()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if kill_at == "check-config":
        env["FAKE_KILL_PARENT_AT_CHECK"] = "1"
    child = run_crashing_child(CHILD, str(server.paths.root), kill_at, env=env)
    assert child.returncode == -signal.SIGKILL, child.stderr
    crashed = journal.read(server.paths.journal)
    assert crashed is not None
    assert crashed.step == step

    said = transaction.recover(server.ctx())
    assert said is not None
    assert said.startswith("recovered")
    assert journal.read(server.paths.journal) is None
    assert server.health() == ends_on
    assert server.paths.version_file.read_text() == f"{ends_on}\n"
    if ends_on == "0.1.0":
        assert server.fingerprint() == before
    assert transaction.recover(server.ctx()) is None  # idempotent: nothing left to do
    # A crash of the updater after the switch judged nothing: 0.2.0 is not held failed.
    assert plan.failed_versions(history.read(server.paths.history)) == set()


def test_a_ctrl_c_while_recovery_discards_still_records_it(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The discard removes the journal first: stopped before its history line, that
    refusal was never recorded by anyone."""
    make_release(server.paths, "0.2.0")
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_KILL_PARENT_AT_CHECK": "1"}
    child = run_crashing_child(CHILD, str(server.paths.root), "check-config", env=env)
    assert child.returncode == -signal.SIGKILL, child.stderr
    discard = transaction._discard

    def interrupted_discard(ctx: Context, j: journal.Journal) -> None:
        discard(ctx, j)
        signal.raise_signal(signal.SIGINT)  # the journal is gone; the history is next

    monkeypatch.setattr(transaction, "_discard", interrupted_discard)
    with interrupt.catching():
        said = transaction.recover(server.ctx())
    assert said is not None
    assert said.startswith("recovered")
    assert journal.read(server.paths.journal) is None
    [entry] = history.read(server.paths.history)
    assert entry.result == "refused"
    assert "interrupted during stage" in str(entry.reason)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a priority again")
def test_a_recovered_commit_waits_for_the_cpu_too(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit a recovery finishes runs 10 steps nicer, as an update's does, and the
    recovery ends back at the process's own priority."""
    make_release(server.paths, "0.0.7")
    make_release(server.paths, "0.0.8")  # something to prune: the child dies pruning
    make_release(server.paths, "0.2.0")
    child = run_crashing_child(CHILD, str(server.paths.root), "commit")
    assert child.returncode == -signal.SIGKILL, child.stderr
    given = os.getpriority(os.PRIO_PROCESS, 0)
    committing: list[int] = []
    commit = commit_step.commit

    def committed(ctx: Context, j: journal.Journal) -> list[str]:
        committing.append(os.getpriority(os.PRIO_PROCESS, 0))
        return commit(ctx, j)

    monkeypatch.setattr(commit_step, "commit", committed)
    try:
        said = transaction.recover(server.ctx())
    finally:
        priority.restore_process(print)  # never leave the test runner lowered
    assert said == "recovered: finished committing the verified update to 0.2.0"
    assert committing == [min(max(given, 0) + priority.NICER, priority.MAX_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == given


@pytest.mark.skipif(os.geteuid() != 0, reason="scalebox-update recover runs as root only")
def test_recover_that_cannot_finish_a_verified_commit_says_so_and_exits_0(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It answered 1, "refused before any change: nothing was changed", for an update that
    stands; an update whose own commit meets the same disk says "updated" (exit 0)."""
    make_release(server.paths, "0.0.7")
    make_release(server.paths, "0.0.8")  # something to prune: the child dies pruning
    make_release(server.paths, "0.2.0")
    child = run_crashing_child(CHILD, str(server.paths.root), "commit")
    assert child.returncode == -signal.SIGKILL, child.stderr

    def read_only(ctx: Context, j: journal.Journal) -> list[str]:
        raise OSError(errno.EROFS, "Read-only file system", str(ctx.paths.history))

    monkeypatch.setattr(commit_step, "commit", read_only)
    monkeypatch.setattr(update_main, "_paths", lambda: server.paths)
    # main() ends ignoring every signal (only its exit is left): not this test runner.
    handlers = {s: signal.getsignal(s) for s in interrupt.HANDLED}
    try:
        code = update_main.main(["recover", "--json"])
    finally:
        priority.restore_process(print)  # never leave the test runner lowered
        for s, handler in handlers.items():
            signal.signal(s, handler)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (code, out["result"], out["exit_code"]) == (0, "recovered", 0), out
    assert out["message"].startswith("recovered: 0.2.0 runs, verified, but its bookkeeping")
    assert "Read-only file system" in out["unfinished"]
    assert "scalebox-update recover" in out["unfinished"]
    assert journal.read(server.paths.journal) is not None  # the next run finishes it
    monkeypatch.undo()
    assert transaction.recover(server.ctx()) == (
        "recovered: finished committing the verified update to 0.2.0"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="scalebox-update runs as root only")
def test_a_dry_run_tells_an_interrupted_update_and_leaves_it(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run promises to change nothing, yet it finished (here: committed, and
    pruned two releases) whatever a crash had left, before saying what it would do."""
    make_release(server.paths, "0.0.7")
    make_release(server.paths, "0.0.8")  # something to prune: the child dies pruning
    make_release(server.paths, "0.2.0")
    child = run_crashing_child(CHILD, str(server.paths.root), "commit")
    assert child.returncode == -signal.SIGKILL, child.stderr
    p = server.paths

    def state() -> tuple[object, ...]:
        history_text = p.history.read_text() if p.history.exists() else ""
        backups = sorted(x.name for x in p.backups.iterdir()) if p.backups.is_dir() else []
        releases = sorted(x.name for x in p.releases.iterdir())
        return releases, p.current.readlink(), history_text, backups

    before = state()
    # An earlier run's scratch (an extracted release) is this run's to clear: a second
    # dry run found the first's and refused to extract (CI run 39).
    (p.work / "release").mkdir(parents=True, exist_ok=True)
    (p.work / "release" / "left").write_text("x")
    pending = journal.read(p.journal)
    monkeypatch.setattr(update_main, "_paths", lambda: p)
    # systemd's part stood in for, as in every test here (systemd is not PID 1 on this host).
    monkeypatch.setattr(update_main, "Systemctl", lambda: server.service)
    handlers = {s: signal.getsignal(s) for s in interrupt.HANDLED}
    try:
        code = update_main.main(["--rollback", "--dry-run", "--json"])
    finally:
        priority.restore_process(print)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert (code, result["result"], result.get("recovered")) == (0, "dry run", None), (result, err)
    assert "an interrupted update 0.1.0 -> 0.2.0 (commit) is not finished" in err
    assert "`scalebox-update recover`" in err
    assert journal.read(p.journal) == pending
    assert state() == before
    assert not p.work.exists()
    assert transaction.recover(server.ctx()) == (
        "recovered: finished committing the verified update to 0.2.0"
    )


def test_a_crash_during_rollback_is_finished_by_the_next_run(server: Server) -> None:
    make_release(server.paths, "0.2.0")
    before = server.fingerprint()
    j = journal.begin(
        server.paths.journal,
        journal.Journal(
            id=journal.new_id(),
            action="update",
            from_version="0.1.0",
            from_release="0.1.0",
            to_version="0.2.0",
            to_release="0.2.0",
            step="stage",
        ),
    )
    switch.back_up(server.paths, server.paths.backup_dir(j.id), ["scaleboxd.service"])
    switch.swap_current(server.paths, "0.2.0")
    switch.install_units(server.paths, server.paths.release_dir("0.2.0"))
    journal.advance(server.paths.journal, j, "rollback", reason="health check failed")
    # The first rollback attempt died half way: current already swapped back, units not.
    switch.swap_current(server.paths, "0.1.0")

    said = transaction.recover(server.ctx())
    assert said is not None
    assert "rolled back" in said
    assert server.fingerprint() == before
    assert server.health() == "0.1.0"
    [entry] = history.read(server.paths.history)
    assert (entry.result, entry.reason) == ("rolled back", "health check failed")
    assert entry.release_failed is True  # the release's own failure: counted in the pruning


SIGTERM_CHILD = """
import sys
import time
from pathlib import Path
import httpx
from scalebox.update import interrupt, transaction
from scalebox.update.context import Context
from scalebox.update.errors import RolledBack
from scalebox.update.paths import Paths
from tests.unit.update_service_double import ProcessService

root = Path(sys.argv[1])
paths = Paths(root)
ctx = Context(paths=paths, service=ProcessService(paths, root),
              http=httpx.Client(trust_env=False), report=print, stability_window=0.5,
              restart_timeout=10, verify_timeout=5)
with interrupt.catching():
    try:
        transaction.install(ctx, action="update", from_version="0.1.0", from_release="0.1.0",
                            target=transaction.Target("0.2.0", None))
    except RolledBack as exc:
        print("RESULT", exc.what, flush=True)
        sys.exit(3)
"""


def test_sigterm_during_the_switch_rolls_back_before_exiting(server: Server) -> None:
    make_release(server.paths, "0.2.0", behaviour="hang")  # the restart never finishes
    before = server.fingerprint()
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, str(server.paths.root)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        start_new_session=True,  # as sudo gives it: a SIGKILL cannot leave ours lowered
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(500):
            current = journal.read(server.paths.journal)
            if current is not None and current.step == "switch":
                break
            time.sleep(0.01)
        time.sleep(0.3)  # inside the restart
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 3, out
    said = "RESULT the update to 0.2.0 was stopped before 0.2.0 was judged (interrupted by SIGTERM"
    assert said in out
    assert server.fingerprint() == before
    assert server.health() == "0.1.0"
    assert journal.read(server.paths.journal) is None
    # The signal stopped it, not the release: the pruning holds nothing against 0.2.0.
    [entry] = history.read(server.paths.history)
    assert (entry.result, entry.release_failed) == ("rolled back", False)
    assert plan.failed_versions([entry]) == set()
