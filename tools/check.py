"""./do check: the release, installed on a fresh systemd server, proven to work there.

    ./do check [--keep-vm] [--tarball PATH]

Phases: build the tarball (./do tarball), boot a machine (tools/machine.py)
with the release bound at /mnt/release, run install.sh inside, then from the
host the API suite (tests/api with SCALEBOX_URL/SCALEBOX_TOKEN), then inside:
the installed units verify clean, scalebox-update is on PATH, a VM survives
`systemctl restart scaleboxd`, and requests sent during that restart are all
answered (socket activation). Prints each phase's wall time; exits non-zero
when any phase failed. The machine is always torn down unless --keep-vm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scalebox.config import parse_lines
from scalebox.errors import ScaleboxError
from tools.machine import Machine, sigterm_raises

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
API_PORT = 8080
CHECK_TEMPLATE = "debian-base"


class CheckFailed(ScaleboxError):
    """One phase of ./do check found a problem."""


class Stop(Exception):
    """A phase that later phases need has failed (it is recorded in its Phase)."""


@dataclass
class Phase:
    name: str
    status: str = "not run"  # ok | FAIL | not run
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Report:
    phases: list[Phase] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def phase(self, name: str, *, required: bool = False) -> Iterator[Phase]:
        """Time one phase; a failure is recorded, and re-raised when later phases need it."""
        phase = Phase(name)
        self.phases.append(phase)
        say(f"{name} ...")
        start = time.monotonic()
        try:
            yield phase
        except Exception as exc:
            if isinstance(exc, ScaleboxError):
                phase.detail = str(exc)
            else:
                # Unexpected: keep the traceback for whoever fixes it.
                traceback.print_exception(exc)
                phase.detail = f"{type(exc).__name__}: {exc}"
            phase.status = "FAIL"
            say(f"FAILED: {name}: {phase.detail}")
            if required:
                raise Stop from exc
        else:
            phase.status = "ok"
            say(f"ok: {name}{': ' + phase.detail if phase.detail else ''}")
        finally:
            phase.seconds = time.monotonic() - start

    def failed(self) -> bool:
        return any(p.status == "FAIL" for p in self.phases)

    def summary(self, planned: list[str], title: str = "./do check") -> str:
        seen = {p.name for p in self.phases}
        rows = [*self.phases, *(Phase(n) for n in planned if n not in seen)]
        width = max(len(p.name) for p in rows)
        lines = ["", f"{title} summary:"]
        for p in rows:
            detail = p.detail.splitlines()[0] if p.detail else ""
            lines.append(f"  {p.status:7} {p.seconds:7.1f} s  {p.name:{width}}  {detail}")
        total = time.monotonic() - self.started
        verdict = "FAILED" if self.failed() else "passed"
        lines.append(f"  total   {total:7.1f} s  {title} {verdict}")
        return "\n".join(lines)


PLANNED = [
    "build the tarball",
    "boot a machine",
    "install.sh",
    "read the API token",
    "API suite from the host",
    "installed units verify clean",
    "scalebox-update on PATH",
    "a VM survives systemctl restart scaleboxd",
    "requests during systemctl restart are answered",
]


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def indent(text: str, lines: int = 60) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


# --- phases ----------------------------------------------------------------------


def signing_env() -> dict[str, str]:
    """The environment for ./do tarball: the real key, or a throwaway one for the check."""
    env = dict(os.environ)
    if env.get("SCALEBOX_SIGNING_KEY") or env.get("SCALEBOX_SIGNING_KEY_FILE"):
        return env
    if (ROOT / "keys/release.key").is_file():
        return env
    key_dir = CACHE / "check-key"
    if not (key_dir / "release.key").is_file():
        say(f"no keys/release.key: making a throwaway signing key in {key_dir} for this check")
        subprocess.run(
            [sys.executable, "-m", "tools.keygen", "--dir", str(key_dir)],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    env["SCALEBOX_SIGNING_KEY_FILE"] = str(key_dir / "release.key")
    return env


def build_tarball(out: Path, version: str | None = None) -> Path:
    """Build this tree's release (as ``version`` if given) into ``out``; return the tarball."""
    # Into this run's own folder, not builds/: two checks at once must not
    # write the same file.
    result = subprocess.run(
        [
            str(ROOT / "do"),
            "tarball",
            "--out",
            str(out),
            *(["--version", version] if version else []),
        ],
        cwd=ROOT,
        env=signing_env(),
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise CheckFailed(
            f"./do tarball {'--version ' + version if version else ''}failed "
            f"with exit code {result.returncode}",
            "run ./do tarball by hand and fix what it reports (its output is above)",
        )
    return Path(lines[-1])


def stage_release(tarball: Path, stage: Path) -> None:
    """The folder bound at /mnt/release: the tarball and the install.sh beside it."""
    if not tarball.is_file():
        raise CheckFailed(f"tarball {tarball} does not exist", "run ./do tarball")
    stage.mkdir(parents=True, exist_ok=True)
    if tarball.parent.resolve() != stage.resolve():
        shutil.copy2(tarball, stage / tarball.name)
    shutil.copy2(ROOT / "scripts/install.sh", stage / "install.sh")


def install(m: Machine, tarball_name: str) -> str:
    result = m.run(["bash", "/mnt/release/install.sh", f"/mnt/release/{tarball_name}"], timeout=600)
    print(indent(result.stdout + result.stderr), file=sys.stderr, flush=True)
    return result.stdout


def read_token(m: Machine) -> str:
    text = m.run(["cat", "/etc/scaleboxd/config"]).stdout
    values = parse_lines(text, "/etc/scaleboxd/config (in the machine)")
    if "API_TOKEN" not in values or not values["API_TOKEN"][0]:
        raise CheckFailed(
            "install.sh wrote /etc/scaleboxd/config without an API_TOKEN",
            "install.sh must generate a token on a fresh install",
        )
    return values["API_TOKEN"][0]


def api_suite(m: Machine, token: str) -> str:
    env = {**os.environ, "SCALEBOX_URL": m.url(API_PORT), "SCALEBOX_TOKEN": token}
    result = subprocess.run(
        [str(ROOT / ".venv/bin/pytest"), "tests/api", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    print(indent(result.stdout, 40), file=sys.stderr, flush=True)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0:
        raise CheckFailed(
            f"the API suite failed against {m.ip} (pytest exit {result.returncode}): {last}",
            "the output is above; rerun with --keep-vm to reproduce against the same server",
        )
    return last.strip("= ")


def units_verify(m: Machine) -> str:
    listing = m.run(
        [
            "sh",
            "-c",
            "ls /etc/systemd/system/scalebox*.service /etc/systemd/system/scalebox*.socket"
            " /etc/systemd/system/scalebox*.timer 2>/dev/null || true",
        ]
    ).stdout.split()
    if not listing:
        raise CheckFailed(
            "no scalebox units under /etc/systemd/system", "install.sh must install the units"
        )
    # A template cannot be verified by itself; an instance of it can.
    targets = [u.replace("@.service", "@check.service") for u in listing]
    result = m.run(["systemd-analyze", "verify", "--man=no", *targets], check=False)
    out = (result.stdout + result.stderr).strip()
    if out or result.returncode != 0:
        raise CheckFailed(
            f"systemd-analyze verify reported (exit {result.returncode}):\n{indent(out)}",
            "fix the unit files in units/",
        )
    return f"{len(listing)} units: " + ", ".join(Path(u).name for u in listing)


def updater_on_path(m: Machine) -> str:
    where = m.run(["sh", "-c", "command -v scalebox-update"], check=False)
    if where.returncode != 0:
        raise CheckFailed(
            "scalebox-update is not on PATH in the installed server",
            "install.sh must link /usr/local/bin/scalebox-update (or the updater has not landed)",
        )
    version = m.run(["scalebox-update", "--version"], check=False)
    if version.returncode != 0:
        raise CheckFailed(
            f"`scalebox-update --version` exited with code {version.returncode}:\n"
            + indent(version.stdout + version.stderr),
            "the updater's entry point must start on the installed server",
        )
    return f"{where.stdout.strip()}: {version.stdout.strip()}"


def ssh_public_key() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode() + " scalebox-check"


def main_pid(m: Machine, unit: str) -> int:
    return int(m.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).stdout.strip())


def guest_answer(m: Machine, port: int, timeout: float = 30) -> dict[str, object]:
    """The one JSON line a VM's guest sends on each connection to its ssh_port."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        address = m.address()  # the route guard, before every connection
        try:
            with socket.create_connection((address, port), timeout=5) as conn:
                data = conn.makefile("rb").readline()
            answer = json.loads(data)
            if isinstance(answer, dict):
                return answer
        except (OSError, ValueError) as exc:
            last_error = exc
        time.sleep(0.2)
    raise CheckFailed(
        f"the guest on {m.ip}:{port} did not answer with a JSON line within {timeout:.0f} s"
        f" (last error: {last_error})",
        "see `journalctl -u 'scalebox-vm@*'` in the machine (--keep-vm)",
    )


def vm_survives_restart(m: Machine, token: str) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.post(
        m.url(API_PORT, "/vms"),
        headers=headers,
        json={"template": CHECK_TEMPLATE, "ssh_public_key": ssh_public_key()},
        timeout=30,
    )
    if response.status_code != 201:
        raise CheckFailed(
            f"POST /vms answered {response.status_code}: {response.text[:300]}",
            f"a fresh install must be able to create a VM from {CHECK_TEMPLATE}",
        )
    vm = response.json()
    vm_id, port = vm["id"], int(vm["ssh_port"])
    unit = f"scalebox-vm@{vm_id}.service"
    first = guest_answer(m, port)
    if first.get("vm") != vm_id:
        raise CheckFailed(f"the guest on port {port} says it is {first!r}, not VM {vm_id}")
    before = main_pid(m, unit)
    if before == 0:
        raise CheckFailed(f"{unit} has no main process", "VMs must run in their own unit")
    daemon_before = main_pid(m, "scaleboxd.service")
    m.run(["systemctl", "restart", "scaleboxd.service"], timeout=120)
    daemon_after = main_pid(m, "scaleboxd.service")
    after = main_pid(m, unit)
    if daemon_after in (0, daemon_before):
        raise CheckFailed(f"scaleboxd's main PID {daemon_before} -> {daemon_after}: no restart")
    if after != before:
        raise CheckFailed(
            f"{unit} main PID changed across the restart of scaleboxd: {before} -> {after}",
            "restarting the daemon must not touch VM units",
        )
    again = guest_answer(m, port)
    if again.get("vm") != vm_id:
        raise CheckFailed(f"after the restart the guest on port {port} says {again!r}")
    listed = httpx.get(m.url(API_PORT, f"/vms/{vm_id}"), headers=headers, timeout=30)
    if listed.status_code != 200:
        raise CheckFailed(
            f"after the restart GET /vms/{vm_id} answered {listed.status_code}: "
            + listed.text[:300],
            "scaleboxd must reconcile its saved VMs on start",
        )
    return f"VM {vm_id}: {unit} main PID {before} unchanged, guest on port {port} answers"


SEND_INTERVAL = 0.02  # a new request every 20 ms, whether or not earlier ones were answered


@dataclass
class RequestStream:
    """/health requests, each on a new connection, sent from the host until stopped.

    Each request runs in its own thread, so requests keep being sent while
    earlier ones wait in the kernel's queue during a restart.
    """

    url: Callable[[], str]
    refused: int = 0
    other: list[str] = field(default_factory=list)
    # (sent, answered) monotonic times of the requests answered with 200
    times: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def answered(self) -> int:
        return len(self.times)

    def run(self) -> None:
        senders = []
        while not self._stop.is_set():
            sender = threading.Thread(target=self._send_one, daemon=True)
            sender.start()
            senders.append(sender)
            time.sleep(SEND_INTERVAL)
        for sender in senders:
            sender.join(60)

    def _send_one(self) -> None:
        start = time.monotonic()
        try:
            # A new client per request: a kept-alive connection would test nothing.
            response = httpx.get(self.url(), timeout=30)
        except httpx.ConnectError as exc:
            with self._lock:
                if "refused" in str(exc).lower():
                    self.refused += 1
                else:
                    self.other.append(f"{type(exc).__name__}: {exc}")
        except (httpx.HTTPError, ScaleboxError) as exc:
            with self._lock:
                self.other.append(f"{type(exc).__name__}: {exc}")
        else:
            with self._lock:
                if response.status_code == 200:
                    self.times.append((start, time.monotonic()))
                else:
                    self.other.append(f"HTTP {response.status_code}")

    def stop(self) -> None:
        self._stop.set()


def requests_during_restart(m: Machine) -> str:
    stream = RequestStream(url=lambda: m.url(API_PORT, "/health"))
    thread = threading.Thread(target=stream.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while stream.answered < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        sent_before = stream.answered
        start = time.monotonic()
        m.run(["systemctl", "restart", "scaleboxd.service"], timeout=120)
        restart_seconds = time.monotonic() - start
        time.sleep(1.0)  # and a while after: the new process must answer too
    finally:
        stream.stop()
        thread.join(90)
    restart_end = start + restart_seconds
    during = sum(1 for sent, _ in stream.times if start <= sent <= restart_end)
    after = sum(1 for sent, _ in stream.times if sent > restart_end)
    total = stream.answered + stream.refused + len(stream.other)
    slowest = max((done - sent for sent, done in stream.times), default=0.0)
    summary = (
        f"{total} requests: {stream.answered} answered ({during} sent while restarting), "
        f"{stream.refused} refused, {len(stream.other)} other errors; "
        f"restart took {restart_seconds:.1f} s, slowest answer {slowest:.2f} s"
    )
    # Requests must have been sent before, during and after the restart, or it proves nothing.
    if stream.refused or stream.other or sent_before < 5 or during < 1 or after < 1:
        raise CheckFailed(
            summary + ("\n" + indent("\n".join(stream.other[:10])) if stream.other else ""),
            "scaleboxd.socket must hold port 8080 while the service restarts"
            if stream.refused
            else "scaleboxd must answer every connection it accepted before it exits"
            if stream.other
            else "too few requests to judge; the machine may be overloaded, run again",
        )
    return summary


# --- driver ----------------------------------------------------------------------


def check(keep_vm: bool, tarball: Path | None) -> Report:
    report = Report()
    stage = CACHE / "check" / f"{os.getpid()}-{int(time.time())}"
    try:
        with report.phase("build the tarball", required=True) as p:
            tarball = tarball or build_tarball(stage)
            stage_release(tarball, stage)
            p.detail = tarball.name
        with contextlib.ExitStack() as stack:
            with report.phase("boot a machine", required=True) as p:
                m = stack.enter_context(Machine.boot(stage, keep=keep_vm))
                p.detail = f"{m.name} at {m.ip}, running after {m.boot_seconds or 0:.1f} s"
            with report.phase("install.sh", required=True) as p:
                out = install(m, tarball.name)
                said = [line for line in out.splitlines() if line.startswith("==> ")]
                p.detail = said[-1].removeprefix("==> ") if said else ""
            with report.phase("read the API token", required=True):
                token = read_token(m)
            with report.phase("API suite from the host") as p:
                p.detail = api_suite(m, token)
            with report.phase("installed units verify clean") as p:
                p.detail = units_verify(m)
            with report.phase("scalebox-update on PATH") as p:
                p.detail = updater_on_path(m)
            with report.phase("a VM survives systemctl restart scaleboxd") as p:
                p.detail = vm_survives_restart(m, token)
            with report.phase("requests during systemctl restart are answered") as p:
                p.detail = requests_during_restart(m)
    except Stop:
        pass  # recorded in its phase; the machine is already torn down
    finally:
        if keep_vm:
            say(f"the release folder bound at /mnt/release stays at {stage}")
        else:
            shutil.rmtree(stage, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./do check", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep-vm", action="store_true", help="keep the machine afterwards (prints how to enter)"
    )
    parser.add_argument("--tarball", type=Path, help="install this tarball instead of building")
    args = parser.parse_args(argv)
    try:
        with sigterm_raises():
            report = check(args.keep_vm, args.tarball.resolve() if args.tarball else None)
    except KeyboardInterrupt:
        say("interrupted; the machine was torn down")
        return 130
    print(report.summary(PLANNED), flush=True)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
