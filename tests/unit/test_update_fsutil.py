"""fsutil, the one door for durable writes: what a later step relies on is fsynced first.

A power loss cannot be simulated on this host (its page cache survives a
killed machine), so these tests watch the fsync calls themselves: the real
``os.fsync`` runs, wrapped to note which file each descriptor names. That
observation is the only stand-in here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from scalebox import fsutil
from scalebox.update import switch
from scalebox.update.paths import Paths


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path fsynced from now on, in order (the real fsync still runs)."""
    seen: list[Path] = []
    real: Callable[[int], None] = os.fsync

    def noting(fd: int) -> None:
        seen.append(Path(f"/proc/self/fd/{fd}").readlink())
        real(fd)

    monkeypatch.setattr(os, "fsync", noting)
    return seen


def test_durable_copy_keeps_bytes_and_mode_and_syncs_before_the_rename(
    tmp_path: Path, synced: list[Path]
) -> None:
    src = tmp_path / "config"
    src.write_bytes(b"API_TOKEN=x\n")
    src.chmod(0o600)
    dst = tmp_path / "backup" / "config"
    fsutil.durable_copy(src, dst)
    assert dst.read_bytes() == b"API_TOKEN=x\n"
    assert dst.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in dst.parent.iterdir()) == ["config"]  # no temp file left
    # The data of the temp file, then the directory holding the rename.
    assert synced[0].parent == dst.parent
    assert synced[0].name.startswith(".config.")
    assert synced[-1] == dst.parent


@pytest.fixture
def syncfs_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every directory whose filesystem was synced with syncfs(2) (the real call still runs)."""
    seen: list[Path] = []
    real = fsutil.syncfs

    def noting(fd: int) -> None:
        seen.append(Path(f"/proc/self/fd/{fd}").readlink())
        real(fd)

    monkeypatch.setattr(fsutil, "syncfs", noting)
    return seen


def test_fsync_tree_syncs_the_trees_filesystem_once(
    tmp_path: Path, syncfs_calls: list[Path], synced: list[Path]
) -> None:
    tree = tmp_path / "release"
    (tree / "venv" / "bin").mkdir(parents=True)
    (tree / "RELEASE.json").write_text("{}")
    (tree / "venv" / "bin" / "scaleboxd").write_text("#!/bin/sh\n")
    fsutil.fsync_tree(tree)
    # One syncfs of the filesystem that holds the tree covers every file in it.
    assert syncfs_calls == [tree]
    assert synced == []


def test_a_failing_syncfs_is_an_error_not_silence(tmp_path: Path) -> None:
    # A descriptor that is not open: the real syncfs(2) fails and the error is raised.
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        fsutil.syncfs(fd)


def test_backup_json_is_written_after_every_copy_is_synced(
    tmp_path: Path, synced: list[Path]
) -> None:
    paths = Paths(tmp_path)
    paths.systemd_dir.mkdir(parents=True)
    (paths.systemd_dir / "scaleboxd.service").write_text("[Service]\n")
    paths.config.parent.mkdir(parents=True)
    paths.config.write_text("API_TOKEN=x\n")
    backup = tmp_path / "backup"
    switch.back_up(paths, backup, ["scaleboxd.service", "scaleboxd.socket"])
    index = next(i for i, p in enumerate(synced) if p.name.startswith(".backup.json."))
    before = synced[:index]
    copies = {p.name.split(".")[1] for p in before if p.name.startswith(".")}
    assert {"scaleboxd", "config"} <= copies  # .scaleboxd.service.xxx.tmp, .config.xxx.tmp
    assert (backup / "config").read_text() == "API_TOKEN=x\n"


def test_append_line_ends_a_torn_line_first(tmp_path: Path, synced: list[Path]) -> None:
    log = tmp_path / "history.jsonl"
    log.write_text('{"whole": 1}\n{"torn"')
    fsutil.append_line(log, '{"next": 2}\n')
    assert log.read_text().splitlines() == ['{"whole": 1}', '{"torn"', '{"next": 2}']
    assert synced == [log]
