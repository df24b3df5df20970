"""The nspawn backend: each VM a booted Debian container you ssh into.

Per VM ``vm-<hex>``, all named after its id so nothing is ever guessed:

- its root filesystem ``DATA_DIR/vms/<id>/disk``, a copy of its template's
  (``cp --reflink=auto``: shared blocks on btrfs/XFS, a full copy elsewhere);
- a network namespace ``scalebox-<id>`` joined to the host by the veth pair
  ``vm<hex>`` (host, ``.1`` of the VM's /30 of VM_NETWORK, in the interface
  group the firewall rules of network.py match) and ``eth0`` (VM, ``.2``),
  configured before the container boots;
- ``scalebox-vm@<id>.service``: its ExecStart (``scaleboxd --run-guest``)
  execs ``systemd-nspawn --boot`` (see ``nspawn_argv``); the container's
  processes live in that unit's cgroup, with MemoryMax, CPUQuota and
  TasksMax set as runtime properties, so restarting scaleboxd never touches it;
- ``scalebox-ssh-<id>.socket`` + ``.service``: transient units made with
  systemd-run, ``systemd-socket-proxyd`` from host port ``ssh_port`` to
  ``<VM address>:22``, outside scaleboxd's process and cgroup, so an open
  SSH session survives restarts and updates of scaleboxd.

Deleting a VM stops and removes all of them (``release``).

A snapshot (``copy_for_snapshot``) freezes the VM's unit (the cgroup v2
freezer stops every process of the container where it is), copies its
disk, thaws it again whatever the copy did, and removes from the copy what
makes a VM itself (``forget_identity``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from scalebox.config import ServerConfig
from scalebox.daemon.errors import ApiError
from scalebox.daemon.vms import disks, idmap, network
from scalebox.daemon.vms.backend import GuestStatus, SystemdBackend, unit_name
from scalebox.daemon.vms.command import CommandFailed, run
from scalebox.daemon.vms.models import VM
from scalebox.daemon.vms.naming import VM_ID_RE
from scalebox.daemon.vms.state import read_vm_record

SOCKET_PROXYD = "/usr/lib/systemd/systemd-socket-proxyd"
NETNS_PREFIX = "scalebox-"
GUEST_IF = "eth0"
SSH_BANNER = b"SSH-"
# Where the cgroup v2 hierarchy is: /sys/fs/cgroup when it is the only one
# (unified, as on Debian 12), /sys/fs/cgroup/unified beside the v1 ones (hybrid).
CGROUP_V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
FREEZE_TIMEOUT = 30.0
MAX_HOSTNAME_LEN = 63
GIB = 1024**3
PROBE_DIR = ".userns-probe"

log = logging.getLogger("scaleboxd")


class NoFreeAddress(ApiError):
    """Every /30 of VM_NETWORK is taken."""

    status = 503


# --- pure decisions ----------------------------------------------------------------


def netns_name(vm_id: str) -> str:
    return f"{NETNS_PREFIX}{vm_id}"


def host_if(vm_id: str) -> str:
    """The host end of the VM's veth: ``vm`` + 12 hex = 14 characters (the limit is 15)."""
    return "vm" + vm_id.removeprefix("vm-")


def forwarder_unit(vm_id: str) -> str:
    """The transient units' name without suffix: ``<it>.socket`` and ``<it>.service``."""
    return f"scalebox-ssh-{vm_id}"


def parse_forwarders(listing: str) -> list[str]:
    """Forwarder unit names (without suffix) in ``systemctl list-units --plain --no-legend``."""
    names = []
    for line in listing.splitlines():
        unit = line.split(maxsplit=1)[0] if line.strip() else ""
        stem, _, suffix = unit.rpartition(".")
        vm_id = stem.removeprefix("scalebox-ssh-")
        if (
            suffix in ("socket", "service")
            and stem.startswith("scalebox-ssh-")
            and (VM_ID_RE.fullmatch(vm_id))
        ):
            names.append(stem)
    return sorted(set(names))


def slot_addresses(network: str, index: int) -> tuple[str, str]:
    """(host side, VM side) addresses of /30 number ``index`` of ``network``."""
    net = ipaddress.IPv4Network(network)
    base = int(net.network_address) + 4 * index
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def pick_guest_ip(network: str, used: set[str]) -> str | None:
    """The VM address of the lowest free /30 of ``network``, or None when all are taken."""
    slots = ipaddress.IPv4Network(network).num_addresses // 4
    for index in range(slots):
        guest = slot_addresses(network, index)[1]
        if guest not in used:
            return guest
    return None


def host_side_of(guest_ip: str) -> str:
    """The host end's address of the /30 that ``guest_ip`` (its ``.2``) is in."""
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address(guest_ip)) - 1))


def hostname_for(name: str) -> str:
    """A VM name as a valid hostname: letters, digits and '-' (names may hold '_')."""
    host = re.sub(r"[^a-zA-Z0-9-]", "-", name).strip("-")[:MAX_HOSTNAME_LEN].strip("-")
    return host or "vm"


def nspawn_argv(rootfs: Path, vm_id: str, hostname: str, uid_base: int = 0) -> list[str]:
    """The command scalebox-vm@<id>.service runs (by exec) for an nspawn VM.

    With ``uid_base`` the container gets a user namespace mapping its UIDs
    0..65535 to the host's ``uid_base``.. (its files are already seen so,
    see disks.mount_layers: nothing to chown). It then enters the VM's
    network namespace through nsenter before nspawn starts, not with
    ``--network-namespace-path``: systemd 252 joins that one after making
    the user namespace, where it may not (EPERM). So the network namespace
    stays the host's, and root in the container has no power over it: it
    cannot change its address or routes, nor open raw sockets.
    """
    if uid_base:
        network = [f"--private-users={uid_base}:{idmap.RANGE}", "--private-users-ownership=off"]
        enter = ["nsenter", f"--net=/run/netns/{netns_name(vm_id)}", "--"]
    else:
        network = [f"--network-namespace-path=/run/netns/{netns_name(vm_id)}"]
        enter = []
    return [
        *enter,
        "systemd-nspawn",
        "--quiet",
        "--boot",
        # The unit is the container's cgroup (Delegate=yes): its limits are the VM's.
        "--keep-unit",
        "--register=no",
        f"--machine={vm_id}",
        f"--hostname={hostname}",
        f"--directory={rootfs}",
        *network,
        "--link-journal=no",
        "--console=read-only",  # the container's boot messages go to the unit's journal
    ]


def limit_properties(vm: VM, pids_max: int) -> list[str]:
    """Unit properties that bound the VM: memory, CPUs, processes."""
    return [
        f"MemoryMax={vm.mem_size_mib}M",
        f"CPUQuota={vm.vcpu_count * 100}%",
        f"TasksMax={pids_max}",
    ]


def hosts_file(hostname: str) -> str:
    # sudo resolves its own hostname; without this line every sudo waits for DNS.
    return f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost\n"


# What makes a VM itself rather than its template: made anew for each VM
# (host keys at its first boot by the template's ssh drop-in, the rest by
# prepare_disk or systemd), so a snapshot template must not carry them.
IDENTITY_FILES = (
    "etc/ssh/ssh_host_*",
    "home/user/.ssh/authorized_keys",
    "var/lib/systemd/random-seed",
    "var/lib/systemd/credential.secret",
    "var/lib/dbus/machine-id",
)


def through_symlink(rootfs: Path, rel: str) -> bool:
    """Whether a directory on the way from ``rootfs`` to ``rel`` is a symlink (or not a dir).

    A guest owns its tree: a symlink it plants at ``etc`` or ``home/user``
    points, for the host that copies or edits the tree, into the host's own
    files. Nothing may be written or removed through one.
    """
    path = rootfs
    for part in Path(rel).parent.parts:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            return True
    return False


def forget_identity(rootfs: Path) -> list[str]:
    """Remove a VM's own identity from a copy of its disk; return what was removed.

    Host keys, authorized keys, random seed and the D-Bus machine id go; the
    machine id is emptied (systemd makes one at boot, scalebox writes one when
    a VM is made from the copy). Never follows a symlink the guest planted:
    what is behind one is not in the tree and is left alone.
    """
    removed = []
    for pattern in IDENTITY_FILES:
        if through_symlink(rootfs, pattern):
            continue
        for path in sorted(rootfs.glob(pattern)):
            if path.is_symlink() or path.is_file():
                path.unlink()
                removed.append(str(path.relative_to(rootfs)))
    if not through_symlink(rootfs, "etc/machine-id"):
        _write_new(rootfs / "etc/machine-id", "", 0o444)
    return removed


def parse_props(text: str) -> dict[str, str]:
    """``systemctl show -p ...`` output as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def cgroup_v2_root(roots: tuple[Path, ...] = CGROUP_V2_ROOTS) -> Path | None:
    """The mount point of the cgroup v2 hierarchy, unified or hybrid; None without one."""
    for root in roots:
        if (root / "cgroup.procs").is_file() and (root / "cgroup.subtree_control").is_file():
            return root
    return None


def is_frozen(cgroup: Path) -> bool:
    """Whether every process of ``cgroup`` is frozen (``frozen 1`` in cgroup.events)."""
    try:
        return "frozen 1" in (cgroup / "cgroup.events").read_text().splitlines()
    except OSError:
        return False


def freeze_asked(cgroup: Path) -> bool:
    """Whether ``cgroup`` is asked to freeze (``1`` in cgroup.freeze), done or not yet."""
    try:
        return (cgroup / "cgroup.freeze").read_text().strip() == "1"
    except OSError:
        return False


def set_frozen(cgroup: Path, frozen: bool, what: str, timeout: float = FREEZE_TIMEOUT) -> None:
    """Freeze or thaw ``cgroup`` (cgroup v2 freezer) and wait until the kernel has done it.

    The kernel's freezer rather than ``systemctl freeze``: systemd freezes
    only on a unified hierarchy, the kernel's v2 freezer works on a hybrid
    one too (as in our test machines). systemd's FreezerState does not see it.
    """
    try:
        (cgroup / "cgroup.freeze").write_text("1" if frozen else "0")
    except OSError as exc:
        raise CommandFailed(
            f"could not {what}: {cgroup}/cgroup.freeze: {exc.strerror}",
            "the host needs cgroup v2 (the unified hierarchy)",
        ) from None
    deadline = time.monotonic() + timeout
    while is_frozen(cgroup) != frozen:
        if time.monotonic() > deadline:
            if frozen:  # never leave it half frozen
                with contextlib.suppress(OSError):
                    (cgroup / "cgroup.freeze").write_text("0")
            raise CommandFailed(f"could not {what}: not done after {timeout:.0f} s",
                                "see the VM's processes: systemd-cgls " + str(cgroup))  # fmt: skip
        time.sleep(0.005)


# --- the backend ---------------------------------------------------------------------


def _user_ids(rootfs: Path, user: str) -> tuple[int, int]:
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise CommandFailed(
        f"the template has no account {user!r} (no line in /etc/passwd)",
        "rebuild the template: python -m scalebox.daemon.vms.templates build FILE",
    )


def _write_new(
    path: Path, text: str, mode: int = 0o644, owner: tuple[int, int] | None = None
) -> None:
    """Replace ``path`` with a new regular file; never follows a symlink at ``path``."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        if owner is not None:
            os.fchown(f.fileno(), *owner)
        os.fchmod(f.fileno(), mode)


def _mirror_dir(
    lower: Path | None, upper: Path, owner: tuple[int, int], mode: int, base: int = 0
) -> None:
    """Make ``upper`` with the owner (+ ``base``) and mode of ``lower``, or the defaults."""
    upper.mkdir(parents=True)
    real = lower is not None and lower.is_dir() and not lower.is_symlink()
    st = lower.lstat() if lower is not None and real else None
    os.chown(upper, *((st.st_uid + base, st.st_gid + base) if st else owner))
    upper.chmod(stat.S_IMODE(st.st_mode) if st else mode)


def ssh_banner(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether an SSH server answers its banner at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(64).startswith(SSH_BANNER)
    except OSError:
        return False


class NspawnBackend:
    """systemd-nspawn containers in scalebox-vm@ units; needs root and systemd."""

    ready_timeout = 60.0

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._vms_dir = config.data_dir / "vms"
        self._units = SystemdBackend()
        # Whether new VMs get a user namespace (their root an unprivileged UID on
        # the host): not until check_user_namespaces has seen that they can.
        self.user_namespaces = False

    def check_user_namespaces(self) -> None:
        """Try what a VM with a user namespace needs (idmap.probe); one warning if it fails."""
        why_not = idmap.probe(self._config.data_dir / PROBE_DIR)
        self.user_namespaces = why_not is None
        if why_not is not None:
            log.warning("new VMs get no user namespace, root in a VM is root on the host: %s",
                        why_not)  # fmt: skip

    # -- the Backend interface

    def make_disk(self, vm: VM, template_disk: Path, vm_dir: Path) -> None:
        """An ext4 image of disk_size_gib holding what makes the template this VM.

        The image holds the overlay's upper/ (its own keys, hostname, hosts,
        machine id; the directories on their way with the template's owners
        and modes, as an upper directory's attributes win) and work/. Nothing
        is copied from the template: it becomes the read-only lower layer when
        the VM starts (``_mount``).
        """
        for rel in ("etc/hostname", "home/user"):
            if through_symlink(template_disk, rel):
                raise CommandFailed(
                    f"the template's {Path(rel).parent} is a symlink or not a directory",
                    "make VMs from another template; delete this one if a snapshot made it",
                )
        base = vm.uid_base  # its upper layer holds the VM's UIDs as the host sees them
        uid, gid = _user_ids(template_disk, "user")
        uid, gid, root = uid + base, gid + base, (base, base)
        staging = vm_dir / "staging"
        upper = staging / "upper"
        upper.mkdir(parents=True)
        os.chown(upper, *root)  # the root directory of the VM
        for rel, owner, mode in (
            ("etc", root, 0o755),
            ("home", root, 0o755),
            ("home/user", (uid, gid), 0o755),
        ):
            _mirror_dir(template_disk / rel, upper / rel, owner, mode, base)
        _mirror_dir(None, upper / "home/user/.ssh", (uid, gid), 0o700)  # always ours, for sshd
        _write_new(upper / "home/user/.ssh/authorized_keys", vm.ssh_public_key + "\n", 0o600,
                   (uid, gid))  # fmt: skip
        hostname = hostname_for(vm.name)
        _write_new(upper / "etc/hostname", hostname + "\n", owner=root)
        _write_new(upper / "etc/hosts", hosts_file(hostname), owner=root)
        _write_new(upper / "etc/machine-id", secrets.token_hex(16) + "\n", 0o444, root)
        (staging / "work").mkdir()
        (vm_dir / disks.LAYER_FILE).write_text(disks.layer_of(template_disk) + "\n")
        disks.make_image(vm_dir / disks.IMAGE, vm.disk_size_gib * GIB, staging)
        disks.remove_tree(staging)
        (vm_dir / disks.FS_DIR).mkdir()
        (vm_dir / disks.ROOT_DIR).mkdir()

    def start(self, vm_id: str) -> int | None:
        vm = self._record(vm_id)
        # Again before each VM: rules flushed by someone else come back.
        network.apply(self._config.vm_network)
        self._mount(vm)
        self._network_up(vm)
        unit = unit_name(vm_id)
        props = limit_properties(vm, self._config.vm_pids_max)
        run(["systemctl", "set-property", "--runtime", unit, *props],
            f"set the limits of VM {vm_id}")  # fmt: skip
        pid = self._units.start(vm_id)
        self._forwarder_up(vm)
        return pid

    def answers(self, vm: VM) -> bool:
        """The whole path works: host port -> forwarder -> VM's sshd sends its banner."""
        return ssh_banner("127.0.0.1", vm.ssh_port)

    def stop(self, vm_id: str, pid: int | None) -> None:
        self._units.stop(vm_id, pid)

    def release(self, vm_id: str) -> None:
        """Remove everything of a stopped VM but its disk: forwarder, network, limits."""
        name = forwarder_unit(vm_id)
        for unit in (f"{name}.socket", f"{name}.service"):
            with contextlib.suppress(CommandFailed):
                run(["systemctl", "stop", unit], f"stop {unit}")
            with contextlib.suppress(CommandFailed):
                run(["systemctl", "reset-failed", unit], f"reset {unit}")
        self._network_down(vm_id)
        with contextlib.suppress(CommandFailed):
            run(["systemctl", "revert", unit_name(vm_id)], f"remove the limits of VM {vm_id}")
        disks.unmount_layers(self._vms_dir / vm_id)

    def status(self, vm_id: str, pid: int | None) -> GuestStatus:
        return self._units.status(vm_id, pid)

    def status_many(self, last_pids: Mapping[str, int | None]) -> dict[str, GuestStatus]:
        return self._units.status_many(last_pids)

    def list_running(self) -> dict[str, int | None]:
        return self._units.list_running()

    def recent_output(self, vm_id: str) -> str:
        return self._units.recent_output(vm_id)

    def adopt(self, vm: VM) -> None:
        """A VM that runs since before scaleboxd started: make sure its forwarder does too.

        A VM left frozen (scaleboxd killed in the middle of a snapshot) is thawed.
        """
        cgroup = self._cgroup(vm.id) if cgroup_v2_root() is not None else None
        # Asked, not only done: a freeze scaleboxd asked for just before it was killed
        # may complete after this look, and the VM would stay frozen for good.
        if cgroup is not None and (freeze_asked(cgroup) or is_frozen(cgroup)):
            set_frozen(cgroup, False, f"thaw VM {vm.id} left frozen by a snapshot")
        self._forwarder_up(vm)

    def copy_for_snapshot(self, vm: VM, disk: Path, target: Path) -> None:
        """Copy ``disk`` with the VM frozen, thaw it whatever happened, then forget its identity.

        Frozen (the cgroup freezer of its unit), no process of the container
        runs, so the copy is one moment of its files: what programs have
        written, not what they still hold in memory; as consistent as a power
        cut. A VM that does not run is copied as it is.
        """
        cgroup = self._cgroup(vm.id)
        if cgroup is None:
            mounted_here = not disks.is_mounted(disk)
            self._mount(vm)  # a stopped VM's root is its template plus its own layer
            try:
                disks.copy_tree(disk, target)
            finally:
                if mounted_here:
                    disks.unmount_layers(disk.parent)
        else:
            set_frozen(cgroup, True, f"freeze VM {vm.id} for its snapshot")
            try:
                disks.copy_tree(disk, target)
            finally:
                set_frozen(cgroup, False, f"thaw VM {vm.id} after its snapshot")
        if vm.uid_base:
            # Its overlay shows the VM's UIDs as the host sees them; a template holds them as is.
            idmap.unshift_tree(target, vm.uid_base)
        forget_identity(target)

    def _cgroup(self, vm_id: str) -> Path | None:
        """The cgroup directory of the VM's unit while it runs, else None."""
        unit = unit_name(vm_id)
        argv = ["systemctl", "show", "-p", "ActiveState,ControlGroup", unit]
        props = parse_props(run(argv, f"read the state of {unit}"))
        group = props.get("ControlGroup", "")
        if props.get("ActiveState") != "active" or not group:
            return None
        root = cgroup_v2_root()
        if root is None:
            raise CommandFailed(
                f"cannot freeze VM {vm_id}: no cgroup v2 hierarchy "
                "(neither /sys/fs/cgroup nor /sys/fs/cgroup/unified)",
                "snapshot it stopped, or boot the host with the unified cgroup hierarchy",
            )
        return root / group.lstrip("/")

    def strays(self, known: set[str]) -> dict[str, str]:
        """Network namespaces and forwarders of VM ids not in ``known`` (a crash mid-delete)."""
        found: dict[str, list[str]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in Path("/run/netns").iterdir():
                vm_id = entry.name.removeprefix(NETNS_PREFIX)
                if entry.name.startswith(NETNS_PREFIX) and VM_ID_RE.fullmatch(vm_id):
                    found.setdefault(vm_id, []).append(f"network namespace {entry.name}")
        listing = run(
            ["systemctl", "list-units", "--all", "--plain", "--no-legend", "scalebox-ssh-vm-*"],
            "list the SSH forwarders of VMs",
        )
        for unit in parse_forwarders(listing):
            found.setdefault(unit.removeprefix("scalebox-ssh-"), []).append(f"forwarder {unit}")
        return {vm_id: ", ".join(sorted(set(what))) for vm_id, what in found.items()
                if vm_id not in known}  # fmt: skip

    # -- pieces

    def _record(self, vm_id: str) -> VM:
        try:
            return read_vm_record(self._vms_dir / vm_id)
        except (OSError, ValueError) as exc:
            raise CommandFailed(f"cannot read the record of VM {vm_id}: {exc}",
                                "delete the VM and create it again") from None  # fmt: skip

    def _mount(self, vm: VM) -> None:
        """Mount the VM's root (its template's disk under its own layer); kept if mounted."""
        vm_dir = self._vms_dir / vm.id
        if disks.is_full_copy(vm_dir):
            return  # made before disks were layered: its disk/ is a whole root
        try:
            layer = (vm_dir / disks.LAYER_FILE).read_text().strip()
        except OSError as exc:
            raise CommandFailed(f"VM {vm.id} has no layer record: {exc}",
                                "delete the VM and create it again") from None  # fmt: skip
        lower = disks.find_layer(self._config.data_dir, vm.template, layer)
        if lower is None:
            raise CommandFailed(
                f"the template disk VM {vm.id} was made from ({vm.template}) is gone",
                "delete the VM and create it again",
            )
        if vm.uid_base and not idmap.valid_base(vm.uid_base):
            raise CommandFailed(f"VM {vm.id} has a UID base {vm.uid_base} that is not one of ours",
                                "delete the VM and create it again")  # fmt: skip
        disks.mount_layers(vm_dir, lower, vm.uid_base)

    def _network_up(self, vm: VM) -> None:
        """A fresh namespace and veth for ``vm`` (what a previous run left is removed first)."""
        self._network_down(vm.id)
        ns, hif = netns_name(vm.id), host_if(vm.id)
        host_ip, prefix = host_side_of(vm.guest_ip), 30
        what = f"set up the network of VM {vm.id}"
        run(["ip", "netns", "add", ns], what)
        try:
            # The group is what the VM network's rules match (network.py).
            run(["ip", "link", "add", hif, "group", str(network.VM_LINK_GROUP), "type", "veth",
                 "peer", "name", GUEST_IF, "netns", ns], what)  # fmt: skip
            run(["ip", "addr", "add", f"{host_ip}/{prefix}", "dev", hif], what)
            run(["ip", "link", "set", hif, "up"], what)
            run(["ip", "-n", ns, "addr", "add", f"{vm.guest_ip}/{prefix}", "dev", GUEST_IF], what)
            run(["ip", "-n", ns, "link", "set", GUEST_IF, "up"], what)
            run(["ip", "-n", ns, "link", "set", "lo", "up"], what)
            run(["ip", "-n", ns, "route", "add", "default", "via", host_ip], what)
            if vm.uid_base:
                # The namespace is the host's: root in the container has no
                # CAP_NET_BIND_SERVICE nor CAP_NET_RAW in it. Let every UID
                # bind ports < 1024 (sshd on 22) and send ICMP echo (ping).
                run(["nsenter", f"--net=/run/netns/{ns}", "sysctl", "-q", "-w",
                     "net.ipv4.ip_unprivileged_port_start=0",
                     "net.ipv4.ping_group_range=0 2147483647"], what)  # fmt: skip
        except BaseException:
            self._network_down(vm.id)
            raise

    def _network_down(self, vm_id: str) -> None:
        with contextlib.suppress(CommandFailed):
            if Path("/run/netns", netns_name(vm_id)).exists():
                run(["ip", "netns", "del", netns_name(vm_id)], f"remove the network of {vm_id}")
        # The veth goes with the namespace; a host end left alone (a crash between
        # the two steps) is removed here.
        if Path("/sys/class/net", host_if(vm_id)).exists():
            with contextlib.suppress(CommandFailed):
                run(["ip", "link", "del", host_if(vm_id)], f"remove the veth of {vm_id}")

    def _forwarder_up(self, vm: VM) -> None:
        """Start the VM's SSH forwarder unless it runs: it outlives the container (a VM
        stopped behind scaleboxd's back keeps it), and a transient unit cannot be made twice."""
        name = forwarder_unit(vm.id)
        state = run(["systemctl", "show", "-p", "ActiveState", "--value", f"{name}.socket"],
                    f"read the state of {name}.socket").strip()  # fmt: skip
        if state == "active":
            return
        for unit in (f"{name}.socket", f"{name}.service"):
            with contextlib.suppress(CommandFailed):
                run(["systemctl", "reset-failed", unit], f"reset {unit}")
        run(
            [
                "systemd-run", "--quiet", f"--unit={name}",
                f"--description=SSH port {vm.ssh_port} of Scalebox VM {vm.id}",
                f"--socket-property=ListenStream={vm.ssh_port}",
                "--socket-property=NoDelay=true",
                SOCKET_PROXYD, f"{vm.guest_ip}:22",
            ],
            f"start the SSH forwarder of VM {vm.id} on port {vm.ssh_port}",
        )  # fmt: skip


def wait_ssh(host: str, port: int, timeout: float) -> bool:
    """Poll until an SSH banner answers at host:port (for tools and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ssh_banner(host, port):
            return True
        time.sleep(0.05)
    return False


def exec_guest(config: ServerConfig, vm_id: str) -> int:
    """``scaleboxd --run-guest ID`` on the nspawn backend: become the container's nspawn."""
    vm_dir = config.data_dir / "vms" / vm_id
    try:
        record = json.loads((vm_dir / "vm.json").read_text())
        name = str(record["name"])
        uid_base = int(record.get("uid_base", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"scalebox guest {vm_id}: cannot read {vm_dir / 'vm.json'}: {exc}", flush=True)
        return 1
    if not disks.is_mounted(vm_dir / disks.ROOT_DIR) and not disks.is_full_copy(vm_dir):
        # Never boot the empty mount point: scaleboxd mounts the root before it starts us.
        print(f"scalebox guest {vm_id}: {vm_dir / disks.ROOT_DIR} is not mounted; "
              "start the VM through scaleboxd", flush=True)  # fmt: skip
        return 1
    if uid_base and not idmap.valid_base(uid_base):
        print(f"scalebox guest {vm_id}: UID base {uid_base} in {vm_dir / 'vm.json'} is not "
              "one of ours; delete the VM and create it again", flush=True)  # fmt: skip
        return 1
    argv = nspawn_argv(vm_dir / disks.ROOT_DIR, vm_id, hostname_for(name), uid_base)
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - argv is ours, no shell involved
    except OSError as exc:
        print(f"scalebox guest {vm_id}: cannot run systemd-nspawn: {exc}", flush=True)
    return 1
