"""The cached Debian 12 image that every test machine boots from.

Built once with debootstrap into /var/cache/scalebox-dev/images/<key>/, where
<key> hashes the suite, mirror and package list: changing any of them builds a
new image instead of silently reusing a stale one. Two runs at once must not
debootstrap into one folder (that corrupts it), so the build holds an flock and
writes into a fresh folder that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from scalebox.daemon.vms import templates
from scalebox.errors import ScaleboxError

CACHE_DIR = Path(os.environ.get("SCALEBOX_DEV_CACHE", "/var/cache/scalebox-dev"))
SUITE = "bookworm"
# The mirror this host already uses (/etc/apt/sources.list.d/debian.sources):
# the machine itself has no route to any registry, so everything install.sh
# needs on a real server must be in the image already.
MIRROR = "http://deb.debian.org/debian"
# Named explicitly: on an Ubuntu host (GitHub's runners) debootstrap of a Debian
# suite cannot check the archive's signature without it. ./do installs it.
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "curl",
    "python3",
    "python3-venv",
    "iproute2",
    "ca-certificates",
    "procps",
    # The nspawn VM backend: containers inside the machine, and the real ssh client to reach them.
    "systemd-container",
    "openssh-client",
    # The VMs' firewall and outbound NAT (scalebox.daemon.vms.network); install.sh installs it.
    "nftables",
)
# Bump when _configure() changes what goes into the image: it is part of the key.
REVISION = 1
# The marker is written last inside the build folder; an image without it was
# never finished and is never booted.
MARKER = ".scalebox-image.json"


class ImageError(ScaleboxError):
    """The machine image could not be built."""


def image_key(
    suite: str = SUITE, mirror: str = MIRROR, packages: tuple[str, ...] = PACKAGES
) -> str:
    """The cache key of an image: changes whenever its inputs change."""
    text = json.dumps(
        {"suite": suite, "mirror": mirror, "packages": sorted(packages), "revision": REVISION}
    )
    return f"{suite}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def image_path(cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / "images" / image_key()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def ensure_image(cache_dir: Path = CACHE_DIR) -> Path:
    """Return the path of a complete image, building it first if needed."""
    final = image_path(cache_dir)
    if is_complete(final):
        return final
    with _locked(cache_dir / "image.lock"):
        # Another run may have finished the build while we waited for the lock.
        if is_complete(final):
            return final
        _remove_unfinished(final.parent)
        _build(final)
    return final


def _remove_unfinished(images_dir: Path) -> None:
    """Remove build folders left by a killed build (only called under the lock)."""
    if not images_dir.is_dir():
        return
    for entry in images_dir.iterdir():
        if entry.name.startswith(".build-") or (entry.is_dir() and not is_complete(entry)):
            shutil.rmtree(entry, ignore_errors=True)


def _build(final: Path) -> None:
    building = final.parent / f".build-{final.name}-{os.getpid()}"
    building.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"==> building the machine image {final.name} with debootstrap "
        "(first use only, takes 1-2 minutes)",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    log = final.parent / f"{final.name}.debootstrap.log"
    try:
        _debootstrap(building, log)
        _configure(building)
        seconds = time.monotonic() - started
        (building / MARKER).write_text(
            json.dumps({"key": final.name, "packages": list(PACKAGES), "build_seconds": seconds})
        )
        building.rename(final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    print(f"==> image built in {seconds:.0f} s: {final}", file=sys.stderr, flush=True)


def debootstrap_argv(target: Path) -> list[str]:
    """The debootstrap command line; the keyring is always named (see KEYRING)."""
    return [
        "debootstrap",
        "--variant=minbase",
        f"--keyring={KEYRING}",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(target),
        MIRROR,
    ]


def _debootstrap(target: Path, log: Path) -> None:
    if not KEYRING.is_file():
        raise ImageError(
            f"the Debian archive keyring {KEYRING} is missing; debootstrap cannot check {MIRROR}",
            "install it: sudo apt-get install debian-archive-keyring (./do does this)",
        )
    argv = debootstrap_argv(target)
    with log.open("w") as out:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ImageError(
            f"debootstrap failed with exit code {result.returncode}:\n{tail}",
            f"see {log}; check that {MIRROR} is reachable, then run again",
        )


def _configure(root: Path) -> None:
    """Small settings that make the image boot quietly as a container."""
    # A hostname makes the shell prompt and logs say where you are.
    (root / "etc/hostname").write_text("scalebox-test\n")
    # No getty on the console: nspawn's console is a log file, not a terminal.
    for unit in ("console-getty.service", "getty@.service"):
        mask = root / "etc/systemd/system" / unit
        mask.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            mask.symlink_to("/dev/null")
    # An empty machine-id is filled in at each boot (the overlay keeps the image clean).
    (root / "etc/machine-id").write_text("")


def build_seconds(path: Path) -> float | None:
    """How long the cached image took to build, as recorded in its marker."""
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    seconds = data.get("build_seconds")
    return float(seconds) if isinstance(seconds, int | float) else None


# --- the VM template (debian-base) -------------------------------------------------
# Built once per host with the same code a server uses
# (scalebox.daemon.vms.templates) and cached as the tarball that
# `templates install` takes; the key changes with its packages and version.


def template_key() -> str:
    text = json.dumps(
        {
            "suite": templates.SUITE,
            "mirror": MIRROR,
            "packages": sorted(templates.PACKAGES),
            "template_version": templates.TEMPLATE_VERSION,
        }
    )
    return f"debian-base-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def template_path(cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / "templates" / f"{template_key()}.tar.gz"


def ensure_template(cache_dir: Path = CACHE_DIR) -> Path:
    """Return the path of the cached debian-base tarball, building it first if needed."""
    final = template_path(cache_dir)
    if final.is_file():
        return final
    with _locked(cache_dir / "template.lock"):
        if final.is_file():
            return final
        print(f"==> building the VM template {final.name} (first use only, 1-2 minutes)",
              file=sys.stderr, flush=True)  # fmt: skip
        started = time.monotonic()
        final.parent.mkdir(parents=True, exist_ok=True)
        # Under the lock: what a killed build left is never finished; remove it.
        for stale in final.parent.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        building = final.parent / f".build-{os.getpid()}"
        try:
            building.mkdir()
            log = final.parent / f"{template_key()}.debootstrap.log"
            templates.build_rootfs(building / "rootfs", mirror=MIRROR, log=log)
            # pack() writes a temporary file and renames it: the tarball is complete or absent.
            templates.pack(building / "rootfs", final)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        print(f"==> template built in {time.monotonic() - started:.0f} s: {final}",
              file=sys.stderr, flush=True)  # fmt: skip
    return final


if __name__ == "__main__":
    print(ensure_template() if sys.argv[1:] == ["template"] else ensure_image())
