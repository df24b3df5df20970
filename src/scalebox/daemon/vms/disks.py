"""VM disks: copied directories (process backend) and layered images (nspawn backend)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from scalebox.daemon.vms import idmap, mounts
from scalebox.daemon.vms.command import CommandFailed, run


def copy_tree(source: Path, target: Path) -> None:
    """Copy directory ``source`` to the new path ``target``, sharing blocks where possible.

    ``cp --reflink=auto`` clones extents on btrfs/XFS and falls back to a
    plain copy elsewhere; ``-a`` keeps modes, owners and times.
    """
    try:
        run(
            ["cp", "-a", "--reflink=auto", "--no-target-directory", "--", str(source), str(target)],
            f"copy the disk {source} to {target}",
            timeout=3600,  # a real disk image without reflink support is gigabytes of copying
        )
    except CommandFailed as exc:
        if _ran_out_of_space(exc.what, target.parent):
            # The disk filled up, as a write of the daemon's own would say: answered 507
            # (the caller removes the partial copy), not a 500 quoting cp and its paths.
            # The file name reaches the log only (the answer names the cause, not paths).
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from exc
        raise


# Less free space than this after a failed copy: the copy is what filled the disk.
NEARLY_FULL_BYTES = 1024 * 1024


def _ran_out_of_space(message: str, where: Path) -> bool:
    """Whether cp failed for want of space: its words (in English) or, in any language,
    a file system left nearly full."""
    if "No space left on device" in message or "Disk quota exceeded" in message:
        return True
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL_BYTES


def tree_size(path: Path) -> int:
    """Bytes in the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = (Path(root) / name).lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything under it; a missing path is fine."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


# --- layered disks of the nspawn backend -----------------------------------------------
#
# DATA_DIR/vms/<id>/
#   disk.img  a sparse ext4 image of disk_size_gib: the VM's own writes (overlay
#             upper/ and work/), so what a VM can write is bounded by its size
#   fs/       where disk.img is mounted (loop) while the VM is up
#   disk/     the VM's root: an overlay of its template's disk (read-only lower)
#             and fs/upper; what systemd-nspawn boots
#   lower/    with a user namespace (uid_base, see idmap.py): an idmapped mount
#             of the template's disk, the overlay's lower layer instead of it
#   layer     the inode number of the template disk it was made from
#
# A template a VM still uses is never removed: deleting or replacing it moves it
# into DATA_DIR/layers/ (retire_tree), and collect_layers removes a layer once
# no VM names it.

IMAGE = "disk.img"
FS_DIR = "fs"
ROOT_DIR = "disk"
LOWER_DIR = "lower"
LAYER_FILE = "layer"
LAYERS_DIR = "layers"
MKFS_OPTIONS = (
    "-q", "-F", "-t", "ext4",
    "-m", "0",  # no blocks kept for root: the VM's root is the one filling it
    "-E", "lazy_itable_init=1,lazy_journal_init=1",  # a fresh sparse file reads as zeros
    "-L", "scalebox-vm",
)  # fmt: skip


def make_image(image: Path, size_bytes: int, content: Path) -> None:
    """A new sparse ext4 image of ``size_bytes`` at ``image``, holding the tree ``content``.

    ``mkfs.ext4 -d`` copies the tree (owners, modes, xattrs) without mounting anything.
    """
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    run(["mkfs.ext4", *MKFS_OPTIONS, "-d", str(content), str(image)],
        f"make the disk image {image}")  # fmt: skip


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at ``path``: also a bind mount of the same file system."""
    return mounts.is_mounted(path)


def is_full_copy(vm_dir: Path) -> bool:
    """A VM made before disks were layered: disk/ is a whole root, there is no image."""
    return not (vm_dir / IMAGE).exists() and (vm_dir / ROOT_DIR / "etc").is_dir()


def mount_layers(vm_dir: Path, lower: Path, uid_base: int = 0) -> None:
    """Mount the VM's image at fs/ and its root overlay at disk/; what is mounted stays.

    With ``uid_base`` the overlay's lower layer is lower/, the template's disk
    idmapped to the VM's UIDs (its upper layer holds them already, see
    NspawnBackend.make_disk), so the container's root (host UID ``uid_base``)
    owns its files while nothing on disk is shifted.
    """
    fs, root, mapped = vm_dir / FS_DIR, vm_dir / ROOT_DIR, vm_dir / LOWER_DIR
    for part in (str(lower), str(fs), str(mapped)):
        if any(c in part for c in ",:\\\n"):
            raise CommandFailed(
                f"cannot mount the disk of {vm_dir.name}: the path {part} holds ',', ':' or '\\'",
                "set DATA_DIR to a path without them",
            )
    if not is_mounted(fs):
        run(["mount", "-t", "ext4", "-o", "loop,noatime", str(vm_dir / IMAGE), str(fs)],
            f"mount the disk image of {vm_dir.name} (a loop device)")  # fmt: skip
    if uid_base and not is_mounted(mapped):
        mapped.mkdir(exist_ok=True)
        try:
            with idmap.userns(uid_base) as userns_fd:
                idmap.mount_idmapped(lower, mapped, userns_fd)
        except OSError as exc:
            raise CommandFailed(
                f"cannot map the template disk of {vm_dir.name} to its UIDs: {exc}",
                "see the warning scaleboxd logged at start about user namespaces",
            ) from None
    if not is_mounted(root):
        lowerdir = mapped if uid_base else lower
        options = f"lowerdir={lowerdir},upperdir={fs}/upper,workdir={fs}/work"
        run(["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
            f"mount the root overlay of {vm_dir.name}")  # fmt: skip


def unmount_layers(vm_dir: Path) -> None:
    """Unmount disk/, lower/ then fs/ (the loop device goes with it); raise if one stays mounted."""
    for part in _mounts(vm_dir):
        if is_mounted(part):
            run(["umount", str(part)], f"unmount {part}")


def _mounts(vm_dir: Path) -> tuple[Path, ...]:
    """What a VM directory may have mounted, the top first."""
    return (vm_dir / ROOT_DIR, vm_dir / LOWER_DIR, vm_dir / FS_DIR)


def remove_vm_dir(vm_dir: Path) -> None:
    """Unmount what a VM directory has mounted, then remove it; never removes through a mount."""
    unmount_layers(vm_dir)
    left = mounts.mounts_under(vm_dir)
    if left:
        raise CommandFailed(f"{left[0]} is still mounted", f"unmount it: umount {left[0]}")
    remove_tree(vm_dir)


def layer_of(template_disk: Path) -> str:
    """What a VM records to find its template's disk again, even after it is retired."""
    return str(template_disk.stat().st_ino)


def find_layer(data_dir: Path, template: str, layer: str) -> Path | None:
    """The template disk (live, or retired into layers/) whose identity is ``layer``."""
    candidates = [data_dir / "templates" / template / "disk"]
    with contextlib.suppress(FileNotFoundError):
        candidates += sorted(p / "disk" for p in (data_dir / LAYERS_DIR).iterdir())
    for disk in candidates:
        with contextlib.suppress(OSError):
            if not disk.is_symlink() and disk.is_dir() and layer_of(disk) == layer:
                return disk
    return None


def retire_tree(tree: Path, data_dir: Path) -> None:
    """Take template directory ``tree`` out of use: moved to layers/, which
    collect_layers empties of what no VM uses."""
    layers = data_dir / LAYERS_DIR
    layers.mkdir(exist_ok=True)
    tree.rename(layers / f"{tree.name.lstrip('.')}-{os.urandom(4).hex()}")


def collect_layers(data_dir: Path) -> list[Path]:
    """Remove every retired layer no VM (made or being made) names; return them."""
    used = set()
    with contextlib.suppress(FileNotFoundError):
        for vm_dir in (data_dir / "vms").iterdir():
            with contextlib.suppress(OSError):
                used.add((vm_dir / LAYER_FILE).read_text().strip())
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for layer in sorted((data_dir / LAYERS_DIR).iterdir()):
            try:
                ident = layer_of(layer / "disk")
            except OSError:
                ident = ""
            if ident not in used:
                remove_tree(layer)
                removed.append(layer)
    return removed
