"""The VM domain's pure parts and narrow doors: names, ports, parsing, the guest, run()."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from scalebox.config import ServerConfig
from scalebox.daemon.errors import InvalidInput
from scalebox.daemon.vms import backend, disks, guest, hostinfo, naming, state
from scalebox.daemon.vms.command import CommandFailed, run
from scalebox.daemon.vms.models import VM


def test_vm_ids_and_generated_names_have_the_contract_shape() -> None:
    ids = {naming.new_vm_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(naming.VM_ID_RE.fullmatch(i) for i in ids)
    name = naming.random_name()
    adverb, adjective, noun = name.split("-")
    assert (adverb, adjective, noun) in {
        (a, b, c)
        for a in naming.ADVERBS
        if a == adverb
        for b in naming.ADJECTIVES
        if b == adjective
        for c in naming.NOUNS
        if c == noun
    }


def test_random_name_avoids_taken_names_even_when_all_are_taken() -> None:
    everything = {
        f"{a}-{b}-{c}" for a in naming.ADVERBS for b in naming.ADJECTIVES for c in naming.NOUNS
    }
    name = naming.random_name(everything)
    assert name not in everything and naming.NAME_RE.fullmatch(name)


@pytest.mark.parametrize("bad", ["", "..", "a/b", "a b", "é", "x" * 64, "a\n", None, 3])
def test_check_name_rejects_unsafe_names(bad: object) -> None:
    with pytest.raises(InvalidInput, match=r"^name"):
        naming.check_vm_name(bad)


def test_check_name_accepts_safe_names() -> None:
    assert naming.check_vm_name("My_box-2") == "My_box-2"
    assert naming.check_template_name("x" * 64) == "x" * 64


@pytest.mark.parametrize("bad", [0, 11, -1, True, 2.0, "3", None, 10**100])
def test_check_int_rejects_out_of_range_and_non_integers(bad: object) -> None:
    with pytest.raises(InvalidInput, match=r"^disk_size_gib must be a whole number from 1 to 10"):
        naming.check_int(bad, "disk_size_gib", 1, 10)


def test_pick_port_skips_used_and_busy_ports() -> None:
    assert naming.pick_port({100, 101}, 100, 105, lambda p: p != 102) == 103
    assert naming.pick_port({100}, 100, 101, lambda p: p != 101) is None


def test_state_round_trips_and_rejects_what_it_did_not_write() -> None:
    vm = VM(
        id="vm-0123456789ab", name="a-b-c", template="t", ip="127.0.0.1", ssh_port=40001,
        status="running", created_at="2024-01-01T00:00:00.000Z", vcpu_count=2,
        mem_size_mib=2048, disk_size_gib=2, pid=None,
    )  # fmt: skip
    [again] = state.parse(state.render([vm]))
    assert again.id == vm.id and again.status == "unknown"
    for text in ("", "[]", '{"format": 2, "vms": []}', '{"format": 1, "vms": [1]}',
                 '{"format": 1, "vms": [{"id": "vm-1"}]}'):  # fmt: skip
        with pytest.raises(ValueError, match=r"\w"):
            state.parse(text)
    twice = json.dumps({"format": 1, "vms": [vm.to_record(), vm.to_record()]})
    with pytest.raises(ValueError, match="twice"):
        state.parse(twice)


def test_state_load_copies_a_corrupt_file_aside_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert state.load(path).vms == [] and state.load(path).problem is None  # missing: no VMs
    path.write_text("{torn")
    loaded = state.load(path)
    assert loaded.problem and "not valid JSON" in loaded.problem
    assert loaded.kept_as is not None and loaded.kept_as.read_text() == "{torn"
    assert path.read_text() == "{torn"  # replaced only by the next atomic save
    state.save(path, [])
    assert state.load(path).problem is None


def test_systemctl_output_parsing() -> None:
    assert backend.parse_show("MainPID=1234\nActiveState=active\n") == backend.GuestStatus(
        "running", 1234
    )
    assert backend.parse_show("MainPID=0\nActiveState=inactive\n") == backend.GuestStatus(
        "stopped", None
    )
    assert backend.parse_show("MainPID=0\nActiveState=failed\n").status == "failed"
    many = (
        "MainPID=77\nActiveState=active\nId=scalebox-vm@vm-0123456789ab.service\n\n"
        "MainPID=0\nActiveState=inactive\nId=scalebox-vm@vm-ba9876543210.service\n"
    )
    assert backend.parse_show_many(many) == {
        "vm-0123456789ab": backend.GuestStatus("running", 77),
        "vm-ba9876543210": backend.GuestStatus("stopped", None),
    }
    listing = (
        "scalebox-vm@vm-0123456789ab.service loaded active running Scalebox VM vm-0123456789ab\n"
        "scalebox-vm@bogus.service loaded active running Scalebox VM bogus\n"
        "other.service loaded active running Other\n"
    )
    assert backend.parse_list_units(listing) == ["vm-0123456789ab"]


def test_guest_command_lines_are_matched_to_their_data_dir_only() -> None:
    argv = backend.guest_argv(Path("/data"), "vm-0123456789ab")
    assert backend.guest_of(argv, Path("/data")) == "vm-0123456789ab"
    assert backend.guest_of(argv, Path("/other")) is None
    assert backend.guest_of(["python", "-m", "http.server"], Path("/data")) is None
    spoofed = [*argv[:-1], "../../etc"]
    assert backend.guest_of(spoofed, Path("/data")) is None


def test_running_under_systemd_needs_to_be_a_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's shell on a systemd host must not put test VMs into system units."""
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert not backend.running_under_systemd()
    monkeypatch.setenv("INVOCATION_ID", "0123")
    assert backend.running_under_systemd() == Path("/run/systemd/system").is_dir()


def test_hostinfo_parsers() -> None:
    meminfo = "MemTotal:       16384000 kB\nMemFree:   1000 kB\nMemAvailable:    8192000 kB\n"
    assert hostinfo.parse_meminfo(meminfo) == {"total_gb": 15.6, "free_gb": 7.8}
    stat = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n"
    assert hostinfo.parse_cpu_times(stat) == (800, 1000)
    assert hostinfo.busy_percent((800, 1000), (1700, 2000)) == 10.0
    assert hostinfo.busy_percent((800, 1000), (800, 1000)) == 0.0


def test_run_returns_stdout_and_turns_failure_into_an_error_with_stderr() -> None:
    assert run(["echo", "hi"], "say hi") == "hi\n"
    with pytest.raises(CommandFailed) as caught:
        run(["ls", "/no/such/path"], "list a missing directory")
    assert caught.value.what.startswith("could not list a missing directory: ls /no/such/path")
    assert "No such file" in caught.value.what
    with pytest.raises(CommandFailed, match="is not installed"):
        run(["no-such-program-scalebox"], "run a missing program")


def test_copy_tree_copies_everything_and_tree_size_counts_files(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("12345")
    (source / "sub" / "b.bin").write_bytes(b"\0" * 100)
    (source / "link").symlink_to("a.txt")
    disks.copy_tree(source, tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "b.bin").read_bytes() == b"\0" * 100
    assert (tmp_path / "copy" / "link").is_symlink()
    assert disks.tree_size(tmp_path / "copy") == 105
    disks.remove_tree(tmp_path / "copy")
    disks.remove_tree(tmp_path / "copy")  # already gone is fine
    assert not (tmp_path / "copy").exists()


def test_guest_refuses_a_bad_id_or_a_missing_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ServerConfig(api_token="t" * 32, data_dir=tmp_path, vm_backend="process")
    assert guest.run(config, "../etc") == 2
    assert guest.run(config, "vm-0123456789ab") == 1
    assert "cannot read its port" in capsys.readouterr().err


def test_guest_program_serves_until_sigterm_and_exits_cleanly(tmp_path: Path) -> None:
    """`python -m scalebox.daemon.vms.guest` as the process backend starts it."""
    vm_dir = tmp_path / "vms" / "vm-0123456789ab"
    (vm_dir / "disk").mkdir(parents=True)
    (vm_dir / "disk" / "hello.txt").write_text("héllo\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (vm_dir / "vm.json").write_text(json.dumps({"ssh_port": port}))
    child = subprocess.Popen(backend.guest_argv(tmp_path, "vm-0123456789ab"), cwd=vm_dir)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and child.poll() is None
                time.sleep(0.02)
        with conn:
            line = conn.makefile("rb").read()
        assert json.loads(line) == {"vm": "vm-0123456789ab", "file": "héllo\n"}
        child.terminate()
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
        child.wait()
