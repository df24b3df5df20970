"""wheel_install.py's own guards, called directly: paths out of the venv, a donor of
another Python, and sources that no compiler takes. (The full install runs in
test_update_stage.py, on the real release.)"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from installer import install

from scalebox.update import wheel_install
from scalebox.update.wheel_install import CollectingDestination, Donor
from tests.unit.test_vms import alive


def _destination(root: Path, donor: Donor | None) -> CollectingDestination:
    site = root / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    schemes = {name: str(site) for name in ("purelib", "platlib")}
    schemes |= {"scripts": str(root / "venv" / "bin"), "data": str(root / "venv")}
    schemes["headers"] = str(root / "venv" / "include")
    return CollectingDestination(
        schemes, interpreter="/usr/bin/python3", script_kind="posix", donor=donor
    )


@pytest.mark.parametrize(
    ("scheme", "path"),
    [("purelib", "../../../../escape/x.py"), ("scripts", "../../escape/x"), ("data", "/escape/x")],
)
def test_a_path_out_of_its_scheme_is_refused_and_makes_no_directory(
    tmp_path: Path, scheme: str, path: str
) -> None:
    donor = Donor(tmp_path / "donor" / "venv", {})
    destination = _destination(tmp_path, donor)
    with pytest.raises(ValueError, match="outside of the target directory"):
        destination.write_to_fs(scheme, path, io.BytesIO(b"x = 1\n"), False)  # type: ignore[arg-type]
    assert not (tmp_path / "escape").exists()
    assert not Path("/escape").exists()


def _venv_made_by(where: Path, version: str) -> Path:
    venv = where / "venv"
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = /usr/bin\nversion = {version}\n")
    record = where / ".staged-files.json"
    record.write_text(json.dumps({"venv/lib/x.pyc": "sha256:" + "0" * 64}))
    return record


def test_a_donor_of_another_python_lends_no_pyc(tmp_path: Path) -> None:
    same = _venv_made_by(tmp_path / "same", platform.python_version())
    assert Donor.load(same.parent / "venv", same).record != {}
    # Another patch release: the same magic number, maybe other bytes from its compiler.
    other = _venv_made_by(tmp_path / "other", "3.0.1")
    assert Donor.load(other.parent / "venv", other).record == {}
    # A record nested too deep to read is no record, not a crash.
    deep = _venv_made_by(tmp_path / "deep", platform.python_version())
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert Donor.load(deep.parent / "venv", deep).record == {}


def test_a_source_no_compiler_takes_gets_no_pyc_and_fails_nothing(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    deep = site / "deep.py"
    deep.write_bytes(b"x = " + b"1 + " * 200_000 + b"1\n")  # RecursionError in compile()
    broken = site / "broken.py"
    broken.write_text("def (:\n")  # SyntaxError
    fine = site / "fine.py"
    fine.write_text("x = 1\n")
    wheel_install.compile_files([(str(p), str(site)) for p in (deep, broken, fine)])
    assert not Path(importlib.util.cache_from_source(str(deep))).exists()
    assert not Path(importlib.util.cache_from_source(str(broken))).exists()
    assert Path(importlib.util.cache_from_source(str(fine))).is_file()


@pytest.mark.parametrize("workers", ["0", "-1", "two", ""])
def test_a_number_of_workers_that_is_not_one_or_more_is_refused(
    tmp_path: Path, workers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert wheel_install.main(["--workers", workers, str(tmp_path), "scalebox==1.0"]) == 2
    assert capsys.readouterr().err == (f"--workers wants a number of processes, not {workers!r}\n")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_without_words_is_named_by_its_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A double for the install: an exception with no words (a bare `raise SomeError`
    # in a library) cannot be made to come out of a real install on demand.
    def broken(*_: object) -> dict[str, str]:
        raise RuntimeError

    monkeypatch.setattr(wheel_install, "install_all", broken)
    assert wheel_install.main([str(tmp_path), "scalebox==1.0"]) == 1
    assert capsys.readouterr().err == "cannot install scalebox==1.0: RuntimeError\n"


def test_a_fifo_in_the_donors_place_is_not_linked_and_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "donor.py"
    os.mkfifo(fifo, 0o644)
    target = tmp_path / "new" / "mine.py"
    answer: list[bytes | None] = []
    worker = threading.Thread(
        target=lambda: answer.append(
            wheel_install.link_if(str(fifo), str(target), 0o644, lambda _: True)
        ),
        daemon=True,
    )
    worker.start()
    worker.join(30)
    assert answer == [None], "link_if opened the FIFO and waited for a writer"


def test_pycache_is_made_only_for_a_pyc_that_is_linked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The installer runs in the venv it installs into; this venv is tmp_path/venv.
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    umask = wheel_install.current_umask()
    mode = 0o666 & ~umask  # a plain file's, as installer writes it
    donor_site = tmp_path / "donor" / "venv" / "lib" / "site-packages"
    (donor_site / "pkg").mkdir(parents=True)
    theirs = importlib.util.cache_from_source(str(donor_site / "pkg" / "__init__.py"))
    Path(theirs).parent.mkdir()
    pyc = wheel_install.pyc_bytes(b"x = 1\n", "pkg/__init__.py")
    Path(theirs).write_bytes(pyc)
    Path(theirs).chmod((mode | 0o200) & 0o666 & ~umask)
    key = os.path.relpath(theirs, tmp_path / "donor")
    donor = Donor(tmp_path / "donor" / "venv", {key: "sha256:" + hashlib.sha256(pyc).hexdigest()})
    destination = _destination(tmp_path, donor)
    site = tmp_path / "venv" / "lib" / "site-packages"
    (site / "pkg").mkdir()
    mine = str(site / "pkg" / "__init__.py")

    assert not destination.link_pyc(str(site), mine, b"x = 2\n", mode)  # another source
    assert not (site / "pkg" / "__pycache__").exists()
    assert destination.link_pyc(str(site), mine, b"x = 1\n", mode)
    assert Path(importlib.util.cache_from_source(mine)).samefile(theirs)


# --- a file the donor holds byte for byte is linked without being unpacked --------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


def _wheel(
    where: Path, files: dict[str, bytes], record: dict[str, bytes | None] | None = None
) -> Path:
    """A wheel of ``files`` whose RECORD gives each the sha256 of ``record``'s bytes for it
    (a RECORD that may lie; None: no hash), deflated."""
    record = record or {}
    lines = []
    for name, data in files.items():
        said = record.get(name, data)
        lines.append(f"{name},{'' if said is None else _record_hash(said)},{len(data)}")
    meta = {
        "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\n",
    }
    path = where / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in {**files, **meta}.items():
            archive.writestr(name, data)
        lines += [f"{name},," for name in meta]
        lines.append("demo-1.0.dist-info/RECORD,,")
        archive.writestr("demo-1.0.dist-info/RECORD", "\n".join(lines))
    return path


def _spoil_deflated(wheel: Path, name: str) -> None:
    """Overwrite ``name``'s deflated bytes in the zip (its size and CRC-32 stay): it can no
    longer be unpacked."""
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(name)
    with wheel.open("r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (
            int.from_bytes(f.read(2), "little"),
            int.from_bytes(f.read(2), "little"),
        )
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(b"\xff" * info.compress_size)
    with zipfile.ZipFile(wheel) as archive, pytest.raises(zlib.error):
        archive.read(name)


def _install_next_to_a_donor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wheel: Path, donor_files: dict[str, bytes]
) -> tuple[CollectingDestination, Path, Path]:
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    mode = 0o666 & ~wheel_install.current_umask()
    donor_site = tmp_path / "donor" / "venv" / "lib" / "site-packages"
    for name, data in donor_files.items():
        (donor_site / name).parent.mkdir(parents=True, exist_ok=True)
        (donor_site / name).write_bytes(data)
        (donor_site / name).chmod(mode)
    destination = _destination(tmp_path, Donor(tmp_path / "donor" / "venv", {}))
    with zipfile.ZipFile(wheel) as archive:
        destination.wheel = wheel_install.NotingWheel(archive)
        install(destination.wheel, destination, {"INSTALLER": wheel_install.INSTALLER})
    return destination, tmp_path / "venv" / "lib" / "site-packages", donor_site


def test_a_file_the_donor_holds_is_linked_without_being_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = b"def f():\n    return 1\n" * 50
    wheel = _wheel(tmp_path, {"pkg/a.py": shared, "pkg/b.py": b"y = 2\n"})
    # Its zip still says the size and CRC-32 of the bytes, its RECORD their sha256: only
    # a build that unpacks it would see the damage.
    _spoil_deflated(wheel, "pkg/a.py")
    destination, site, donor_site = _install_next_to_a_donor(
        tmp_path, monkeypatch, wheel, {"pkg/a.py": shared}
    )
    assert (site / "pkg" / "a.py").samefile(donor_site / "pkg" / "a.py")
    assert (site / "pkg" / "b.py").read_bytes() == b"y = 2\n"  # the donor has none: unpacked
    assert (
        destination.hashes[str(site / "pkg" / "a.py")]
        == "sha256:" + hashlib.sha256(shared).hexdigest()
    )
    record = (site / "demo-1.0.dist-info" / "RECORD").read_text().splitlines()
    assert f"pkg/a.py,{_record_hash(shared)},{len(shared)}" in record
    assert destination.wheel is not None
    assert destination.wheel.member(io.BytesIO(shared)) is None  # not the wheel's file


def test_a_file_the_wheel_gives_no_sha256_is_unpacked_and_compared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"pkg/a.py": b"x = 1\n", "pkg/empty.py": b""}
    wheel = _wheel(tmp_path, files, dict.fromkeys(files))
    destination, site, donor_site = _install_next_to_a_donor(tmp_path, monkeypatch, wheel, files)
    for name, data in files.items():
        assert (site / name).samefile(donor_site / name)
        assert destination.hashes[str(site / name)] == "sha256:" + hashlib.sha256(data).hexdigest()
    record = (site / "demo-1.0.dist-info" / "RECORD").read_text().splitlines()
    assert f"pkg/empty.py,{_record_hash(b'')},0" in record


def test_an_item_of_a_shape_not_known_here_is_unpacked_not_failed(tmp_path: Path) -> None:
    # A later installer (the new release's) may yield otherwise: nothing is vouched for.
    wheel = _wheel(tmp_path, {"pkg/a.py": b"x = 1\n"})
    with zipfile.ZipFile(wheel) as archive:
        noting = wheel_install.NotingWheel(archive)
        stream = io.BytesIO(b"x = 1\n")
        for item in [("pkg/a.py", stream, False), ((1, 2), stream), None]:
            assert noting._member(item) is None  # type: ignore[arg-type]
        renamed = (("pkg/a.py", _record_hash(b"x = 1\n"), "6"), stream, False)
        assert noting._member(renamed) == (stream, None)  # its stream names no member


def test_a_record_that_names_the_donors_bytes_does_not_put_them_in_place_of_the_wheels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same size, and a RECORD that gives the donor's sha256: the CRC-32 of the
    # bytes in the zip tells them apart, and the wheel's own bytes are installed.
    wheel = _wheel(tmp_path, {"pkg/a.py": b"x = 1\n"}, {"pkg/a.py": b"x = 2\n"})
    _, site, donor_site = _install_next_to_a_donor(
        tmp_path, monkeypatch, wheel, {"pkg/a.py": b"x = 2\n"}
    )
    assert not (site / "pkg" / "a.py").samefile(donor_site / "pkg" / "a.py")
    assert (site / "pkg" / "a.py").read_bytes() == b"x = 1\n"


@pytest.mark.parametrize(
    ("mine", "theirs"),
    [
        ("lib/site-packages/pkg/a.py", "lib/site-packages/pkg/a.py"),
        ("lib/./site-packages/pkg/../pkg/a.py", "lib/site-packages/pkg/a.py"),
        ("lib/site-packages/.hidden/a.py", "lib/site-packages/.hidden/a.py"),
        ("../elsewhere/a.py", None),
        ("../venv2/a.py", None),  # a sibling whose name starts with the venv's
        ("..", None),
    ],
)
def test_the_donors_place_of_a_file_is_the_same_place_below_its_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mine: str, theirs: str | None
) -> None:
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    donor = Donor(tmp_path / "donor" / "venv", {f"venv/{theirs}": "sha256:x"} if theirs else {})
    found = donor.path(f"{tmp_path}/venv/{mine}")
    assert found == (None if theirs is None else str(tmp_path / "donor" / "venv" / theirs))
    if found is not None:
        assert donor.recorded(found) == "sha256:x"


# A parent that starts the install's stand-in (die_with, then a long sleep), says its
# pid, and waits; the test kills the parent as a SIGKILL kills the updater.
_PARENT = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())],
                         stdout=subprocess.PIPE, start_new_session=True)
print(child.pid, child.stdout.readline().decode().strip(), flush=True)
child.wait()
"""
_CHILD = """
import sys, time
from scalebox.update import wheel_install
wheel_install.die_with(int(sys.argv[1]))
print("armed", flush=True)
time.sleep(60)
"""


def test_the_install_dies_with_the_updater_that_started_it() -> None:
    """An updater SIGKILLed mid-stage left its wheel install writing into releases/<v>
    for up to a minute, while a next run removed and rebuilt that directory."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _CHILD],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert parent.stdout is not None
    child_pid, said = parent.stdout.readline().decode().split()
    child = int(child_pid)
    try:
        assert said == "armed"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(child):
            time.sleep(0.02)
        assert not alive(child), "the install outlived the updater"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()
