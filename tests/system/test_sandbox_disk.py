"""VM disks on a real server: copy-on-write roots, a bound per VM, mounts that never linger.

One server per module (tools/sandbox.py). A VM's root is an overlay: its
template's disk as the read-only lower layer, its own writes in a sparse
ext4 image of disk_size_gib (loop-mounted). Every test ends with nothing of
its VMs left: no unit, mount, loop device, namespace, port or directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from tools.sandbox import OUR_LOOPS, TEMPLATE, Sandbox, sandbox_server

from .conftest import _skip_unless_able

pytestmark = pytest.mark.system

DATA = "/var/lib/scalebox"
PYTHON = "/opt/scalebox/current/venv/bin/python"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    _skip_unless_able()
    with sandbox_server(tmp_path_factory.mktemp("sandbox-disk")) as s:
        yield s


def create(s: Sandbox, **body: object) -> dict[str, object]:
    answer = s.api("POST", "/vms", json={"template": "debian-base",
                                         "ssh_public_key": s.public_key(), **body})  # fmt: skip
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def delete(s: Sandbox, vm: dict[str, object]) -> None:
    assert s.api("DELETE", f"/vms/{vm['id']}").status_code == 204
    assert s.leftovers(str(vm["id"]), int(str(vm["ssh_port"]))) == []


def mounts(s: Sandbox, vm_id: str) -> dict[str, str]:
    """Mount point -> 'FSTYPE SOURCE OPTIONS' of the VM's mounts, from findmnt."""
    out = s.sh(f"findmnt -rn -o TARGET,FSTYPE,SOURCE,OPTIONS | grep -F {DATA}/vms/{vm_id}/ "
               "|| true").stdout  # fmt: skip
    return {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines()}


def test_a_vm_root_is_an_overlay_of_its_template_kept_across_restarts_and_unmounted_on_delete(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    vm = create(s, disk_size_gib=1)
    vm_id, port = str(vm["id"]), int(str(vm["ssh_port"]))
    seen = mounts(s, vm_id)
    root, fs = f"{DATA}/vms/{vm_id}/disk", f"{DATA}/vms/{vm_id}/fs"
    assert seen[root].startswith("overlay overlay "), seen
    # Its lower layer: the template's disk, idmapped to the VM's UIDs, read-only
    # (tests/system/test_sandbox_userns.py).
    lower = f"{DATA}/vms/{vm_id}/lower"
    assert f"lowerdir={lower}," in seen[root]
    assert "[/templates/debian-base/disk]" in seen[lower], seen
    assert seen[lower].split()[-1].split(",")[0] == "ro" and "idmapped" in seen[lower], seen
    assert f"upperdir={fs}/upper" in seen[root]
    assert seen[fs].startswith("ext4 /dev/loop"), seen
    # Nothing of the template was copied: the VM's directory holds a few MB, not 200+
    # (lower/ is the template itself, seen again on the same file system).
    used_kb = int(s.sh(f"du -sk --one-file-system --exclude=lower {DATA}/vms/{vm_id}")
                  .stdout.split()[0])  # fmt: skip
    assert used_kb < 40_000, used_kb
    # What the guest writes lands in its own layer, never in the template.
    done = s.ssh(port, "/root/one", "echo mine > /home/user/note; sudo touch /etc/x")
    assert done.returncode == 0, done.stderr
    assert s.sh(f"cat {fs}/upper/home/user/note").stdout == "mine\n"
    assert s.sh(f"ls {DATA}/templates/debian-base/disk/etc/x", check=False).returncode != 0

    # A restart of scaleboxd leaves the running VM's mounts and container alone.
    before = (s.sh(f"grep -F /vms/{vm_id}/ /proc/self/mountinfo").stdout,
              s.sh(f"systemctl show -p MainPID scalebox-vm@{vm_id}").stdout)  # fmt: skip
    s.sh("systemctl restart scaleboxd")
    after = (s.sh(f"grep -F /vms/{vm_id}/ /proc/self/mountinfo").stdout,
             s.sh(f"systemctl show -p MainPID scalebox-vm@{vm_id}").stdout)  # fmt: skip
    assert after == before
    assert s.ssh(port, "/root/one", "cat /home/user/note").stdout == "mine\n"
    delete(s, vm)


def test_a_guest_that_fills_its_disk_gets_enospc_and_the_host_disk_is_not_filled(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    vm = create(s, disk_size_gib=1)
    vm_id, port = str(vm["id"]), int(str(vm["ssh_port"]))
    free_before = int(s.sh(f"df --output=avail -B1 {DATA} | tail -1").stdout)
    fill = s.ssh(port, "/root/one", "dd if=/dev/zero of=/home/user/fill bs=1M count=3000 2>&1; "
                 "echo exit=$?; df -B1M --output=size / | tail -1")  # fmt: skip
    assert "No space left on device" in fill.stdout, fill.stdout + fill.stderr
    assert "exit=1" in fill.stdout
    assert int(fill.stdout.split()[-1]) <= 1024  # the guest's / is its 1 GiB disk
    image = f"{DATA}/vms/{vm_id}/disk.img"
    size, allocated = s.sh(f"stat -c '%s %b' {image}").stdout.split()
    assert int(size) == 1024**3 and int(allocated) * 512 <= 1024**3
    free_after = int(s.sh(f"df --output=avail -B1 {DATA} | tail -1").stdout)
    assert free_before - free_after <= 1024**3
    # Full, the VM still lets its user in and frees space again.
    done = s.ssh(port, "/root/one", "rm /home/user/fill && echo freed")
    assert done.stdout.strip() == "freed", done.stderr
    delete(s, vm)


def test_a_disk_size_above_the_limit_is_refused_and_leaves_nothing(sandbox: Sandbox) -> None:
    s = sandbox
    before = s.sh(f"ls -A {DATA}/vms; {OUR_LOOPS}; findmnt -rn | grep -F {DATA} || true").stdout
    answer = s.api("POST", "/vms", json={"template": "debian-base", "disk_size_gib": 101,
                                         "ssh_public_key": s.public_key()})  # fmt: skip
    assert answer.status_code == 400, answer.text
    assert "disk_size_gib" in answer.json()["error"]
    assert s.sh(f"ls -A {DATA}/vms; {OUR_LOOPS}; findmnt -rn | grep -F {DATA} || true").stdout == (
        before
    )


def test_templates_deleted_or_replaced_under_running_vms_stay_their_layer_until_they_go(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    src = create(s, name="layer-src")
    s.ssh(int(str(src["ssh_port"])), "/root/one", "echo from-snap > /home/user/snap.txt")
    snap = s.api("POST", f"/vms/{src['id']}/snapshot", json={"template_name": "snap-layer"})
    assert snap.status_code == 201, snap.text
    child = create(s, template="snap-layer", name="layer-child")
    base_child = create(s, name="base-child")
    assert s.api("DELETE", "/templates/snap-layer").status_code == 204
    # The template is gone from the list, but its disk is the child's lower layer.
    names = [t["name"] for t in s.api("GET", "/templates").json()["templates"]]
    assert names == ["debian-base"]
    assert len(s.sh(f"ls -A {DATA}/layers").stdout.split()) == 1
    # Rebuilding debian-base under a running VM: the old disk is retired, not removed.
    s.sh(f"{PYTHON} -m scalebox.daemon.vms.templates install {TEMPLATE}")
    assert len(s.sh(f"ls -A {DATA}/layers").stdout.split()) == 2
    for vm, command, answer in (
        (child, "cat /home/user/snap.txt", "from-snap"),
        (base_child, "ls /usr/bin/ssh-keygen", "/usr/bin/ssh-keygen"),
    ):
        done = s.ssh(int(str(vm["ssh_port"])), "/root/one", command)
        assert done.stdout.strip() == answer, done.stdout + done.stderr
    delete(s, child)
    assert len(s.sh(f"ls -A {DATA}/layers").stdout.split()) == 1
    delete(s, base_child)
    delete(s, src)  # made from the old debian-base too: the last user of that layer
    assert s.sh(f"ls -A {DATA}/layers").stdout.split() == []


def test_a_create_that_fails_after_mounting_and_a_vm_missing_from_the_state_leave_nothing(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    noboot = f"{DATA}/templates/noboot"
    s.sh(f"cp -a {DATA}/templates/debian-base {noboot} && "
         f"printf '#!/bin/sh\\nexit 3\\n' > {noboot}/disk/usr/lib/systemd/systemd")  # fmt: skip
    try:
        answer = s.api("POST", "/vms", json={"template": "noboot",
                                             "ssh_public_key": s.public_key()})  # fmt: skip
        assert answer.status_code == 500, answer.text
    finally:
        s.sh(f"rm -rf {DATA}/templates/noboot")
    assert s.sh(f"findmnt -rn | grep -F {DATA}/vms/; {{ {OUR_LOOPS}; }} | grep -F {DATA}/vms/; "
                f"ls -A {DATA}/vms", check=False).stdout == ""  # fmt: skip

    # A VM scaleboxd has no record of (its state lost in a crash): on start,
    # its container is stopped and its mounts, loop device and directory go.
    vm = create(s)
    s.sh("systemctl stop scaleboxd")
    state = json.loads(s.sh(f"cat {DATA}/state.json").stdout)
    state["vms"] = [v for v in state["vms"] if v["id"] != vm["id"]]
    s.m.run(["bash", "-c", f"cat > {DATA}/state.json"], input=json.dumps(state))
    assert mounts(s, str(vm["id"])) != {}
    s.sh("systemctl start scaleboxd")
    assert s.leftovers(str(vm["id"]), int(str(vm["ssh_port"]))) == []
