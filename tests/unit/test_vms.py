"""VMService with real guest processes on loopback ports and a real temp DATA_DIR.

Only the non-systemd path (detached process groups) runs here; the systemd
units are exercised on the nspawn machine. Every guest a test starts is
killed in teardown, also when the test fails.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scalebox.config import ServerConfig
from scalebox.daemon.errors import (
    Conflict,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    Protected,
    Unavailable,
)
from scalebox.daemon.vms import disks
from scalebox.daemon.vms import service as service_module
from scalebox.daemon.vms.backend import ProcessBackend
from scalebox.daemon.vms.service import VM, VMService

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyForTests test@host"


def port_block(size: int = 40) -> tuple[int, int]:
    """A random block of ports below the ephemeral range, free right now.

    Below it, so that no connection's TIME-WAIT (which a plain bind refuses)
    sits in the block: inside Debian's 32768-60999, a busy loopback left no
    free block of 40 in 100 tries (seen in CI, with a load of thousands of
    connections beside it).
    """
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    start = max(1024, first_ephemeral - 12000)
    for _ in range(100):
        low = start + secrets.randbelow(max(1, first_ephemeral - size - start))
        if all(_free(p) for p in range(low, low + size)):
            return low, low + size - 1
    raise RuntimeError("no free block of loopback ports for the guests")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def knock(port: int) -> dict[str, str]:
    """Connect to a guest the way a client would and return its one JSON line."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        data = conn.makefile("rb").read()
    answer = json.loads(data)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    return answer  # type: ignore[no-any-return]


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def config(tmp_path: Path) -> ServerConfig:
    low, high = port_block()
    return ServerConfig(
        api_token="t" * 32,
        data_dir=tmp_path / "data",
        port_min=low,
        port_max=high,
        host_ip="127.0.0.1",
        vm_domain="vms.example.test",
        max_disk_size_gib=100,
        vm_backend="process",  # the stand-ins: these tests are about VMService's decisions
    )


@pytest.fixture
def guests(config: ServerConfig) -> Iterator[None]:
    """Kill every guest serving this DATA_DIR at teardown, pass or fail."""
    yield
    backend = ProcessBackend(config.data_dir)
    for vm_id, pid in backend.list_running().items():
        backend.stop(vm_id, pid)
    assert backend.list_running() == {}


def new_service(config: ServerConfig, name: str = "vms") -> VMService:
    service = VMService(config, logging.getLogger(f"test.{name}"), use_systemd=False)
    service.start()
    return service


def made_by_a_daemon_now_gone(config: ServerConfig, **create: Any) -> VM:
    """A VM a first service made before it stopped (its guest runs on)."""
    first = new_service(config, "first")
    vm = first.create_vm(template="debian-base", ssh_public_key=KEY, **create)
    first.close()
    return vm


@pytest.fixture
def service(config: ServerConfig, guests: None) -> Iterator[VMService]:
    service = new_service(config)
    yield service
    service.close()


def snapshot_of(data_dir: Path) -> dict[str, object]:
    """Everything a bad request must leave unchanged."""
    return {
        "state": (data_dir / "state.json").read_bytes(),
        "vms": sorted(p.name for p in (data_dir / "vms").iterdir()),
        "templates": sorted(p.name for p in (data_dir / "templates").iterdir()),
    }


# -- start ---------------------------------------------------------------------


def test_start_creates_storage_and_the_protected_base_template(
    service: VMService, config: ServerConfig
) -> None:
    for sub in ("templates", "vms"):
        assert (config.data_dir / sub).is_dir()
    assert json.loads((config.data_dir / "state.json").read_text()) == {"format": 1, "vms": []}
    [base] = service.list_templates()
    assert base.name == "debian-base" and base.protected
    assert base.size_bytes == len("hello from debian-base\n")
    assert base.to_api() == {
        "name": "debian-base",
        "size_bytes": base.size_bytes,
        "created_at": base.created_at,
    }


# -- create, get, list, delete ---------------------------------------------------


def test_created_vm_answers_on_its_port_with_its_id_and_disk_file(
    service: VMService, config: ServerConfig
) -> None:
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY)
    assert vm.status == "running"
    assert vm.id.startswith("vm-") and len(vm.id) == 15 and int(vm.id[3:], 16) >= 0
    assert len(vm.name.split("-")) == 3
    assert config.port_min <= vm.ssh_port <= config.port_max
    assert (vm.vcpu_count, vm.mem_size_mib, vm.disk_size_gib) == (2, 2048, 2)  # config defaults
    assert knock(vm.ssh_port) == {"vm": vm.id, "file": "hello from debian-base\n"}
    # Each connection gets its own answer.
    assert knock(vm.ssh_port)["vm"] == vm.id
    assert (config.data_dir / "vms" / vm.id / "disk" / "hello.txt").is_file()
    saved = json.loads((config.data_dir / "state.json").read_text())
    assert [r["id"] for r in saved["vms"]] == [vm.id]


def test_to_api_has_the_contract_shape(service: VMService) -> None:
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY, name="box-1")
    assert vm.to_api("203.0.113.7", "vms.example.com") == {
        "id": vm.id,
        "name": "box-1",
        "template": "debian-base",
        "ip": vm.ip,
        "ssh_port": vm.ssh_port,
        "ssh": f"ssh -p {vm.ssh_port} user@203.0.113.7",
        "url": "https://box-1.vms.example.com",
        "status": "running",
        "created_at": vm.created_at,
    }
    assert vm.to_api("203.0.113.7", "")["url"] is None


def test_get_and_list_find_vms_by_id_and_name(service: VMService) -> None:
    one = service.create_vm(template="debian-base", ssh_public_key=KEY, name="one")
    two = service.create_vm(template="debian-base", ssh_public_key=KEY, vcpu_count=4)
    assert one.ssh_port != two.ssh_port
    assert two.vcpu_count == 4
    assert service.get_vm(one.id).name == "one"
    assert service.get_vm("one").id == one.id
    assert service.get_vm(two.name).id == two.id
    assert [vm.id for vm in service.list_vms()] == [one.id, two.id]
    with pytest.raises(NotFound, match="VM not found"):
        service.get_vm("vm-000000000000")
    with pytest.raises(NotFound, match="VM not found"):
        service.get_vm("../one")


def test_delete_stops_the_guest_removes_the_disk_and_frees_the_port(
    service: VMService, config: ServerConfig
) -> None:
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY, name="doomed")
    assert vm.pid is not None
    service.delete_vm("doomed")
    assert wait_dead(vm.pid)
    assert refused(vm.ssh_port)
    assert not (config.data_dir / "vms" / vm.id).exists()
    assert service.list_vms() == []
    with pytest.raises(NotFound):
        service.get_vm(vm.id)
    with pytest.raises(NotFound):
        service.delete_vm(vm.id)
    again = service.create_vm(template="debian-base", ssh_public_key=KEY)
    assert again.ssh_port == vm.ssh_port  # the lowest free port is handed out again


def test_status_is_the_real_state_of_the_guest(service: VMService) -> None:
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY)
    assert vm.pid is not None
    os.killpg(vm.pid, signal.SIGKILL)
    assert wait_dead(vm.pid)
    assert service.get_vm(vm.id).status == "stopped"
    assert [v.status for v in service.list_vms()] == ["stopped"]


def test_ports_already_in_use_are_skipped(service: VMService, config: ServerConfig) -> None:
    with socket.create_server(("0.0.0.0", config.port_min)):
        vm = service.create_vm(template="debian-base", ssh_public_key=KEY)
    assert vm.ssh_port == config.port_min + 1
    assert knock(vm.ssh_port)["vm"] == vm.id


# -- restart of the daemon: re-adoption, orphans, corrupt state ------------------


def test_a_new_service_re_adopts_running_guests_with_the_same_pid(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture
) -> None:
    vm = made_by_a_daemon_now_gone(config)
    assert vm.pid is not None and alive(vm.pid)  # close never stops a VM

    caplog.set_level(logging.INFO)
    second = new_service(config, "second")
    again = second.get_vm(vm.id)
    assert again.pid == vm.pid and again.status == "running"
    assert knock(vm.ssh_port) == {"vm": vm.id, "file": "hello from debian-base\n"}
    assert f"re-adopted VM {vm.id}" in caplog.text
    second.close()


def test_start_restarts_a_guest_that_died_while_the_daemon_was_down(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture
) -> None:
    vm = made_by_a_daemon_now_gone(config)
    assert vm.pid is not None
    os.killpg(vm.pid, signal.SIGKILL)
    assert wait_dead(vm.pid)

    second = new_service(config, "second")
    # start() boots nothing itself (a guest that never comes up kept the API down):
    # the boot comes after, in the background, while the API serves.
    assert second.get_vm(vm.id).status == "stopped"
    booting = second.boot_stopped()
    assert booting is not None
    booting.join(60)
    again = second.get_vm(vm.id)
    assert again.status == "running" and again.pid != vm.pid
    assert knock(vm.ssh_port)["vm"] == vm.id
    assert f"VM {vm.id} ({vm.name}) was not running; started its guest again" in caplog.text
    assert second.boot_stopped() is None  # nothing left to boot
    second.close()


def test_a_guest_that_cannot_start_is_reported_with_its_output_and_not_left_behind(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture
) -> None:
    vm = made_by_a_daemon_now_gone(config)
    assert vm.pid is not None
    os.killpg(vm.pid, signal.SIGKILL)
    assert wait_dead(vm.pid)
    # Someone took the port while the daemon was down (the same address the guest binds).
    with socket.create_server(("0.0.0.0", vm.ssh_port)):
        second = new_service(config, "second")
        booting = second.boot_stopped()
        assert booting is not None
        booting.join(60)
        again = second.get_vm(vm.id)
    assert again.status == "stopped"
    assert ProcessBackend(config.data_dir).list_running() == {}
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"VM {vm.id} ({vm.name}) is not running and could not be started" in line
    assert f"cannot listen on port {vm.ssh_port}" in line
    second.close()


def a_guest_that_never_answers(service: VMService, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest process starts and runs; only its readiness check is stood in (it never
    answers), for a boot that takes as long as the backend waits: no stand-in guest
    can be made to run without listening here."""
    monkeypatch.setattr(service._backend, "answers", lambda vm: False)
    monkeypatch.setattr(service._backend, "ready_timeout", 120.0)


def booting_in_the_background(
    config: ServerConfig, monkeypatch: pytest.MonkeyPatch
) -> tuple[VM, VMService, threading.Thread, int]:
    """A VM whose guest died while the daemon was down, booting again in a second
    service's background thread and never answering: the VM, the service, the
    thread, and the new guest's pid."""
    vm = made_by_a_daemon_now_gone(config)
    assert vm.pid is not None
    os.killpg(vm.pid, signal.SIGKILL)
    assert wait_dead(vm.pid)
    second = new_service(config, "second")
    a_guest_that_never_answers(second, monkeypatch)
    booting = second.boot_stopped()
    assert booting is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid = second.get_vm(vm.id).pid
        if pid is not None and pid != vm.pid:
            return vm, second, booting, pid
        time.sleep(0.02)
    raise AssertionError(f"VM {vm.id} was never started again")


def test_a_delete_does_not_wait_for_the_background_boot_of_its_vm(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    vm, second, booting, pid = booting_in_the_background(config, monkeypatch)
    began = time.monotonic()
    second.delete_vm(vm.id)  # it held the change lock for the whole boot: 120 s here
    assert time.monotonic() - began < 60
    booting.join(60)
    assert not booting.is_alive()
    assert wait_dead(pid)
    assert second.list_vms() == []
    assert ProcessBackend(config.data_dir).list_running() == {}
    assert "could not be started" not in caplog.text
    second.close()


def test_a_stop_during_a_background_boot_leaves_the_guest_to_the_next_start(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    vm, second, booting, pid = booting_in_the_background(config, monkeypatch)
    second.close()  # ends the wait, and writes nothing after its own save
    assert not booting.is_alive()
    assert f"VM {vm.id} ({vm.name}) goes on booting; the next start adopts it" in caplog.text
    assert "started its guest again" not in caplog.text
    assert alive(pid)  # a stop never stops a guest
    third = new_service(config, "third")
    assert third.get_vm(vm.id).pid == pid
    assert f"re-adopted VM {vm.id}" in caplog.text
    third.close()


def test_a_snapshot_that_freezes_a_booting_guest_past_its_wait_does_not_stop_it(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """nspawn freezes a guest for a snapshot's copy while its boot's wait runs on; the
    wait ran out, and the boot stopped a guest that answered by then. The process
    backend freezes nothing: the freeze is stood in by answers() saying no during a
    copy made longer than the wait (the guest and the copy are real)."""
    vm = made_by_a_daemon_now_gone(config)
    assert vm.pid is not None
    os.killpg(vm.pid, signal.SIGKILL)
    assert wait_dead(vm.pid)
    second = new_service(config, "second")
    backend = second._backend
    frozen = threading.Event()
    answers, copy = backend.answers, backend.copy_for_snapshot

    def frozen_copy(*args: Any) -> None:
        frozen.set()
        try:
            time.sleep(2.0)  # longer than the wait below
            copy(*args)
        finally:
            frozen.clear()

    monkeypatch.setattr(backend, "answers", lambda v: not frozen.is_set() and answers(v))
    monkeypatch.setattr(backend, "copy_for_snapshot", frozen_copy)
    monkeypatch.setattr(backend, "ready_timeout", 1.0)
    frozen.set()  # from the start: the boot's wait sees no answer before the copy
    booting = second.boot_stopped()
    assert booting is not None
    deadline = time.monotonic() + 30
    while second.get_vm(vm.id).pid in (None, vm.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second.snapshot_vm(vm.id, "snap1")
    booting.join(30)
    assert second.get_vm(vm.id).status == "running"
    assert "could not be started" not in caplog.text
    second.close()


def test_a_status_that_fails_during_a_background_boot_stops_that_guest_cleanly(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A systemctl that fails to answer (here: an OSError stood in for it) skipped the
    boot's clean-up: the guest was left running, unrecorded, behind a traceback."""
    vm, second, booting, pid = booting_in_the_background(config, monkeypatch)

    def broken(*_args: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(second._backend, "status", broken)
    booting.join(30)
    assert not booting.is_alive()
    assert wait_dead(pid)
    assert f"VM {vm.id} ({vm.name}) is not running and could not be started" in caplog.text
    assert "failed unexpectedly" not in caplog.text
    monkeypatch.undo()
    assert second.get_vm(vm.id).status == "stopped"
    second.close()


def test_one_vm_whose_boot_fails_unexpectedly_does_not_keep_the_others_stopped(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    first = new_service(config, "first")
    broken = first.create_vm(template="debian-base", ssh_public_key=KEY, name="broken")
    fine = first.create_vm(template="debian-base", ssh_public_key=KEY, name="fine")
    first.close()
    for vm in (broken, fine):
        assert vm.pid is not None
        os.killpg(vm.pid, signal.SIGKILL)
        assert wait_dead(vm.pid)
    second = new_service(config, "second")
    start = second._backend.start

    def start_but_not_broken(vm_id: str) -> int | None:
        if vm_id == broken.id:  # a bug no except clause foresaw
            raise KeyError(vm_id)
        return start(vm_id)

    monkeypatch.setattr(second._backend, "start", start_but_not_broken)
    booting = second.boot_stopped()
    assert booting is not None
    booting.join(60)
    assert second.get_vm("fine").status == "running"
    assert second.get_vm("broken").status == "stopped"
    assert f"VM {broken.id}: starting its guest failed unexpectedly" in caplog.text
    second.close()


def test_a_missing_state_file_is_rebuilt_from_the_vms_records_not_taken_for_orphans(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Every VM was taken for an orphan, stopped and its disk deleted, for one file."""
    vm = made_by_a_daemon_now_gone(config, name="keep-me")
    (config.data_dir / "state.json").unlink()

    second = new_service(config, "second")
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "is missing" in line and "rebuilt the list of 1 VM(s)" in line
    assert "deleted nothing" in line
    again = second.get_vm("keep-me")
    assert again.id == vm.id and again.pid == vm.pid and again.status == "running"
    assert knock(vm.ssh_port)["vm"] == vm.id
    assert not [r for r in caplog.records if "orphan" in r.getMessage()]
    assert (config.data_dir / "state.json").exists()
    second.close()


def test_a_vm_deleted_half_way_is_cleaned_up_as_an_orphan_with_a_log_line(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash between a delete's save and its cleanup: the state, read, says no VM."""
    vm = made_by_a_daemon_now_gone(config)
    (config.data_dir / "state.json").write_text('{"format": 1, "vms": []}\n')

    second = new_service(config, "second")
    assert vm.pid is not None and wait_dead(vm.pid)
    assert refused(vm.ssh_port)
    assert not (config.data_dir / "vms" / vm.id).exists()
    assert second.list_vms() == []
    orphan_lines = [r.getMessage() for r in caplog.records if "orphan" in r.getMessage()]
    assert len(orphan_lines) == 2, orphan_lines
    assert f"cleaned up orphan guest of VM {vm.id} (pid {vm.pid})" in orphan_lines[0]
    assert f"cleaned up orphan disk {config.data_dir / 'vms' / vm.id}" in orphan_lines[1]
    second.close()


def test_a_corrupt_state_file_is_kept_and_the_vms_are_rebuilt_not_deleted(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture
) -> None:
    vm = made_by_a_daemon_now_gone(config, name="keep-me")
    torn = b'{"format": 1, "vms": [{"id": "vm-'
    (config.data_dir / "state.json").write_bytes(torn)

    second = new_service(config, "second")
    [kept] = config.data_dir.glob("state.json.corrupt-*")
    assert kept.read_bytes() == torn
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "is corrupt" in line and str(kept) in line and "rebuilt the list of 1 VM(s)" in line
    again = second.get_vm("keep-me")
    assert again.id == vm.id and again.pid == vm.pid and again.status == "running"
    assert knock(vm.ssh_port)["vm"] == vm.id
    # The rebuilt state was saved: a third start reads it cleanly.
    assert [r["id"] for r in json.loads((config.data_dir / "state.json").read_text())["vms"]] == [
        vm.id
    ]
    second.close()


def test_with_a_corrupt_state_file_unrecoverable_disks_are_kept_not_deleted(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture
) -> None:
    new_service(config).close()
    stray = config.data_dir / "vms" / "vm-0123456789ab"
    (stray / "disk").mkdir(parents=True)
    (stray / "disk" / "precious.txt").write_text("user data")
    (config.data_dir / "state.json").write_text("not json")

    new_service(config).close()
    assert (stray / "disk" / "precious.txt").read_text() == "user data"
    assert f"kept {stray}, which no VM in the state uses" in caplog.text
    # Once the state is readable again, the stray directory is an ordinary orphan.
    new_service(config).close()
    assert not stray.exists()
    assert f"cleaned up orphan disk {stray}" in caplog.text


def test_leftovers_of_an_interrupted_create_are_removed_on_start(
    config: ServerConfig, guests: None, caplog: pytest.LogCaptureFixture
) -> None:
    new_service(config).close()
    leftover = config.data_dir / "vms" / ".tmp-vm-0123456789ab" / "disk"
    leftover.mkdir(parents=True)
    new_service(config).close()
    assert not leftover.parent.exists()
    assert "left over by an interrupted operation" in caplog.text


# -- snapshots and templates -------------------------------------------------------


def test_a_vm_made_from_a_snapshot_answers_with_the_same_file(
    service: VMService, config: ServerConfig
) -> None:
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY)
    (config.data_dir / "vms" / vm.id / "disk" / "hello.txt").write_text("changed inside the VM\n")
    assert knock(vm.ssh_port)["file"] == "changed inside the VM\n"

    template, source = service.snapshot_vm(vm.name, "my-snap")
    assert source.id == vm.id
    assert template.name == "my-snap" and not template.protected
    assert template.size_bytes == len("changed inside the VM\n")
    assert [t.name for t in service.list_templates()] == ["debian-base", "my-snap"]

    child = service.create_vm(template="my-snap", ssh_public_key=KEY)
    assert knock(child.ssh_port) == {"vm": child.id, "file": "changed inside the VM\n"}
    # The copy is independent: the source VM's disk changing later does not leak.
    (config.data_dir / "vms" / vm.id / "disk" / "hello.txt").write_text("later\n")
    assert knock(child.ssh_port)["file"] == "changed inside the VM\n"


def test_reads_go_on_while_a_snapshot_copies(
    service: VMService, config: ServerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM list's lock was held for a whole snapshot or create (a copy of minutes
    without reflink, a boot): every read waited, /info and /caddy/check, which anyone
    may call, too. The test holds the real copy open until the reads are done."""
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY, name="source")
    copying, release = threading.Event(), threading.Event()
    real_copy = service._backend.copy_for_snapshot

    def held_copy(*args: object) -> None:
        copying.set()
        assert release.wait(30)
        real_copy(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(service._backend, "copy_for_snapshot", held_copy)
    result: list[object] = []
    snapshot = threading.Thread(target=lambda: result.append(service.snapshot_vm(vm.id, "snap")))
    snapshot.start()
    try:
        assert copying.wait(10)
        reads: list[object] = []
        reader = threading.Thread(
            target=lambda: reads.extend(
                [service.list_vms(), service.get_vm("source"), service.list_templates(),
                 service.info(), service.has_vm_named("SOURCE")]
            )
        )  # fmt: skip
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "a read waited for the snapshot"
        assert [v.name for v in reads[0]] == ["source"]  # type: ignore[attr-defined]
        assert reads[4] is True
    finally:
        release.set()
        snapshot.join(30)
    assert len(result) == 1
    assert [t.name for t in service.list_templates()] == ["debian-base", "snap"]


def test_snapshot_errors_change_nothing(service: VMService, config: ServerConfig) -> None:
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY)
    service.snapshot_vm(vm.id, "taken")
    before = snapshot_of(config.data_dir)
    with pytest.raises(Conflict, match="template taken already exists"):
        service.snapshot_vm(vm.id, "taken")
    with pytest.raises(Conflict):
        service.snapshot_vm(vm.id, "debian-base")
    for bad in ("", "a/b", "..", "../x", "x" * 65, "sp ace"):
        with pytest.raises(InvalidInput, match="template_name"):
            service.snapshot_vm(vm.id, bad)
    with pytest.raises(NotFound, match="VM not found"):
        service.snapshot_vm("no-such-vm", "fine")
    assert snapshot_of(config.data_dir) == before


def test_delete_template(service: VMService, config: ServerConfig) -> None:
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY)
    service.snapshot_vm(vm.id, "gone-soon")
    before = snapshot_of(config.data_dir)
    with pytest.raises(Protected, match="debian-base is protected"):
        service.delete_template("debian-base")
    with pytest.raises(NotFound, match="template nope not found"):
        service.delete_template("nope")
    for bad in ("", "..", "a/b", "../templates", "x" * 65):
        with pytest.raises(InvalidInput):
            service.delete_template(bad)
    assert snapshot_of(config.data_dir) == before
    service.delete_template("gone-soon")
    assert [t.name for t in service.list_templates()] == ["debian-base"]
    assert not (config.data_dir / "templates" / "gone-soon").exists()
    # A VM made from a deleted template keeps its own copy of the disk.
    assert knock(vm.ssh_port)["vm"] == vm.id


# -- bad input to create_vm ---------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"disk_size_gib": 0}, "disk_size_gib"),
        ({"disk_size_gib": 101}, "disk_size_gib"),  # above MAX_DISK_SIZE_GIB
        ({"disk_size_gib": 10**30}, "disk_size_gib"),
        ({"disk_size_gib": -1}, "disk_size_gib"),
        ({"disk_size_gib": True}, "disk_size_gib"),
        ({"vcpu_count": 10**18}, "vcpu_count"),
        ({"vcpu_count": 0}, "vcpu_count"),
        ({"vcpu_count": "2"}, "vcpu_count"),
        ({"mem_size_mib": 10**12}, "mem_size_mib"),
        ({"mem_size_mib": 1.5}, "mem_size_mib"),
        ({"template": "../debian-base"}, "template"),
        ({"template": "a/b"}, "template"),
        ({"template": ".."}, "template"),
        ({"template": ""}, "template"),
        ({"name": "a/b"}, "name"),
        ({"name": ".."}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"name": ""}, "name"),
        ({"name": "vm-0123456789ab"}, "name"),
        ({"ssh_public_key": ""}, "ssh_public_key"),
        # Several keys are fine (one per line), but each line must be a key.
        ({"ssh_public_key": "ssh-ed25519 AAAA\nnot-a-key BBBB"}, "ssh_public_key"),
        ({"ssh_public_key": "ssh-ed25519"}, "ssh_public_key"),
    ],
)
def test_invalid_input_names_the_field_and_changes_nothing(
    service: VMService, config: ServerConfig, overrides: dict[str, object], field: str
) -> None:
    before = snapshot_of(config.data_dir)
    args: dict[str, object] = {"template": "debian-base", "ssh_public_key": KEY, **overrides}
    with pytest.raises(InvalidInput) as caught:
        service.create_vm(**args)  # type: ignore[arg-type]
    assert caught.value.what.startswith(field), caught.value.what
    assert caught.value.hint
    assert snapshot_of(config.data_dir) == before
    assert service.list_vms() == []


def test_unknown_template_is_not_found(service: VMService, config: ServerConfig) -> None:
    before = snapshot_of(config.data_dir)
    with pytest.raises(NotFound, match="template no-such not found"):
        service.create_vm(template="no-such", ssh_public_key=KEY)
    assert snapshot_of(config.data_dir) == before


def test_a_taken_name_is_a_conflict(service: VMService, config: ServerConfig) -> None:
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY, name="taken")
    before = snapshot_of(config.data_dir)
    for name in ("taken", "TAKEN"):  # one DNS name: https://taken.<VM_DOMAIN>
        with pytest.raises(Conflict, match=f"already used by VM {vm.id}"):
            service.create_vm(template="debian-base", ssh_public_key=KEY, name=name)
    assert snapshot_of(config.data_dir) == before


def test_a_disk_larger_than_the_free_storage_is_refused(config: ServerConfig, guests: None) -> None:
    from dataclasses import replace  # noqa: PLC0415

    roomy = replace(config, max_disk_size_gib=65536)  # far more than this host has free
    service = new_service(roomy)
    before = snapshot_of(config.data_dir)
    with pytest.raises(InsufficientStorage, match="not enough storage for a 65536 GiB disk"):
        service.create_vm(template="debian-base", ssh_public_key=KEY, disk_size_gib=65536)
    assert snapshot_of(config.data_dir) == before
    service.close()


def test_running_out_of_ports_is_an_error_not_a_clash(config: ServerConfig, guests: None) -> None:
    from dataclasses import replace  # noqa: PLC0415

    service = new_service(replace(config, port_max=config.port_min + 1))
    service.create_vm(template="debian-base", ssh_public_key=KEY)
    service.create_vm(template="debian-base", ssh_public_key=KEY)
    before = snapshot_of(config.data_dir)
    with pytest.raises(Exception, match="no free ssh port") as caught:
        service.create_vm(template="debian-base", ssh_public_key=KEY)
    assert getattr(caught.value, "status", None) == 503
    assert snapshot_of(config.data_dir) == before
    service.close()


# -- info ---------------------------------------------------------------------------


def test_info_reports_counts_and_host_figures(service: VMService) -> None:
    service.create_vm(template="debian-base", ssh_public_key=KEY)
    info = service.info()
    assert info["host_ip"] == "127.0.0.1" and info["vm_domain"] == "vms.example.test"
    assert info["templates_count"] == 1 and info["vms_count"] == 1
    storage, memory = info["storage"], info["memory"]
    assert isinstance(storage, dict) and isinstance(memory, dict)
    assert storage["total_gb"] >= storage["free_gb"] > 0 and storage["used_gb"] > 0
    assert memory["total_gb"] >= memory["free_gb"] > 0
    assert isinstance(info["cpu_percent"], float) and 0 <= info["cpu_percent"] <= 100
    assert all(round(v, 1) == v for v in [*storage.values(), *memory.values()])


def test_vm_record_round_trips_through_json() -> None:
    vm = VM(
        id="vm-0123456789ab", name="a-b-c", template="t", ip="127.0.0.1", ssh_port=40001,
        status="running", created_at="2024-01-01T00:00:00.000Z", vcpu_count=2,
        mem_size_mib=2048, disk_size_gib=2, ssh_public_key=KEY, pid=42,
    )  # fmt: skip
    again = VM.from_record(json.loads(json.dumps(vm.to_record())))
    assert again == VM(**{**vm.__dict__, "status": "unknown"})


# In a mount namespace of its own (the mount goes with it): DATA_DIR on a tmpfs
# that is shrunk to what it holds once the VM exists, so the next write fails.
_ON_A_TMPFS = """
import json, logging, os, subprocess, sys
from pathlib import Path
from scalebox.config import ServerConfig
from scalebox.daemon.errors import ApiError
from scalebox.daemon.vms.backend import ProcessBackend
from scalebox.daemon.vms.service import VMService

data, low, high, key = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "data", str(data)], check=True)
config = ServerConfig(api_token="t" * 32, data_dir=data, port_min=low, port_max=high,
                      host_ip="127.0.0.1", vm_backend="process")


def fill():  # shrink it to what it holds: the next write fails
    fs = os.statvfs(data)
    used = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
    subprocess.run(["mount", "-o", f"remount,size={used}", str(data)], check=True)
"""


def _on_a_full_tmpfs(script: str, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Run ``script`` (after _ON_A_TMPFS) as root in a mount namespace of its own; its
    last line of output as JSON, and its stderr."""
    low, high = port_block()
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
             _ON_A_TMPFS + script, str(tmp_path / "data"), str(low), str(high), KEY],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )  # fmt: skip
    finally:  # its guests run on in sessions of their own, as a daemon's do
        _stop_guests_of(tmp_path / "data")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


FULL_DISK_DELETE = """
service = VMService(config, logging.getLogger("full"), use_systemd=False)
service.start()
out = {}
vm = service.create_vm(template="debian-base", ssh_public_key=key, name="kept", disk_size_gib=1)
fill()
try:
    service.delete_vm("kept")
except ApiError as exc:
    out["error"] = [exc.status, exc.what, exc.hint]
out["listed"] = [v.name for v in service.list_vms()]
out["in_state"] = "kept" in (data / "state.json").read_text()
subprocess.run(["mount", "-o", "remount,size=2g", str(data)], check=True)
service.delete_vm("kept")
out["after_room"] = [v.name for v in service.list_vms()]
out["dir_left"] = (data / "vms" / vm.id).exists()
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a file system (root)")
def test_a_delete_on_a_full_disk_keeps_the_vm_listed_and_says_so(tmp_path: Path) -> None:
    """The VM was dropped from memory before the state was saved: on a full disk
    the client got a 500, the VM vanished from GET /vms (a retry said 404), and
    came back, running, at the daemon's next start."""
    out, _ = _on_a_full_tmpfs(FULL_DISK_DELETE, tmp_path)
    status, what, hint = out["error"]
    assert status == 507
    assert what.startswith("VM vm-") and "(kept) is stopped but not deleted" in what
    assert "No space left on device" in what
    assert hint == "delete it again once the server's disk has room"
    assert out["listed"] == ["kept"]
    assert out["in_state"] is True
    assert out["after_room"] == []
    assert out["dir_left"] is False


FULL_DISK_START = """
logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
out = {}
first = VMService(config, logging.getLogger("first"), use_systemd=False)
first.start()
vm = first.create_vm(template="debian-base", ssh_public_key=key, name="kept", disk_size_gib=1)
first.close()
fill()
again = VMService(config, logging.getLogger("again"), use_systemd=False)
again.start()  # raised: the start's save of the state hit the full disk
out["listed"] = [(v.name, v.status) for v in again.list_vms()]
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a file system (root)")
def test_a_full_disk_does_not_keep_the_daemon_from_starting(tmp_path: Path) -> None:
    out, stderr = _on_a_full_tmpfs(FULL_DISK_START, tmp_path)
    assert out == {"listed": [["kept", "running"]]}
    assert "could not save the state" in stderr
    assert "No space left on device" in stderr


FULL_DISK_SNAPSHOT = """
service = VMService(config, logging.getLogger("full"), use_systemd=False)
service.start()
vm = service.create_vm(template="debian-base", ssh_public_key=key, name="kept", disk_size_gib=1)
fill()
out = {}
try:
    service.snapshot_vm("kept", "too-big")
except OSError as exc:
    out["errno"] = exc.errno
out["templates"] = sorted(p.name for p in (data / "templates").iterdir())
out["vm"] = [(v.name, v.status) for v in service.list_vms()]
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a file system (root)")
def test_a_snapshot_copy_that_fills_the_disk_is_told_as_a_full_disk(tmp_path: Path) -> None:
    """cp's failure was a CommandFailed (500) quoting cp and the server's paths; as an
    OSError of ENOSPC the API answers it 507, as every other full-disk write."""
    out, _ = _on_a_full_tmpfs(FULL_DISK_SNAPSHOT, tmp_path)
    assert out == {
        "errno": errno.ENOSPC,
        "templates": ["debian-base"],  # nothing half-made
        "vm": [["kept", "running"]],
    }


def _stop_guests_of(data_dir: Path) -> None:
    backend = ProcessBackend(data_dir)
    for vm_id, pid in backend.list_running().items():
        backend.stop(vm_id, pid)


def test_a_sync_that_fails_after_the_rename_does_not_unmake_the_answer(
    service: VMService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The directory's fsync ran inside the cleanup meant for the steps before the
    rename: the client read "failed, nothing was changed" (a retry: 409) while the
    template existed. A failing fsync of a directory cannot be made on cue here, so
    the service's fsync_dir is replaced by one that fails."""
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY)

    def failing(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(service_module, "fsync_dir", failing)
    template, _ = service.snapshot_vm(vm.id, "kept")
    other = service.create_vm(template="debian-base", ssh_public_key=KEY, name="other")
    assert template.name == "kept"
    assert [t.name for t in service.list_templates()] == ["debian-base", "kept"]
    assert service.get_vm("other").id == other.id
    assert "may not survive a power cut" in caplog.text


def test_a_template_made_again_under_its_name_reports_its_own_size(
    service: VMService, config: ServerConfig
) -> None:
    """Sizes are cached; the key was the disk's inode, which ext4 hands out again at
    once: the second template reported the first one's size."""
    big = service.create_vm(template="debian-base", ssh_public_key=KEY, name="big")
    (config.data_dir / "vms" / big.id / "disk" / "hello.txt").write_text("x" * 100_000)
    small = service.create_vm(template="debian-base", ssh_public_key=KEY, name="small")
    (config.data_dir / "vms" / small.id / "disk" / "hello.txt").write_text("x" * 23)
    for _ in range(3):
        first, _ = service.snapshot_vm("big", "snap")
        assert first.size_bytes == 100_000
        assert [t.size_bytes for t in service.list_templates() if t.name == "snap"] == [100_000]
        service.delete_template("snap")
        second, _ = service.snapshot_vm("small", "snap")
        assert second.size_bytes == 23
        assert [t.size_bytes for t in service.list_templates() if t.name == "snap"] == [23]
        service.delete_template("snap")


def test_a_delete_whose_cleanup_is_killed_is_still_a_done_delete(
    service: VMService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A umount killed by a signal (Unavailable, 503 "retry") after the state was
    saved: the client was told to retry a delete that had been done. Stands in for
    the killed umount: a remove_vm_dir that raises what command.run raises then."""
    vm = service.create_vm(template="debian-base", ssh_public_key=KEY)

    def killed(path: Path) -> None:
        raise Unavailable(f"could not unmount {path}: umount was killed by signal 9", "retry")

    monkeypatch.setattr(disks, "remove_vm_dir", killed)
    service.delete_vm(vm.id)
    assert service.list_vms() == []
    assert "is deleted, but its files could not all be removed" in caplog.text


def test_an_orphan_whose_guest_cannot_be_stopped_keeps_its_disk(
    config: ServerConfig, guests: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start logged that it could not stop the orphan's guest, then removed the
    disk under it. A stop that fails is made by a backend whose stop raises."""
    vm = made_by_a_daemon_now_gone(config)
    (config.data_dir / "state.json").write_text('{"format": 1, "vms": []}\n')

    def refused(self: ProcessBackend, vm_id: str, pid: int | None) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    with monkeypatch.context() as patched:
        patched.setattr(ProcessBackend, "stop", refused)
        second = new_service(config, "second")
    assert (config.data_dir / "vms" / vm.id / "disk").is_dir()
    assert vm.pid is not None and alive(vm.pid)
    second.close()
