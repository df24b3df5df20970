"""./do bench: what an update costs the users of a real server, in figures.

    ./do bench [--runs N] [--json] [--workers N] [--interval S] [--releases DIR]

Builds signed releases A, B and one that crashes at start (tools/releases.py),
then for each run boots a fresh nspawn machine, installs A with install.sh,
starts a VM and measures:

1. requests during an update A -> B: load generators on the host send
   GET /health to the machine (through m.url(), which checks the route) for
   the whole update, all at once: paced workers on a new connection per
   request, the same on kept-alive connections, and an open loop (a new
   request every 20 ms whether or not earlier ones were answered, like
   ./do check's RequestStream). Sent, answered, failed by kind, and
   p50/p99/max latency of each.
2. a crashing release: from the moment the updater starts its switch (its
   own step_times) to the moment /health answers with the old version again,
   polled from the host every 20 ms; also the updater's own view (the time
   its "is healthy" line arrives) and systemd's journal.
3. the update's wall time from a local tarball, per step, with the stability
   window (default 5 s) called out.

Prints a table with targets and PASS/MISS; exits 0 even when a target is
missed (a benchmark, not a test), 1 only when the bench itself could not run.
Every machine is torn down, every temp folder removed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from scalebox.errors import ScaleboxError
from tools import keygen, releases
from tools.checks import API_PORT, CACHE, create_vm, install, read_token, say, vm_still_running
from tools.loadgen import Load, Stats
from tools.machine import MACHINE_ENV, Machine, sigterm_raises
from tools.releases import CRASH, A, B

CRASH_TARGET = 5.0  # seconds from the switch to the old version healthy
FAILED_TARGET = 0
UPDATE_TIMEOUT = 600.0
STABILITY_WINDOW = 5.0  # the updater's default; the bench does not change it


class BenchError(ScaleboxError):
    """The bench could not measure (a build, boot or install failed)."""


# --- the updater, timed line by line ------------------------------------------------


@dataclass
class UpdaterRun:
    started: float  # host time.time() just before the updater was started
    ended: float
    exit_code: int
    result: dict[str, Any]
    lines: list[tuple[float, str]]  # (arrival time on the host, stderr line)

    @property
    def step_times(self) -> dict[str, float]:
        raw = self.result.get("step_times")
        return {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def line_time(self, text: str, after: float = 0.0) -> float | None:
        """When the first stderr line containing ``text`` (arriving after ``after``) came."""
        return next((t for t, line in self.lines if text in line and t >= after), None)


def run_updater(m: Machine, release_url: str) -> UpdaterRun:
    """scalebox-update --json in the machine, its stderr lines timestamped as they arrive."""
    if m.init_pid is None:
        raise BenchError(f"{m.name} has not booted", "use Machine.boot()")
    argv = [
        "nsenter",
        "-t",
        str(m.init_pid),
        "-a",
        "--",
        "env",
        f"SCALEBOX_RELEASE_URL={release_url}",
        "scalebox-update",
        "--json",
    ]
    lines: list[tuple[float, str]] = []
    out: list[str] = []
    started = time.time()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=MACHINE_ENV
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr

    def read_err() -> None:
        for line in stderr:
            lines.append((time.time(), line.rstrip("\n")))

    readers = [
        threading.Thread(target=read_err, daemon=True),
        threading.Thread(target=lambda: out.append(stdout.read()), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        code = proc.wait(UPDATE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise BenchError(
            f"scalebox-update did not finish within {UPDATE_TIMEOUT:.0f} s",
            "see its progress lines above; the machine is torn down",
        ) from None
    ended = time.time()
    for reader in readers:
        reader.join(10)
    last = "".join(out).strip().splitlines()[-1:] or ["{}"]
    try:
        result = json.loads(last[0])
    except ValueError:
        result = {"message": last[0]}
    for t, line in lines:
        say(f"  +{t - started:6.2f} s  {line}")
    return UpdaterRun(started, ended, code, result if isinstance(result, dict) else {}, lines)


# --- the figures ------------------------------------------------------------------


@dataclass
class LoadFigures:
    name: str
    sent: int
    answered: int
    failed: int
    failures: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    versions: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, stats: Stats) -> LoadFigures:
        return cls(
            name,
            stats.sent,
            stats.answered,
            stats.failed,
            stats.failures,
            round(stats.p50 * 1000, 1),
            round(stats.p99 * 1000, 1),
            round(stats.max * 1000, 1),
            stats.versions,
        )

    def line(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.failures.items())) or "none"
        return (
            f"{self.name:<30} {self.sent:6d} sent {self.answered:6d} answered "
            f"{self.failed:4d} failed ({kinds})  p50 {self.p50_ms:6.1f} ms  "
            f"p99 {self.p99_ms:7.1f} ms  max {self.max_ms:7.1f} ms"
        )


@dataclass
class RunFigures:
    run: int
    machine: str
    # 1. load during A -> B
    update_exit: int | None = None
    update_result: str = ""
    loads: list[LoadFigures] = field(default_factory=list)
    # 3. update time
    update_wall_s: float | None = None
    steps_s: dict[str, float] = field(default_factory=dict)
    # 2. crashing release
    crash_exit: int | None = None
    crash_result: str = ""
    crash_to_old_healthy_s: float | None = None  # host poll, from the updater's switch
    crash_updater_view_s: float | None = None  # the updater's "is healthy" line
    crash_from_systemd_stop_s: float | None = None  # from systemd's "Stopping" of the old one
    crash_timeline: list[str] = field(default_factory=list)
    crash_load: LoadFigures | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def worst_failed(self) -> int:
        return max((load.failed for load in self.loads), default=0)


STEP_ORDER = ("stage", "backup", "switch", "verify", "commit", "end")


def step_durations(run: UpdaterRun) -> dict[str, float]:
    """Seconds in each step, from the updater's own step_times, plus what came before and after."""
    times = run.step_times
    marks = [(name, times[name]) for name in STEP_ORDER if name in times]
    if not marks:
        return {}
    out = {"preflight+fetch+verify": marks[0][1] - run.started}
    for (name, begun), (_, following) in itertools.pairwise(marks):
        out[name] = following - begun
    out["exit"] = run.ended - marks[-1][1]
    return {k: round(v, 3) for k, v in out.items()}


# --- one run ----------------------------------------------------------------------


def _health_url(m: Machine) -> str:
    return m.url(API_PORT, "/health")


def _wait_version(m: Machine, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    seen = "no answer"
    while time.monotonic() < deadline:
        try:
            seen = str(httpx.get(_health_url(m), timeout=5).json().get("version"))
        except (httpx.HTTPError, ValueError) as exc:
            seen = f"{type(exc).__name__}: {exc}"
        if seen == version:
            return
        time.sleep(0.2)
    raise BenchError(
        f"/health on {m.ip} did not report {version} within {timeout:.0f} s (last: {seen})",
        "see `journalctl -u scaleboxd` in the machine",
    )


def _wait_answered(loads: list[Load], count: int = 5) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(load.stats().answered >= count for load in loads):
            return
        time.sleep(0.05)
    raise BenchError(
        "the load generators got no answers from /health before the update",
        "the freshly installed scaleboxd does not answer; see journalctl -u scaleboxd",
    )


def _wait_more_answers(loads: list[Load], more: int = 5, timeout: float = 10) -> None:
    """Until each load got ``more`` answers than now: the new process answers too.

    Not an error when it does not happen: the figures then show what was seen.
    """
    start = [load.stats().answered for load in loads]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(load.stats().answered >= n + more for load, n in zip(loads, start, strict=True)):
            return
        time.sleep(0.05)


def measure_update(m: Machine, figures: RunFigures, workers: int, interval: float) -> None:
    """1 and 3: A -> B under constant load."""
    new_conn = Load(lambda: _health_url(m), workers=workers, interval=interval)
    kept = Load(lambda: _health_url(m), workers=workers, interval=interval, keep_alive=True)
    open_loop = Load(lambda: _health_url(m), interval=0.02, open_loop=True)
    with new_conn.running(), kept.running(), open_loop.running():
        _wait_answered([new_conn, kept, open_loop])
        run = run_updater(m, f"/mnt/release/{releases.tarball_name(B)}")
        _wait_more_answers([new_conn, kept, open_loop])  # the new process answers too
    figures.update_exit = run.exit_code
    figures.update_result = str(run.result.get("result", run.result.get("message", "")))
    figures.update_wall_s = round(run.ended - run.started, 3)
    figures.steps_s = step_durations(run)
    figures.loads = [
        LoadFigures.of(f"new connection, {workers} workers", new_conn.stats()),
        LoadFigures.of(f"keep-alive, {workers} workers", kept.stats()),
        LoadFigures.of("open loop, new request / 20 ms", open_loop.stats()),
    ]
    if run.exit_code != 0:
        figures.errors.append(f"update A->B exited {run.exit_code}: {run.result.get('message')}")
    for load in figures.loads:
        if load.versions and set(load.versions) != {A, B}:
            figures.errors.append(f"{load.name}: /health versions seen {load.versions}")


def _systemd_timeline(m: Machine, since: float) -> list[tuple[float, str]]:
    """scaleboxd's journal entries since ``since`` (Unix time) as (time, message)."""
    done = m.run(
        ["journalctl", "-u", "scaleboxd.service", "-o", "json", "--since", f"@{since:.3f}"],
        check=False,
    )
    entries = []
    for line in done.stdout.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            raw = json.loads(line)
            message = raw["MESSAGE"]
            if isinstance(message, str):
                entries.append((int(raw["__REALTIME_TIMESTAMP"]) / 1e6, message))
    return entries


def _notable(message: str) -> bool:
    """Not an access-log line, nor the container's harmless cgroup complaint."""
    return "scaleboxd.api:" not in message and "Failed to kill control group" not in message


def measure_crash(m: Machine, figures: RunFigures, old: str) -> None:
    """2: update to a release that exits at start; time until ``old`` answers again."""
    poll = Load(lambda: _health_url(m), workers=1, interval=0.02, timeout=30)
    with poll.running():
        deadline = time.monotonic() + 10
        while poll.stats().answered < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        run = run_updater(m, f"/mnt/release/{releases.tarball_name(CRASH)}")
        _wait_more_answers([poll])  # the old version answers again after the rollback
    figures.crash_exit = run.exit_code
    figures.crash_result = str(run.result.get("result", ""))
    figures.crash_load = LoadFigures.of("poll during crash+rollback", poll.stats())
    times = run.step_times
    switch, rollback = times.get("switch"), times.get("rollback")
    if run.exit_code != 3 or switch is None or rollback is None:
        figures.errors.append(
            f"the crashing release was not rolled back as expected: exit {run.exit_code}, "
            f"step_times {times}, {run.result.get('message')}"
        )
        return
    # The first answer from `old` that arrived after the rollback began: the old
    # process cannot answer then unless it runs again (the crashing one never does).
    answers = sorted(
        s.sent + s.seconds
        for s in poll.taken()
        if s.version == old and s.sent + s.seconds > rollback
    )
    if answers:
        figures.crash_to_old_healthy_s = round(answers[0] - switch, 3)
    healthy_line = run.line_time(f"scaleboxd {old} is healthy", after=rollback)
    if healthy_line is not None:
        figures.crash_updater_view_s = round(healthy_line - switch, 3)
    journal = _systemd_timeline(m, switch - 0.5)
    stopping = next((t for t, msg in journal if msg.startswith("Stopping")), None)
    if stopping is not None and answers:
        figures.crash_from_systemd_stop_s = round(answers[0] - stopping, 3)
    marks = [(switch, "updater: switch step begins"), (rollback, "updater: rollback step begins")]
    marks += [(t, f"journal: {msg}") for t, msg in journal if _notable(msg)]
    if healthy_line is not None:
        marks.append((healthy_line, f"updater: scaleboxd {old} is healthy"))
    if answers:
        marks.append((answers[0], f"host: /health answers {old}"))
    last = (answers[0] if answers else run.ended) + 0.05
    figures.crash_timeline = [
        f"+{t - switch:6.3f} s  {what}" for t, what in sorted(marks) if switch - 0.5 <= t <= last
    ]


def one_run(index: int, release_dir: Path, workers: int, interval: float) -> RunFigures:
    with Machine.boot(release_dir) as m:
        figures = RunFigures(index, m.name)
        say(f"run {index}: installing {A} on {m.name}")
        install(m, releases.tarball_name(A), "--backend", "process")
        token = read_token(m)
        vm = create_vm(m, token)
        _wait_version(m, A)
        say(f"run {index}: update {A} -> {B} under load")
        measure_update(m, figures, workers, interval)
        if figures.update_exit == 0:
            _wait_version(m, B)
            vm_still_running(m, token, vm)
            say(f"run {index}: update {B} -> {CRASH} (crashes at start)")
            measure_crash(m, figures, old=B)
            _wait_version(m, B)
        return figures


# --- report -----------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _zero(failed: int | None) -> bool:
    return failed is not None and failed <= FAILED_TARGET


def _under(seconds: float | None) -> bool:
    return seconds is not None and seconds < CRASH_TARGET


def _fmt(value: float | None, unit: str = "s") -> str:
    return "n/a" if value is None else f"{value:.2f} {unit}"


def report(runs: list[RunFigures]) -> tuple[str, dict[str, Any]]:
    lines = []
    for r in runs:
        lines.append(f"run {r.run} ({r.machine}): update {A} -> {B}: exit {r.update_exit}")
        lines += ["  " + load.line() for load in r.loads]
        lines.append(
            f"  update wall time {_fmt(r.update_wall_s)}; steps: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r.steps_s.items())
        )
        lines.append(
            f"  crash {B} -> {CRASH}: exit {r.crash_exit} ({r.crash_result}); switch -> {B} "
            f"healthy: host {_fmt(r.crash_to_old_healthy_s)}, updater "
            f"{_fmt(r.crash_updater_view_s)}; systemd stop -> healthy "
            f"{_fmt(r.crash_from_systemd_stop_s)}"
        )
        lines += ["    " + t for t in r.crash_timeline]
        if r.crash_load is not None:
            lines.append("  " + r.crash_load.line())
        lines += [f"  ERROR: {e}" for e in r.errors]

    def worst(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return max(known) if known else None

    failed_new = max((r.loads[0].failed for r in runs if r.loads), default=None)
    failed_kept = max((r.loads[1].failed for r in runs if len(r.loads) > 1), default=None)
    failed_open = max((r.loads[2].failed for r in runs if len(r.loads) > 2), default=None)
    longest = worst([max((ld.max_ms for ld in r.loads), default=None) for r in runs])
    crash = worst([r.crash_to_old_healthy_s for r in runs])
    crash_updater = worst([r.crash_updater_view_s for r in runs])
    wall = worst([r.update_wall_s for r in runs])
    fastest = min((r.update_wall_s for r in runs if r.update_wall_s is not None), default=None)
    verify = worst([r.steps_s.get("verify") for r in runs])
    broken = any(r.errors for r in runs)
    longest_s = None if longest is None else longest / 1000
    unwindowed = None if wall is None else wall - STABILITY_WINDOW
    under = f"< {CRASH_TARGET:g} s"
    window = f"{STABILITY_WINDOW:g} s"
    rows: list[tuple[str, str, object, bool | None]] = [
        ("failed requests during A->B, new connection", "0", failed_new, _zero(failed_new)),
        ("failed requests during A->B, keep-alive", "0", failed_kept, _zero(failed_kept)),
        ("failed requests during A->B, open loop", "0", failed_open, _zero(failed_open)),
        ("longest request latency during A->B", "-", _fmt(longest_s), None),
        ("crash: switch -> old healthy (host, 20 ms poll)", under, _fmt(crash), _under(crash)),
        ("crash: switch -> old healthy (updater's view)", under, _fmt(crash_updater),
         _under(crash_updater)),
        ("update A->B wall time, local tarball (worst)", "-", _fmt(wall), None),
        ("update A->B wall time, local tarball (best)", "-", _fmt(fastest), None),
        (f"  of which verify, incl. the {window} stability window", "-", _fmt(verify), None),
        (f"  wall time without the {window} window (worst)", "-", _fmt(unwindowed), None),
    ]  # fmt: skip
    heading = f"figure (worst of {len(runs)} runs)"
    table = [f"\n{heading:<52} {'target':>8}  {'value':>10}  verdict"]
    for name, target, value, ok in rows:
        verdict = "" if ok is None else _verdict(ok)
        table.append(f"{name:<52} {target:>8}  {value!s:>10}  {verdict}")
    misses = [name for name, _, _, ok in rows if ok is False]
    if misses:
        table.append("MISS: " + "; ".join(misses))
    if broken:
        table.append(
            "some runs reported errors (ERROR lines above): their figures may be incomplete"
        )
    summary = {
        "runs": [asdict(r) for r in runs],
        "worst": {
            "failed_new_connection": failed_new,
            "failed_keep_alive": failed_kept,
            "failed_open_loop": failed_open,
            "longest_latency_s": None if longest is None else longest / 1000,
            "crash_to_old_healthy_s": crash,
            "crash_to_old_healthy_updater_s": crash_updater,
            "update_wall_s": wall,
            "update_wall_best_s": fastest,
            "stability_window_s": STABILITY_WINDOW,
        },
        "targets": {"failed_requests": FAILED_TARGET, "crash_to_old_healthy_s": CRASH_TARGET},
        "misses": misses,
    }
    return "\n".join(lines + table), summary


# --- driver -----------------------------------------------------------------------


def build_releases(out: Path) -> None:
    """A, B and the crashing release, signed by a throwaway key, with install.sh beside them."""
    key, _ = keygen.keygen(out / "key")
    for version in (A, B):
        say(f"building release {version}")
        releases.build_tarball(out, key, version)
    say(f"building release {CRASH} (exits at start)")
    releases.build_tarball(out, key, CRASH, releases.broken_copy(out, CRASH))
    shutil.copy2(releases.ROOT / "scripts" / "install.sh", out / "install.sh")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./do bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, choices=range(1, 21), metavar="N",
                        help="fresh machines to measure on (1-20, default 3)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--workers", type=int, default=4, choices=range(1, 33), metavar="N",
                        help="load workers per variant (default 4)")  # fmt: skip
    parser.add_argument("--interval", type=float, default=0.05,
                        help="seconds between one worker's requests (default 0.05)")  # fmt: skip
    parser.add_argument("--releases", type=Path,
                        help="reuse a folder of releases kept by --keep-releases")  # fmt: skip
    parser.add_argument("--keep-releases", action="store_true",
                        help="keep the built releases and print their folder")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0.005 <= args.interval <= 5:
        parser.error("--interval must be between 0.005 and 5 seconds")
    runs: list[RunFigures] = []
    temp = None
    try:
        with sigterm_raises():
            if args.releases:
                release_dir = args.releases.resolve()
            else:
                (CACHE / "bench").mkdir(parents=True, exist_ok=True)
                temp = release_dir = Path(tempfile.mkdtemp(prefix="releases-", dir=CACHE / "bench"))
                build_releases(release_dir)
            for index in range(1, args.runs + 1):
                runs.append(one_run(index, release_dir, args.workers, args.interval))
    except KeyboardInterrupt:
        say("interrupted; the machine was torn down")
        return 130
    except (ScaleboxError, releases.ReleaseBuildFailed) as exc:
        say(f"bench: error: {exc}")
        if not runs:
            return 1
        say("reporting the runs that finished")
    finally:
        if temp is not None:
            if args.keep_releases:
                say(f"releases kept in {temp} (reuse with --releases {temp})")
            else:
                shutil.rmtree(temp, ignore_errors=True)
    text, summary = report(runs)
    print(json.dumps(summary, sort_keys=True) if args.json else text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
