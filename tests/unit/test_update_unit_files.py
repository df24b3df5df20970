"""Which files can change a unit, and whether one was written since systemd loaded units."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from scalebox.update import unit_files


@pytest.mark.parametrize(
    ("unit", "dirs"),
    [
        ("scaleboxd.service", ["scaleboxd.service.d", "service.d"]),
        (
            "scaleboxd-handover.service",
            ["scaleboxd-handover.service.d", "scaleboxd-.service.d", "service.d"],
        ),
        ("scaleboxd.socket", ["scaleboxd.socket.d", "socket.d"]),
        (
            "scalebox-vm@abc.service",
            [
                "scalebox-vm@abc.service.d",
                "scalebox-vm@.service.d",
                "scalebox-.service.d",
                "service.d",
            ],
        ),
    ],
)
def test_every_drop_in_directory_systemd_reads_for_a_unit(unit: str, dirs: list[str]) -> None:
    assert unit_files.dropin_dirs(unit) == dirs


# A file's ctime cannot be set back, so each case lets systemd "load" after the files
# made before it (LOADED), and dates what it writes after that load past it.
def _loaded() -> float:
    return time.time() + unit_files.MARGIN_S + 60


def _written_after(path: Path, loaded: float) -> None:
    os.utime(path, (loaded + 1, loaded + 1), follow_symlinks=False)


def test_a_drop_in_directory_made_after_the_last_load_is_seen(tmp_path: Path) -> None:
    """systemd 252 says NeedDaemonReload=no for a new scaleboxd.service.d/ (seen in a
    machine): the file times say it."""
    etc = tmp_path / "etc"
    etc.mkdir()
    unit = etc / "scaleboxd.service"
    unit.write_text("[Service]\n")
    loaded = _loaded()
    assert unit_files.written_since(["scaleboxd.service"], loaded, [etc]) == []

    dropin = etc / "scaleboxd.service.d" / "probe.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nEnvironment=X=1\n")
    _written_after(dropin, loaded)
    _written_after(dropin.parent, loaded)
    seen = unit_files.written_since(["scaleboxd.service", "scaleboxd.socket"], loaded, [etc])
    assert seen == [dropin.parent, dropin]


def test_a_type_wide_or_prefix_drop_in_counts_and_one_for_another_unit_does_not(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    (run / "service.d").mkdir(parents=True)
    (run / "ssh.service.d").mkdir()
    loaded = _loaded()
    assert unit_files.written_since(["scaleboxd-handover.service"], loaded, [run]) == []
    (run / "service.d" / "10-all.conf").write_text("[Service]\n")
    (run / "scaleboxd-.service.d").mkdir()
    (run / "ssh.service.d" / "other.conf").write_text("[Service]\n")
    for path in ("service.d", "service.d/10-all.conf", "scaleboxd-.service.d", "ssh.service.d"):
        _written_after(run / path, loaded)
    _written_after(run / "ssh.service.d" / "other.conf", loaded)
    seen = unit_files.written_since(["scaleboxd-handover.service"], loaded, [run])
    assert seen == [run / "scaleboxd-.service.d", run / "service.d", run / "service.d/10-all.conf"]


def test_a_unit_edited_through_a_symlink_counts_and_a_dangling_one_is_ignored(
    tmp_path: Path,
) -> None:
    etc, opt = tmp_path / "etc", tmp_path / "opt"
    etc.mkdir()
    opt.mkdir()
    (opt / "scaleboxd.service").write_text("[Service]\n")
    (etc / "scaleboxd.service").symlink_to(opt / "scaleboxd.service")
    (etc / "scaleboxd.socket").symlink_to(opt / "gone.socket")
    loaded = _loaded()
    units = ["scaleboxd.service", "scaleboxd.socket"]
    assert unit_files.written_since(units, loaded, [etc]) == []
    (opt / "scaleboxd.service").write_text("[Service]\nNice=1\n")
    _written_after(opt / "scaleboxd.service", loaded)
    assert unit_files.written_since(units, loaded, [etc]) == [etc / "scaleboxd.service"]


def test_a_file_written_just_before_the_load_counts_as_written_after_it(tmp_path: Path) -> None:
    """File times come from the kernel's coarse clock (a tick behind): a margin."""
    unit = tmp_path / "scaleboxd.service"
    unit.write_text("[Service]\n")
    written = max(unit.stat().st_mtime, unit.stat().st_ctime)
    units = ["scaleboxd.service"]
    assert unit_files.written_since(units, written + unit_files.MARGIN_S / 2, [tmp_path]) == [unit]
    assert unit_files.written_since(units, written + unit_files.MARGIN_S + 0.1, [tmp_path]) == []


def test_systemds_monotonic_load_time_becomes_wall_clock_time() -> None:
    now_us = int(time.monotonic() * 1e6)
    assert abs(unit_files.loaded_at(now_us - 5_000_000) - (time.time() - 5)) < 0.1
