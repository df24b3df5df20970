"""User namespaces of nspawn VMs: UID ranges, the mount table, idmapped mounts on real files.

Mounting needs root and a kernel that allows it; those tests skip otherwise
(the VM start path itself: tests/system/test_sandbox_userns.py).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebox.daemon.vms import idmap, mounts
from scalebox.daemon.vms.models import VM, RecordError

ROOT = os.geteuid() == 0
BASE = idmap.FIRST_BASE + 3 * idmap.RANGE


def test_ranges_start_in_systemds_container_range_and_never_overlap() -> None:
    first = idmap.pick_base([])
    assert first == 0x80000
    second = idmap.pick_base([first])
    assert second == first + 65536
    assert idmap.pick_base([first, first + 2 * 65536]) == second  # a freed range is used again
    assert idmap.pick_base(range(idmap.FIRST_BASE, idmap.LAST_BASE + 1, idmap.RANGE)) is None
    assert idmap.valid_base(second) and not idmap.valid_base(second + 1)
    assert not idmap.valid_base(0) and not idmap.valid_base(idmap.LAST_BASE + idmap.RANGE)
    assert idmap.id_map(first) == "0 524288 65536\n"


def test_a_range_holding_a_host_users_uid_or_gid_is_never_picked(tmp_path: Path) -> None:
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\nodd:x:524300:100::/:/bin/sh\n")
    group.write_text("root:x:0:\nodd:x:589830:\n")
    ids = idmap.local_ids((passwd, group, tmp_path / "missing"))
    assert ids == {0, 100, 524300, 589830}
    # 524300 is in the first range, 589830 (a GID) in the second: the third it is.
    assert idmap.pick_base([], ids) == 0x80000 + 2 * 65536


def test_the_range_is_kept_in_the_vm_record_and_older_records_have_none() -> None:
    vm = VM(id="vm-0123456789ab", name="a", template="t", ip="1.2.3.4", ssh_port=22001,
            status="running", created_at="x", vcpu_count=1, mem_size_mib=256, disk_size_gib=1,
            uid_base=BASE)  # fmt: skip
    record = json.loads(json.dumps(vm.to_record()))
    assert VM.from_record(record).uid_base == BASE
    del record["uid_base"]
    assert VM.from_record(record).uid_base == 0
    with pytest.raises(RecordError, match="uid_base"):
        VM.from_record({**record, "uid_base": "524288"})
    with pytest.raises(RecordError, match="uid_base"):
        VM.from_record({**record, "uid_base": True})


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
90 22 7:0 /templates/t/disk /d/vms/vm-1/lower rw,relatime,idmapped shared:2 - ext4 /dev/loop0 rw
91 22 7:1 / /d/vms/vm-1/fs rw,noatime shared:3 - ext4 /dev/loop1 rw
92 22 0:40 / /d/my\\040dir rw shared:4 - tmpfs tmpfs rw
"""


def test_the_mount_table_sees_bind_mounts_of_the_same_file_system() -> None:
    assert mounts.is_mounted(Path("/d/vms/vm-1/lower"), MOUNTINFO)
    assert not mounts.is_mounted(Path("/d/vms/vm-1/disk"), MOUNTINFO)
    assert mounts.is_mounted(Path("/d/my dir"), MOUNTINFO)
    assert mounts.mounts_under(Path("/d/vms/vm-1"), MOUNTINFO) == [
        "/d/vms/vm-1/lower", "/d/vms/vm-1/fs",
    ]  # fmt: skip
    assert mounts.mounts_under(Path("/d/vms/vm-"), MOUNTINFO) == []
    assert mounts.is_idmapped(Path("/d/vms/vm-1/lower"), MOUNTINFO)
    assert not mounts.is_idmapped(Path("/d/vms/vm-1/fs"), MOUNTINFO)


def test_the_systemd_version_is_read_from_nspawn() -> None:
    assert idmap.nspawn_version("systemd 252 (252.36-1~deb12u1)\n+PAM +AUDIT") == 252
    assert idmap.nspawn_version("something else") == 0


@pytest.mark.skipif(not ROOT, reason="chowns files to other users (needs root)")
def test_a_copy_seen_through_a_vm_is_shifted_back_keeping_setuid_bits(tmp_path: Path) -> None:
    tree = tmp_path / "copy"
    (tree / "usr/bin").mkdir(parents=True)
    sudo = tree / "usr/bin/sudo"
    sudo.write_text("#!/bin/sh\n")
    os.chown(sudo, BASE, BASE)
    sudo.chmod(0o4755)
    (tree / "home").mkdir()
    mine = tree / "home/mine"
    mine.write_text("x")
    os.chown(mine, BASE + 1000, BASE + 1000)
    (tree / "link").symlink_to("/etc/passwd")  # not followed: /etc/passwd keeps its owner
    os.lchown(tree / "link", BASE, BASE)
    stranger = tree / "stranger"
    stranger.write_text("")
    os.chown(stranger, 4242, 4242)  # outside the range: left alone
    for path in (tree, tree / "usr", tree / "usr/bin", tree / "home"):
        os.chown(path, BASE, BASE)
    before = Path("/etc/passwd").stat()

    assert idmap.unshift_tree(tree, BASE) == 7
    assert (sudo.stat().st_uid, sudo.stat().st_gid) == (0, 0)
    assert stat.S_IMODE(sudo.stat().st_mode) == 0o4755
    assert mine.stat().st_uid == 1000
    assert (tree / "link").lstat().st_uid == 0
    assert stranger.stat().st_uid == 4242
    assert tree.stat().st_uid == 0
    assert Path("/etc/passwd").stat().st_uid == before.st_uid


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL xattr: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


# A journal directory's ACL as systemd sets it: group adm (4) may read, as the host sees
# a VM's group 4.
UNDEFINED = 0xFFFFFFFF
JOURNAL_ACL = [(0x01, 7, UNDEFINED), (0x04, 5, UNDEFINED), (0x08, 5, 4), (0x10, 5, UNDEFINED),
               (0x20, 5, UNDEFINED)]  # fmt: skip


def _caps(revision: int, rootid: int | None = None) -> bytes:
    # cap_net_raw (13) permitted, effective flag set.
    body = struct.pack("<I", revision | 0x1) + struct.pack("<IIII", 1 << 13, 0, 0, 0)
    return body + (struct.pack("<I", rootid) if rootid is not None else b"")


def test_acl_and_capability_values_are_shifted_back() -> None:
    shifted = [(t, p, BASE + i if i != UNDEFINED else i) for t, p, i in JOURNAL_ACL]
    assert idmap.unshifted_acl(_acl(*shifted), BASE) == _acl(*JOURNAL_ACL)
    assert idmap.unshifted_acl(_acl(*JOURNAL_ACL), BASE) is None  # nothing of the range
    assert idmap.unshifted_acl(b"\x02\x00\x00", BASE) is None  # not an ACL: left alone
    # A capability a VM's root set (v3, its root as the host sees it) is a plain v2 one.
    assert idmap.unshifted_caps(_caps(0x03000000, BASE), BASE) == _caps(0x02000000)
    assert idmap.unshifted_caps(_caps(0x03000000, BASE + 1000), BASE) == _caps(0x03000000, 1000)
    assert idmap.unshifted_caps(_caps(0x02000000), BASE) == _caps(0x02000000)


@pytest.mark.skipif(not ROOT, reason="chowns files and sets capabilities (needs root)")
def test_a_copy_keeps_its_acls_and_file_capabilities_shifted_back(tmp_path: Path) -> None:
    """A snapshot's template kept ACLs naming the VM's host ids (a VM made from it could
    not be snapshotted: cp failed on them), and lost every file capability to the chown."""
    tree = tmp_path / "copy"
    journal = tree / "var/log/journal"
    journal.mkdir(parents=True)
    shifted = [(t, p, BASE + i if i != UNDEFINED else i) for t, p, i in JOURNAL_ACL]
    for name in idmap.ACL_XATTRS:
        os.setxattr(journal, name, _acl(*shifted))
    ping = tree / "ping"
    ping.write_text("")
    os.chown(ping, BASE, BASE)
    os.setxattr(ping, idmap.CAPS_XATTR, _caps(0x02000000))
    for path in (tree, tree / "var", tree / "var/log", journal):
        os.chown(path, BASE, BASE)

    assert idmap.unshift_tree(tree, BASE) == 5
    for name in idmap.ACL_XATTRS:
        assert os.getxattr(journal, name) == _acl(*JOURNAL_ACL)
    assert ping.stat().st_uid == 0
    assert os.getxattr(ping, idmap.CAPS_XATTR) == _caps(0x02000000)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for point in reversed(mounts.mounts_under(tmp_path)):
        subprocess.run(["umount", point], check=False)


@pytest.mark.skipif(not ROOT, reason="mounts (needs root)")
def test_an_idmapped_mount_shows_the_files_as_the_vm_owns_them(scratch: Path) -> None:
    source, target = scratch / "source", scratch / "target"
    source.mkdir()
    target.mkdir()
    (source / "f").write_text("x")
    os.chown(source / "f", 1000, 1000)
    try:
        with idmap.userns(BASE) as fd:
            idmap.mount_idmapped(source, target, fd)
    except idmap.IdmapError as exc:
        pytest.skip(f"this kernel or file system cannot idmap: {exc}")
    assert mounts.is_mounted(target) and mounts.is_idmapped(target)
    assert (target / "f").stat().st_uid == BASE + 1000
    assert (source / "f").stat().st_uid == 1000  # nothing changed on disk
    with pytest.raises(OSError, match="Read-only"):
        (target / "g").write_text("")  # a VM's lower layer is read-only
    subprocess.run(["umount", str(target)], check=True)
    assert not mounts.is_mounted(target)


@pytest.mark.skipif(not ROOT, reason="mounts (needs root)")
def test_the_probe_says_why_not_or_nothing_and_leaves_nothing_behind(scratch: Path) -> None:
    why_not = idmap.probe(scratch / "probe")
    assert not (scratch / "probe").exists()
    assert mounts.mounts_under(scratch) == []
    if why_not is not None:
        pytest.skip(f"this host cannot give VMs user namespaces: {why_not}")


@pytest.mark.skipif(not ROOT, reason="mounts (needs root)")
def test_a_symlinked_source_is_refused_not_followed(scratch: Path) -> None:
    real, link, target = scratch / "real", scratch / "link", scratch / "target"
    real.mkdir()
    target.mkdir()
    link.symlink_to(real)
    with idmap.userns(BASE) as fd, pytest.raises(idmap.IdmapError):
        idmap.mount_idmapped(link, target, fd)
    assert not mounts.is_mounted(target)


def test_an_architecture_with_other_syscall_numbers_is_refused_by_name(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for uname -m: this host cannot be a mips machine. Nothing reaches the kernel.
    monkeypatch.setattr(idmap.platform, "machine", lambda: "mips")
    with pytest.raises(idmap.IdmapError, match="not supported on mips") as caught:
        idmap.mount_idmapped(scratch, scratch, 0)
    assert caught.value.errno == errno.ENOSYS
