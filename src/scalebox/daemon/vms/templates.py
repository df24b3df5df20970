"""Root filesystem templates of the nspawn backend: build, pack and install ``debian-base``.

A template is a directory ``DATA_DIR/templates/<name>/`` holding ``disk/``
(a bootable Debian root filesystem) and ``template.json`` (name, created_at,
source_vm, template_version). ``debian-base`` is built with debootstrap
(``build_rootfs``), shipped as a tarball (``pack``) so offline servers and
test machines take a prebuilt one, and unpacked into place by ``install``.

    python -m scalebox.daemon.vms.templates build OUT.tar.gz [--mirror URL]
    python -m scalebox.daemon.vms.templates install FILE [--config PATH]
    python -m scalebox.daemon.vms.templates rebuild [--mirror URL] [--config PATH]
    python -m scalebox.daemon.vms.templates status [--config PATH]

``status`` exits 0 when the installed debian-base has this release's
TEMPLATE_VERSION, 3 when it is missing or older (install.sh and
scalebox-update ask it); ``rebuild`` is build + install in one step.

Installing replaces the template atomically (rename in, then retire the old
one): VMs made from the old one keep it as their read-only lower layer
(``DATA_DIR/layers/``, removed when the last of them is deleted), so running
VMs never notice.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from scalebox.config import DEFAULT_PATH as DEFAULT_CONFIG_PATH
from scalebox.config import load as load_config
from scalebox.daemon.vms import disks
from scalebox.daemon.vms.models import now_iso
from scalebox.errors import ScaleboxError
from scalebox.fsutil import atomic_write

BASE_TEMPLATE = "debian-base"
# Bump whenever build_rootfs() makes a different tree: releases compare it to
# what is installed and say when the template needs rebuilding.
TEMPLATE_VERSION = 1
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "sudo",
    "iproute2",
    "curl",
    "python3",
    "ca-certificates",
    "procps",
    "less",
)
USER = "user"
# Inside the rootfs: what a running VM can read to learn its template.
VERSION_FILE = "etc/scalebox-template.json"
META_NAME = "template.json"
TMP_PREFIX = ".tmp-"

SSHD_CONFIG = """\
# Written by scalebox: keys only, one host key made at the VM's first boot.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
HostKey /etc/ssh/ssh_host_ed25519_key
"""
# Every VM makes its own host key at its first boot (a copy of the template
# must never share one); ed25519 takes milliseconds where RSA takes a second.
SSH_HOSTKEY_DROPIN = """\
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -s /etc/ssh/ssh_host_ed25519_key || \
ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
"""
# Units that only slow a container's boot or have nothing to do in one.
MASKED_UNITS = (
    "console-getty.service",
    "getty@.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-networkd-wait-online.service",
)


# One template install or rebuild at a time per DATA_DIR; scaleboxd's start removes
# an unfinished one's .tmp- directory only while it can take this lock itself.
LOCK_NAME = ".templates.lock"


@contextlib.contextmanager
def exclusive(data_dir: Path, *, create: bool = True) -> Iterator[bool]:
    """Hold DATA_DIR's template lock for the block; yields False (not held) when
    another process holds it. OSError when the lock file cannot be opened.

    ``create=False`` (scaleboxd, which must not add a file to DATA_DIR: an update
    leaves it as it was) takes a missing lock file for a free lock: no install or
    rebuild has run, and one starting now makes its directory after the file.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(data_dir / LOCK_NAME, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _only_one(data_dir: Path) -> contextlib.AbstractContextManager[bool]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return exclusive(data_dir)


def _refuse_if_busy(held: bool, data_dir: Path) -> None:
    if not held:
        raise TemplateError(
            f"another template install or rebuild is running on {data_dir}",
            "wait for it to finish, then run this again",
        )


def _remove_leftovers(data_dir: Path) -> None:
    """What a rebuild killed half way left beside templates/ (its build directory and
    tarball); nothing else removes them. Only with the lock held."""
    for entry in data_dir.glob(f"{TMP_PREFIX}build-*"):
        shutil.rmtree(entry, ignore_errors=True)
    (data_dir / f"{TMP_PREFIX}{BASE_TEMPLATE}.tar.gz").unlink(missing_ok=True)


class TemplateError(ScaleboxError):
    """A template could not be built or installed."""


def _run(argv: list[str], what: str, log: Path | None = None) -> None:
    """Run ``argv``; its output goes to ``log`` (or is kept), its tail into the error."""
    try:
        if log is None:
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            output = done.stdout + done.stderr
            code = done.returncode
        else:
            with log.open("w") as out:
                code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                      check=False).returncode  # fmt: skip
            output = log.read_text(errors="replace")
    except FileNotFoundError:
        raise TemplateError(f"could not {what}: {argv[0]} is not installed",
                            f"apt-get install {argv[0]}") from None  # fmt: skip
    if code != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise TemplateError(
            f"could not {what}: {' '.join(argv[:3])} ... exited with {code}:\n{tail}",
            f"see {log}" if log else "fix the cause above and run again",
        )


def build_rootfs(target: Path, *, mirror: str = DEFAULT_MIRROR, log: Path | None = None) -> None:
    """debootstrap Debian 12 into the new directory ``target`` and make it a sandbox template."""
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
            str(target), mirror]  # fmt: skip
    _run(argv, f"debootstrap {SUITE} from {mirror}", log)
    configure_rootfs(target)


def _chroot(root: Path, *argv: str) -> None:
    _run(["chroot", str(root), *argv], f"run {argv[0]} in {root}")


def configure_rootfs(root: Path) -> None:
    """Turn a debootstrapped tree into the template every VM copies."""
    _chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", USER)
    # '*': no password can ever match, yet the account is not locked, so
    # sshd (with or without PAM) lets the key in.
    _chroot(root, "usermod", "--password", "*", USER)
    sudoers = root / "etc/sudoers.d/scalebox-user"
    sudoers.write_text(f"{USER} ALL=(ALL:ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    ssh_dir = root / "etc/ssh"
    (ssh_dir / "sshd_config.d").mkdir(parents=True, exist_ok=True)
    (ssh_dir / "sshd_config.d/scalebox.conf").write_text(SSHD_CONFIG)
    for key in ssh_dir.glob("ssh_host_*"):
        key.unlink()
    dropin = root / "etc/systemd/system/ssh.service.d/scalebox-hostkey.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(SSH_HOSTKEY_DROPIN)
    for unit in MASKED_UNITS:
        mask = root / "etc/systemd/system" / unit
        with contextlib.suppress(FileExistsError):
            mask.symlink_to("/dev/null")
    # Each VM gets its own machine id and hostname when it is made.
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("debian-base\n")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (root / cache).glob("*"):
            if entry.is_file():
                entry.unlink()
    (root / VERSION_FILE).write_text(
        json.dumps({"template": BASE_TEMPLATE, "template_version": TEMPLATE_VERSION}) + "\n"
    )


def pack(root: Path, tarball: Path) -> None:
    """Write ``root`` as a gzip tarball (owners numeric, modes, devices, xattrs kept)."""
    tmp = tarball.with_name(f".{tarball.name}.{os.getpid()}.tmp")
    try:
        _run(["tar", "--numeric-owner", "--xattrs", "-czf", str(tmp), "-C", str(root), "."],
             f"pack {root} into {tarball}")  # fmt: skip
        tmp.replace(tarball)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_version(rootfs: Path) -> int | None:
    """The template version written into a root filesystem, None if it has none."""
    try:
        data = json.loads((rootfs / VERSION_FILE).read_text())
    except (OSError, ValueError):
        return None
    version = data.get("template_version") if isinstance(data, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def is_bootable(rootfs: Path) -> bool:
    """Whether ``rootfs`` looks like a root filesystem systemd-nspawn can boot."""
    return (rootfs / "usr/lib/systemd/systemd").is_file() and (rootfs / "etc/os-release").exists()


def _checked_version(rootfs: Path, tarball: Path) -> int:
    version = read_version(rootfs)
    if version is None or not is_bootable(rootfs):
        raise TemplateError(
            f"{tarball} is not a scalebox template (no {VERSION_FILE} or no systemd in it)",
            "build one with: python -m scalebox.daemon.vms.templates build FILE",
        )
    return version


def install(tarball: Path, data_dir: Path, name: str = BASE_TEMPLATE) -> int:
    """Unpack ``tarball`` as template ``name`` under ``data_dir``; return its template version.

    Unpacked into a ``.tmp-`` directory (which scaleboxd removes on start if
    this is cut off), checked, then renamed into place; a template it
    replaces is renamed aside and removed. Never touches a VM.
    """
    templates = data_dir / "templates"
    templates.mkdir(parents=True, exist_ok=True)
    building = templates / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    old = templates / f"{TMP_PREFIX}replaced-{name}-{secrets.token_hex(4)}"
    try:
        (building / "disk").mkdir(parents=True)
        _run(["tar", "--numeric-owner", "--xattrs", "-xpzf", str(tarball),
              "-C", str(building / "disk")], f"unpack {tarball}")  # fmt: skip
        version = _checked_version(building / "disk", tarball)
        meta = {
            "name": name,
            "created_at": now_iso(),
            "source_vm": None,
            "template_version": version,
        }
        atomic_write(building / META_NAME, json.dumps(meta, indent=2) + "\n")
        final = templates / name
        if final.exists():
            final.rename(old)
        building.rename(final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        if old.exists() and not (templates / name).exists():
            old.rename(templates / name)
        raise
    if old.exists():
        # Running VMs use the old disk as their lower layer: it goes to
        # DATA_DIR/layers/ and is removed when the last of them is deleted.
        disks.retire_tree(old, data_dir)
        disks.collect_layers(data_dir)
    return version


STATUS_OUTDATED = 3  # `status`: the template is missing or older than this release's


def installed_version(data_dir: Path, name: str = BASE_TEMPLATE) -> int | None:
    """The template version of the installed template ``name``, None when there is none."""
    try:
        data = json.loads((data_dir / "templates" / name / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    version = data.get("template_version") if isinstance(data, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def status_line(installed: int | None, wanted: int = TEMPLATE_VERSION) -> tuple[bool, str]:
    """Whether the installed debian-base is current, and one line that says so."""
    rebuild = "sudo /opt/scalebox/current/venv/bin/python -m scalebox.daemon.vms.templates rebuild"
    if installed is None:
        return False, f"template {BASE_TEMPLATE} is not installed; make it with: {rebuild}"
    if installed < wanted:
        return False, (
            f"template {BASE_TEMPLATE} is version {installed}, this release builds version "
            f"{wanted}; new VMs keep using version {installed} until you rebuild it (running "
            f"VMs and snapshots are not touched): {rebuild}"
        )
    return True, f"template {BASE_TEMPLATE} version {installed} is current"


def _build(out: Path, mirror: str) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{TMP_PREFIX}build-") as scratch:
        root = Path(scratch) / "rootfs"
        build_rootfs(root, mirror=mirror, log=Path(scratch) / "debootstrap.log")
        pack(root, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scalebox.daemon.vms.templates",
        description="Build or install the debian-base template of the nspawn backend.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="debootstrap debian-base and write it as a tarball")
    build.add_argument("out", type=Path)
    build.add_argument("--mirror", default=DEFAULT_MIRROR)
    inst = sub.add_parser("install", help="unpack a template tarball into DATA_DIR/templates")
    inst.add_argument("tarball", type=Path)
    inst.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    inst.add_argument("--name", default=BASE_TEMPLATE)
    again = sub.add_parser("rebuild", help="build debian-base and install it (running VMs stay)")
    again.add_argument("--mirror", default=DEFAULT_MIRROR)
    again.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    stat = sub.add_parser(
        "status", help=f"exit 0 if debian-base is current, {STATUS_OUTDATED} if not"
    )
    stat.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            _build(args.out, args.mirror)
            print(f"built {BASE_TEMPLATE} version {TEMPLATE_VERSION}: {args.out}")
        elif args.cmd == "status":
            config = load_config(args.config, os.environ)
            if config.vm_backend != "nspawn":
                print(f"VM_BACKEND={config.vm_backend}: VMs are stand-ins; no template is used")
                return 0
            current, line = status_line(installed_version(config.data_dir))
            print(line)
            return 0 if current else STATUS_OUTDATED
        elif args.cmd == "rebuild":
            config = load_config(args.config, os.environ)
            # Beside templates/, not in it: nothing half-built is ever listed as a template.
            out = config.data_dir / f"{TMP_PREFIX}{BASE_TEMPLATE}.tar.gz"
            with _only_one(config.data_dir) as held:
                _refuse_if_busy(held, config.data_dir)
                _remove_leftovers(config.data_dir)
                try:
                    _build(out, args.mirror)
                    version = install(out, config.data_dir)
                finally:
                    out.unlink(missing_ok=True)
            print(f"rebuilt template {BASE_TEMPLATE} version {version} in {config.data_dir}")
        else:
            config = load_config(args.config, os.environ)
            with _only_one(config.data_dir) as held:
                _refuse_if_busy(held, config.data_dir)
                version = install(args.tarball, config.data_dir, args.name)
            print(f"installed template {args.name} version {version} in {config.data_dir}")
    except ScaleboxError as exc:
        print(f"templates: error: {exc}", file=sys.stderr)
        return 1  # refused or failed; this tool has no other outcomes
    except OSError as exc:
        print(f"templates: error: {exc}\n  hint: check that the data directory is writable "
              "and has free space, then run this again", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
