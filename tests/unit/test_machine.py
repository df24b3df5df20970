"""The machine harness's decisions that need no root: names, cache keys, staleness, guard."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tools import cgroups, image, netns
from tools.check import RequestStream
from tools.checks import CheckFailed, Report
from tools.machine import Machine, host_lock, is_stale, read_state, start_time, sweep_stale
from tools.netns import Slot


def test_slot_names_and_addresses_follow_n() -> None:
    slot = Slot(7)
    assert (slot.name, slot.host_if, slot.machine_if) == ("sb7", "sbh7", "sbc7")
    assert (slot.host_ip, slot.machine_ip) == ("10.251.7.1", "10.251.7.2")
    assert str(slot.netns_path) == "/run/netns/sb7"


@pytest.mark.parametrize("name", ["eth0", "sb", "sb0", "sb251", "sbx", "sb-1", "xsb1", "sb1 "])
def test_parse_name_refuses_names_the_harness_never_makes(name: str) -> None:
    with pytest.raises(netns.NetnsError, match="not a machine name"):
        netns.parse_name(name)


def test_parse_name_accepts_our_names() -> None:
    assert netns.parse_name("sb1") == Slot(1)
    assert netns.parse_name("sb250") == Slot(250)


def test_image_key_changes_with_its_inputs_only() -> None:
    key = image.image_key()
    assert image.image_key() == key
    assert image.image_key(packages=(*image.PACKAGES, "vim")) != key
    assert image.image_key(suite="trixie") != key
    assert image.image_key(packages=tuple(reversed(image.PACKAGES))) == key


def test_debootstrap_names_the_debian_keyring_as_an_ubuntu_host_needs() -> None:
    argv = image.debootstrap_argv(Path("/tmp/target"))
    assert "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg" in argv
    assert argv[-3:] == ["bookworm", "/tmp/target", "http://deb.debian.org/debian"]


def _dead_pid() -> tuple[int, int | None]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = start_time(child.pid)
    child.kill()
    child.wait()
    return child.pid, started


def test_start_time_is_none_for_a_zombie() -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while start_time(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # exited but not yet waited for: a zombie
    assert start_time(child.pid) is None
    child.wait()


def test_a_machine_whose_owner_lives_is_not_stale() -> None:
    me = {"owner_pid": os.getpid(), "owner_start": start_time(os.getpid()), "keep": False}
    assert not is_stale(me, state_age=3600)
    # ... even with nspawn alive under it
    assert not is_stale({**me, "nspawn_pid": os.getpid(), "nspawn_start": me["owner_start"]}, 0)


def test_a_machine_whose_owner_died_is_stale_unless_kept() -> None:
    pid, started = _dead_pid()
    me_pid, me_start = os.getpid(), start_time(os.getpid())
    dead_owner = {"owner_pid": pid, "owner_start": started, "keep": False}
    assert is_stale(dead_owner, 0)
    kept = {**dead_owner, "keep": True, "nspawn_pid": me_pid, "nspawn_start": me_start}
    assert not is_stale(kept, 0)


def test_a_machine_whose_nspawn_died_is_stale_even_when_kept() -> None:
    pid, started = _dead_pid()
    state = {
        "owner_pid": os.getpid(),
        "owner_start": start_time(os.getpid()),
        "keep": True,
        "nspawn_pid": pid,
        "nspawn_start": started,
    }
    assert is_stale(state, 0)


def test_a_reused_pid_does_not_count_as_alive() -> None:
    state = {"owner_pid": os.getpid(), "owner_start": -1, "keep": False}
    assert is_stale(state, 0)


def test_an_unreadable_state_file_is_stale_only_when_old() -> None:
    assert not is_stale({}, state_age=1)
    assert is_stale({}, state_age=3600)


def _write_slot_state(state_dir: Path, slot: Slot, state: dict[str, object]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    slot.state_file(state_dir).write_text(json.dumps({"name": slot.name, **state}))


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
def test_a_sweep_waits_for_the_host_lock_before_judging_a_machine(tmp_path: Path) -> None:
    """Another run tearing a machine down holds the lock: the sweep must not act meanwhile."""
    pid, started = _dead_pid()
    slot = Slot(248)  # no network of that name exists: destroy's `ip ... del` finds nothing
    _write_slot_state(tmp_path, slot, {"owner_pid": pid, "owner_start": started, "keep": False})
    swept: list[list[str]] = []
    with host_lock(tmp_path):
        sweeper = threading.Thread(target=lambda: swept.append(sweep_stale(tmp_path)))
        sweeper.start()
        sweeper.join(0.5)
        assert sweeper.is_alive(), "the sweep ran while another holder had the host lock"
        assert read_state(slot, tmp_path) is not None
    sweeper.join(30)
    assert swept == [["sb248"]]
    assert read_state(slot, tmp_path) is None


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
def test_teardown_leaves_a_slot_that_another_boot_claimed_since(tmp_path: Path) -> None:
    """A sweep removed this boot's machine and another boot took the slot: not ours to free."""
    slot = Slot(247)
    me = {"owner_pid": os.getpid(), "owner_start": start_time(os.getpid()), "keep": False}
    _write_slot_state(tmp_path, slot, {**me, "token": "the-other-boot"})
    machine = Machine(slot, tmp_path / "image", None, tmp_path)
    machine._state = {"name": slot.name, **me, "token": "this-boot"}
    machine.teardown()
    assert read_state(slot, tmp_path) == {"name": "sb247", **me, "token": "the-other-boot"}
    machine._state["token"] = "the-other-boot"
    machine.teardown()
    assert read_state(slot, tmp_path) is None


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
@pytest.mark.parametrize("address", ["127.0.0.1", "10.251.249.2", "192.0.2.77"])
def test_the_netlink_route_lookup_names_the_device_ip_route_get_names(address: str) -> None:
    argv = ["ip", "-j", "route", "get", address]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    expected = json.loads(done.stdout)[0]["dev"] if done.returncode == 0 else None
    assert netns.route_device(address) == expected


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
def test_route_guard_refuses_a_slot_whose_veth_does_not_exist() -> None:
    assert netns.route_device("127.0.0.1") == "lo"
    unmade = Slot(249)
    if netns.network_exists(unmade):
        pytest.skip("sb249 exists on this host right now")
    with pytest.raises(netns.NetnsError, match=r"refusing to send traffic to 10\.251\.249\.2"):
        netns.guard(unmade)


def test_report_fails_when_a_phase_fails_and_lists_phases_not_run() -> None:
    report = Report()
    with report.phase("first"):
        pass
    with report.phase("second"):
        raise CheckFailed("it broke", "fix it")
    assert report.failed()
    text = report.summary(["first", "second", "third"])
    assert "ok" in text.splitlines()[2]
    assert "FAIL" in text and "it broke" in text
    assert "not run" in text.splitlines()[4]
    assert "./do check FAILED" in text


def test_report_passes_only_when_every_phase_passed() -> None:
    report = Report()
    with report.phase("only"):
        pass
    assert not report.failed()
    assert "./do check passed" in report.summary(["only"])


def test_request_stream_counts_a_refused_connection_as_refused() -> None:
    """The restart check's counter: a closed port must show up as refused, not answered."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on that port now: every connection is refused.
    stream = RequestStream(url=lambda: f"http://127.0.0.1:{port}/health")
    thread = threading.Thread(target=stream.run)
    thread.start()
    assert stream.wait_refused(timeout=10)
    stream.stop()
    thread.join(10)
    assert stream.refused > 0
    assert stream.answered == 0
    assert stream.other == []


HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
"""


def test_machines_get_cgroups_in_the_hierarchies_systemd_tracks_units_by(tmp_path: Path) -> None:
    """This host's mounts (hybrid): the unified hierarchy and v1's name=systemd, not the
    v1 controllers'; a cgroup2-only host has just the unified one."""
    mounts = tmp_path / "mounts"
    mounts.write_text(HYBRID_MOUNTS)
    assert cgroups.hierarchies(mounts) == [
        Path("/sys/fs/cgroup/systemd"),
        Path("/sys/fs/cgroup/unified"),
    ]
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec 0 0\n")
    assert cgroups.hierarchies(mounts) == [Path("/sys/fs/cgroup")]
    assert cgroups.hierarchies(tmp_path / "none") == []
    roots = [tmp_path / "a", tmp_path / "b"]
    assert cgroups.machine_cgroups("sb3", roots) == [
        tmp_path / "a/scalebox-machines/sb3",
        tmp_path / "b/scalebox-machines/sb3",
    ]


def test_a_machines_cgroups_are_made_fresh_and_removed_deepest_first(tmp_path: Path) -> None:
    """Plain directories stand in for cgroupfs here (rmdir of empty ones, as there)."""
    roots = [tmp_path / "unified"]
    stale = tmp_path / "unified/scalebox-machines/sb2/payload/system.slice/x.service"
    stale.mkdir(parents=True)
    made = cgroups.prepare("sb2", roots)
    assert made == [tmp_path / "unified/scalebox-machines/sb2"]
    assert made[0].is_dir() and not (made[0] / "payload").exists()  # a killed run's, gone
    (made[0] / "payload/init.scope").mkdir(parents=True)
    (made[0] / "supervisor").mkdir()
    cgroups.remove("sb2", roots)
    assert not made[0].exists()
    assert (tmp_path / "unified/scalebox-machines").is_dir()  # shared by every machine
