"""Real sandboxes (VM_BACKEND=nspawn) on a real systemd server, reached with real OpenSSH.

One server per module (tools/sandbox.py): release A installed by install.sh,
VM_BACKEND=nspawn, the cached debian-base template unpacked, two keys made
with ssh-keygen in the machine; ssh runs there against HOST_IP.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from tools.machine import MACHINE_ENV
from tools.releases import NEWER_TEMPLATE, A, B, tarball_name
from tools.sandbox import Sandbox, sandbox_server

from .conftest import _skip_unless_able


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    _skip_unless_able()
    with sandbox_server(tmp_path_factory.mktemp("sandbox"), also=(B, NEWER_TEMPLATE)) as s:
        yield s


# Lines of each open session, read by a thread: select() on the pipe would
# miss a second line that readline() had already pulled into its buffer.
_LINES: dict[subprocess.Popen[str], queue.Queue[str]] = {}


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    if proc not in _LINES:
        _LINES[proc] = queue.Queue()
        threading.Thread(target=_pump, args=(proc, _LINES[proc]), daemon=True).start()
    try:
        return _LINES[proc].get(timeout=timeout).strip()
    except queue.Empty:
        raise AssertionError(f"no line from the ssh session within {timeout:.0f} s") from None


@contextlib.contextmanager
def open_session(s: Sandbox, port: int, key: str) -> Iterator[subprocess.Popen[str]]:
    """One long-lived SSH session (a remote bash reading commands from stdin)."""
    argv = ["nsenter", "-t", str(s.m.init_pid), "-a", "--", *s.ssh_argv(port, key, "bash")]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=MACHINE_ENV,
        bufsize=1,
    )  # fmt: skip
    try:
        yield proc
    finally:
        # EOF ends the remote bash and so ssh; killing nsenter would orphan its ssh child.
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        _LINES.pop(proc, None)


def ask(proc: subprocess.Popen[str], command: str, timeout: float = 30) -> str:
    assert proc.stdin is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return _readline(proc, timeout)


def test_a_vm_is_a_container_you_ssh_into_whose_session_survives_scaleboxd(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    keys = [s.public_key("/root/one"), s.public_key("/root/two")]
    # Two keys, CRLF-separated: either one logs in.
    body = {"template": "debian-base", "name": "box_1", "ssh_public_key": "\r\n".join(keys)}
    created = s.api("POST", "/vms", json=body)
    assert created.status_code == 201, created.text
    vm = created.json()
    vm_id, port = vm["id"], vm["ssh_port"]
    assert vm["ip"] == s.host_ip
    assert vm["ssh"] == f"ssh -p {port} user@{s.host_ip}"
    assert vm["status"] == "running"

    for key in ("/root/one", "/root/two"):
        done = s.ssh(port, key, "true")
        assert done.returncode == 0, done.stderr
    done = s.ssh(port, "/root/one", "sudo -n true && hostname && id -un && cat /etc/machine-id")
    assert done.returncode == 0, done.stderr
    hostname, user, machine_id = done.stdout.split()
    assert (hostname, user) == ("box-1", "user")
    # A booted container: systemd is its PID 1 and sshd runs as a service of it.
    done = s.ssh(port, "/root/one", "cat /proc/1/comm; systemctl is-active ssh")
    assert done.stdout.split() == ["systemd", "active"], done.stdout + done.stderr
    assert machine_id != s.sh("cat /etc/machine-id").stdout.strip()
    # Limits are properties of the VM's unit (whether the kernel enforces them
    # depends on the cgroup controllers the host gives; a nested test machine has none).
    props = s.sh(f"systemctl show scalebox-vm@{vm_id}.service -p MemoryMax,TasksMax").stdout
    assert "MemoryMax=2147483648" in props and "TasksMax=4096" in props

    # The same session, across a restart of scaleboxd: the forwarder lives outside it.
    forwarder = f"scalebox-ssh-{vm_id}.service"
    with open_session(s, port, "/root/one") as session:
        assert ask(session, "echo before $((20 + 22))") == "before 42"
        proxy_pid = s.sh(f"systemctl show -p MainPID --value {forwarder}").stdout.strip()
        daemon_pid = s.sh("systemctl show -p MainPID --value scaleboxd").stdout.strip()
        s.sh("systemctl restart scaleboxd")
        assert s.sh("systemctl show -p MainPID --value scaleboxd").stdout.strip() != daemon_pid
        assert ask(session, "echo after; hostname | tr -d '\\n'; echo") == "after"
        assert _readline(session, 10) == "box-1"
        assert s.sh(f"systemctl show -p MainPID --value {forwarder}").stdout.strip() == proxy_pid
    # After the restart the VM is re-adopted, not restarted, and still lets new sessions in.
    again = s.api("GET", f"/vms/{vm_id}").json()
    assert again["status"] == "running"
    assert s.ssh(port, "/root/two", "true").returncode == 0

    assert s.api("DELETE", f"/vms/{vm_id}").status_code == 204
    assert s.leftovers(vm_id, port) == []
    assert s.ssh(port, "/root/one", "true").returncode != 0
    assert s.api("GET", f"/vms/{vm_id}").status_code == 404
    # No program scaleboxd ran spoke to systemd in its name.
    assert "Got notification message" not in s.sh("journalctl -u scaleboxd -o cat").stdout


def _vms_dir(s: Sandbox) -> str:
    return s.sh("ls -A /var/lib/scalebox/vms; systemctl list-units --all --plain --no-legend "
                "'scalebox-vm@*' 'scalebox-ssh-*'; ip netns list").stdout  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"template": "nope"}, 404, "template nope not found"),
        ({"ssh_public_key": "ssh-ed25519 not-base64!"}, 400, "not base64"),
        ({"ssh_public_key": "hello world"}, 400, "unknown key type"),
        ({"mem_size_mib": 10}, 400, "mem_size_mib"),
    ],
)
def test_bad_create_requests_are_refused_and_leave_nothing(
    sandbox: Sandbox, body: dict[str, object], status: int, words: str
) -> None:
    s = sandbox
    good_key = s.public_key()
    before = _vms_dir(s)
    answer = s.api("POST", "/vms", json={"template": "debian-base", "ssh_public_key": good_key,
                                         **body})  # fmt: skip
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]
    assert _vms_dir(s) == before


def test_a_template_that_is_not_a_root_filesystem_is_refused_with_the_fix(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    s.sh("mkdir -p /var/lib/scalebox/templates/empty/disk")
    try:
        before = _vms_dir(s)
        key = s.public_key()
        answer = s.api("POST", "/vms", json={"template": "empty", "ssh_public_key": key})
        assert answer.status_code == 500, answer.text
        assert "not a root filesystem" in answer.json()["error"]
        assert "templates install" in answer.json()["hint"]
        assert _vms_dir(s) == before
    finally:
        s.sh("rm -rf /var/lib/scalebox/templates/empty")


def test_create_to_ssh_time(sandbox: Sandbox) -> None:
    """Not a pass/fail target here: prints the time from POST /vms to a working ssh."""
    s = sandbox
    key = s.public_key()
    started = time.monotonic()
    created = s.api("POST", "/vms", json={"template": "debian-base", "ssh_public_key": key})
    assert created.status_code == 201, created.text
    api_seconds = time.monotonic() - started
    vm = created.json()
    assert s.ssh(vm["ssh_port"], "/root/one", "true").returncode == 0
    total = time.monotonic() - started
    print(f"\nPOST /vms answered in {api_seconds:.2f} s; ssh true worked after {total:.2f} s")
    assert s.api("DELETE", f"/vms/{vm['id']}").status_code == 204
    assert s.leftovers(vm["id"], vm["ssh_port"]) == []


def test_orphan_forwarders_and_namespaces_are_cleaned_up_when_scaleboxd_starts(
    sandbox: Sandbox,
) -> None:
    """What a crash between delete's steps leaves (no VM record) is freed, one log line each."""
    s = sandbox
    stray, port = "vm-0123456789ab", 23999
    s.sh(
        f"ip netns add scalebox-{stray} && systemd-run --quiet --unit=scalebox-ssh-{stray} "
        f"--socket-property=ListenStream={port} /usr/lib/systemd/systemd-socket-proxyd "
        "10.187.255.2:22"
    )
    assert s.leftovers(stray, port) != []
    s.sh("systemctl restart scaleboxd")
    assert s.leftovers(stray, port) == []
    log = s.sh("journalctl -u scaleboxd -n 100 -o cat --no-pager").stdout
    assert (
        f"cleaned up orphan forwarder scalebox-ssh-{stray}, network namespace scalebox-{stray} "
        f"of VM {stray}: it is not in the state file"
    ) in log


def test_a_vm_whose_container_powers_off_is_reported_stopped_and_deletes_cleanly(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    created = s.api(
        "POST", "/vms", json={"template": "debian-base", "ssh_public_key": s.public_key()}
    )
    assert created.status_code == 201, created.text
    vm_id, port = created.json()["id"], created.json()["ssh_port"]
    # Its user also makes sure it never answers ssh again: at scaleboxd's next start its
    # boot fails after a minute, and that minute kept the API down (longer than systemd
    # waits: scaleboxd never started at all).
    s.ssh(port, "/root/one", "sudo systemctl mask ssh.service ssh.socket")
    s.ssh(port, "/root/one", "sudo systemctl poweroff")  # the session ends with the VM
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline and status != "stopped":
        status = s.api("GET", f"/vms/{vm_id}").json()["status"]
        time.sleep(0.5)
    assert status == "stopped"
    listed = {vm["id"]: vm["status"] for vm in s.api("GET", "/vms").json()["vms"]}
    assert listed[vm_id] == "stopped"

    started = time.monotonic()
    s.sh("systemctl restart scaleboxd")
    assert time.monotonic() - started < 20
    assert s.api("GET", "/health").status_code == 200
    # The boot goes on in the background; reads answer meanwhile.
    assert s.api("GET", f"/vms/{vm_id}").json()["status"] in {"stopped", "starting", "running"}
    # A delete waits for that boot to give up (up to a minute), then deletes.
    assert s.api("DELETE", f"/vms/{vm_id}").status_code == 204
    assert s.api("GET", f"/vms/{vm_id}").status_code == 404
    assert s.leftovers(vm_id, port) == []
    logged = s.sh("journalctl -u scaleboxd -o cat --no-pager").stdout
    assert "starting the guests of 1 stopped VM(s) while serving" in logged


def _update(s: Sandbox, args: str = "", env: str = "") -> dict[str, object]:
    """``scalebox-update --json ARGS`` in the machine; its JSON result (exit 0 asserted)."""
    done = s.sh(f"{env} scalebox-update --json {args}", check=False)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_an_ssh_session_survives_an_update_and_its_rollback_and_no_new_one_is_refused(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    created = s.api(
        "POST", "/vms", json={"template": "debian-base", "ssh_public_key": s.public_key()}
    )
    assert created.status_code == 201, created.text
    vm_id, port = created.json()["id"], created.json()["ssh_port"]
    pids = f"systemctl show -p MainPID --value scalebox-vm@{vm_id}.service scalebox-ssh-{vm_id}"
    # New connections all along the update: one `ssh true` every 0.2 s, each result logged.
    loop = " ".join(s.ssh_argv(port, "/root/one", "true"))
    s.sh(
        "rm -f /run/ssh-loop.log /run/ssh-loop.stop; systemd-run --quiet --unit=ssh-loop "
        f"bash -c 'until [ -e /run/ssh-loop.stop ]; do if {loop}; then echo ok; else echo refused; "
        "fi >> /run/ssh-loop.log; sleep 0.2; done'"
    )
    with open_session(s, port, "/root/one") as session:
        assert ask(session, "echo before") == "before"
        before = s.sh(pids).stdout
        result = _update(s, env=f"SCALEBOX_RELEASE_URL=/mnt/release/{tarball_name(B)}")
        assert (result["result"], result["target"]) == ("updated", B)
        assert s.sh("cat /etc/scaleboxd/version").stdout.strip() == B
        assert ask(session, "echo after the update") == "after the update"
        result = _update(s, "--rollback")
        assert result["target"] == A
        assert ask(session, "echo after the rollback") == "after the rollback"
        assert s.sh(pids).stdout == before  # the container and its forwarder were never restarted
    s.sh("touch /run/ssh-loop.stop; while systemctl is-active -q ssh-loop; do sleep 0.2; done")
    results = s.sh("cat /run/ssh-loop.log").stdout.split()
    assert len(results) >= 5 and results.count("refused") == 0, results
    print(f"\n{len(results)} new SSH connections during update and rollback, 0 refused")
    assert s.api("DELETE", f"/vms/{vm_id}").status_code == 204
    assert s.leftovers(vm_id, port) == []


def test_an_update_to_a_release_with_a_newer_template_names_the_rebuild_and_rebuilds_nothing(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    templates = "/opt/scalebox/current/venv/bin/python -m scalebox.daemon.vms.templates"
    created = s.api(
        "POST", "/vms", json={"template": "debian-base", "ssh_public_key": s.public_key()}
    )
    assert created.status_code == 201, created.text
    vm_id, port = created.json()["id"], created.json()["ssh_port"]
    pid = f"systemctl show -p MainPID --value scalebox-vm@{vm_id}.service"
    template_json = "cat /var/lib/scalebox/templates/debian-base/template.json"
    before = (s.sh(pid).stdout, s.sh(template_json).stdout)
    assert s.sh(f"{templates} status", check=False).returncode == 0

    result = _update(s, env=f"SCALEBOX_RELEASE_URL=/mnt/release/{tarball_name(NEWER_TEMPLATE)}")
    assert (result["result"], result["target"]) == ("updated", NEWER_TEMPLATE)
    said = str(result.get("template"))
    assert "scalebox.daemon.vms.templates rebuild" in said, result
    assert str(result["message"]).endswith(said)  # the last thing a person reads
    assert s.sh(f"{templates} status", check=False).returncode == 3
    # Nothing was rebuilt: the old template and the running VM are as they were.
    assert (s.sh(pid).stdout, s.sh(template_json).stdout) == before
    assert s.ssh(port, "/root/one", "echo still").stdout.strip() == "still"

    result = _update(s, "--rollback")
    assert result["target"] == A and "template" not in result, result
    assert s.sh(f"{templates} status", check=False).returncode == 0
    assert s.api("DELETE", f"/vms/{vm_id}").status_code == 204
    assert s.leftovers(vm_id, port) == []


def test_a_template_that_does_not_boot_fails_the_create_fast_and_leaves_nothing(
    sandbox: Sandbox,
) -> None:
    s = sandbox
    # A copy of debian-base whose init exits at once: looks bootable, is not.
    s.sh(
        "cp -a --reflink=auto /var/lib/scalebox/templates/debian-base /var/lib/scalebox/templates/"
        "broken && printf '#!/bin/sh\\nexit 3\\n' > "
        "/var/lib/scalebox/templates/broken/disk/usr/lib/systemd/systemd"
    )
    try:
        before = _vms_dir(s)
        started = time.monotonic()
        answer = s.api(
            "POST", "/vms", json={"template": "broken", "ssh_public_key": s.public_key()}
        )
        seconds = time.monotonic() - started
        assert answer.status_code == 500, answer.text
        assert "did not start" in answer.json()["error"]
        assert seconds < 30, f"took {seconds:.0f} s to notice"
        assert _vms_dir(s) == before
    finally:
        s.sh("rm -rf /var/lib/scalebox/templates/broken")
