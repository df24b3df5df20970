"""User namespaces of real sandboxes: root in a VM is an unprivileged UID on the host.

One server (tools/sandbox.py; its DATA_DIR is an ext4 file system, as on a
server's disk, so the kernel can idmap the template disk). Each VM gets its
own 65536 host UIDs from systemd's container range, recorded in its vm.json
as ``uid_base``: its processes run as uid_base + their UID in the guest, its
files stay where CoW works (the template untouched, the VM's own files in its
image), and the range stays with the VM across scaleboxd restarts and VM
restarts. What the host shows is read on the host (the test machine), what
the guest shows over real ssh.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from tools.sandbox import Sandbox, sandbox_server

from .conftest import _skip_unless_able

pytestmark = pytest.mark.system

KEY = "/root/one"
DATA = "/var/lib/scalebox"
FIRST_BASE, RANGE = 0x80000, 65536


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    _skip_unless_able()
    with sandbox_server(tmp_path_factory.mktemp("sandbox-userns")) as s:
        yield s


def create(s: Sandbox) -> dict[str, object]:
    made = s.api("POST", "/vms", json={"template": "debian-base", "ssh_public_key": s.public_key()})
    assert made.status_code == 201, made.text
    return dict(made.json())


def uid_base(s: Sandbox, vm_id: str) -> int:
    record = json.loads(s.sh(f"cat {DATA}/vms/{vm_id}/vm.json").stdout)
    return int(record["uid_base"])


def main_pid(s: Sandbox, vm_id: str) -> str:
    return s.sh(f"systemctl show -p MainPID --value scalebox-vm@{vm_id}.service").stdout.strip()


def host_uids(s: Sandbox, vm_id: str) -> dict[str, set[int]]:
    """Host UIDs of the processes of the VM's unit, by command name (nspawn itself too)."""
    unit = f"scalebox-vm@{vm_id}.service"
    out = s.sh(
        f"for p in $(systemd-cgls --no-pager -u {unit} | grep -o '[0-9]\\+ ' ); do "
        f"ps -o uid=,comm= -p $p; done"
    ).stdout
    seen: dict[str, set[int]] = {}
    for line in out.splitlines():
        uid, _, comm = line.strip().partition(" ")
        if uid.isdigit():
            seen.setdefault(comm.strip(), set()).add(int(uid))
    return seen


def test_root_in_a_vm_is_an_unprivileged_uid_on_the_host(sandbox: Sandbox) -> None:
    s = sandbox
    vm = create(s)
    vm_id, port = str(vm["id"]), int(str(vm["ssh_port"]))
    try:
        base = uid_base(s, vm_id)
        assert base >= FIRST_BASE and (base - FIRST_BASE) % RANGE == 0, base
        # On the host: the container's init and sshd run as the VM's base, not 0;
        # only systemd-nspawn (the supervisor outside the container) is root.
        uids = host_uids(s, vm_id)
        assert uids.get("systemd") == {base}, uids
        assert uids.get("sshd") == {base}, uids
        assert uids.get("systemd-nspawn") == {0}, uids
        for comm, found in uids.items():
            if comm != "systemd-nspawn":
                assert all(base <= uid < base + RANGE for uid in found), (comm, found)
        status = s.sh(f"grep ^Uid: /proc/$(pgrep -P {main_pid(s, vm_id)})/status").stdout
        assert status.split()[1:] == [str(base)] * 4, status
        # In the guest: root is 0 and sudo works for user; user's files are user's.
        done = s.ssh(
            port, KEY, "id -u; sudo -n id -u; touch /home/user/x; stat -c %U:%u /home/user/x"
        )
        assert done.stdout.split() == ["1000", "0", "user:1000"], done.stdout + done.stderr
        # On the host: the VM's file is in its own image, as the host sees the VM's
        # user; the template it was copied-on-write from is untouched and unshifted.
        owner = s.sh(f"stat -c %u {DATA}/vms/{vm_id}/fs/upper/home/user/x").stdout.strip()
        assert owner == str(base + 1000)
        template = s.sh(f"stat -c %u {DATA}/templates/debian-base/disk/usr/bin/sudo").stdout
        assert template.strip() == "0"
        # Root in the guest has no power over the host's network namespace it runs in.
        changed = s.ssh(port, KEY, "sudo -n ip addr add 10.9.9.9/32 dev eth0; echo rc=$?")
        assert "rc=2" in changed.stdout and "not permitted" in changed.stderr, changed
        # The mounts behind it: the template idmapped as the lower layer.
        mounts = s.sh(f"findmnt -rn -o TARGET,OPTIONS | grep -F {DATA}/vms/{vm_id}/").stdout
        assert f"{DATA}/vms/{vm_id}/lower " in mounts and "idmapped" in mounts, mounts
    finally:
        assert s.api("DELETE", f"/vms/{vm_id}").status_code == 204
    assert s.leftovers(vm_id, port) == []


def test_each_vm_keeps_its_own_range_across_restarts(sandbox: Sandbox) -> None:
    s = sandbox
    vms = [create(s) for _ in range(2)]
    ids = [str(vm["id"]) for vm in vms]
    try:
        bases = [uid_base(s, vm_id) for vm_id in ids]
        assert len(set(bases)) == 2 and abs(bases[0] - bases[1]) >= RANGE, bases
        # scaleboxd restarts: the running VMs are adopted as they are, not re-mapped.
        pids = [main_pid(s, vm_id) for vm_id in ids]
        s.sh("systemctl restart scaleboxd")
        assert [main_pid(s, vm_id) for vm_id in ids] == pids
        assert [uid_base(s, vm_id) for vm_id in ids] == bases
        # A VM that stopped is started again by scaleboxd with the same range.
        s.sh(f"systemctl stop scalebox-vm@{ids[0]}.service")
        s.sh("systemctl restart scaleboxd")
        # Booted in the background once the API serves (VMService.boot_stopped).
        started_again = f"VM {ids[0]} ({vms[0]['name']}) was not running; started its guest again"
        deadline = time.monotonic() + 60
        while started_again not in s.sh("journalctl -u scaleboxd --no-pager -o cat").stdout:
            assert time.monotonic() < deadline, "the stopped VM was not started again"
            time.sleep(0.5)
        assert s.api("GET", f"/vms/{ids[0]}").json()["status"] == "running"
        assert main_pid(s, ids[0]) not in ("0", pids[0])
        assert uid_base(s, ids[0]) == bases[0]
        assert host_uids(s, ids[0]).get("systemd") == {bases[0]}
        # Its forwarder outlived the container and is kept, not made twice.
        logged = s.sh("journalctl -u scaleboxd --since=-2min --no-pager -o cat").stdout
        assert "could not be started" not in logged, logged
        assert started_again in logged
        deadline = time.monotonic() + 30
        while True:
            done = s.ssh(int(str(vms[0]["ssh_port"])), KEY, "sudo -n id -u")
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done.stdout.strip() == "0", done.stderr
        # A new VM does not get a range in use, even one whose VM is down.
        third = create(s)
        ids.append(str(third["id"]))
        assert uid_base(s, ids[2]) not in bases
    finally:
        for vm_id in ids:
            assert s.api("DELETE", f"/vms/{vm_id}").status_code == 204
    assert s.sh(f"findmnt -rn -o TARGET | grep -F {DATA}/vms/ || true").stdout == ""
    assert s.sh("pgrep -a -x unshare || true").stdout == ""
    assert s.sh(f"ls -A {DATA}/vms").stdout == ""


def test_the_daemon_checked_user_namespaces_at_start_and_left_nothing(sandbox: Sandbox) -> None:
    log = sandbox.sh("journalctl -u scaleboxd -o cat").stdout
    assert "no user namespace" not in log, log
    assert ".userns-probe" not in sandbox.sh(f"ls -A {DATA}").stdout


def test_where_the_kernel_cannot_idmap_vms_run_as_before_after_one_warning(
    sandbox: Sandbox,
) -> None:
    """DATA_DIR on the machine's overlay root, which the kernel cannot idmap: root is root."""
    s = sandbox
    plain = "/srv/scalebox-plain"
    config = "/etc/scaleboxd/config"
    s.sh(f"cp {config} /root/config.saved && mkdir -p {plain} && echo DATA_DIR={plain} >> {config}")
    try:
        s.sh(f"/opt/scalebox/current/venv/bin/python -I -m scalebox.daemon.vms.templates "
             f"install /mnt/template/debian-base.tar.gz --config {config}")  # fmt: skip
        since = s.sh("date +%s").stdout.strip()
        s.sh("systemctl restart scaleboxd")
        log = s.sh(f"journalctl -u scaleboxd -o cat --since @{since}").stdout
        warnings = [line for line in log.splitlines() if "no user namespace" in line]
        assert len(warnings) == 1, log
        assert "root in a VM is root on the host" in warnings[0]
        vm = create(s)
        vm_id, port = str(vm["id"]), int(str(vm["ssh_port"]))
        try:
            record = json.loads(s.sh(f"cat {plain}/vms/{vm_id}/vm.json").stdout)
            assert record["uid_base"] == 0
            assert host_uids(s, vm_id).get("systemd") == {0}
            done = s.ssh(port, KEY, "sudo -n id -u")
            assert done.stdout.strip() == "0", done.stderr
            assert (
                "idmapped" not in s.sh(f"findmnt -rn -o OPTIONS | grep -F {plain} || true").stdout
            )
        finally:
            assert s.api("DELETE", f"/vms/{vm_id}").status_code == 204
        assert s.sh(f"findmnt -rn -o TARGET | grep -F {plain}/vms/ || true").stdout == ""
        assert ".userns-probe" not in s.sh(f"ls -A {plain}").stdout
    finally:
        s.sh(f"cp /root/config.saved {config} && systemctl restart scaleboxd")
