"""The nspawn backend's pure decisions, its key check and what it writes into a VM's disk.

The backend itself (containers, veths, forwarders) runs only on a real
systemd machine: tests/system/test_sandbox.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scalebox import config as config_module
from scalebox.daemon.errors import InvalidInput
from scalebox.daemon.vms import nspawn, templates
from scalebox.daemon.vms.backend import GuestStatus, parse_show
from scalebox.daemon.vms.models import VM
from scalebox.daemon.vms.naming import check_ssh_key
from scalebox.errors import ConfigError

VM_ID = "vm-0123456789ab"


def real_key(comment: str = "me@host") -> str:
    raw = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return f"{raw.decode()} {comment}"


def make_vm(**changes: object) -> VM:
    values: dict[str, object] = {
        "id": VM_ID, "name": "my_box", "template": "debian-base", "ip": "203.0.113.7",
        "ssh_port": 22001, "status": "running", "created_at": "2026-01-01T00:00:00.000Z",
        "vcpu_count": 2, "mem_size_mib": 1024, "disk_size_gib": 2,
        "ssh_public_key": real_key(), "guest_ip": "10.187.0.2",
    }  # fmt: skip
    values.update(changes)
    return VM(**values)  # type: ignore[arg-type]


def test_each_vm_gets_its_own_slash_30_host_side_dot_1_vm_dot_2() -> None:
    assert nspawn.slot_addresses("10.187.0.0/16", 0) == ("10.187.0.1", "10.187.0.2")
    assert nspawn.slot_addresses("10.187.0.0/16", 64) == ("10.187.1.1", "10.187.1.2")
    assert nspawn.host_side_of("10.187.1.2") == "10.187.1.1"


def test_the_lowest_free_address_is_picked_and_a_full_pool_gives_none() -> None:
    assert nspawn.pick_guest_ip("10.187.0.0/16", set()) == "10.187.0.2"
    assert nspawn.pick_guest_ip("10.187.0.0/16", {"10.187.0.2"}) == "10.187.0.6"
    full = {"10.9.0.2", "10.9.0.6", "10.9.0.10", "10.9.0.14"}
    assert nspawn.pick_guest_ip("10.9.0.0/28", full) is None
    assert nspawn.pick_guest_ip("10.9.0.0/28", full - {"10.9.0.10"}) == "10.9.0.10"


def test_names_derived_from_the_vm_id_fit_the_kernels_limits() -> None:
    assert nspawn.host_if(VM_ID) == "vm0123456789ab"
    assert len(nspawn.host_if(VM_ID)) <= 15  # IFNAMSIZ - 1
    assert nspawn.netns_name(VM_ID) == f"scalebox-{VM_ID}"
    assert nspawn.forwarder_unit(VM_ID) == f"scalebox-ssh-{VM_ID}"


@pytest.mark.parametrize(
    ("name", "hostname"),
    [("box-1", "box-1"), ("my_box", "my-box"), ("_x_", "x"), ("___", "vm"), ("a" * 63, "a" * 63)],
)
def test_vm_names_become_valid_hostnames(name: str, hostname: str) -> None:
    assert nspawn.hostname_for(name) == hostname


def test_the_unit_boots_the_vms_own_disk_in_its_own_network_namespace() -> None:
    argv = nspawn.nspawn_argv(Path("/d/vms") / VM_ID / "disk", VM_ID, "my-box")
    assert argv[0] == "systemd-nspawn"
    assert "--boot" in argv and "--keep-unit" in argv
    assert f"--directory=/d/vms/{VM_ID}/disk" in argv
    assert f"--network-namespace-path=/run/netns/scalebox-{VM_ID}" in argv
    assert "--hostname=my-box" in argv


def test_with_a_uid_base_the_unit_boots_in_a_user_namespace_inside_the_vms_network() -> None:
    base = 0x80000 + 65536
    argv = nspawn.nspawn_argv(Path("/d/vms") / VM_ID / "disk", VM_ID, "my-box", base)
    # nspawn 252 cannot join a network namespace after making the user namespace:
    # nsenter puts it there first.
    assert argv[:3] == ["nsenter", f"--net=/run/netns/scalebox-{VM_ID}", "--"]
    assert argv[3] == "systemd-nspawn"
    assert f"--private-users={base}:65536" in argv
    assert "--private-users-ownership=off" in argv  # the mounts map the files: no chown
    assert not any(a.startswith("--network-namespace-path") for a in argv)


def test_limits_come_from_the_vm_and_the_config() -> None:
    props = nspawn.limit_properties(make_vm(vcpu_count=3, mem_size_mib=512), pids_max=100)
    assert props == ["MemoryMax=512M", "CPUQuota=300%", "TasksMax=100"]


# -- keys ---------------------------------------------------------------------------


def test_several_keys_with_crlf_or_lf_are_kept_one_per_line() -> None:
    one, two = real_key("a@x"), real_key("b@y")
    text = f"{one}\r\n\r\n# a comment\r\n{two}\r\n"
    assert check_ssh_key(text, strict=True) == f"{one}\n{two}"
    assert check_ssh_key(f"{one}\n{two}\n", strict=True) == f"{one}\n{two}"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("hello", "expected 'TYPE BASE64"),
        ("ssh-foo AAAA x", "unknown key type"),
        ("ssh-ed25519 not!base64 x", "not base64"),
        # a valid ssh-rsa blob presented as ed25519
        ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ== x", "not a ssh-ed25519 key"),
        ("# only a comment\n", "holds no key"),
        ("ssh-ed25519 AAAA\rx", "carriage return"),
    ],
)
def test_what_is_not_a_key_is_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match="ssh_public_key") as caught:
        check_ssh_key(text, strict=True)
    assert problem in caught.value.what


@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\u2028", "\x85", "\u00a0"])
def test_whitespace_sshd_does_not_split_on_is_refused(separator: str) -> None:
    """str.split() split on it and took the key, which sshd then skipped: the
    user was locked out of a VM made with a 201."""
    with pytest.raises(InvalidInput) as caught:
        check_ssh_key(real_key().replace(" ", separator, 1), strict=True)
    assert f"U+{ord(separator):04X} is not allowed" in caught.value.what


def test_tabs_and_a_comment_in_any_script_are_a_key_as_sshd_reads_it() -> None:
    key = real_key("anna@höst").replace(" ", "\t", 1)
    assert check_ssh_key(key, strict=True) == key


def test_the_second_of_two_keys_is_named_when_it_is_bad() -> None:
    with pytest.raises(InvalidInput, match="key 2 of 2"):
        check_ssh_key(f"{real_key()}\nssh-ed25519 AAAA", strict=True)


# -- the VM's disk ------------------------------------------------------------------


def fake_rootfs(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "home").mkdir()
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n"
    )
    (root / "etc/hostname").write_text("debian-base\n")
    (root / "etc/machine-id").write_text("")
    return root


def debugfs(image: Path, request: str) -> str:
    """Read the ext4 image with debugfs (e2fsprogs): no mount, no root needed."""
    import subprocess  # noqa: PLC0415

    done = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout


def make_disk(template: Path, vm_dir: Path, **changes: object) -> None:
    vm_dir.mkdir()
    backend = nspawn.NspawnBackend.__new__(nspawn.NspawnBackend)  # make_disk uses no state
    backend.make_disk(make_vm(**changes), template, vm_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to the guest's user (needs root)")
def test_make_disk_writes_keys_hostname_and_a_machine_id_into_a_sparse_image_of_its_size(
    tmp_path: Path,
) -> None:
    template = fake_rootfs(tmp_path / "template")
    one, two = real_key("a"), real_key("b")
    vm_dir = tmp_path / "vm"
    make_disk(template, vm_dir, ssh_public_key=f"{one}\n{two}", disk_size_gib=3)
    image = vm_dir / "disk.img"
    assert image.stat().st_size == 3 * 1024**3
    assert image.stat().st_blocks * 512 < 64 * 1024**2  # sparse: only what was written
    assert debugfs(image, "cat upper/home/user/.ssh/authorized_keys") == f"{one}\n{two}\n"
    keys = debugfs(image, "stat upper/home/user/.ssh/authorized_keys")
    assert "User:  1000" in keys and "Mode:  0600" in keys
    assert "Mode:  0700" in debugfs(image, "stat upper/home/user/.ssh")
    assert debugfs(image, "cat upper/etc/hostname") == "my-box\n"
    assert "127.0.1.1\tmy-box" in debugfs(image, "cat upper/etc/hosts")
    assert len(debugfs(image, "cat upper/etc/machine-id").strip()) == 32
    assert "work" in debugfs(image, "ls -l")
    # Nothing is written into the template: it is the VM's read-only lower layer.
    assert (template / "etc/hostname").read_text() == "debian-base\n"
    assert not (template / "home/user/.ssh").exists()
    assert (vm_dir / "layer").read_text().strip() == str(template.stat().st_ino)
    assert sorted(p.name for p in vm_dir.iterdir()) == ["disk", "disk.img", "fs", "layer"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to the guest's user (needs root)")
def test_with_a_uid_base_the_vms_own_files_belong_to_its_uids_on_the_host(tmp_path: Path) -> None:
    template = fake_rootfs(tmp_path / "template")
    base = 0x80000
    make_disk(template, tmp_path / "vm", ssh_public_key=real_key(), uid_base=base)
    image = tmp_path / "vm" / "disk.img"
    assert f"User: {base + 1000:6d}" in debugfs(image, "stat upper/home/user/.ssh/authorized_keys")
    assert f"User: {base:6d}" in debugfs(image, "stat upper/etc/hostname")
    assert f"User: {base:6d}" in debugfs(image, "stat upper")  # the VM's / is its root's
    assert "User:     0" in debugfs(image, "stat work")  # overlay's own, the host's
    assert template.stat().st_uid == 0 and (template / "etc/hostname").stat().st_uid == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to the guest's user (needs root)")
def test_make_disk_never_writes_through_a_symlink_in_the_template(tmp_path: Path) -> None:
    template = fake_rootfs(tmp_path / "template")
    outside = tmp_path / "outside"
    outside.write_text("untouched\n")
    (template / "etc/hosts").symlink_to(outside)
    make_disk(template, tmp_path / "vm")
    assert outside.read_text() == "untouched\n"
    assert (template / "etc/hosts").is_symlink()
    assert "my-box" in debugfs(tmp_path / "vm/disk.img", "cat upper/etc/hosts")


def test_a_template_without_systemd_or_version_is_not_bootable(tmp_path: Path) -> None:
    assert not templates.is_bootable(tmp_path)
    assert templates.read_version(tmp_path) is None
    (tmp_path / "etc").mkdir()
    (tmp_path / templates.VERSION_FILE).write_text('{"template_version": 3}')
    assert templates.read_version(tmp_path) == 3


# -- config -------------------------------------------------------------------------

TOKEN = "API_TOKEN=sb-0123456789abcdef0123\nHOST_IP=203.0.113.7\n"


def test_vm_backend_nspawn_and_its_network_are_read_from_the_config() -> None:
    cfg = config_module.parse(TOKEN + "VM_BACKEND=nspawn\nVM_NETWORK=10.50.0.0/20\n", "c", {})
    assert (cfg.vm_backend, cfg.vm_network, cfg.vm_pids_max) == ("nspawn", "10.50.0.0/20", 4096)
    default = config_module.parse(TOKEN, "c", {})
    assert (default.vm_backend, default.vm_network) == ("nspawn", "10.187.0.0/16")


@pytest.mark.parametrize(
    "line",
    ["VM_BACKEND=docker", "VM_NETWORK=10.50.0.1/16", "VM_NETWORK=10.50.0.0/30", "VM_NETWORK=x"],
)
def test_bad_backend_or_network_names_the_key(line: str) -> None:
    with pytest.raises(ConfigError, match=line.split("=", maxsplit=1)[0]):
        config_module.parse(TOKEN + line + "\n", "c", {})


def test_forwarders_are_found_in_the_unit_list_and_strangers_ignored() -> None:
    listing = (
        f"scalebox-ssh-{VM_ID}.socket loaded active listening SSH port 22001\n"
        f"scalebox-ssh-{VM_ID}.service loaded active running SSH port 22001\n"
        "scalebox-ssh-vm-nothex.socket loaded active listening x\n"
        "scalebox-sshd.service loaded active running x\n"
        "\n"
    )
    assert nspawn.parse_forwarders(listing) == [f"scalebox-ssh-{VM_ID}"]


# -- template install (real tar, real files) -------------------------------------------


def fake_template_tarball(tmp_path: Path, *, version: int | None, name: str) -> Path:
    root = tmp_path / f"tree-{name}"
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/lib/systemd/systemd").write_text("#!/bin/true\n")
    (root / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    if version is not None:
        (root / templates.VERSION_FILE).write_text(f'{{"template_version": {version}}}\n')
    tarball = tmp_path / f"{name}.tar.gz"
    templates.pack(root, tarball)
    return tarball


def test_a_template_tarball_is_installed_with_its_version_and_replaces_the_old(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    assert templates.install(fake_template_tarball(tmp_path, version=1, name="v1"), data) == 1
    assert templates.install(fake_template_tarball(tmp_path, version=2, name="v2"), data) == 2
    base = data / "templates/debian-base"
    assert templates.is_bootable(base / "disk")
    assert templates.read_version(base / "disk") == 2
    assert '"template_version": 2' in (base / "template.json").read_text()
    assert sorted(p.name for p in (data / "templates").iterdir()) == ["debian-base"]


def test_a_tarball_that_is_not_a_template_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    templates.install(fake_template_tarball(tmp_path, version=1, name="good"), data)
    before = (data / "templates/debian-base/template.json").read_text()
    with pytest.raises(templates.TemplateError, match="not a scalebox template"):
        templates.install(fake_template_tarball(tmp_path, version=None, name="bad"), data)
    with pytest.raises(templates.TemplateError, match="could not unpack"):
        templates.install(tmp_path / "missing.tar.gz", data)
    assert sorted(p.name for p in (data / "templates").iterdir()) == ["debian-base"]
    assert (data / "templates/debian-base/template.json").read_text() == before


def test_a_unit_waiting_to_restart_its_dead_guest_is_failed_not_starting() -> None:
    text = "MainPID=0\nActiveState=activating\nSubState=auto-restart\n"
    assert parse_show(text) == GuestStatus("failed", None)
    assert parse_show("MainPID=0\nActiveState=activating\nSubState=start\n").status == "starting"


def test_forget_identity_removes_what_makes_a_vm_itself_and_keeps_its_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "disk"
    for rel, text in {
        "etc/ssh/ssh_host_ed25519_key": "secret",
        "etc/ssh/ssh_host_ed25519_key.pub": "public",
        "etc/ssh/sshd_config": "Port 22\n",
        "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
        "home/user/.ssh/authorized_keys": "ssh-ed25519 AAAA me\n",
        "home/user/notes.txt": "kept\n",
        "var/lib/systemd/random-seed": "seed",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    # A guest may plant a symlink where a file is expected: it is removed, not followed.
    outside = tmp_path / "outside"
    outside.write_text("host file\n")
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").symlink_to(outside)

    removed = nspawn.forget_identity(root)

    assert sorted(removed) == [
        "etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub",
        "home/user/.ssh/authorized_keys", "var/lib/dbus/machine-id",
        "var/lib/systemd/random-seed",
    ]  # fmt: skip
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "etc/ssh/sshd_config").read_text() == "Port 22\n"
    assert (root / "home/user/notes.txt").read_text() == "kept\n"
    assert outside.read_text() == "host file\n"


def test_parse_props_reads_systemctl_show() -> None:
    text = "ActiveState=active\nControlGroup=/system.slice/a=b.service\n"
    assert nspawn.parse_props(text) == {
        "ActiveState": "active", "ControlGroup": "/system.slice/a=b.service",
    }  # fmt: skip


def test_cgroup_v2_root_is_the_unified_or_the_hybrid_mount(tmp_path: Path) -> None:
    unified, hybrid = tmp_path / "cgroup", tmp_path / "cgroup/unified"
    hybrid.mkdir(parents=True)
    assert nspawn.cgroup_v2_root((unified, hybrid)) is None  # v1 only: no v2 hierarchy
    (hybrid / "cgroup.procs").write_text("")
    (hybrid / "cgroup.subtree_control").write_text("")
    assert nspawn.cgroup_v2_root((unified, hybrid)) == hybrid
    (unified / "cgroup.procs").write_text("")
    (unified / "cgroup.subtree_control").write_text("")
    assert nspawn.cgroup_v2_root((unified, hybrid)) == unified


def test_is_frozen_reads_cgroup_events(tmp_path: Path) -> None:
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    assert nspawn.is_frozen(tmp_path)
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert not nspawn.is_frozen(tmp_path)
    assert not nspawn.is_frozen(tmp_path / "gone")


def test_a_freeze_asked_for_is_seen_before_it_is_done(tmp_path: Path) -> None:
    """adopt() thaws a VM left frozen by a killed snapshot; it looked only at a
    completed freeze, so one still under way when it looked stayed frozen for good."""
    (tmp_path / "cgroup.freeze").write_text("1\n")
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert nspawn.freeze_asked(tmp_path) and not nspawn.is_frozen(tmp_path)
    (tmp_path / "cgroup.freeze").write_text("0\n")
    assert not nspawn.freeze_asked(tmp_path)
    assert not nspawn.freeze_asked(tmp_path / "gone")


def test_forget_identity_removes_nothing_through_a_planted_directory_symlink(
    tmp_path: Path,
) -> None:
    """A guest made /etc/ssh and /etc point at the host's (absolute) paths: nothing there goes."""
    host = tmp_path / "host"
    (host / "ssh").mkdir(parents=True)
    (host / "ssh/ssh_host_ed25519_key").write_text("the host's key")
    (host / "machine-id").write_text("host id\n")
    root = tmp_path / "disk"
    root.mkdir()
    (root / "etc").symlink_to(host)
    (root / "home/user").mkdir(parents=True)
    (root / "home/user/.ssh").symlink_to(host / "ssh")

    assert nspawn.forget_identity(root) == []
    assert (host / "ssh/ssh_host_ed25519_key").read_text() == "the host's key"
    assert (host / "machine-id").read_text() == "host id\n"


def test_make_disk_refuses_a_template_whose_etc_is_a_symlink(tmp_path: Path) -> None:
    host_etc = tmp_path / "host-etc"
    host_etc.mkdir()
    (host_etc / "hostname").write_text("host\n")
    disk = tmp_path / "disk"
    (disk / "home/user").mkdir(parents=True)
    (disk / "etc").symlink_to(host_etc)
    with pytest.raises(nspawn.CommandFailed, match="template's etc is a symlink"):
        make_disk(disk, tmp_path / "vm", ssh_public_key=real_key())
    assert (host_etc / "hostname").read_text() == "host\n"
    assert list((tmp_path / "vm").iterdir()) == []
