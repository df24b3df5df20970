"""Staging builds a real release from a real signed tarball, offline, and runs its own checks."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tools import keygen

from scalebox.release.verify import Release, open_release
from scalebox.update import stage
from scalebox.update.errors import UpdateError
from scalebox.update.paths import Paths

ROOT = Path(__file__).resolve().parents[2]
VERSION = "7.7.7"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    tmp = tmp_path_factory.mktemp("tarball")
    key, pub = keygen.keygen(tmp / "keys")
    built = subprocess.run(
        [str(ROOT / "do"), "tarball", "--version", VERSION, "--key", str(key), "--out", str(tmp)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    yield open_release(Path(built.stdout.strip()), tmp / "open", [pub])


@pytest.fixture(scope="module")
def staged(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Paths:
    paths = Paths(tmp_path_factory.mktemp("server"))
    lines: list[str] = []
    assert stage.build(paths, release.root, VERSION, python="python3", report=lines.append)
    return paths


def test_staged_release_is_complete_and_runs_its_own_programs(staged: Paths) -> None:
    built = staged.release_dir(VERSION)
    assert stage.is_complete(built)
    assert stage.manifest_version(built) == VERSION
    assert (built / "units" / "scaleboxd.service").is_file()
    assert not (built / "wheels").exists()
    out = subprocess.run(
        [str(built / "venv" / "bin" / "scaleboxd"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == VERSION


def test_the_new_release_judges_the_live_config(staged: Paths) -> None:
    staged.config.parent.mkdir(parents=True, exist_ok=True)
    staged.config.write_text(f"API_TOKEN=sb-{'1' * 48}\nHOST_IP=127.0.0.1\n")
    stage.check_config(staged, VERSION)
    staged.config.write_text(f"API_TOKEN=sb-{'1' * 48}\nAPI_PORT=http\n")
    with pytest.raises(UpdateError, match="rejects the live config") as caught:
        stage.check_config(staged, VERSION)
    assert "API_PORT" in caught.value.what
    assert caught.value.hint is not None
    assert "nothing was changed" in caught.value.hint


def test_a_second_build_of_the_same_release_reuses_it(staged: Paths, release: Release) -> None:
    marker = staged.release_dir(VERSION) / "venv" / "marker"
    marker.write_text("still here")
    assert not stage.build(staged, release.root, VERSION, python="python3", report=print)
    assert marker.read_text() == "still here"


def test_unfinished_release_directories_are_removed(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    (paths.release_dir("1.0.0") / "venv").mkdir(parents=True)
    (paths.release_dir("1.0.0") / ".complete").write_text("1.0.0\n")
    (paths.release_dir("1.1.0") / "venv").mkdir(parents=True)  # killed mid-build
    paths.current.symlink_to("releases/1.0.0")
    assert stage.remove_unfinished(paths, print) == ["1.1.0"]
    assert [r.name for r in stage.list_releases(paths)] == ["1.0.0"]


@pytest.mark.parametrize("bad", ["", ".hidden", "../escape", "a/b"])
def test_a_version_that_is_not_a_plain_name_is_refused(bad: str) -> None:
    with pytest.raises(UpdateError, match="cannot name a directory"):
        stage.check_name(bad)
