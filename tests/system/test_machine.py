"""The test server harness itself: boots real systemd, guards traffic, always cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tools import cgroups, image, netns
from tools.machine import Machine, MachineError, read_state, sweep_stale
from tools.netns import Slot

from .conftest import BootMachine

ROOT = Path(__file__).resolve().parents[2]


def _nothing_left(name: str, owner_pid: int) -> list[str]:
    """What is still around of machine ``name`` booted by ``owner_pid`` (empty when gone)."""
    slot = netns.parse_name(name)
    state = read_state(slot)
    if state and state.get("owner_pid") != owner_pid:
        # Another run (tests and checks run in parallel) claimed the number, which
        # it can only do once our namespace and veth were gone.
        return []
    left = []
    if slot.netns_path.exists():
        left.append(f"namespace {slot.netns_path}")
    if (
        subprocess.run(
            ["ip", "link", "show", slot.host_if], capture_output=True, check=False
        ).returncode
        == 0
    ):
        left.append(f"veth {slot.host_if}")
    if slot.state_file().exists():
        left.append(f"state file {slot.state_file()}")
    left += [f"cgroup {c}" for c in cgroups.machine_cgroups(name) if c.exists()]
    nspawns = subprocess.run(
        ["pgrep", "-f", f"systemd-nspawn.*--machine={name} "],
        capture_output=True,
        text=True,
        check=False,
    )
    if nspawns.stdout.strip():
        left.append(f"systemd-nspawn pids {nspawns.stdout.split()}")
    reapers = subprocess.run(
        ["pgrep", "-f", f"tools.machine reap {name} "], capture_output=True, text=True, check=False
    )
    if reapers.stdout.strip():
        left.append(f"reaper pids {reapers.stdout.split()}")
    return left


def test_machine_runs_systemd_as_pid_1(machine: Machine) -> None:
    state = machine.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded")
    assert machine.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    # systemd-run works: the updater's tests start transient units.
    machine.run(["systemd-run", "--wait", "--quiet", "true"])


def test_route_guard_refuses_addresses_not_on_our_veth(machine: Machine) -> None:
    assert machine.url(8080, "/health") == f"http://{machine.ip}:8080/health"
    # A slot nobody made: its address would leave through the default route.
    unmade = Slot(250)
    assert not netns.network_exists(unmade)
    with pytest.raises(netns.NetnsError, match="refusing to send traffic"):
        netns.guard(unmade)
    # Our own machine, once its veth is gone, is refused too.
    subprocess.run(["ip", "link", "del", machine.slot.host_if], check=True)
    with pytest.raises(netns.NetnsError, match=machine.slot.host_if):
        machine.url()


def test_two_machines_run_at_once_with_their_own_addresses(boot_machine: BootMachine) -> None:
    first, second = boot_machine(), boot_machine()
    assert first.ip != second.ip
    assert first.address() != second.address()
    for m in (first, second):
        addrs = m.run(["ip", "-4", "-o", "addr", "show", m.slot.machine_if]).stdout
        assert f"{m.ip}/30" in addrs
    # Volatile overlays: what one writes, the other does not see.
    first.run(["touch", "/root/only-in-first"])
    assert second.run(["test", "-e", "/root/only-in-first"], check=False).returncode == 1


def _host_cgroups(pid: int) -> list[str]:
    """The cgroups of host process ``pid`` that systemd tracks units by."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return [line.split(":", 2)[2] for line in lines if line.split(":")[1] in ("", "name=systemd")]


def test_two_machines_keep_their_units_in_cgroup_trees_of_their_own(
    boot_machine: BootMachine,
) -> None:
    """Started from one process (as one xdist worker, or two, start them), two machines
    shared one cgroup tree: each one's systemd created and removed the other's unit
    cgroups, and a start failed with 219/CGROUP now and then (tools/cgroups.py)."""
    first, second = boot_machine(), boot_machine()
    seen = {}
    for m in (first, second):
        inside = m.run(["systemctl", "show", "-P", "MainPID", "systemd-journald"]).stdout.strip()
        # The machine's journald, as the host numbers it: the one child of the
        # machine's init with that PID in the machine's namespace.
        host_pid = next(
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and (p / "status").exists()
            and _in_machine(int(p.name), m.init_pid)
            and _ns_pid(int(p.name)) == inside
        )
        cgroups = _host_cgroups(host_pid)
        assert cgroups, f"journald of {m.name}: no cgroup that systemd tracks by"
        for cgroup in cgroups:
            assert cgroup.startswith(f"/scalebox-machines/{m.name}/payload/"), cgroups
            assert cgroup.endswith("/system.slice/systemd-journald.service"), cgroups
        seen[m.name] = cgroups
    assert seen[first.name] != seen[second.name]


def _ns_pid(pid: int) -> str:
    """``pid``'s number in its own PID namespace (the last NSpid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return line.split()[-1]
    return ""


def _in_machine(pid: int, init_pid: int | None) -> bool:
    try:
        ns = Path(f"/proc/{pid}/ns/pid").readlink()
        return ns == Path(f"/proc/{init_pid}/ns/pid").readlink()
    except OSError:
        return False


def test_writes_inside_never_reach_the_cached_image(machine: Machine) -> None:
    machine.run(["sh", "-c", "echo dirty > /etc/scalebox-written-inside"])
    assert machine.run(["cat", "/etc/scalebox-written-inside"]).stdout == "dirty\n"
    assert not (machine.image_dir / "etc/scalebox-written-inside").exists()


def test_release_dir_is_bound_read_only(boot_machine: BootMachine, tmp_path: Path) -> None:
    (tmp_path / "install.sh").write_text("echo hello from the host\n")
    m = boot_machine(tmp_path)
    assert m.run(["bash", "/mnt/release/install.sh"]).stdout == "hello from the host\n"
    assert m.run(["touch", "/mnt/release/x"], check=False).returncode != 0


def test_failing_command_raises_with_its_output(machine: Machine) -> None:
    with pytest.raises(MachineError, match=r"(?s)exited with code 3.*oops"):
        machine.run(["sh", "-c", "echo oops >&2; exit 3"])


def test_exception_in_the_block_tears_everything_down() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root to boot an nspawn machine")
    name = ""
    with pytest.raises(RuntimeError, match="injected"), Machine.boot() as m:
        name = m.name
        raise RuntimeError("injected")
    assert name
    assert _nothing_left(name, os.getpid()) == []


BOOT_AND_WAIT = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from tools.machine import Machine
    with Machine.boot() as m:
        print(m.name, flush=True)
        time.sleep(120)
    """
)


def _start_booted_child() -> tuple[subprocess.Popen[str], str]:
    child = subprocess.Popen(
        [sys.executable, "-c", BOOT_AND_WAIT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    name = child.stdout.readline().strip()
    assert name.startswith("sb"), f"child did not boot a machine (exit {child.poll()})"
    return child, name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_harness_tears_everything_down(sig: signal.Signals) -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root to boot an nspawn machine")
    child, name = _start_booted_child()
    assert netns.parse_name(name).netns_path.exists()
    child.send_signal(sig)
    assert child.wait(60) != 0
    assert _nothing_left(name, child.pid) == []


def test_a_run_killed_mid_teardown_has_its_machine_torn_down_by_its_reaper() -> None:
    """SIGKILL (or an xdist worker ended by its controller while it tore down): no
    cleanup code of the harness runs; the machine's reaper, a process of its own
    session, removes the namespace, veth and state without waiting for a sweep."""
    if os.geteuid() != 0:
        pytest.skip("system test: needs root to boot an nspawn machine")
    child, name = _start_booted_child()
    state = read_state(netns.parse_name(name))
    assert state is not None
    assert state.get("reaper_pid"), state
    child.kill()
    child.wait(10)
    deadline = time.monotonic() + 30
    left = _nothing_left(name, child.pid)
    while time.monotonic() < deadline and left:
        time.sleep(0.2)
        left = _nothing_left(name, child.pid)
    assert left == []


def test_stale_sweep_removes_what_a_killed_run_left() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root to boot an nspawn machine")
    child, name = _start_booted_child()
    slot = netns.parse_name(name)
    state = read_state(slot)
    assert state is not None
    # Its reaper killed too (a host-wide kill): only a sweep is left to clean up.
    os.kill(state["reaper_pid"], signal.SIGKILL)
    child.kill()  # SIGKILL: no cleanup code runs in the harness
    child.wait(10)
    assert slot.netns_path.exists(), "a killed run leaves its namespace behind"
    killed_leaves = [
        f"namespace {slot.netns_path}",
        f"veth {slot.host_if}",
        f"state file {slot.state_file()}",
        *(f"cgroup {c}" for c in cgroups.machine_cgroups(name)),
    ]
    deadline = time.monotonic() + 30
    left = _nothing_left(name, child.pid)
    while time.monotonic() < deadline and left not in (killed_leaves, []):
        time.sleep(0.2)  # the container dies with its parent (PDEATHSIG)
        left = _nothing_left(name, child.pid)
    assert left in (killed_leaves, []), left
    swept = sweep_stale()
    # System tests run on two workers and every Machine.boot sweeps first, so the
    # other worker's sweep may come before ours: then `name` is not in `swept`, but
    # only a sweep removes these leftovers, so one sweep_stale() did either way.
    assert _nothing_left(name, child.pid) == [], (left, swept)


def test_image_is_cached_and_complete() -> None:
    if os.geteuid() != 0:
        pytest.skip("system test: needs root to build the machine image")
    path = image.ensure_image()
    assert image.is_complete(path)
    assert (path / "usr/lib/systemd/systemd").exists()
    assert (path / "usr/bin/python3").exists()
    assert image.ensure_image() == path  # second call: from the cache
