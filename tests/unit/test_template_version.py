"""The template version: `templates status`, the updater's notice, and a rebuild that
leaves VMs and snapshots alone. Real files, real tar, a real interpreter."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebox.config import ServerConfig
from scalebox.daemon.vms import templates
from scalebox.daemon.vms.service import VMService
from scalebox.update import template_notice
from scalebox.update.paths import Paths
from tests.unit.test_nspawn import fake_template_tarball

TOKEN = "API_TOKEN=sb-0123456789abcdef0123\nHOST_IP=203.0.113.7\n"
NOW = templates.TEMPLATE_VERSION


def config(tmp_path: Path, backend: str = "nspawn") -> Path:
    path = tmp_path / "config"
    path.write_text(f"{TOKEN}DATA_DIR={tmp_path / 'data'}\nVM_BACKEND={backend}\n")
    return path


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: its sha256 and inode (a copy would get a new one)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_status_line_says_current_missing_or_older_with_the_rebuild_command() -> None:
    assert templates.status_line(NOW) == (True, f"template debian-base version {NOW} is current")
    assert templates.status_line(NOW + 1)[0]  # a newer one (after a rollback) is fine
    for installed in (None, NOW - 1):
        current, line = templates.status_line(installed)
        assert not current
        assert "-m scalebox.daemon.vms.templates rebuild" in line, line
    assert "running VMs and snapshots are not touched" in templates.status_line(NOW - 1)[1]


@pytest.mark.parametrize(
    ("installed", "backend", "code"),
    [(None, "nspawn", 3), (NOW - 1, "nspawn", 3), (NOW, "nspawn", 0), (None, "process", 0)],
)
def test_status_exit_code(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    installed: int | None,
    backend: str,
    code: int,
) -> None:
    cfg = config(tmp_path, backend)
    if installed is not None:
        tarball = fake_template_tarball(tmp_path, version=installed, name="t")
        templates.install(tarball, tmp_path / "data")
    assert templates.main(["status", "--config", str(cfg)]) == code
    assert capsys.readouterr().out.strip()


def test_installing_a_new_debian_base_never_touches_vms_or_snapshots(tmp_path: Path) -> None:
    """What `templates rebuild` does after building: VMs' disks and snapshot templates stay."""
    data = tmp_path / "data"
    templates.install(fake_template_tarball(tmp_path, version=NOW - 1, name="old"), data)
    vm = data / "vms/vm-0123456789ab"
    (vm / "disk/home/user").mkdir(parents=True)
    (vm / "disk/home/user/notes.txt").write_text("written in the VM\n")
    (vm / "vm.json").write_text(json.dumps({"id": vm.name}))
    snap = data / "templates/my-snapshot"
    (snap / "disk/home/user").mkdir(parents=True)
    (snap / "disk/home/user/notes.txt").write_text("snapshotted\n")
    (snap / "template.json").write_text(json.dumps({"name": "my-snapshot"}))
    before = (tree(data / "vms"), tree(snap))

    assert templates.install(fake_template_tarball(tmp_path, version=NOW, name="new"), data) == NOW
    assert templates.installed_version(data) == NOW
    assert (tree(data / "vms"), tree(snap)) == before


def test_the_updater_names_the_rebuild_only_when_the_new_release_needs_it(tmp_path: Path) -> None:
    paths = Paths(root=tmp_path / "root")
    assert template_notice.notice(paths) is None  # no release: nothing to say
    bin_dir = paths.current / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    # The release's interpreter and code: this test's own (a symlink would lose the venv).
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    paths.config.parent.mkdir(parents=True)
    paths.config.write_text(config(tmp_path).read_text())
    data = tmp_path / "data"
    templates.install(fake_template_tarball(tmp_path, version=NOW - 1, name="old"), data)
    said = template_notice.notice(paths)
    assert said is not None
    assert f"version {NOW - 1}, this release builds version {NOW}" in said
    assert "scalebox.daemon.vms.templates rebuild" in said
    templates.install(fake_template_tarball(tmp_path, version=NOW, name="new"), data)
    assert template_notice.notice(paths) is None


@pytest.fixture
def lock_held_elsewhere(tmp_path: Path) -> Iterator[Path]:
    """DATA_DIR's template lock, held by another real process (util-linux flock)."""
    data = tmp_path / "data"
    data.mkdir()
    holder = subprocess.Popen(
        ["flock", str(data / templates.LOCK_NAME), "sh", "-c", "echo held; exec sleep 60"],
        stdout=subprocess.PIPE,
        start_new_session=True,  # flock forks its command: the group goes at the end
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        yield data
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        holder.stdout.close()


def test_a_second_install_at_once_is_refused_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lock_held_elsewhere: Path
) -> None:
    tarball = fake_template_tarball(tmp_path, version=NOW, name="t")
    assert templates.main(["install", str(tarball), "--config", str(config(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "another template install or rebuild is running" in err
    assert not (lock_held_elsewhere / "templates").exists()


def test_a_daemon_start_leaves_a_running_install_its_directory(
    tmp_path: Path, lock_held_elsewhere: Path
) -> None:
    """scaleboxd's start moved away the .tmp- directory an install was unpacking into."""
    unpacking = lock_held_elsewhere / "templates" / ".tmp-debian-base-0123abcd"
    (unpacking / "disk").mkdir(parents=True)
    cfg = ServerConfig(api_token="t" * 32, data_dir=lock_held_elsewhere, vm_backend="process")
    service = VMService(cfg, logging.getLogger("t"), use_systemd=False)
    service.start()
    service.close()
    assert (unpacking / "disk").is_dir()


def test_a_rebuild_first_removes_what_a_killed_one_left(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / ".tmp-build-x1y2z3" / "rootfs" / "etc").mkdir(parents=True)
    (data / ".tmp-debian-base.tar.gz").write_bytes(b"half a tarball")
    (data / "templates").mkdir()
    templates._remove_leftovers(data)
    assert sorted(p.name for p in data.iterdir()) == ["templates"]


def test_a_daemon_start_adds_no_lock_file_to_data_dir(tmp_path: Path) -> None:
    """It did: `./do check-update` found DATA_DIR changed across an update."""
    data = tmp_path / "data"
    (data / "templates" / ".tmp-debian-base-0123abcd" / "disk").mkdir(parents=True)
    cfg = ServerConfig(api_token="t" * 32, data_dir=data, vm_backend="process")
    service = VMService(cfg, logging.getLogger("t"), use_systemd=False)
    service.start()
    service.close()
    assert not (data / templates.LOCK_NAME).exists()
    assert not (data / "templates" / ".tmp-debian-base-0123abcd").exists()  # no install ran
