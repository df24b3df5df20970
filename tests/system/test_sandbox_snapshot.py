"""Snapshots of real sandboxes (VM_BACKEND=nspawn) and `scalebox vm ssh`, on a real server.

One server per module (tools/sandbox.py). The VM is frozen for the copy
(the cgroup freezer of its unit) and thawed after, also when the copy fails;
its container process and an open SSH session go on across the snapshot.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterator

import pytest
from tools.sandbox import SSH_OPTS, Sandbox, sandbox_server

from .conftest import _skip_unless_able
from .test_sandbox import ask, open_session

TEMPLATES = "/var/lib/scalebox/templates"
# The cgroup v2 hierarchy of the test machine (hybrid: beside the v1 ones).
V2 = "$(test -e /sys/fs/cgroup/cgroup.procs && echo /sys/fs/cgroup || echo /sys/fs/cgroup/unified)"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    _skip_unless_able()
    with sandbox_server(tmp_path_factory.mktemp("sandbox-snapshot")) as s:
        yield s


def vm_ssh(s: Sandbox, vm: str, key: str, command: str) -> subprocess.CompletedProcess[str]:
    """`scalebox vm ssh VM -- COMMAND` in the machine, as a user of the server would run it."""
    options = " ".join(f"-o {shlex.quote(o)}" for o in shlex.split(SSH_OPTS)[1::2])
    return s.sh(
        f"SCALEBOX_URL=http://127.0.0.1:8080 SCALEBOX_TOKEN={s.token} "
        f"scalebox vm ssh -i {key} {options} {vm} -- {shlex.quote(command)}",
        check=False,
    )


def unit_props(s: Sandbox, vm_id: str) -> str:
    """Main PID and state of the VM's unit, and whether its cgroup is frozen now."""
    unit = f"scalebox-vm@{vm_id}.service"
    return s.sh(
        f"systemctl show -p MainPID,ActiveState {unit}; "
        f"grep frozen {V2}$(systemctl show -p ControlGroup --value {unit})/cgroup.events"
    ).stdout


def create(s: Sandbox, name: str, template: str, key: str) -> dict[str, object]:
    body = {"template": template, "name": name, "ssh_public_key": s.public_key(key)}
    created = s.api("POST", "/vms", json=body)
    assert created.status_code == 201, created.text
    return dict(created.json())


IDENTITY = "cat /etc/machine-id; ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2"


def test_a_snapshot_of_a_running_vm_makes_a_template_whose_vms_have_its_files(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    src = create(s, "source", "debian-base", "/root/one")
    src_id, port = str(src["id"]), int(str(src["ssh_port"]))
    done = vm_ssh(s, "source", "/root/one", "echo kept-by-the-snapshot > /home/user/note.txt")
    assert done.returncode == 0, done.stderr
    # A file capability set in the VM (a chown drops it) is kept too.
    done = vm_ssh(s, "source", "/root/one", "sudo cp /bin/true /usr/local/bin/raw && sudo "
                  "python3 -c 'import os; os.setxattr(\"/usr/local/bin/raw\", "
                  "\"security.capability\", bytes.fromhex(\"010000020020000000000000"
                  "0000000000000000\"))'")  # fmt: skip
    assert done.returncode == 0, done.stderr
    src_identity = vm_ssh(s, "source", "/root/one", IDENTITY).stdout.split()
    assert len(src_identity) == 2, src_identity
    before = unit_props(s, src_id)
    assert "ActiveState=active" in before and "frozen 0" in before

    # A watcher that notes when the kernel reports the VM's processes frozen.
    events = f"{V2}$(systemctl show -p ControlGroup --value scalebox-vm@{src_id})"
    s.sh(
        "systemd-run --quiet --unit=freeze-watch bash -c "
        + shlex.quote(f"for i in $(seq 3000); do grep -q 'frozen 1' {events}/cgroup.events "
                      "&& echo seen > /run/seen-frozen && break; sleep 0.01; done")
    )  # fmt: skip
    with open_session(s, port, "/root/one") as session:
        assert ask(session, "echo before") == "before"
        snap = s.api("POST", f"/vms/{src_id}/snapshot", json={"template_name": "snap-one"})
        assert snap.status_code == 201, snap.text
        # The same container process, running (not frozen), and the same SSH session.
        after = unit_props(s, src_id)
        assert after == before, (before, after)
        assert ask(session, "cat /home/user/note.txt") == "kept-by-the-snapshot"
    seen = s.sh("cat /run/seen-frozen; systemctl status freeze-watch", check=False).stdout
    assert seen.startswith("seen"), seen
    s.sh("systemctl stop freeze-watch 2>/dev/null || true")

    answer = snap.json()
    assert (answer["template"], answer["source_vm"]) == ("snap-one", src_id)
    disk = f"{TEMPLATES}/snap-one/disk"
    real = s.sh(f"find {disk} -type f -printf '%s\\n' | awk '{{n += $1}} END {{print n}}'")
    assert answer["size_bytes"] == int(real.stdout) > 100_000_000, (answer, real.stdout)
    # The VM's own identity stayed with it.
    assert s.sh(f"ls {disk}/etc/ssh/ | grep -c ssh_host_ || true").stdout.strip() == "0"
    assert s.sh(f"stat -c %s {disk}/etc/machine-id").stdout.strip() == "0"
    assert s.sh(f"test -e {disk}/home/user/.ssh/authorized_keys", check=False).returncode == 1

    # A VM made from the snapshot has the file, its own identity, and only its own key.
    copy = create(s, "from-snap", "snap-one", "/root/two")
    done = vm_ssh(s, "from-snap", "/root/two", "cat /home/user/note.txt; hostname")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["kept-by-the-snapshot", "from-snap"]
    copy_identity = vm_ssh(s, "from-snap", "/root/two", IDENTITY).stdout.split()
    # Its own machine id and its own ssh host key.
    assert len(copy_identity) == 2, copy_identity
    assert copy_identity[0] != src_identity[0] and copy_identity[1] != src_identity[1]
    assert s.ssh(int(str(copy["ssh_port"])), "/root/one", "true").returncode != 0
    # `scalebox vm ssh` exits with the command's exit code.
    assert vm_ssh(s, "from-snap", "/root/two", "exit 3").returncode == 3
    caps = vm_ssh(s, "from-snap", "/root/two", "/sbin/getcap /usr/local/bin/raw || "
                  "python3 -c 'import os; print(os.getxattr(\"/usr/local/bin/raw\", "
                  "\"security.capability\").hex())'")  # fmt: skip
    assert "cap_net_raw" in caps.stdout or "0100000200200000" in caps.stdout, caps

    # A snapshot of a VM made from a snapshot (ACLs systemd set on the journal named
    # the first VM's host ids: the copy failed with a 500).
    again = s.api("POST", f"/vms/{copy['id']}/snapshot", json={"template_name": "snap-two"})
    assert again.status_code == 201, again.text
    # In the VM the journal's ACL names its own group adm (4), as systemd-tmpfiles set it.
    acl = vm_ssh(s, "from-snap", "/root/two", "sudo python3 -c 'import os, struct; "
                 "v = os.getxattr(\"/var/log/journal\", \"system.posix_acl_access\"); "
                 "e = [struct.unpack_from(\"<HHI\", v, o) for o in range(4, len(v), 8)]; "
                 "print([i for t, p, i in e if t == 8])'")  # fmt: skip
    assert acl.stdout.strip() == "[4]", acl

    for vm_id in (str(copy["id"]), src_id):
        assert s.api("DELETE", f"/vms/{vm_id}").status_code == 204
    assert s.api("DELETE", "/templates/debian-base").status_code == 403
    assert s.api("DELETE", "/templates/snap-one").status_code == 204
    assert s.api("DELETE", "/templates/snap-two").status_code == 204
    assert s.sh(f"ls -A {TEMPLATES}").stdout.split() == ["debian-base"]


def test_a_snapshot_that_fails_on_a_full_disk_thaws_the_vm_and_leaves_nothing(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    src = create(s, "filler", "debian-base", "/root/one")
    src_id, port = str(src["id"]), int(str(src["ssh_port"]))
    before = unit_props(s, src_id)
    # A 1 MiB file system over the templates: the copy runs out of space.
    s.sh(f"mount -t tmpfs -o size=1M scalebox-full {TEMPLATES}")
    try:
        with open_session(s, port, "/root/one") as session:
            failed = s.api("POST", f"/vms/{src_id}/snapshot", json={"template_name": "too-big"})
            assert failed.status_code == 507, failed.text
            assert "the server's disk is full" in failed.json()["error"]
            assert "/var/lib/scalebox" not in failed.text  # the cause, not the server's paths
            assert unit_props(s, src_id) == before  # same PID, active, thawed
            assert ask(session, "echo still running") == "still running"
            assert s.sh(f"ls -A {TEMPLATES}").stdout == ""  # nothing half-made
    finally:
        s.sh(f"umount {TEMPLATES}")
    names = [t["name"] for t in s.api("GET", "/templates").json()["templates"]]
    assert names == ["debian-base"]
    assert s.api("DELETE", f"/vms/{src_id}").status_code == 204
    assert s.leftovers(src_id, port) == []


def test_vm_ssh_refuses_an_unknown_vm_with_one_line(sandbox: Sandbox) -> None:
    done = vm_ssh(sandbox, "no-such-vm", "/root/one", "true")
    assert done.returncode == 5
    assert done.stderr.strip().startswith("scalebox: error: VM 'no-such-vm' not found")
