"""User namespaces for nspawn VMs: UID ranges and idmapped mounts.

Root in a VM is the host's UID ``base`` (and the VM's UID n the host's
``base + n``) when the VM boots with ``--private-users=base:65536``. Nothing
is chowned for it: the lower layer of its root overlay is an *idmapped
mount* of the template disk, read-only, whose mapping is a user namespace
with the VM's range (the template's UID n shows as ``base + n``, and stays
n on disk), and its upper layer, made fresh for each VM, holds its few
files as ``base + n`` from the start (NspawnBackend.make_disk). overlayfs
takes idmapped layers (Linux >= 5.19); an overlay itself cannot be
idmapped, which is why nspawn's ``--private-users-ownership=map`` does not
work on it, and an idmapped *upper* layer makes the overlay read-only when
the host's root mounts it (its UID 0 has no mapping there: EOVERFLOW).

An idmapped mount is made with the new mount API: ``open_tree``
(``OPEN_TREE_CLONE``) makes a detached copy of a mount, ``mount_setattr``
(``MOUNT_ATTR_IDMAP``) gives it the mapping of a user namespace, and
``move_mount`` attaches it at a path. Python 3.11 has none of them, so
they are called through ctypes, by number: the same on every architecture
with the common syscall table (``ARCHES``); elsewhere (alpha, mips, ia64)
they are refused as unsupported instead of calling whatever has that
number. The user namespace comes from a short-lived ``unshare --user``
child whose maps we write; the mount keeps the namespace alive, the child
is gone before the mount is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from scalebox.daemon.vms import mounts
from scalebox.daemon.vms.command import CommandFailed, run

RANGE = 65536
# systemd's range for containers' UIDs (0x00080000..0x6FFFFFFF, see
# systemd's docs/UIDS-GIDS.md); pick_base also skips the host's own ids.
FIRST_BASE = 0x00080000
LAST_BASE = 0x6FFF0000

# Syscalls added since Linux 5.1 have one number on every architecture but
# alpha, mips and ia64; uname -m names of those that share it.
ARCHES = frozenset({"x86_64", "aarch64", "i686", "armv7l", "riscv64", "ppc64le", "s390x"})
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_IDMAP = 0x00100000
USERNS_TIMEOUT = 5.0
# --private-users-ownership= (before 249: --private-users-chown).
MIN_SYSTEMD = 249


class IdmapError(OSError):
    """An idmapped mount or its user namespace could not be made."""


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


# --- pure decisions ----------------------------------------------------------------


def pick_base(used: Iterable[int], host_ids: Iterable[int] = ()) -> int | None:
    """The lowest UID base of a free 65536-range in systemd's container range, or None.

    Free: no VM has it (``used``) and no UID or GID of the host's own
    users and groups (``host_ids``, see ``local_ids``) falls in it.
    """
    taken = set(used) | {FIRST_BASE + (i - FIRST_BASE) // RANGE * RANGE for i in host_ids}
    for base in range(FIRST_BASE, LAST_BASE + 1, RANGE):
        if base not in taken:
            return base
    return None


def parse_ids(text: str) -> set[int]:
    """The numeric ids (third and fourth fields) of /etc/passwd or /etc/group lines."""
    ids = set()
    for line in text.splitlines():
        for field in line.split(":")[2:4]:
            if field.isdigit():
                ids.add(int(field))
    return ids


def local_ids(files: tuple[Path, ...] = (Path("/etc/passwd"), Path("/etc/group"))) -> set[int]:
    """UIDs and GIDs of the host's local users and groups (not those of LDAP and the like)."""
    ids: set[int] = set()
    for path in files:
        with contextlib.suppress(OSError):
            ids |= parse_ids(path.read_text(errors="replace"))
    return ids


def valid_base(base: int) -> bool:
    """Whether ``base`` starts one of the ranges ``pick_base`` hands out."""
    return FIRST_BASE <= base <= LAST_BASE and (base - FIRST_BASE) % RANGE == 0


def id_map(base: int) -> str:
    """The uid_map/gid_map line: inside 0..65535 is outside base..base+65535."""
    return f"0 {base} {RANGE}\n"


# --- the system calls ----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long  # syscall(2) returns a long


def _syscall(number: int, *args: object, what: str) -> int:
    """syscall(number, *args); IdmapError on failure or on an architecture not in ARCHES."""
    arch = platform.machine()
    if arch not in ARCHES:
        raise IdmapError(errno.ENOSYS, f"{what}: idmapped mounts are not supported on {arch}")
    return _check(_libc.syscall(ctypes.c_long(number), *args), what)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise IdmapError(err, f"{what}: {os.strerror(err)}")
    return result


@contextlib.contextmanager
def userns(base: int) -> Iterator[int]:
    """An fd of a new user namespace mapping 0..65535 to ``base``..; closed on leaving.

    A ``unshare --user`` child makes the namespace; we write its maps (root
    may write any mapping) and open it, then the child goes: the fd (and
    later the mounts) keep the namespace.
    """
    # cat waits on our pipe: should we die, it reads EOF and goes too.
    child = subprocess.Popen(
        ["unshare", "--user", "--", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    fd = -1
    try:
        ours = Path("/proc/self/ns/user").readlink()
        deadline = time.monotonic() + USERNS_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child.pid}/ns/user").readlink() != ours:
                    break
            if child.poll() is not None:
                err = child.stderr.read().decode(errors="replace").strip() if child.stderr else ""
                raise IdmapError(
                    errno.EPERM, f"cannot make a user namespace: {err or 'unshare failed'}"
                )
            if time.monotonic() > deadline:
                raise IdmapError(errno.ETIMEDOUT, "cannot make a user namespace: unshare hangs")
            time.sleep(0.001)
        for name in ("uid_map", "gid_map"):
            try:
                Path(f"/proc/{child.pid}/{name}").write_text(id_map(base))
            except OSError as exc:
                what = f"cannot write the {name} of a user namespace: {exc.strerror}"
                raise IdmapError(exc.errno or errno.EPERM, what) from None
        fd = os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()
        for pipe in (child.stdin, child.stderr):
            if pipe:
                pipe.close()
    try:
        yield fd
    finally:
        os.close(fd)


def _clone(source: Path) -> int:
    """A detached copy of the mount at ``source`` (an fd; the mount goes with its last fd)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_SYMLINK_NOFOLLOW
    return _syscall(SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(source)),
                    ctypes.c_uint(flags), what=f"open_tree {source}")  # fmt: skip


def _set_idmap(tree: int, userns_fd: int, source: Path) -> None:
    attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, userns_fd=userns_fd)
    _syscall(SYS_MOUNT_SETATTR, ctypes.c_int(tree), ctypes.c_char_p(b""),
             ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr),
             ctypes.c_size_t(ctypes.sizeof(attr)), what=f"idmap a mount of {source}")  # fmt: skip


def mount_idmapped(source: Path, target: Path, userns_fd: int) -> None:
    """Attach at ``target`` a copy of the mount at ``source``, seen through ``userns_fd``.

    Raises IdmapError when the kernel or ``source``'s filesystem cannot idmap.
    """
    tree = _clone(source)
    try:
        _set_idmap(tree, userns_fd, source)
        _syscall(SYS_MOVE_MOUNT, ctypes.c_int(tree), ctypes.c_char_p(b""),
                 ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(target)),
                 ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
                 what=f"attach the idmapped mount of {source} at {target}")  # fmt: skip
    finally:
        os.close(tree)


def unshift_tree(root: Path, base: int) -> int:
    """Give every file under ``root`` (and ``root``) owned by base..base+65535 the owner - base.

    For a copy made through a VM's overlay, which shows its files as the
    host sees the VM's UIDs. Symlinks are not followed; setuid and setgid
    bits and file capabilities, which the kernel clears on a chown, are put
    back (a capability's root id shifted too); the users and groups named in
    POSIX ACLs are shifted like owners (left as they were, a VM made from the
    template could not even copy them: they map to no one in its range).
    Returns how many files changed.
    """
    changed = 0

    def unshift(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        uid = st.st_uid - base if base <= st.st_uid < base + RANGE else st.st_uid
        gid = st.st_gid - base if base <= st.st_gid < base + RANGE else st.st_gid
        names = [] if stat.S_ISLNK(st.st_mode) else os.listxattr(path, follow_symlinks=False)
        acls_changed = _unshift_acls(path, names, base)
        if (uid, gid) == (st.st_uid, st.st_gid):
            changed += acls_changed
            return
        caps = os.getxattr(path, CAPS_XATTR, follow_symlinks=False) if CAPS_XATTR in names else None
        os.lchown(path, uid, gid)
        if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            Path(path).chmod(stat.S_IMODE(st.st_mode))
        if caps is not None:
            os.setxattr(path, CAPS_XATTR, unshifted_caps(caps, base), follow_symlinks=False)
        changed += 1

    unshift(str(root))
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            unshift(f"{parent}/{name}")
    return changed


CAPS_XATTR = "security.capability"
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
ACL_USER, ACL_GROUP = 0x02, 0x08  # the ACL entries that name an id (uapi posix_acl_xattr.h)
VFS_CAP_REVISION_2, VFS_CAP_REVISION_3 = 0x02000000, 0x03000000
VFS_CAP_REVISION_MASK = 0xFF000000


def unshifted_acl(value: bytes, base: int) -> bytes | None:
    """An ACL xattr (a u32 version, then u16 tag, u16 perm, u32 id per entry) with the
    ids of base..base+65535 made id - base; None when it names none of them."""
    if len(value) < 4 or (len(value) - 4) % 8:
        return None
    out = bytearray(value)
    for offset in range(4, len(value), 8):
        tag, _perm, ident = struct.unpack_from("<HHI", value, offset)
        if tag in (ACL_USER, ACL_GROUP) and base <= ident < base + RANGE:
            struct.pack_into("<I", out, offset + 4, ident - base)
    return bytes(out) if out != value else None


def unshifted_caps(value: bytes, base: int) -> bytes:
    """A security.capability value as the template holds it: a namespaced (v3) one made
    in the VM names its root as the host sees it (base); for root that is a plain v2
    capability again, as the template's own files (ping) have."""
    if len(value) != 24:  # v1 (12 bytes) and v2 (20) name no root id
        return value
    (magic,) = struct.unpack_from("<I", value, 0)
    if magic & VFS_CAP_REVISION_MASK != VFS_CAP_REVISION_3:
        return value
    (rootid,) = struct.unpack_from("<I", value, 20)
    if base <= rootid < base + RANGE:
        rootid -= base
    if rootid == 0:
        flags = magic & ~VFS_CAP_REVISION_MASK & 0xFFFFFFFF
        return struct.pack("<I", VFS_CAP_REVISION_2 | flags) + value[4:20]
    return value[:20] + struct.pack("<I", rootid)


def _unshift_acls(path: str, names: list[str], base: int) -> int:
    """Shift the ids the file's ACLs name; 1 if any changed, else 0."""
    changed = 0
    for name in ACL_XATTRS:
        if name in names:
            value = unshifted_acl(os.getxattr(path, name, follow_symlinks=False), base)
            if value is not None:
                os.setxattr(path, name, value, follow_symlinks=False)
                changed = 1
    return changed


def nspawn_version(text: str) -> int:
    """The version in ``systemd-nspawn --version`` ("systemd 252 (252.36-1~deb12u1)"), or 0."""
    fields = text.split()
    return (
        int(fields[1]) if len(fields) > 1 and fields[0] == "systemd" and fields[1].isdigit() else 0
    )


def probe(scratch: Path) -> str | None:
    """Why VMs cannot get user namespaces on this host, or None when they can.

    Tries in the new directory ``scratch`` (on DATA_DIR's filesystem, where
    templates live) what a VM start does: a user namespace, an idmapped
    mount of a directory, an overlay on it that is writable, and a
    systemd-nspawn that knows ``--private-users-ownership`` (systemd >= 249).
    Leaves nothing mounted and removes ``scratch``.
    """
    try:
        version = nspawn_version(run(["systemd-nspawn", "--version"], "read the systemd version"))
    except CommandFailed as exc:
        return exc.what
    if version < MIN_SYSTEMD:
        found = version or "of an unknown version"
        return f"systemd-nspawn is systemd {found}, {MIN_SYSTEMD} or later is needed"
    lower, mapped, upper, work, root = (
        scratch / n for n in ("lower", "mapped", "upper", "work", "root")
    )
    _clear(scratch)  # what a probe cut off left
    try:
        for part in (lower, mapped, upper, work, root):
            part.mkdir(parents=True)
        with userns(FIRST_BASE) as fd:
            mount_idmapped(lower, mapped, fd)
        options = f"lowerdir={mapped},upperdir={upper},workdir={work}"
        run(["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
            "mount an overlay on an idmapped layer")  # fmt: skip
        (root / "written").write_text("")
        if not (upper / "written").is_file():
            return "an overlay on an idmapped layer does not write to its upper layer"
    except (OSError, CommandFailed) as exc:
        return str(exc)
    finally:
        _clear(scratch)
    return None


def _clear(scratch: Path) -> None:
    """Unmount the probe's mounts and remove its directory; never removes through a mount."""
    for part in (scratch / "root", scratch / "mapped"):
        if mounts.is_mounted(part):
            with contextlib.suppress(CommandFailed):
                run(["umount", str(part)], f"unmount {part}")
    if not mounts.mounts_under(scratch):
        shutil.rmtree(scratch, ignore_errors=True)
