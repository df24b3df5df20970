"""VMService: the VM domain of scaleboxd, the one thing the HTTP layer calls.

It owns DATA_DIR (``templates/<name>/{disk/,template.json}``,
``vms/<id>/{disk/,vm.json,guest.log}``, ``state.json``) and decides; the
backend (backend.py) only starts, stops and observes guests. Every change
runs under one lock and is saved atomically before the call returns. Bad
input is rejected before anything changes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from scalebox.config import ServerConfig
from scalebox.daemon.errors import (
    ApiError,
    Conflict,
    InsufficientStorage,
    NotFound,
    Protected,
    Unavailable,
)
from scalebox.daemon.vms import disks, hostinfo, idmap, naming, network, nspawn, state, templates
from scalebox.daemon.vms.backend import (
    Backend,
    GuestStatus,
    ProcessBackend,
    SystemdBackend,
    running_under_systemd,
)
from scalebox.daemon.vms.models import VM, Template, now_iso
from scalebox.errors import ConfigError
from scalebox.fsutil import atomic_write, fsync_dir, fsync_tree

__all__ = ["VM", "GuestFailed", "NoFreePort", "Template", "VMService"]

BASE_TEMPLATE = templates.BASE_TEMPLATE
PROTECTED_TEMPLATES = frozenset({BASE_TEMPLATE})
BASE_HELLO = "hello from debian-base\n"
GUEST_IP = "127.0.0.1"  # process guests share the host's network; Firecracker gives each its own
MAX_VCPU_COUNT = 256
MIN_MEM_SIZE_MIB, MAX_MEM_SIZE_MIB = 64, 1048576
GIB = 1024**3
TMP_PREFIX = ".tmp-"


class NoFreePort(ApiError):
    """Every ssh port of PORT_MIN..PORT_MAX is taken."""

    status = 503


class GuestFailed(ApiError):
    """A VM's guest did not come up."""

    status = 500


def port_is_free(port: int) -> bool:
    """Whether a guest could listen on ``port`` now (binds the way the guest does)."""
    try:
        with socket.create_server(("0.0.0.0", port)):
            return True
    except OSError:
        return False


class HandingOver(Unavailable):
    """A change asked of the handover instance, which never changes VMs (see VMService)."""

    retry_after = 1


def _not_deleted(vm: VM, exc: OSError) -> ApiError:
    """A VM stopped for its deletion whose state could not be saved without it."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    error = InsufficientStorage if full else ApiError
    return error(
        f"VM {vm.id} ({vm.name}) is stopped but not deleted: the server could not save "
        f"its state ({exc.strerror or exc})",
        "delete it again once the server's disk has room"
        if full
        else "ask the server's operator to check its disk, then delete it again",
    )


class VMService:
    """The VM domain. With ``read_only`` (the handover instance of an update) it only reads.

    During an update a second scaleboxd serves on the same socket while the
    main one restarts (scaleboxd-handover.service). Two writers of
    DATA_DIR would overwrite each other's state file and each would take
    the other's VMs for orphans, so that instance never reconciles, cleans
    up or saves: it reads state.json (again whenever it changes) and
    answers every change with 503 and ``Retry-After: 1``.
    """

    def __init__(
        self,
        config: ServerConfig,
        log: logging.Logger,
        *,
        use_systemd: bool | None = None,
        read_only: bool = False,
    ) -> None:
        self._config = config
        self._log = log
        self._data_dir = config.data_dir
        self._templates_dir = config.data_dir / "templates"
        self._vms_dir = config.data_dir / "vms"
        self._state_path = config.data_dir / "state.json"
        if use_systemd is None:
            use_systemd = running_under_systemd()
        self._nspawn = config.vm_backend == "nspawn"
        self._backend: Backend
        if self._nspawn:
            if not use_systemd:
                raise ConfigError(
                    "VM_BACKEND=nspawn needs scaleboxd to run as a systemd service (as root)",
                    "start it with systemctl start scaleboxd, or set VM_BACKEND=process",
                )
            self._backend = nspawn.NspawnBackend(config)
        else:
            self._backend = SystemdBackend() if use_systemd else ProcessBackend(self._data_dir)
        self._vms: dict[str, VM] = {}
        # _lock guards the VM list, briefly; _changes serialises creates, deletes and
        # snapshots for their whole length (disk copies, boots) without blocking reads.
        self._lock = threading.RLock()
        self._changes = threading.Lock()
        self._sizes: dict[tuple[str, int, int], int] = {}  # (name, disk inode, ctime): bytes
        self._cpu = hostinfo.CpuMeter()
        self._read_only = read_only
        self._state_seen: tuple[int, int] | None = None  # (mtime_ns, inode) last read
        # VMs found stopped at start: booted by boot_stopped() while the API serves.
        self._to_boot: list[str] = []
        self._closing = threading.Event()
        self._boot_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Create the storage, the base template, load state and reconcile it with what runs."""
        if self._read_only:
            self._refresh()
            return
        with self._lock:
            for directory in (self._data_dir, self._templates_dir, self._vms_dir):
                directory.mkdir(parents=True, exist_ok=True)
            self._remove_unfinished()
            self._ensure_base_template()
            loaded = state.load(self._state_path)
            vms = loaded.vms
            # Cleaned up only what a state file that was read says is not a VM.
            trusted = loaded.problem is None
            if loaded.problem is not None:
                vms = self._recover_from_vm_records()
                self._log.error(
                    "state file %s is corrupt (%s); kept it as %s and rebuilt the list of %d "
                    "VM(s) from %s/*/vm.json",
                    self._state_path, loaded.problem, loaded.kept_as, len(vms), self._vms_dir,
                )  # fmt: skip
            elif not self._state_path.exists() and any(
                naming.VM_ID_RE.fullmatch(entry.name) for entry in self._vms_dir.iterdir()
            ):
                # Every start writes it, so VMs without it means it was lost or removed:
                # all of them taken for orphans would be every VM deleted for one file.
                trusted = False
                vms = self._recover_from_vm_records()
                self._log.error(
                    "state file %s is missing but %s holds VMs; rebuilt the list of %d VM(s) "
                    "from %s/*/vm.json and deleted nothing",
                    self._state_path, self._vms_dir, len(vms), self._vms_dir,
                )  # fmt: skip
            self._vms = {vm.id: vm for vm in vms}
            if self._nspawn:  # before any VM starts; reapplied on every start (network.py)
                network.apply(self._config.vm_network)
            if isinstance(self._backend, nspawn.NspawnBackend):
                # Here, not in the read-only handover: one prober of DATA_DIR at a time.
                self._backend.check_user_namespaces()
            # With a corrupt state file, what could not be recovered is kept,
            # not cleaned up: nothing is deleted because a file was unreadable.
            self._reconcile(clean_orphans=trusted)
            if trusted:
                self._clean_strays()
                self._tolerated("remove template layers no VM uses", self._collect_at_start)
            # A full disk must not keep the API down: it serves, and each change says
            # what the disk does (a 507) until the disk has room.
            self._tolerated("save the state", self._save)

    def boot_stopped(self) -> threading.Thread | None:
        """Start, in the background, the guests of the VMs start() found stopped (after a
        reboot, or a guest that powered itself off).

        Not in start(): one boot takes up to the backend's ready_timeout, and a guest
        that never comes up (its user masked sshd and powered it off) kept the API down
        for a minute at every start, longer than systemd waits, so scaleboxd never
        started at all. One VM at a time. Starting a guest is a change (a create or a
        delete waits for it); waiting for it to answer is not, so a delete of a VM whose
        guest never comes up does not wait out the boot's minute. A stop ends the boots at
        once; a guest already booting goes on, and the next start adopts it.
        """
        if not self._to_boot:
            return None
        thread = threading.Thread(target=self._boot_each, name="boot-stopped-vms", daemon=True)
        self._boot_thread = thread
        thread.start()
        return thread

    def _boot_each(self) -> None:
        pending, self._to_boot = self._to_boot, []
        self._log.info("starting the guests of %d stopped VM(s) while serving", len(pending))
        for vm_id in pending:
            if self._closing.is_set():
                self._log.info("stopping: the stopped VMs not started yet start at the next start")
                return
            try:
                self._boot_one(vm_id)
            except Exception:  # noqa: BLE001 -- one VM's unforeseen failure must not leave the rest stopped
                self._log.exception("VM %s: starting its guest failed unexpectedly", vm_id)

    def _boot_one(self, vm_id: str) -> None:
        with self._changes:
            if self._closing.is_set():
                return
            with self._lock:
                vm = self._vms.get(vm_id)
            if vm is None:  # deleted meanwhile
                return
            if self._backend.status(vm.id, vm.pid).status in {"running", "starting"}:
                return  # started meanwhile
            try:
                pid = self._backend.start(vm.id)
            except (ApiError, OSError) as exc:
                self._not_started(vm, exc)
                return
            vm = replace(vm, pid=pid)
            with self._lock:  # a delete from now on stops this guest
                self._vms[vm.id] = vm
        failed: Exception | None = None
        try:
            started = self._await_guest(vm, cancel=self._closing)
        except (ApiError, OSError) as exc:  # GuestFailed, or systemctl failing to answer
            started, failed = None, exc
        with self._changes:
            with self._lock:
                now = self._vms.get(vm.id)
            if now is None or now.pid != pid:
                return  # deleted while it booted: the delete stopped it
            if failed is not None and not self._closing.is_set():
                # A snapshot froze the guest for its copy while the wait ran out: it
                # may answer by now. One more look before it is stopped for good.
                started = self._answering(vm)
                failed = None if started is not None else failed
            if failed is not None:
                self._tolerated(f"stop the guest of VM {vm.id}",
                                partial(self._stop_and_release, vm.id, pid))  # fmt: skip
                self._not_started(vm, failed)
            elif started is None:
                self._log.info("stopping: VM %s (%s) goes on booting; the next start adopts it",
                               vm.id, vm.name)  # fmt: skip
                return
            else:
                self._started_again(started)
            with self._lock:
                self._tolerated("save the state", self._save)

    def close(self) -> None:
        """Save the state. VMs keep running: they outlive the daemon on purpose."""
        if self._read_only:
            return
        self._closing.set()  # no further background boot begins
        booting = self._boot_thread
        if booting is not None:
            # Its wait ends within a poll: joined so that it writes nothing after this save.
            booting.join(timeout=10)
        with self._changes, self._lock:  # a change under way ends first, and is saved
            self._save()

    def _refresh(self) -> None:
        """Read-only: take the VM list from state.json when the main daemon has rewritten it.

        An unreadable file keeps the list last read: the main daemon, the only
        writer, deals with it.
        """
        try:
            st = self._state_path.stat()
            seen = (st.st_mtime_ns, st.st_ino)
            if seen == self._state_seen:
                return
            vms = state.parse(self._state_path.read_text())
        except FileNotFoundError:
            vms, seen = [], (0, 0)
        except (OSError, ValueError) as exc:
            self._log.warning("handover: cannot read %s (%s)", self._state_path, exc)
            return
        with self._lock:
            self._vms = {vm.id: vm for vm in vms}
            self._state_seen = seen

    def _writable(self, what: str) -> None:
        if self._read_only:
            raise HandingOver(
                f"scaleboxd is handing over to another version; the {what} was not made",
                "retry in a second (Retry-After); the update's handover lasts about that long",
            )

    # -- templates -------------------------------------------------------------

    def list_templates(self) -> list[Template]:
        # No lock: a template appears and goes by a rename, and one deleted meanwhile
        # is left out.
        templates = []
        for name in self._template_names():
            with contextlib.suppress(FileNotFoundError):
                templates.append(self._template(name))
        return templates

    def _template_names(self) -> list[str]:
        return sorted(
            entry.name
            for entry in self._templates_dir.iterdir()
            if naming.NAME_RE.fullmatch(entry.name) and (entry / "disk").is_dir()
        )

    def delete_template(self, name: str) -> None:
        self._writable("template deletion")
        name = naming.check_template_name(name, "template name")
        if name in PROTECTED_TEMPLATES:
            raise Protected(
                f"template {name} is protected", "only templates made by snapshots can be deleted"
            )
        with self._changes:
            path = self._templates_dir / name
            if not (path / "disk").is_dir():
                raise NotFound(
                    f"template {name} not found", "list templates: scalebox template list"
                )
            # Rename first: readers never see half a template, and a crash
            # leaves a .tmp- directory that the next start removes.
            # A template that VMs still use as their lower layer goes to layers/
            # until the last of them is deleted (disks.retire_tree).
            disks.retire_tree(path, self._data_dir)
            for key in [key for key in self._sizes if key[0] == name]:
                self._sizes.pop(key, None)
            self._collect_layers(f"template {name} is deleted")

    # -- VMs ---------------------------------------------------------------------

    def list_vms(self) -> list[VM]:
        if self._read_only:
            self._refresh()
        with self._lock:
            vms = sorted(self._vms.values(), key=lambda vm: (vm.created_at, vm.id))
        # One query for all: under systemd that is one systemctl call, not one per VM.
        seen = self._backend.status_many({vm.id: vm.pid for vm in vms})
        return [self._seen_as(vm, seen[vm.id]) for vm in vms]

    def has_vm_named(self, name: str) -> bool:
        """Whether a VM is called ``name`` (names are told apart regardless of case)."""
        if self._read_only:
            self._refresh()
        wanted = name.lower()
        with self._lock:
            return any(vm.name.lower() == wanted for vm in self._vms.values())

    def get_vm(self, id_or_name: str) -> VM:
        if self._read_only:
            self._refresh()
        with self._lock:
            vm = self._find(id_or_name)
        return self._with_status(vm)

    def create_vm(
        self,
        *,
        template: str,
        ssh_public_key: str,
        name: str | None = None,
        vcpu_count: int | None = None,
        mem_size_mib: int | None = None,
        disk_size_gib: int | None = None,
    ) -> VM:
        self._writable("VM")
        cfg = self._config
        template = naming.check_template_name(template)
        # Into a real authorized_keys only what really is a key.
        key = naming.check_ssh_key(ssh_public_key, strict=self._nspawn)
        wanted_name = None if name is None else naming.check_vm_name(name)
        vcpus = naming.check_int(
            cfg.default_vcpu_count if vcpu_count is None else vcpu_count,
            "vcpu_count", 1, MAX_VCPU_COUNT,
        )  # fmt: skip
        mem = naming.check_int(
            cfg.default_mem_size_mib if mem_size_mib is None else mem_size_mib,
            "mem_size_mib", MIN_MEM_SIZE_MIB, MAX_MEM_SIZE_MIB,
        )  # fmt: skip
        disk = naming.check_int(
            cfg.default_disk_size_gib if disk_size_gib is None else disk_size_gib,
            "disk_size_gib", 1, cfg.max_disk_size_gib,
        )  # fmt: skip
        # Serialised with every other change; the VM list is locked only to pick and
        # to add: reads go on while the disk is made and the guest boots.
        with self._changes:
            with self._lock:
                template_disk = self._templates_dir / template / "disk"
                if not template_disk.is_dir():
                    raise NotFound(
                        f"template {template} not found", "list templates: scalebox template list"
                    )
                if self._nspawn and not templates.is_bootable(template_disk):
                    raise GuestFailed(
                        f"template {template} is not a root filesystem the nspawn backend can boot "
                        f"({template_disk} has no usr/lib/systemd/systemd)",
                        "install the template: "
                        "python -m scalebox.daemon.vms.templates install FILE",
                    )
                taken = {vm.name.lower(): vm.id for vm in self._vms.values()}
                if wanted_name is not None and wanted_name.lower() in taken:
                    raise Conflict(
                        f"name {wanted_name} is already used by VM {taken[wanted_name.lower()]}",
                        "choose another name, or leave it out for a generated one",
                    )
                free = shutil.disk_usage(self._data_dir).free
                if disk * GIB > free:
                    raise InsufficientStorage(
                        f"not enough storage for a {disk} GiB disk: {free / GIB:.1f} GiB free "
                        "on the server's data disk",
                        "delete VMs or templates, or ask for a smaller disk_size_gib",
                    )
                used_ports = {vm.ssh_port for vm in self._vms.values()}
                port = naming.pick_port(used_ports, cfg.port_min, cfg.port_max, port_is_free)
                if port is None:
                    raise NoFreePort(
                        f"no free ssh port in PORT_MIN..PORT_MAX ({cfg.port_min}..{cfg.port_max})",
                        "delete a VM, or widen PORT_MIN/PORT_MAX in the server config",
                    )
                guest_ip = ""
                if self._nspawn:
                    used = {vm.guest_ip for vm in self._vms.values()}
                    guest_ip = nspawn.pick_guest_ip(cfg.vm_network, used) or ""
                    if not guest_ip:
                        raise nspawn.NoFreeAddress(
                            f"no free VM address in VM_NETWORK {cfg.vm_network} (a /30 per VM)",
                            "delete a VM, or set a larger VM_NETWORK in the server config",
                        )
                vm = VM(
                    id=naming.new_vm_id(set(self._vms) | self._dir_names(self._vms_dir)),
                    name=wanted_name or naming.random_name(taken),
                    template=template,
                    # nspawn: where users connect (the forwarder); process guests listen
                    # on the host.
                    ip=cfg.host_ip if self._nspawn else GUEST_IP,
                    guest_ip=guest_ip,
                    uid_base=self._pick_uid_base(),
                    ssh_port=port,
                    status="starting",
                    created_at=now_iso(),
                    vcpu_count=vcpus,
                    mem_size_mib=mem,
                    disk_size_gib=disk,
                    ssh_public_key=key,
                )
            started = time.monotonic()
            self._make_vm_dir(vm, template_disk)
            copied = time.monotonic()
            vm = self._boot_and_add(vm)
            self._log.info(
                "created VM %s (%s) from %s on port %d in %.2f s (disk %.2f s, boot to ssh %.2f s)",
                vm.id, vm.name, template, port, time.monotonic() - started, copied - started,
                time.monotonic() - copied,
            )  # fmt: skip
            return vm

    def _boot_and_add(self, vm: VM) -> VM:
        """Start a new VM's guest and add it to the state; undone whole if anything fails."""
        try:
            vm = self._start_guest(vm)
            state.write_vm_record(self._vms_dir / vm.id, vm)
            with self._lock:
                self._vms[vm.id] = vm
                try:
                    self._save()
                except BaseException:
                    self._vms.pop(vm.id, None)  # no reader sees a VM being rolled back
                    raise
        except BaseException:
            self._backend.stop(vm.id, vm.pid)
            self._backend.release(vm.id)
            disks.remove_vm_dir(self._vms_dir / vm.id)
            raise
        return vm

    def _pick_uid_base(self) -> int:
        """A new VM's own 65536 host UIDs (0: no user namespace); recorded, never picked again."""
        backend = self._backend
        if not (isinstance(backend, nspawn.NspawnBackend) and backend.user_namespaces):
            return 0
        base = idmap.pick_base({vm.uid_base for vm in self._vms.values()}, idmap.local_ids())
        if base is None:
            raise nspawn.NoFreeAddress(
                "no free range of 65536 host UIDs for the VM's user namespace", "delete a VM"
            )
        return base

    def delete_vm(self, id_or_name: str) -> None:
        self._writable("VM deletion")
        with self._changes:
            with self._lock:
                vm = self._find(id_or_name)
            self._backend.stop(vm.id, vm.pid)
            self._backend.release(vm.id)
            with self._lock:
                del self._vms[vm.id]
                try:
                    self._save()
                except BaseException as exc:
                    # Not deleted: the state file still lists it, so it stays listed
                    # (stopped) and a DELETE once the disk takes the write again ends it.
                    # No pid: its guest is stopped (a background boot of it ends there).
                    self._vms[vm.id] = replace(vm, pid=None)
                    if isinstance(exc, OSError):
                        raise _not_deleted(vm, exc) from exc
                    raise
            self._log.info("deleted VM %s (%s); port %d is free", vm.id, vm.name, vm.ssh_port)
            self._after_deletion(f"VM {vm.id} is deleted", disks.remove_vm_dir,
                                 self._vms_dir / vm.id)  # fmt: skip
            self._collect_layers(f"VM {vm.id} is deleted")

    def _collect_layers(self, done: str) -> None:
        self._after_deletion(done, disks.collect_layers, self._data_dir)

    def _after_deletion(self, done: str, remove: Callable[[Path], object], path: Path) -> None:
        """Remove what a deletion left: clutter by now, so an error is logged, not answered
        (the client's request succeeded); scaleboxd removes it when it next starts."""
        try:
            remove(path)
        except (OSError, ApiError) as exc:
            self._log.warning(
                "%s, but its files could not all be removed (%s); scaleboxd removes "
                "them when it next starts",
                done,
                exc,
            )

    def snapshot_vm(self, id_or_name: str, template_name: str) -> tuple[Template, VM]:
        """Copy the VM's disk into a new template; VMs made from it start with that disk.

        The backend makes the copy (an nspawn VM is frozen for it and keeps
        running); a copy that fails leaves nothing behind.
        """
        self._writable("snapshot")
        template_name = naming.check_template_name(template_name, "template_name")
        with self._changes:
            with self._lock:
                vm = self._find(id_or_name)
            target = self._templates_dir / template_name
            if target.exists():
                raise Conflict(
                    f"template {template_name} already exists", "choose another template_name"
                )
            building = self._templates_dir / f"{TMP_PREFIX}{template_name}-{secrets.token_hex(4)}"
            try:
                building.mkdir()
                self._backend.copy_for_snapshot(vm, self._vms_dir / vm.id / "disk",
                                                building / "disk")  # fmt: skip
                self._write_template_meta(building, template_name, source_vm=vm.id)
                # On disk before its name says it is whole: a power cut after the answer
                # must not leave a template of empty files that new VMs boot from.
                fsync_tree(building)
                building.rename(target)
            except BaseException:
                disks.remove_tree(building)
                raise
            self._sync_dir(self._templates_dir)
            self._log.info(
                "snapshot of VM %s (%s) saved as template %s", vm.id, vm.name, template_name
            )
            return self._template(template_name), self._with_status(vm)

    def info(self) -> dict[str, object]:
        if self._read_only:
            self._refresh()
        with self._lock:
            vms_count = len(self._vms)
        cfg = self._config
        return {
            "host_ip": cfg.host_ip,
            "api_domain": cfg.api_domain,
            "vm_domain": cfg.vm_domain,
            "templates_count": len(self._template_names()),
            "vms_count": vms_count,
            "storage": hostinfo.storage(self._data_dir),
            "memory": hostinfo.memory(),
            "cpu_percent": self._cpu.percent(),
        }

    # -- internals ---------------------------------------------------------------

    def _find(self, id_or_name: str) -> VM:
        if id_or_name in self._vms:
            return self._vms[id_or_name]
        for vm in self._vms.values():
            if vm.name == id_or_name:
                return vm
        # Names are told apart regardless of case (at create, and in /caddy/check, as
        # in DNS), so MY-BOX finds my-box; only when one VM alone has that name.
        wanted = id_or_name.lower()
        [*alike] = (vm for vm in self._vms.values() if vm.name.lower() == wanted)
        if len(alike) == 1:
            return alike[0]
        raise NotFound("VM not found", "list VMs: scalebox vm list")

    def _with_status(self, vm: VM) -> VM:
        return self._seen_as(vm, self._backend.status(vm.id, vm.pid))

    @staticmethod
    def _seen_as(vm: VM, seen: GuestStatus) -> VM:
        return replace(vm, status=seen.status, pid=seen.pid if seen.pid is not None else vm.pid)

    def _save(self) -> None:
        state.save(self._state_path, list(self._vms.values()))

    def _template(self, name: str) -> Template:
        path = self._templates_dir / name
        try:
            meta = json.loads((path / "template.json").read_text())
            created_at = str(meta["created_at"])
        except (OSError, ValueError, KeyError, TypeError):
            created_at = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(path.stat().st_mtime))
        return Template(
            name=name,
            size_bytes=self._template_size(name, path / "disk"),
            created_at=created_at,
            protected=name in PROTECTED_TEMPLATES,
        )

    def _template_size(self, name: str, disk: Path) -> int:
        """A template's bytes, walked once: a template's disk never changes (a new one
        replaces it by a rename, so under another inode)."""
        before = disk.stat()
        # The inode number alone is reused at once by ext4 for the next template.
        key = (name, before.st_ino, before.st_ctime_ns)
        if key in self._sizes:
            return self._sizes[key]
        size = disks.tree_size(disk)
        try:
            still = disk.stat().st_ino == before.st_ino
        except FileNotFoundError:
            still = False
        if still:  # else deleted or replaced during the walk: the total is partial
            self._sizes[key] = size
        return size

    def _sync_dir(self, directory: Path) -> None:
        """Make a rename into ``directory`` durable. Once renamed the thing exists: a
        failure here is logged, not answered as if nothing had been made."""
        try:
            fsync_dir(directory)
        except OSError as exc:
            self._log.error("could not sync %s (%s): what was just made there may not "
                            "survive a power cut", directory, exc)  # fmt: skip

    def _write_template_meta(self, path: Path, name: str, source_vm: str | None) -> None:
        meta = {"name": name, "created_at": now_iso(), "source_vm": source_vm}
        atomic_write(path / "template.json", json.dumps(meta, indent=2) + "\n")

    def _ensure_base_template(self) -> None:
        if (self._templates_dir / BASE_TEMPLATE / "disk").is_dir():
            return
        if self._nspawn:
            # A real root filesystem is built or unpacked by its own command, not here.
            self._log.warning(
                "template %s is not installed: VMs cannot be created until it is "
                "(python -m scalebox.daemon.vms.templates install FILE)", BASE_TEMPLATE,
            )  # fmt: skip
            return
        building = self._templates_dir / f"{TMP_PREFIX}{BASE_TEMPLATE}-{secrets.token_hex(4)}"
        (building / "disk").mkdir(parents=True)
        atomic_write(building / "disk" / "hello.txt", BASE_HELLO)
        self._write_template_meta(building, BASE_TEMPLATE, source_vm=None)
        building.rename(self._templates_dir / BASE_TEMPLATE)
        self._log.info("created the protected template %s", BASE_TEMPLATE)

    def _make_vm_dir(self, vm: VM, template_disk: Path) -> None:
        building = self._vms_dir / f"{TMP_PREFIX}{vm.id}"
        try:
            building.mkdir()
            self._backend.make_disk(vm, template_disk, building)
            state.write_vm_record(building, vm)
            # Durable before it is named (and listed): after a power cut the state
            # file must not list a VM whose directory is still a .tmp- one, or empty.
            fsync_tree(building)
            building.rename(self._vms_dir / vm.id)
        except BaseException:
            disks.remove_vm_dir(building)
            raise
        self._sync_dir(self._vms_dir)

    def _start_guest(self, vm: VM) -> VM:
        """Start the guest and wait until it answers on its port."""
        pid = self._backend.start(vm.id)
        vm = replace(vm, pid=pid)
        try:
            started = self._await_guest(vm)
        except GuestFailed:
            self._backend.stop(vm.id, pid)  # a guest that never came up must not linger
            self._backend.release(vm.id)
            raise
        if started is None:  # only a cancel returns None, and there is none here
            raise RuntimeError(f"the wait for VM {vm.id} ended without an answer")
        return started

    def _await_guest(self, vm: VM, cancel: threading.Event | None = None) -> VM | None:
        """Wait until the started guest answers on its port: the VM running, or None
        once ``cancel`` is set (the daemon stops; the guest goes on booting, and the
        next start adopts it). GuestFailed, with its output, if it stops or never
        answers; the caller stops it."""
        deadline = time.monotonic() + self._backend.ready_timeout
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                return None
            seen = self._backend.status(vm.id, vm.pid)
            if seen.status in {"stopped", "failed"}:
                break
            if seen.status == "running" and self._backend.answers(vm):
                return replace(vm, status="running", pid=seen.pid)
            time.sleep(0.02)
        output = self._backend.recent_output(vm.id)
        raise GuestFailed(
            f"the guest of VM {vm.id} did not start listening on port {vm.ssh_port}: {output}",
            "fix what its output says, then create the VM again",
        )

    def _recover_from_vm_records(self) -> list[VM]:
        vms = []
        for vm_dir in sorted(self._vms_dir.iterdir()):
            if naming.VM_ID_RE.fullmatch(vm_dir.name):
                try:
                    vms.append(state.read_vm_record(vm_dir))
                except (OSError, ValueError) as exc:
                    self._log.warning("could not recover VM %s: %s", vm_dir.name, exc)
        return vms

    def _remove_unfinished(self) -> None:
        """Remove .tmp- directories left by a create, snapshot or delete that was cut off."""
        self._remove_unfinished_in(self._vms_dir)
        # A template install or rebuild may be unpacking into one right now.
        with contextlib.ExitStack() as stack:
            try:
                held = stack.enter_context(templates.exclusive(self._data_dir, create=False))
            except OSError as exc:
                self._log.error("could not take the template lock (%s); unfinished templates "
                                "are left for the next start", exc)  # fmt: skip
                return
            if held:
                self._remove_unfinished_in(self._templates_dir)
            else:
                self._log.warning(
                    "a template install or rebuild is running: its directory in %s is left to it",
                    self._templates_dir,
                )

    def _remove_unfinished_in(self, parent: Path) -> None:
        for entry in parent.iterdir():
            if not entry.name.startswith(TMP_PREFIX):
                continue
            # A .tmp- template may be a replaced one that VMs still use as their lower
            # layer: it is retired (disks.retire_tree), not removed.
            remove = (
                partial(disks.retire_tree, entry, self._data_dir)
                if parent == self._templates_dir
                else partial(disks.remove_vm_dir, entry)
            )
            if self._tolerated(f"remove {entry}", remove):
                self._log.warning("removed %s, left over by an interrupted operation", entry)

    def _reconcile(self, *, clean_orphans: bool) -> None:
        """Make what runs match the state: adopt, restart, and clean up orphans (logged)."""
        running = self._backend.list_running()
        self._adopt_or_restart(running)
        still_running = self._stop_orphans(running, clean_orphans)
        self._remove_orphan_disks(clean_orphans, still_running)

    def _adopt_or_restart(self, running: dict[str, int | None]) -> None:
        for vm in list(self._vms.values()):
            vm_dir = self._vms_dir / vm.id
            if not (vm_dir / "disk").is_dir():
                # Kept in the state while its guest may still run: its address and UID
                # range must not go to a new VM. The next start tries again.
                if self._tolerated(
                    f"stop VM {vm.id}, whose disk is missing",
                    partial(self._stop_and_release, vm.id, running.get(vm.id, vm.pid)),
                ):
                    self._log.error(
                        "VM %s (%s) is in the state file but its disk %s is missing; "
                        "dropped it from the state", vm.id, vm.name, vm_dir / "disk",
                    )  # fmt: skip
                    del self._vms[vm.id]
            elif vm.id in running:
                pid = running[vm.id]
                self._vms[vm.id] = replace(vm, pid=pid if pid is not None else vm.pid)
                try:
                    self._backend.adopt(self._vms[vm.id])
                except (ApiError, OSError) as exc:
                    self._log.error("VM %s (%s) runs, but %s", vm.id, vm.name, exc)
                self._log.info("re-adopted VM %s (%s), guest pid %s", vm.id, vm.name, pid)
            else:
                # Not running: booted once the API serves (boot_stopped), not here.
                self._vms[vm.id] = replace(vm, pid=None)
                self._to_boot.append(vm.id)

    def _stop_orphans(self, running: dict[str, int | None], clean: bool) -> set[str]:
        """Stop guests the state does not list; return those that could not be stopped."""
        still_running = set()  # their disks stay under them
        for vm_id, pid in running.items():
            if vm_id not in self._vms and not clean:
                self._log.warning("kept the guest of VM %s (pid %s), not in the state", vm_id, pid)
            elif vm_id in self._vms:
                continue
            elif self._tolerated(
                f"stop the orphan guest of VM {vm_id}",
                partial(self._stop_and_release, vm_id, pid),
            ):
                self._log.warning(
                    "cleaned up orphan guest of VM %s (pid %s): it is not in the state file",
                    vm_id, pid,
                )  # fmt: skip
            else:
                still_running.add(vm_id)
        return still_running

    def _remove_orphan_disks(self, clean: bool, still_running: set[str]) -> None:
        for entry in sorted(self._vms_dir.iterdir()):
            if entry.name not in self._vms and not clean:
                self._log.warning("kept %s, which no VM in the state uses", entry)
            elif entry.name in still_running:
                self._log.warning("kept %s: its guest could not be stopped", entry)
            elif entry.name not in self._vms and self._tolerated(
                f"remove the orphan disk {entry}",
                partial(disks.remove_vm_dir, entry),
            ):
                self._log.warning(
                    "cleaned up orphan disk %s: no VM in the state file uses it", entry
                )

    def _tolerated(self, what: str, action: Callable[[], object]) -> bool:
        """Do one step of the start's cleanup; a failure is logged and left for the next
        start, never fatal: one stuck mount or a full disk must not keep the API down."""
        try:
            action()
        except (ApiError, OSError) as exc:
            self._log.error("could not %s (%s); scaleboxd tries again when it next starts",
                            what, exc)  # fmt: skip
            return False
        return True

    def _stop_and_release(self, vm_id: str, pid: int | None) -> None:
        self._backend.stop(vm_id, pid)
        self._backend.release(vm_id)

    def _collect_at_start(self) -> None:
        for layer in disks.collect_layers(self._data_dir):
            self._log.warning("removed %s, a template layer no VM uses", layer)

    def _clean_strays(self) -> None:
        """Free what VMs not in the state still hold (a crash between delete's steps)."""
        strays: dict[str, str] = {}
        listed = self._tolerated(
            "list what VMs not in the state hold",
            lambda: strays.update(self._backend.strays(set(self._vms))),
        )
        if not listed:
            return
        for vm_id, what in sorted(strays.items()):
            if not self._tolerated(f"free {what} of VM {vm_id}",
                                   partial(self._backend.release, vm_id)):  # fmt: skip
                continue
            self._log.warning("cleaned up orphan %s of VM %s: it is not in the state file",
                              what, vm_id)  # fmt: skip

    def _answering(self, vm: VM) -> VM | None:
        """The VM running, if its guest runs and answers now; else None."""
        try:
            seen = self._backend.status(vm.id, vm.pid)
            if seen.status == "running" and self._backend.answers(vm):
                return replace(vm, status="running", pid=seen.pid)
        except (ApiError, OSError):
            pass
        return None

    def _not_started(self, vm: VM, exc: Exception) -> None:
        """A stopped VM whose guest could not start (boot_stopped's thread, holding _changes)."""
        with self._lock:
            if vm.id in self._vms:
                self._vms[vm.id] = replace(vm, pid=None)
        self._log.error("VM %s (%s) is not running and could not be started: %s",
                        vm.id, vm.name, exc)  # fmt: skip

    def _started_again(self, vm: VM) -> None:
        """A stopped VM whose guest answers again (boot_stopped's thread, holding _changes)."""
        with self._lock:
            self._vms[vm.id] = vm
        self._log.warning("VM %s (%s) was not running; started its guest again (pid %s)",
                          vm.id, vm.name, vm.pid)  # fmt: skip
        # It runs either way: its record (the pid, for a start without a state file) is
        # written again at the next start if the disk does not take it now.
        self._tolerated(f"write the record of VM {vm.id}",
                        partial(state.write_vm_record, self._vms_dir / vm.id, vm))  # fmt: skip

    @staticmethod
    def _dir_names(path: Path) -> set[str]:
        return {entry.name for entry in path.iterdir()}
