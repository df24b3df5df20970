"""A test server running real sandboxes (VM_BACKEND=nspawn), for system tests and the bench.

    with sandbox_server(scratch) as s:          # boots, installs, switches to nspawn
        vm = s.api("POST", "/vms", json={...}).json()
        s.ssh(vm["ssh_port"], "/root/one", "true")

The machine is booted with a root server's capabilities (--capability=all,
which containers inside it need) and the cached debian-base template
(tools/image.py) bound read-only at /mnt/template. The release is installed
with install.sh --template as on an offline server (VM_BACKEND=nspawn, the
default; see docs/operations.md). DATA_DIR (/var/lib/scalebox) is an ext4
file system of its own, as on a server's disk: the machine's root is an
overlay, which the kernel cannot idmap, so VMs there would run without
user namespaces (see idmap.py). Two ed25519 keys,
/root/one and /root/two, are made with ssh-keygen; ssh runs inside the
machine against HOST_IP (the machine's own address), as a user elsewhere would.
``Sandbox.outside()`` adds "the outside" for the VM network tests: a network
namespace inside the machine (TEST-NET-1) with a listener that answers each
connection with the address it came from (and logs UDP datagrams).
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
from tools.releases import ROOT, VARIANTS, A, broken_copy, build_tarball, tarball_name

TEMPLATE = "/mnt/template/debian-base.tar.gz"
SSH_OPTS = (
    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes "
    "-o LogLevel=ERROR -o ConnectTimeout=10"
)
KEYS = ("/root/one", "/root/two")
# A sparse image in the machine's (tmpfs) root: it takes only what is written.
DATA_DISK = (
    "truncate -s 64G /var/lib/scalebox.img && "
    "mkfs.ext4 -q -E lazy_itable_init=1,lazy_journal_init=1 /var/lib/scalebox.img && "
    "mkdir -p /var/lib/scalebox && mount -o loop /var/lib/scalebox.img /var/lib/scalebox"
)
# The loop devices of this server's VM disks ("NAME BACK-FILE" lines). Loop devices
# are the host kernel's, so `losetup -a` in one machine also lists every other
# machine's: only those backed by a file on this machine's DATA_DIR are ours.
OUR_LOOPS = (
    "d=$(mountpoint -d /var/lib/scalebox) && losetup -l -n -O NAME,BACK-MAJ:MIN,BACK-FILE"
    " | awk -v d=\"$d\" '$2 == d {print $1, $3}'"
)
# "The outside" of the VM network tests: a network namespace inside the test
# machine, at the end of a veth, with TEST-NET-1 (RFC 5737) addresses. Traffic
# a VM sends "out" ends there; nothing leaves our machines.
OUTSIDE_NS = "sb-outside"
OUTSIDE_LINK = "sbout"
OUTSIDE_GATEWAY = "192.0.2.1"  # the test server's end: what a masqueraded VM shows as
OUTSIDE_ADDR = "192.0.2.2"  # the listener
OUTSIDE_PORT = 9000
OUTSIDE_UNIT = "sb-outside-listener"
OUTSIDE_UDP_LOG = "/run/sb-outside-udp.log"
# Answers each TCP connection with the source address it came from, then closes
# it; writes each UDP datagram to the same port as "<source> <payload>" to the log.
PEER_ECHO = (
    "import socket, threading\n"
    "def udp():\n"
    "    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    f"    u.bind(('{OUTSIDE_ADDR}', {OUTSIDE_PORT}))\n"
    "    while True:\n"
    "        data, peer = u.recvfrom(512)\n"
    f"        with open('{OUTSIDE_UDP_LOG}', 'a') as log:\n"
    "            log.write(peer[0] + ' ' + data.decode(errors='replace') + '\\n')\n"
    "threading.Thread(target=udp, daemon=True).start()\n"
    f"srv = socket.create_server(('{OUTSIDE_ADDR}', {OUTSIDE_PORT}))\n"
    "while True:\n"
    "    conn, peer = srv.accept()\n"
    "    conn.sendall(peer[0].encode() + b'\\n')\n"
    "    conn.close()\n"
)


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

    @contextlib.contextmanager
    def outside(self) -> Iterator[str]:
        """Yield the address of a listener "outside" the server; it answers with the peer.

        A namespace of the harness's own inside the test machine (OUTSIDE_NS),
        with a default route back through the machine, so that without NAT it
        would see (and answer) a VM's own address. Removed afterwards.
        """
        ns, link = OUTSIDE_NS, OUTSIDE_LINK
        setup = (
            f"ip netns add {ns}; "
            f"ip link add {link} type veth peer name eth0 netns {ns}; "
            f"ip addr add {OUTSIDE_GATEWAY}/24 dev {link}; ip link set {link} up; "
            f"ip -n {ns} addr add {OUTSIDE_ADDR}/24 dev eth0; ip -n {ns} link set eth0 up; "
            f"ip -n {ns} link set lo up; ip -n {ns} route add default via {OUTSIDE_GATEWAY}"
        )
        try:
            self.sh(f"set -e; {setup}")
            # The guard: the address must be ours, at the end of our veth.
            route = self.sh(f"ip -o route get {OUTSIDE_ADDR}").stdout
            if f" dev {link} " not in route:
                raise AssertionError(f"refusing to send to {OUTSIDE_ADDR}: routed as {route!r}")
            self.m.run(["systemd-run", "--quiet", f"--unit={OUTSIDE_UNIT}", "--collect",
                        "ip", "netns", "exec", ns, "python3", "-c", PEER_ECHO])  # fmt: skip
            self.sh(
                f"for _ in $(seq 100); do ip netns exec {ns} ss -ltnH "
                f"'sport = :{OUTSIDE_PORT}' | grep -q . && exit 0; sleep 0.1; done; exit 1"
            )
            yield OUTSIDE_ADDR
        finally:
            self.sh(
                f"systemctl stop {OUTSIDE_UNIT} 2>/dev/null; rm -f {OUTSIDE_UDP_LOG}; "
                f"ip netns del {ns} 2>/dev/null; "
                f"ip link del {link} 2>/dev/null; true"
            )

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
            "mount": f"grep -F /vms/{vm_id}/ /proc/self/mountinfo",
            "loop device": f"{{ {OUR_LOOPS}; }} | grep -F /vms/{vm_id}/",
            "port": f"ss -ltnH 'sport = :{port}'",
            # The short-lived holders of a VM's user namespace (idmap.userns).
            "userns child": "pgrep -a -x unshare",
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
            src = broken_copy(scratch, version) if version in VARIANTS else ROOT
            build_tarball(release, keys / "release.key", version, src)
    (release / "install.sh").write_bytes((ROOT / "scripts/install.sh").read_bytes())
    cached = image.ensure_template()
    with contextlib.suppress(FileNotFoundError):
        (template / "debian-base.tar.gz").unlink()
    os.link(cached, template / "debian-base.tar.gz")
    with Machine.boot(
        release, keep=keep, all_capabilities=True, binds_ro=[(template, "/mnt/template")]
    ) as m:
        m.run(["bash", "-c", DATA_DISK])
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
