"""A test server running real sandboxes (VM_BACKEND=nspawn), for system tests and the bench.

    with sandbox_server(scratch) as s:          # boots, installs, switches to nspawn
        vm = s.api("POST", "/vms", json={...}).json()
        s.ssh(vm["ssh_port"], "/root/one", "true")

The machine is booted with a root server's capabilities (--capability=all,
which containers inside it need) and the cached debian-base template
(tools/image.py) bound read-only at /mnt/template. The release is installed
with install.sh --template as on an offline server (VM_BACKEND=nspawn, the
default; see docs/operations.md). Two ed25519 keys,
/root/one and /root/two, are made with ssh-keygen; ssh runs inside the
machine against HOST_IP (the machine's own address), as a user elsewhere would.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shlex
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from tools import image, keygen
from tools.machine import MACHINE_ENV, Machine
from tools.releases import ROOT, A, build_tarball, tarball_name

TEMPLATE = "/mnt/template/debian-base.tar.gz"
SSH_OPTS = (
    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes "
    "-o LogLevel=ERROR -o ConnectTimeout=10"
)
KEYS = ("/root/one", "/root/two")


class Sandbox:
    """The installed server: its API, shell, and ssh from inside it."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.token = self._config_value("API_TOKEN")
        self.host_ip = self._config_value("HOST_IP")

    def _config_value(self, key: str) -> str:
        return self.m.run(["sed", "-n", f"s/^{key}=//p", "/etc/scaleboxd/config"]).stdout.strip()

    def api(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.request(
            method,
            self.m.url(8080, path),
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=120,
            **kwargs,  # type: ignore[arg-type]
        )

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.m.run(["bash", "-c", script], check=check, timeout=300)

    def public_key(self, key: str = KEYS[0]) -> str:
        return self.sh(f"cat {key}.pub").stdout.strip()

    def ssh_argv(self, port: int, key: str, *command: str) -> list[str]:
        return ["ssh", *shlex.split(SSH_OPTS), "-p", str(port), "-i", key,
                f"user@{self.host_ip}", *command]  # fmt: skip

    def ssh(self, port: int, key: str, command: str) -> subprocess.CompletedProcess[str]:
        return self.m.run(self.ssh_argv(port, key, command), check=False, timeout=60)

    def leftovers(self, vm_id: str, port: int) -> list[str]:
        """What is still around of VM ``vm_id`` on the server (empty when nothing)."""
        hexid = vm_id.removeprefix("vm-")
        checks = {
            "unit": f"systemctl list-units --all --plain --no-legend 'scalebox-*{vm_id}*'",
            "runtime limits": f"ls -d /run/systemd/system.control/*{vm_id}* 2>/dev/null",
            "container": f"pgrep -a -x systemd-nspawn | grep -F {vm_id}",
            "netns": f"ip netns list | grep -F {vm_id}",
            "veth": f"ip -br link | grep -F vm{hexid}",
            "disk": f"ls -d /var/lib/scalebox/vms/{vm_id} 2>/dev/null",
            "port": f"ss -ltnH 'sport = :{port}'",
        }
        left = []
        for what, script in checks.items():
            out = self.sh(f"{script} || true").stdout.strip()
            if out:
                left.append(f"{what}: {out}")
        return left


@contextlib.contextmanager
def sandbox_server(
    scratch: Path, *, keep: bool = False, also: tuple[str, ...] = ()
) -> Iterator[Sandbox]:
    """Boot a machine with release A installed (VM_BACKEND=nspawn); torn down after.

    ``also``: more release versions built with the same key into /mnt/release
    (e.g. B, to update to).
    """
    release, keys, template = scratch / "release", scratch / "keys", scratch / "template"
    for folder in (release, keys, template):
        folder.mkdir(parents=True, exist_ok=True)
    if not (keys / "release.key").is_file():
        keygen.keygen(keys)
    for version in (A, *also):
        if not (release / tarball_name(version)).is_file():
            build_tarball(release, keys / "release.key", version)
    (release / "install.sh").write_bytes((ROOT / "scripts/install.sh").read_bytes())
    cached = image.ensure_template()
    with contextlib.suppress(FileNotFoundError):
        (template / "debian-base.tar.gz").unlink()
    os.link(cached, template / "debian-base.tar.gz")
    with Machine.boot(
        release, keep=keep, all_capabilities=True, binds_ro=[(template, "/mnt/template")]
    ) as m:
        m.run(["bash", "/mnt/release/install.sh", "--template", TEMPLATE,
               f"/mnt/release/{tarball_name(A)}"], timeout=600)  # fmt: skip
        for key_path in KEYS:
            m.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key_path])
        yield Sandbox(m)


class SshSession:
    """One long-lived SSH session into a VM: a remote bash reading commands from stdin.

    ssh runs inside the machine (nsenter), as a user on the server would run it.
    Lines are read by a thread: select() on the pipe would miss a second line
    that readline() had already pulled into its buffer.
    """

    def __init__(self, m: Machine, argv: list[str]) -> None:
        assert m.init_pid is not None, "the machine is not running"
        self.proc = subprocess.Popen(
            ["nsenter", "-t", str(m.init_pid), "-a", "--", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env=MACHINE_ENV,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def ask(self, command: str, timeout: float = 30) -> str:
        """Run ``command`` in the session; its first output line (None: the session is gone)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return self.lines.get(timeout=timeout).strip()
        except (BrokenPipeError, queue.Empty):
            return ""

    def close(self) -> None:
        # EOF ends the remote bash and so ssh; killing nsenter would orphan its ssh child.
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
