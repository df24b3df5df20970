"""Commit's pruning on real directories: old releases go, and their migration records with them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from scalebox.update import commit, history, migrate
from scalebox.update.context import Context
from scalebox.update.paths import Paths
from scalebox.update.systemd import Systemctl


def _release(paths: Paths, version: str) -> None:
    d = paths.release_dir(version)
    d.mkdir(parents=True)
    (d / "RELEASE.json").write_text(json.dumps({"version": version}))
    (d / ".complete").write_text("")


def _record(paths: Paths, version: str) -> Path:
    where = migrate.records_dir(paths) / version
    where.mkdir(parents=True)
    (where / "record.json").write_text("{}")
    (where / "config.before").write_text("API_TOKEN=x\n")
    return where


def test_migration_records_are_pruned_with_their_releases(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    for version in ("1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"):
        _release(paths, version)
        _record(paths, version)
    _record(paths, "0.9.0")  # its release was pruned long ago
    paths.current.parent.mkdir(parents=True, exist_ok=True)
    paths.current.symlink_to("releases/1.4.0")
    said: list[str] = []
    with httpx.Client() as http:
        # Systemctl is never called by pruning; a Context needs one.
        ctx = Context(paths, Systemctl(), http, said.append)
        pruned = commit.prune(ctx, previous="1.0.0", entries=[])

    # Kept: current 1.4.0, the rollback target 1.0.0 (old, but the way back), and
    # the newest other good release 1.3.0: three in all.
    assert pruned == ["1.1.0", "1.2.0"]
    assert sorted(d.name for d in paths.releases.iterdir()) == ["1.0.0", "1.3.0", "1.4.0"]
    assert sorted(d.name for d in migrate.records_dir(paths).iterdir()) == [
        "1.0.0",
        "1.3.0",
        "1.4.0",
    ]
    assert "pruning the migration record of 0.9.0" in said
    assert "pruning the migration record of 1.1.0" in said


def test_a_reinstall_keeps_the_release_rollback_goes_back_to(tmp_path: Path) -> None:
    """`--force` of 1.1.0 with 1.7.0 and 1.8.0 pre-staged: the transaction came from
    1.1.0 itself, and 1.0.0, what 1.1.0 was installed from, stays the way back."""
    paths = Paths(tmp_path)
    for version in ("1.0.0", "1.1.0", "1.7.0", "1.8.0"):
        _release(paths, version)
    paths.current.symlink_to("releases/1.1.0")  # releases/ exists: made by _release
    entries = [
        history.Entry("t", "a", "update", "1.0.0", "1.1.0", history.UPDATED),
        history.Entry("t", "b", "update", "1.1.0", "1.1.0", history.UPDATED),
    ]
    with httpx.Client() as http:
        ctx = Context(paths, Systemctl(), http, print)
        pruned = commit.prune(ctx, previous="1.1.0", entries=entries)
    assert pruned == ["1.7.0"]
    assert sorted(d.name for d in paths.releases.iterdir()) == ["1.0.0", "1.1.0", "1.8.0"]


def test_no_migrated_directory_is_fine(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert migrate.prune_records(paths, {"1.0.0"}, print) == []


def test_stale_records_by_hand() -> None:
    assert migrate.stale_records(["1.0.0", "1.1.0", "2.0.0"], {"1.1.0", "2.0.0", "3.0.0"}) == [
        "1.0.0"
    ]
    assert migrate.stale_records([], {"1.0.0"}) == []
