"""Staging builds a real release from a real signed tarball, offline, and runs its own checks."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tools import keygen

from scalebox import fsutil
from scalebox.release.verify import Release, open_release
from scalebox.update import stage
from scalebox.update.errors import CommandError, UpdateError
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


def test_the_record_staging_writes_is_what_the_files_hold(staged: Paths) -> None:
    """The record takes most sha256 from the installer (--hashes) instead of reading
    every file again; it must still be what reading every file gives."""
    built = staged.release_dir(VERSION)
    assert json.loads((built / stage.STAGED_FILES).read_text()) == stage.file_record(built)
    assert not (built / ".install-hashes.json").exists()


def test_the_installer_hands_over_the_sha256_of_every_file_it_wrote(
    release: Release, tmp_path: Path
) -> None:
    venv = tmp_path / "release" / "venv"
    known = stage._install(venv, release.root / "wheels", VERSION, "python3")
    on_disk = stage.file_record(venv.parent)
    site = {rel for rel in on_disk if "/site-packages/" in rel and not rel.endswith("/")}
    assert any(rel.endswith(".pyc") for rel in site)
    assert site <= known.keys()  # every file of site-packages, its .pyc included
    assert "venv/bin/scaleboxd" in known  # and the scripts installer made
    # The record adds each file's mode and owner to the installer's sha256.
    assert {rel: on_disk[rel].split(" ")[0] for rel in known} == known
    assert not (venv.parent / ".install-hashes.json").exists()


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
    complete = staged.release_dir(VERSION) / stage.COMPLETE
    before = complete.stat().st_ino
    assert not stage.build(staged, release.root, VERSION, python="python3", report=print)
    assert complete.stat().st_ino == before  # the same build, not a new one


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


def _files(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink() and not rel.startswith(skip):
            out[rel] = path.read_bytes()
    return out


def _pip_venv(release: Release, where: Path) -> Path:
    """The venv pip builds from the same wheels: what the fast staging must match."""
    subprocess.run(["python3", "-m", "venv", str(where)], check=True, timeout=120)
    subprocess.run(
        [
            str(where / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--disable-pip-version-check",
            "--find-links",
            str(release.root / "wheels"),
            f"scalebox=={VERSION}",
        ],
        check=True,
        timeout=600,
    )
    return where


# What only pip's own venv has: pip/setuptools (ensurepip) and pip's INSTALLER/RECORD
# lines (RECORD lists the .pyc files and pip's installer name).
_PIP_ONLY = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence")


def _site(venv: Path) -> Path:
    return next((venv / "lib").glob("python3.*")) / "site-packages"


def test_fast_staging_installs_what_pip_installs(
    staged: Paths, release: Release, tmp_path: Path
) -> None:
    ours = staged.release_dir(VERSION) / "venv"
    theirs = _pip_venv(release, tmp_path / "pipvenv")
    mine, pips = _files(_site(ours), _PIP_ONLY), _files(_site(theirs), _PIP_ONLY)
    assert not (ours / "bin" / "pip").exists()

    def comparable(files: dict[str, bytes]) -> dict[str, bytes]:
        return {
            rel: data
            for rel, data in files.items()
            if not rel.endswith((".pyc", "/RECORD", "/INSTALLER", "/REQUESTED", "/direct_url.json"))
        }

    assert sorted(mine) != []
    assert comparable(mine) == comparable(pips)
    # The same modules are compiled (the .pyc bytes differ: ours hash-based, pip's mtime-based).
    assert {r for r in mine if r.endswith(".pyc")} == {r for r in pips if r.endswith(".pyc")}
    # The same entry-point scripts, each pointing at its own venv's python.
    scripts = {"scaleboxd", "scalebox", "scalebox-update"}
    for name in scripts:
        text = (ours / "bin" / name).read_text()
        assert text.startswith(f"#!{ours / 'bin' / 'python'}\n"), text
    assert {p.name for p in (ours / "bin").iterdir()} - {"pip", "pip3"} >= scripts
    # pip (from the other venv) finds every requirement of the staged venv satisfied.
    check = subprocess.run(
        [
            str(theirs / "bin" / "python"),
            "-m",
            "pip",
            "--python",
            str(ours / "bin" / "python"),
            "check",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_fast_staging_is_reproducible_and_quick(release: Release, tmp_path: Path) -> None:
    paths = Paths(tmp_path / "server")
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    first = _files(paths.release_dir(VERSION))
    shutil.rmtree(paths.release_dir(VERSION))
    started = time.monotonic()
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    took = time.monotonic() - started
    print(f"staging took {took:.2f}s")
    # Built again at the same place: byte for byte the same tree.
    assert _files(paths.release_dir(VERSION)) == first
    # Elsewhere, only what names the venv's own path differs (scripts' #!, pyvenv.cfg, the
    # RECORDs that hash those scripts): the .pyc name their files relative to site-packages.
    elsewhere = Paths(tmp_path / "other")
    assert stage.build(elsewhere, release.root, VERSION, python="python3", report=lambda _: None)
    there, here = elsewhere.release_dir(VERSION) / "venv", paths.release_dir(VERSION) / "venv"
    there_files, here_files = _files(_site(there)), _files(_site(here))
    differ = {rel for rel in here_files if there_files.get(rel) != here_files[rel]}
    assert there_files.keys() == here_files.keys()
    assert differ and all(rel.endswith(".dist-info/RECORD") for rel in differ), differ
    # Generous for a shared test host; `./do bench-stage` prints the figure on an idle one.
    assert took < 60


def test_while_giving_way_the_install_runs_in_one_process_and_builds_the_same_tree(
    release: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths(tmp_path / "server")
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    by_every_core = _files(paths.release_dir(VERSION))
    shutil.rmtree(paths.release_dir(VERSION))
    # The updater gives way only as root with a daemon serving; here the decision alone is
    # replaced (priority.lowered), and the real install runs with what the stage passes.
    monkeypatch.setattr(stage.priority, "lowered", lambda: True)
    commands: list[list[str]] = []
    real = stage.process.run

    def noting(argv: list[str], *args: Any, **kwargs: Any) -> Any:
        commands.append(list(argv))
        return real(argv, *args, **kwargs)

    monkeypatch.setattr(stage.process, "run", noting)
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    install = next(argv for argv in commands if str(stage.INSTALL_SCRIPT) in argv)
    assert install[install.index("--workers") + 1] == "1"
    # Built at the same place by one process: byte for byte the same tree.
    assert _files(paths.release_dir(VERSION)) == by_every_core


def test_the_built_tree_is_on_disk_before_complete_vouches_for_it(
    release: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real syncfs and fsync run; each is noted in order (a power loss cannot be
    # simulated on this host, see test_update_fsutil.py).
    order: list[tuple[str, Path]] = []
    for module, name in ((fsutil, "syncfs"), (os, "fsync")):
        real = getattr(module, name)

        def noting(fd: int, real: Callable[[int], None] = real, name: str = name) -> None:
            order.append((name, Path(f"/proc/self/fd/{fd}").readlink()))
            real(fd)

        monkeypatch.setattr(module, name, noting)
    paths = Paths(tmp_path / "server")
    lines: list[str] = []
    assert stage.build(paths, release.root, VERSION, python="python3", report=lines.append)
    target = paths.release_dir(VERSION)
    tree = order.index(("syncfs", target))
    marker = next(i for i, (_, p) in enumerate(order) if ".complete." in p.name)
    assert tree < marker
    assert any(line.startswith(f"built releases/{VERSION} in ") for line in lines), lines


def test_a_release_without_the_installer_wheel_is_built_with_pip(
    release: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Releases before 0.2.0 ship no installer wheel (and do not depend on it). Building one
    # here would need that old source tree, so the wheel lookup is made to find none: the
    # rest (venv, ensurepip, pip install from the real wheels) is real.
    monkeypatch.setattr(stage, "_tool_wheel", lambda wheels, project: None)
    paths = Paths(tmp_path / "server")
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    venv = paths.release_dir(VERSION) / "venv"
    assert (venv / "bin" / "pip").exists()  # the old way: ensurepip + pip install
    assert stage.is_complete(paths.release_dir(VERSION))
    ran = subprocess.run([str(venv / "bin" / "scaleboxd"), "--version"], timeout=60, check=False)
    assert ran.returncode == 0


def test_a_complete_release_whose_files_changed_is_rebuilt_not_reused(
    release: Release, tmp_path: Path
) -> None:
    paths = Paths(tmp_path / "server")
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    built = paths.release_dir(VERSION)
    assert stage.unchanged(built)
    # As a pre-stage leaves it: reused as is while every staged file is what staging recorded.
    assert not stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    cli = next(_site(built / "venv").glob("scalebox/cli/main.py"))
    cli.write_text(cli.read_text() + "\n# tampered\n")
    assert not stage.unchanged(built)
    lines: list[str] = []
    assert stage.build(paths, release.root, VERSION, python="python3", report=lines.append)
    assert any("rebuilding" in line for line in lines), lines
    assert "tampered" not in next(_site(built / "venv").glob("scalebox/cli/main.py")).read_text()
    assert stage.unchanged(built)
    # A staged file removed, or one added, counts as changed too.
    (built / "venv" / "extra").write_text("x")
    assert not stage.unchanged(built)
    (built / "venv" / "extra").unlink()
    assert stage.unchanged(built)
    # And so does a file's or a directory's mode or owner (a setuid bit, a script no
    # longer executable, a world-writable package, a file given to another user).
    script, package = built / "venv" / "bin" / "scaleboxd", cli.parent
    changes: list[tuple[Path, Callable[[Path], None], Callable[[Path], None]]] = [
        (script, lambda p: p.chmod(0o644), lambda p: p.chmod(0o755)),
        (cli, lambda p: p.chmod(0o4644), lambda p: p.chmod(0o644)),
        (package, lambda p: p.chmod(0o777), lambda p: p.chmod(0o755)),
    ]
    if os.geteuid() == 0:  # only root gives a file away (CI runs as root)
        changes.append((cli, lambda p: os.chown(p, 65534, -1), lambda p: os.chown(p, 0, -1)))
    for path, change, undo in changes:
        change(path)
        assert not stage.unchanged(built), path
        undo(path)
        assert stage.unchanged(built), path


def test_a_disk_that_fails_under_the_install_is_blamed_on_the_disk_not_the_release(
    release: Release, tmp_path: Path
) -> None:
    """A write the file system refuses (here RLIMIT_FSIZE's EFBIG: a real failed write,
    as a full disk's ENOSPC would be) names the file and says what to do about the disk;
    the release's wheels are not blamed."""
    paths = Paths(tmp_path / "server")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, limit[1]))
    try:
        with pytest.raises(CommandError) as caught:
            stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert caught.value.exit_status == stage.EXIT_DISK
    assert f"cannot install scalebox=={VERSION}: File too large: " in caught.value.what
    assert str(paths.release_dir(VERSION) / "venv") in caught.value.what
    assert caught.value.hint == stage.DISK_HINT
    assert "do not install" not in caught.value.what + str(caught.value.hint)


def test_the_record_names_every_kind_of_entry_and_never_opens_a_fifo(tmp_path: Path) -> None:
    """Files by sha256, symlinks by target (a linked directory is not followed), anything
    else by kind: a FIFO put into a release is a change, not a hang."""
    tree = tmp_path / "release"
    (tree / "venv" / "lib").mkdir(parents=True)
    (tree / "venv" / "lib" / "a.py").write_bytes(b"print(1)\n")
    (tree / "venv" / "bin").mkdir()
    (tree / "venv" / "bin" / "python").symlink_to("/usr/bin/python3")
    (tree / "venv" / "lib64").symlink_to("lib")
    os.mkfifo(tree / "venv" / "pipe")
    (tree / stage.COMPLETE).write_text("1\n")
    (tree / stage.STAGED_FILES).write_text("{}")
    (tree / "venv" / stage.COMPLETE).write_text("not the marker: below the top\n")
    found: list[dict[str, str]] = []
    reading = threading.Thread(target=lambda: found.append(stage.file_record(tree)), daemon=True)
    reading.start()
    reading.join(30)
    if reading.is_alive():  # stuck opening the FIFO: a writer lets it go on, then fail
        with (tree / "venv" / "pipe").open("wb"):
            pass
        pytest.fail("file_record opened the FIFO and waited for a writer")

    def meta(rel: str) -> str:
        st = (tree / rel).lstat()
        return f"{stat.S_IMODE(st.st_mode):04o} {st.st_uid}:{st.st_gid}"

    assert found == [
        {
            "venv/": "dir " + meta("venv"),
            "venv/lib/": "dir " + meta("venv/lib"),
            "venv/bin/": "dir " + meta("venv/bin"),
            "venv/lib/a.py": "sha256:"
            + hashlib.sha256(b"print(1)\n").hexdigest()
            + " "
            + meta("venv/lib/a.py"),
            "venv/bin/python": "symlink:/usr/bin/python3",
            "venv/lib64": "symlink:lib",
            "venv/pipe": "special",
            f"venv/{stage.COMPLETE}": "sha256:"
            + hashlib.sha256(b"not the marker: below the top\n").hexdigest()
            + " "
            + meta(f"venv/{stage.COMPLETE}"),
        }
    ]
    known = {"venv/lib/a.py": "sha256:from-the-installer"}
    assert stage.file_record(tree, known)["venv/lib/a.py"] == (
        "sha256:from-the-installer " + meta("venv/lib/a.py")
    )


# --- a build next to the running release links the files it shares with it ---------------

DONOR = "7.7.6"


def _next_to_a_donor(release: Release, root: Path, spoil: Callable[[Path], None]) -> Paths:
    """Build VERSION as if DONOR ran: DONOR is VERSION built before (with its record),
    then ``spoil``-ed, and ``current`` points at it."""
    paths = Paths(root)
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    paths.release_dir(VERSION).rename(paths.release_dir(DONOR))
    paths.current.symlink_to(f"releases/{DONOR}")
    spoil(paths.release_dir(DONOR))
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    return paths


def _shared(paths: Paths) -> set[str]:
    """site-packages files of VERSION that are the donor's own (the same inode)."""
    mine, theirs = (
        _site(paths.release_dir(VERSION) / "venv"),
        _site(paths.release_dir(DONOR) / "venv"),
    )
    return {
        p.relative_to(mine).as_posix()
        for p in mine.rglob("*")
        if p.is_file()
        and (theirs / p.relative_to(mine)).exists()
        and p.stat().st_ino == (theirs / p.relative_to(mine)).stat().st_ino
    }


def _as_built_alone(paths: Paths, release: Release) -> dict[str, str]:
    """VERSION's file record, then VERSION built again at the same place with no donor:
    the record of both must be the same, modes included."""

    def record() -> dict[str, str]:
        built = paths.release_dir(VERSION)
        return {
            **stage.file_record(built),
            **{
                f"mode:{p.relative_to(built)}": oct(p.lstat().st_mode)
                for p in built.rglob("*")
                if p.name not in {stage.COMPLETE, stage.STAGED_FILES}
            },
        }

    linked = record()
    # The record staging wrote (hashes from the installer, links included) is the disk's.
    built = paths.release_dir(VERSION)
    assert json.loads((built / stage.STAGED_FILES).read_text()) == stage.file_record(built)
    shutil.rmtree(paths.release_dir(VERSION))
    paths.current.unlink()
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    assert record() == linked
    return linked


def test_a_build_next_to_the_running_release_links_what_they_share(
    release: Release, tmp_path: Path
) -> None:
    paths = _next_to_a_donor(release, tmp_path / "server", lambda _: None)
    site = _site(paths.release_dir(VERSION) / "venv")
    everything = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    shared = _shared(paths)
    # Every file of the same wheels, .pyc included, except RECORDs that list scripts.
    assert {r for r in everything - shared if not r.endswith("/RECORD")} == set()
    assert any(r.endswith(".pyc") for r in shared)
    # The scripts name their own venv's python: never shared.
    venv, donor = paths.release_dir(VERSION) / "venv", paths.release_dir(DONOR) / "venv"
    assert (venv / "bin" / "scaleboxd").stat().st_ino != (donor / "bin" / "scaleboxd").stat().st_ino
    # The linked release runs, and its code names its own files (the import puts the
    # real path into code that a .pyc names relative to site-packages).
    ran = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import scalebox.update.stage as s; print(s.build.__code__.co_filename)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ran.stdout.strip() == str(site / "scalebox" / "update" / "stage.py")
    # Byte for byte, mode for mode, what a build with no release beside it makes.
    _as_built_alone(paths, release)


def _spoil(donor: Path) -> None:
    site = _site(donor / "venv")
    py = site / "scalebox" / "cli" / "main.py"
    py.write_text(py.read_text() + "\n# edited\n")  # a file that differs
    same_size = site / "scalebox" / "update" / "plan.py"
    before = same_size.read_bytes()
    same_size.write_bytes(before.replace(b"def ", b"def  ", 1)[:-1])
    assert same_size.stat().st_size == len(before)
    pyc = next((site / "scalebox" / "update" / "__pycache__").glob("stage.*.pyc"))
    data = bytearray(pyc.read_bytes())
    data[-1] ^= 1  # bit rot past the header: its record no longer matches
    pyc.write_bytes(bytes(data))
    (site / "scalebox" / "errors.py").chmod(0o600)  # another mode
    link = site / "scalebox" / "__init__.py"
    real = link.read_bytes()
    link.unlink()
    (donor / "elsewhere.py").write_bytes(real)
    link.symlink_to(donor / "elsewhere.py")  # the same bytes, but not a regular file


def test_a_donor_file_that_is_not_exactly_the_same_is_written_not_linked(
    release: Release, tmp_path: Path
) -> None:
    paths = _next_to_a_donor(release, tmp_path / "server", _spoil)
    shared = _shared(paths)
    for spoiled in (
        "scalebox/cli/main.py",
        "scalebox/update/plan.py",  # the same size, other bytes
        "scalebox/update/__pycache__/stage.cpython",
        "scalebox/errors.py",
        "scalebox/__init__.py",
    ):
        assert not any(r.startswith(spoiled) for r in shared), spoiled
    # Their neighbours are still shared; so is the edited file's .pyc, which the donor's
    # staging compiled from the wheel's bytes, the bytes this build has.
    assert "scalebox/update/stage.py" in shared
    assert any(r.startswith("scalebox/cli/__pycache__/main.") for r in shared)
    assert any(r.startswith("scalebox/__pycache__/errors.") for r in shared)
    donor_site = _site(paths.release_dir(DONOR) / "venv")
    assert (donor_site / "scalebox" / "cli" / "main.py").read_text().endswith("# edited\n")
    _as_built_alone(paths, release)


def test_without_the_donors_record_its_pyc_are_compiled_again(
    release: Release, tmp_path: Path
) -> None:
    # As after install.sh (pip builds the first release and keeps no record).
    paths = _next_to_a_donor(
        release, tmp_path / "server", lambda donor: (donor / stage.STAGED_FILES).unlink()
    )
    shared = _shared(paths)
    assert "scalebox/update/stage.py" in shared
    assert not any(r.endswith(".pyc") for r in shared)
    _as_built_alone(paths, release)


def test_an_edit_of_a_shared_file_is_named_as_an_edit_of_the_running_release_too(
    release: Release, tmp_path: Path
) -> None:
    # The cost of sharing: one inode, so an edit in place edits both releases. The
    # re-check of a pre-staged release rebuilds it and says what else it changed.
    paths = _next_to_a_donor(release, tmp_path / "server", lambda _: None)
    site = _site(paths.release_dir(VERSION) / "venv")
    edited = site / "scalebox" / "daemon" / "main.py"
    with edited.open("a") as f:
        f.write("raise SystemExit(3)\n")
    lines: list[str] = []
    assert stage.build(paths, release.root, VERSION, python="python3", report=lines.append)
    warning = next(line for line in lines if line.startswith("warning:"))
    assert f"shared with the running release releases/{DONOR}" in warning
    assert edited.relative_to(paths.release_dir(VERSION)).as_posix() in warning
    # The rebuilt release has the wheel's file again, its own; the running one keeps the edit.
    assert "SystemExit(3)" not in edited.read_text()
    assert "scalebox/daemon/main.py" not in _shared(paths)
    theirs = _site(paths.release_dir(DONOR) / "venv") / "scalebox" / "daemon" / "main.py"
    assert theirs.read_text().endswith("raise SystemExit(3)\n")
    assert stage.unchanged(paths.release_dir(VERSION))


def _as_an_older_updater_recorded(directory: Path) -> None:
    """Rewrite the record as updaters before 95ad77a wrote it: a sha256 per file, no
    mode or owner, no directories."""
    record = json.loads((directory / stage.STAGED_FILES).read_text())
    older = {
        rel: value.split(" ", 1)[0] if value.startswith("sha256:") else value
        for rel, value in record.items()
        if not rel.endswith("/")
    }
    (directory / stage.STAGED_FILES).write_text(json.dumps(older))


def test_a_release_an_older_updater_staged_is_rebuilt_for_its_modes_without_a_false_alarm(
    release: Release, tmp_path: Path
) -> None:
    # Staged next to the running release (sharing its files), by an updater whose
    # record held only hashes: every file looked changed, and each shared one was
    # reported as an edit of the running release too, though nothing was edited.
    paths = _next_to_a_donor(release, tmp_path / "server", lambda _: None)
    built = paths.release_dir(VERSION)
    _as_an_older_updater_recorded(built)
    assert stage.changed_files(built) == []  # held to what it recorded: nothing changed
    lines: list[str] = []
    assert stage.build(paths, release.root, VERSION, python="python3", report=lines.append)
    assert f"releases/{VERSION} was staged by an older updater" in "\n".join(lines), lines
    assert not [line for line in lines if line.startswith("warning:")], lines
    assert stage.unchanged(built)
    assert stage._has_modes(built)  # rebuilt: this updater's record
    # An older record still tells an edit from none, and the shared edit is named.
    _as_an_older_updater_recorded(built)
    edited = _site(built / "venv") / "scalebox" / "daemon" / "main.py"
    with edited.open("a") as f:
        f.write("raise SystemExit(3)\n")
    assert stage.changed_files(built) == [edited.relative_to(built).as_posix()]
    lines = []
    assert stage.build(paths, release.root, VERSION, python="python3", report=lines.append)
    assert any("is not exactly what this release builds" in line for line in lines), lines
    warning = next(line for line in lines if line.startswith("warning:"))
    assert edited.relative_to(built).as_posix() in warning
