"""./do check: the release, installed on a fresh systemd server, proven to work there.

    ./do check [--keep-vm] [--tarball PATH]

Phases: build the tarball (./do tarball) and a second one of the same
sources as the next version, boot a machine (tools/machine.py) with a real
server's capabilities and both bound at /mnt/release, the cached debian-base
template (tools/image.py) at /mnt/template, run `install.sh --template`
inside (VM_BACKEND=nspawn, the default), then from the host the API suite
(tests/api with SCALEBOX_URL/SCALEBOX_TOKEN), then inside: the installed
units verify clean, scalebox-update is on PATH, a VM (a container) keeps
running and answers ssh across `systemctl restart scaleboxd`, requests sent
during that restart are all answered (socket activation); then, with ONE
ssh session open to a VM: debian-base is installed anew (what `templates
rebuild` does after building) and the VM and the session keep working;
with a loop opening a new ssh connection every 0.2 s, `scalebox-update` to
the next version and `scalebox-update
--rollback` back: after each, the same session runs a command, the config
is as the migrations declare, DATA_DIR's templates are byte-identical and
the VM runs with the same unit main PID; the new connections that failed
during each are counted (target 0). Prints each phase's wall time; exits
non-zero when any phase failed. The machine is always torn down unless
--keep-vm.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scalebox.errors import ScaleboxError
from tools import image
from tools.checks import (
    API_PORT,
    CACHE,
    CHECK_TEMPLATE,
    CheckFailed,
    Report,
    Snapshot,
    Stop,
    api_suite,
    build_tarball,
    compare_config,
    compare_data,
    indent,
    install,
    main_pid,
    read_token,
    run_updater,
    say,
    serving_version,
    snapshot,
    stage_release,
)
from tools.machine import Machine, sigterm_raises
from tools.sandbox import KEYS, Sandbox, SshSession

TEMPLATE = "/mnt/template/debian-base.tar.gz"
SSH_LOOP = "check-ssh-loop"  # the unit in the machine that opens new ssh connections
SSH_LOOP_LOG = "/run/check-ssh-loop.log"

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
    "open an ssh session to a VM",
    "reinstall debian-base under the running VM",
    "scalebox-update to the next build",
    "scalebox-update --rollback",
]


# --- phases ----------------------------------------------------------------------


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


@dataclass(frozen=True)
class SandboxVM:
    id: str
    port: int
    unit: str
    main_pid: int


def create_sandbox_vm(s: Sandbox) -> SandboxVM:
    """POST /vms with the machine's key /root/one; wait until ``ssh ... true`` works."""
    response = s.api(
        "POST", "/vms", json={"template": CHECK_TEMPLATE, "ssh_public_key": s.public_key()}
    )
    if response.status_code != 201:
        raise CheckFailed(
            f"POST /vms answered {response.status_code}: {response.text[:300]}",
            f"a fresh install must be able to create a VM from {CHECK_TEMPLATE}",
        )
    vm_id, port = response.json()["id"], int(response.json()["ssh_port"])
    ssh_works(s, port, f"the new VM {vm_id}")
    unit = f"scalebox-vm@{vm_id}.service"
    pid = main_pid(s.m, unit)
    if pid == 0:
        raise CheckFailed(f"{unit} has no main process", "VMs must run in their own unit")
    return SandboxVM(vm_id, port, unit, pid)


def ssh_works(s: Sandbox, port: int, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = s.ssh(port, KEYS[0], "true")
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise CheckFailed(
                f"ssh -p {port} user@{s.host_ip} true into {what} exited with "
                f"{done.returncode}: {done.stderr.strip()[-300:]}",
                "see `journalctl -u 'scalebox-vm@*'` in the machine (--keep-vm)",
            )
        time.sleep(0.5)


def vm_still_running(s: Sandbox, vm: SandboxVM) -> str:
    pid = main_pid(s.m, vm.unit)
    if pid != vm.main_pid:
        raise CheckFailed(
            f"{vm.unit} main PID {vm.main_pid} -> {pid}: the VM was restarted or stopped",
            "daemon restarts and updates must leave running VMs alone (docs/compatibility.md)",
        )
    ssh_works(s, vm.port, f"VM {vm.id}", timeout=10)
    got = s.api("GET", f"/vms/{vm.id}")
    if got.status_code != 200 or got.json().get("status") != "running":
        raise CheckFailed(
            f"GET /vms/{vm.id} answered {got.status_code}: {got.text[:300]}",
            "scaleboxd must adopt the VMs it (or the release before it) started",
        )
    return f"VM {vm.id}: main PID {pid} unchanged, ssh works, API says running"


def vm_survives_restart(s: Sandbox) -> str:
    vm = create_sandbox_vm(s)
    daemon_before = main_pid(s.m, "scaleboxd.service")
    s.m.run(["systemctl", "restart", "scaleboxd.service"], timeout=120)
    daemon_after = main_pid(s.m, "scaleboxd.service")
    if daemon_after in (0, daemon_before):
        raise CheckFailed(f"scaleboxd's main PID {daemon_before} -> {daemon_after}: no restart")
    kept = vm_still_running(s, vm)
    if s.api("DELETE", f"/vms/{vm.id}").status_code != 204:
        raise CheckFailed(f"DELETE /vms/{vm.id} failed after the restart")
    return kept


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

    def wait_answered_after(self, since: float, count: int, timeout: float) -> bool:
        """Wait until ``count`` requests sent after ``since`` were answered; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if sum(1 for sent, _ in self.times if sent > since) >= count:
                    return True
            time.sleep(0.05)
        return False

    def wait_refused(self, timeout: float) -> bool:
        """Wait until a request was refused; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.refused:
                    return True
            time.sleep(0.01)
        return False


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
        # and after it: the new process must answer too (the "after" count below).
        stream.wait_answered_after(start + restart_seconds, 5, timeout=10)
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


def version_in_name(tarball: Path) -> str:
    """The version in a scalebox-<version>-<arch>.tar.gz name (install.sh verifies the rest)."""
    name = tarball.name.removesuffix(".tar.gz")
    version = name.removeprefix("scalebox-").rpartition("-")[0]
    if not name.startswith("scalebox-") or not version:
        raise CheckFailed(
            f"{tarball.name} is not named scalebox-<version>-<arch>.tar.gz",
            "give a tarball made by ./do tarball",
        )
    return version


def next_version(version: str) -> str:
    """A version just above ``version`` built from the same sources: a PEP 440 local label."""
    return f"{version}.next" if "+" in version else f"{version}+next"


def start_ssh_loop(s: Sandbox, port: int) -> None:
    """A unit in the machine opening a new ``ssh ... true`` every 0.2 s; one line each."""
    loop = " ".join(s.ssh_argv(port, KEYS[0], "true"))
    s.sh(
        f"rm -f {SSH_LOOP_LOG}; systemd-run --quiet --unit={SSH_LOOP} --collect bash -c "
        f"'while :; do if {loop}; then echo ok; else echo failed; fi >> {SSH_LOOP_LOG}; "
        "sleep 0.2; done'"
    )


def ssh_loop_results(s: Sandbox) -> list[str]:
    return s.sh(f"cat {SSH_LOOP_LOG} 2>/dev/null || true").stdout.split()


def stop_ssh_loop(s: Sandbox) -> None:
    s.sh(f"systemctl stop {SSH_LOOP} 2>/dev/null || true")


def update_with_session(
    s: Sandbox,
    *,
    vm: SandboxVM,
    session: SshSession,
    before: Snapshot,
    args: list[str],
    env: dict[str, str],
    versions: tuple[str, str],
) -> str:
    """scalebox-update from versions[0] to versions[1] with a session open and ssh in a loop."""
    started = len(ssh_loop_results(s))
    code, outcome = run_updater(s.m, *args, env=env)
    if code != 0:
        raise CheckFailed(
            f"scalebox-update {' '.join(args)} exited with code {code}: {outcome.get('message')}",
            "its progress is above; rerun with --keep-vm and see `scalebox-update history`",
        )
    serving = serving_version(s.m)
    if serving != versions[1]:
        raise CheckFailed(f"after scalebox-update the server runs {serving}, not {versions[1]}")
    tag = f"session-after-{versions[1]}"
    answer = session.ask(f"echo {tag}")
    if answer != tag:
        raise CheckFailed(
            f"the ssh session opened before the update did not answer after it ({answer!r})",
            "a VM's port forwarder must live outside scaleboxd (its own unit)",
        )
    during = ssh_loop_results(s)[started:]
    failed = during.count("failed")
    after = snapshot(s.m, skip_guest_disks=True)
    kept = [
        compare_config(before, after, *versions),
        compare_data(before, after, new_files_allowed=False),
        vm_still_running(s, vm),
    ]
    figures = (
        f"the session opened before it ran a command after it; {len(during)} new ssh "
        f"connections during it, {failed} failed"
    )
    if failed or not during:
        raise CheckFailed(
            figures,
            "new ssh connections must be accepted all through an update (target 0 failed)"
            if failed
            else "no ssh connection was tried during the update: the loop did not run",
        )
    return f"{outcome.get('message')}; {figures}; " + "; ".join(kept)


# --- driver ----------------------------------------------------------------------


def reinstall_template(s: Sandbox, vm: SandboxVM, session: SshSession) -> str:
    """What `templates rebuild` does once it has built: install debian-base anew. The VM stays."""
    done = s.m.run(
        ["/opt/scalebox/current/venv/bin/python", "-m", "scalebox.daemon.vms.templates",
         "install", TEMPLATE], check=False, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise CheckFailed(
            f"templates install {TEMPLATE} exited with {done.returncode}: {done.stderr.strip()}",
            "see docs/operations.md, 'Real sandboxes'",
        )
    if session.ask("echo still") != "still":
        raise CheckFailed("the ssh session stopped answering when debian-base was reinstalled")
    return f"{done.stdout.strip()}; the session still answers; " + vm_still_running(s, vm)


def sandbox_of(m: Machine) -> Sandbox:
    """The installed server as tools/sandbox.py drives it, with the ssh key /root/one made."""
    m.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", KEYS[0]])
    return Sandbox(m)


def open_session(s: Sandbox, stack: contextlib.ExitStack) -> tuple[SandboxVM, SshSession]:
    """A new VM, ONE ssh session into it kept open, and the new-connection loop started."""
    vm = create_sandbox_vm(s)
    session = SshSession(s.m, s.ssh_argv(vm.port, KEYS[0], "bash"))
    stack.callback(session.close)
    if session.ask("echo before") != "before":
        raise CheckFailed(f"an ssh session to VM {vm.id} did not run `echo before`")
    start_ssh_loop(s, vm.port)
    stack.callback(stop_ssh_loop, s)
    return vm, session


def stage_template(stage: Path) -> Path:
    """The folder bound at /mnt/template: the cached debian-base (built once per host)."""
    folder = stage / "template"
    folder.mkdir(parents=True, exist_ok=True)
    cached = image.ensure_template()
    try:
        os.link(cached, folder / "debian-base.tar.gz")
    except OSError:  # another filesystem: a copy
        shutil.copy2(cached, folder / "debian-base.tar.gz")
    return folder


def update_phases(
    report: Report,
    s: Sandbox,
    stack: contextlib.ExitStack,
    following: str,
    versions: tuple[str, str],
) -> None:
    """A session and a connection loop into one VM, across an update and its rollback."""
    with report.phase("open an ssh session to a VM", required=True) as p:
        vm, session = open_session(s, stack)
        p.detail = f"VM {vm.id} on port {vm.port}: the session ran `echo before`"
    with report.phase("reinstall debian-base under the running VM") as p:
        p.detail = reinstall_template(s, vm, session)
    with report.phase("scalebox-update to the next build", required=True) as p:
        before = snapshot(s.m, skip_guest_disks=True)
        p.detail = update_with_session(
            s, vm=vm, session=session, before=before, args=[],
            env={"SCALEBOX_RELEASE_URL": f"/mnt/release/{following}"}, versions=versions,
        )  # fmt: skip
    with report.phase("scalebox-update --rollback") as p:
        p.detail = update_with_session(
            s, vm=vm, session=session, before=before, args=["--rollback"], env={},
            versions=(versions[1], versions[0]),
        )  # fmt: skip


def check(keep_vm: bool, tarball: Path | None) -> Report:
    report = Report()
    stage = CACHE / "check" / f"{os.getpid()}-{int(time.time())}"
    try:
        with report.phase("build the tarball", required=True) as p:
            tarball = tarball or build_tarball(stage)
            stage_release(tarball, stage)
            this = version_in_name(tarball)
            upcoming = next_version(this)
            following = build_tarball(stage, upcoming)
            template = stage_template(stage.with_name(stage.name + "-template"))
            p.detail = f"{tarball.name}, and {following.name} to update to"
        with contextlib.ExitStack() as stack:
            with report.phase("boot a machine", required=True) as p:
                m = stack.enter_context(
                    Machine.boot(
                        stage,
                        keep=keep_vm,
                        all_capabilities=True,
                        binds_ro=[(template, "/mnt/template")],
                    )
                )
                p.detail = f"{m.name} at {m.ip}, running after {m.boot_seconds or 0:.1f} s"
            with report.phase("install.sh", required=True) as p:
                out = install(m, tarball.name, "--template", TEMPLATE)
                said = [line for line in out.splitlines() if line.startswith("==> ")]
                p.detail = said[-1].removeprefix("==> ") if said else ""
            with report.phase("read the API token", required=True):
                token = read_token(m)
                s = sandbox_of(m)
            with report.phase("API suite from the host") as p:
                p.detail = api_suite(m, token)
            with report.phase("installed units verify clean") as p:
                p.detail = units_verify(m)
            with report.phase("scalebox-update on PATH") as p:
                p.detail = updater_on_path(m)
            with report.phase("a VM survives systemctl restart scaleboxd") as p:
                p.detail = vm_survives_restart(s)
            with report.phase("requests during systemctl restart are answered") as p:
                p.detail = requests_during_restart(m)
            update_phases(report, s, stack, following.name, (this, upcoming))
    except Stop:
        pass  # recorded in its phase; the machine is already torn down
    finally:
        if keep_vm:
            say(f"the release folder bound at /mnt/release stays at {stage}")
        else:
            shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(stage.with_name(stage.name + "-template"), ignore_errors=True)
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
