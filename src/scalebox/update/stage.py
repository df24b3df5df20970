"""Stage: build releases/<version> from a verified release, offline, next to the running one.

A venv's scripts carry their absolute path, so the release is built in place
and marked ``.complete`` last; a directory without it is unfinished and is
removed, never used. Then the *new* release's own ``scaleboxd
--check-config`` judges the live config, so a release that cannot start with
it is refused before the service is touched (design section 8). Before the
build, the Debian packages the release declares are installed if missing
(packages.py), so a release that cannot get them is refused the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from scalebox import priority
from scalebox.fsutil import atomic_write, fsync_dir, fsync_tree
from scalebox.release import manifest
from scalebox.release.errors import ReleaseError
from scalebox.update import packages, process
from scalebox.update.errors import CommandError, UpdateError
from scalebox.update.interrupt import Interrupted
from scalebox.update.paths import Paths
from scalebox.update.plan import ReleaseDir

COMPLETE = ".complete"
# What staging wrote (sha256 per file, target per symlink): a pre-staged release is
# re-checked against it before an update reuses it.
STAGED_FILES = ".staged-files.json"
EXIT_DISK = 3  # wheel_install.py's exit when writing the venv failed (its EXIT_DISK)
DISK_HINT = (
    "nothing was changed; if the message says the disk is full or read-only, free space "
    "on that file system (`df -h`) or remount it read-write, then run scalebox-update again"
)
# Run by the new venv's interpreter, so it imports nothing of the running release.
INSTALL_SCRIPT = Path(__file__).with_name("wheel_install.py")
MANIFEST = "RELEASE.json"

Report = Callable[[str], None]
T = TypeVar("T")


def check_name(version: str) -> str:
    """A version is used as a directory name: refuse anything that is not one plain name."""
    if not version or version.startswith(".") or "/" in version or "\0" in version:
        raise UpdateError(
            f"release version {version!r} cannot name a directory under releases/",
            "the release is malformed; use another release",
        )
    return version


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


def manifest_version(directory: Path) -> str:
    """The version a release directory's RELEASE.json names ('' when unreadable)."""
    try:
        return str(json.loads((directory / MANIFEST).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def current_name(paths: Paths) -> str | None:
    """The directory name under releases/ that ``current`` points at, or None."""
    try:
        target = paths.current.readlink()
    except OSError:
        return None
    return Path(target).name


def list_releases(paths: Paths) -> list[ReleaseDir]:
    if not paths.releases.is_dir():
        return []
    return [
        ReleaseDir(d.name, manifest_version(d) or d.name, is_complete(d))
        for d in sorted(paths.releases.iterdir())
        if d.is_dir() and not d.is_symlink()
    ]


def remove_unfinished(paths: Paths, report: Report) -> list[str]:
    """Delete release directories without .complete (left by an interrupted stage)."""
    removed = []
    current = current_name(paths)
    for release in list_releases(paths):
        if not release.complete and release.name != current:
            report(f"removing unfinished release directory releases/{release.name}")
            shutil.rmtree(paths.release_dir(release.name))
            removed.append(release.name)
    return removed


def _declared(directory: Path, key: str, parse: Callable[[Any], T]) -> T:
    # RELEASE.json was verified when the release was opened or built; a release
    # made before ``key`` existed simply has none (parse([]) is empty).
    try:
        raw = json.loads((directory / MANIFEST).read_bytes())
        return parse(raw.get(key, []) if isinstance(raw, dict) else [])
    except (OSError, ValueError, ReleaseError) as exc:
        what = exc.what if isinstance(exc, ReleaseError) else str(exc)
        raise UpdateError(
            f"cannot read {key} from {directory / MANIFEST}: {what}",
            "the release is damaged; remove it and run scalebox-update again",
        ) from None


def declared_packages(directory: Path) -> tuple[str, ...]:
    """RELEASE.json ``debian_packages``: what the release needs installed."""
    return _declared(directory, "debian_packages", manifest.parse_debian_packages)


def declared_migrations(directory: Path) -> tuple[manifest.MigrationInfo, ...]:
    """RELEASE.json ``migrations``: what the release's runner may apply."""
    return _declared(directory, "migrations", manifest.parse_migrations)


def ensure_packages(release_root: Path, version: str, report: Report) -> list[str]:
    """Install the Debian packages the release declares that are missing; refuse on failure."""
    wanted = declared_packages(release_root)
    return packages.ensure(wanted, version, report, timeout=packages.APT_TIMEOUT)


def python_version(python: str) -> str:
    out = process.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        f"ask {python} for its version",
        timeout=30,
    )
    return out.strip()


def build(paths: Paths, release_root: Path, version: str, *, python: str, report: Report) -> bool:
    """Make releases/<version> a complete release built from ``release_root``.

    Returns True when it built the directory, False when an identical complete
    build was already there (reused as is).
    """
    name = check_name(version)
    target = paths.release_dir(name)
    new_manifest = (release_root / MANIFEST).read_bytes()
    if target.exists():
        same = (target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == new_manifest
        running = current_name(paths) == name
        changed = changed_files(target) if is_complete(target) and same and not running else None
        older = changed == [] and not _has_modes(target)
        if is_complete(target) and same and (running or (changed == [] and not older)):
            report(f"releases/{name} is already built from this release; reusing it")
            return False
        if running:
            raise UpdateError(
                f"releases/{name} is the running release but was built from a different "
                f"{MANIFEST}; it cannot be rebuilt while it runs",
                "install another version first, or publish this build under a new version",
            )
        if older:  # its files are as staged, but no mode or owner of them was recorded
            report(
                f"releases/{name} was staged by an older updater, whose record holds no file "
                "modes or owners; rebuilding it"
            )
        else:
            report(f"releases/{name} is not exactly what this release builds; rebuilding it")
            _report_shared_changes(paths, target, changed or [], report)
        shutil.rmtree(target)

    wanted = _supported_pythons(new_manifest)
    have = python_version(python)
    if wanted and have not in wanted:
        raise UpdateError(
            f"release {version} supports Python {', '.join(wanted)}, this server has {have}",
            "use a release built for this server's Python",
        )

    report(f"building releases/{name} (offline, from the release's wheels)")
    started = time.monotonic()
    target.mkdir(parents=True)
    for entry in sorted(release_root.iterdir()):
        if entry.name == "wheels":
            continue  # installed into the venv below; not needed afterwards
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, target / entry.name)
    known = _install(target / "venv", release_root / "wheels", version, python, donor=_donor(paths))
    write_record(target, known)
    # All that cp and the installer wrote reaches the disk before .complete says it is whole.
    fsync_tree(target)
    fsync_dir(target.parent)
    atomic_write(target / COMPLETE, f"{version}\n")
    report(f"built releases/{name} in {time.monotonic() - started:.2f} s")
    return True


def _report_shared_changes(paths: Paths, target: Path, changed: list[str], report: Report) -> None:
    shared = shared_with_current(paths, target, changed)
    if shared:
        shown = ", ".join(shared[:3]) + (f" and {len(shared) - 3} more" if len(shared) > 3 else "")
        report(
            f"warning: {len(shared)} changed file(s) of releases/{target.name} are hard links "
            f"shared with the running release releases/{current_name(paths)}, which is changed "
            f"too: {shown}; a rollback to it would run them. Undo that edit there (each "
            "file's original is in its release's wheels), and never edit files under releases/"
        )


def write_record(directory: Path, known: dict[str, str] | None = None) -> None:
    """Write STAGED_FILES: what the release directory holds now (install.sh calls it too).

    ``known``: the sha256 of files just written, from the bytes the writer had in
    hand (wheel_install.py's --hashes), so that they are not read again."""
    (directory / STAGED_FILES).write_text(
        json.dumps(file_record(directory, known), indent=0, sort_keys=True)
    )


def file_record(directory: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every regular file under ``directory`` (from ``known`` where it names
    the file), the target of every symlink, the kind of anything else; and the mode
    and owner of every file and directory (``dir/``): a chmod or chown of a staged
    file (a setuid bit, a world-writable module, a script no longer executable) is a
    change like any other."""
    known = known or {}
    record: dict[str, str] = {}
    for rel, entry in _entries(os.fspath(directory)):
        if rel in {COMPLETE, STAGED_FILES}:
            continue
        if entry.is_symlink():
            record[rel] = "symlink:" + str(Path(entry.path).readlink())
            continue
        meta = _mode_and_owner(entry.stat(follow_symlinks=False))
        if entry.is_dir(follow_symlinks=False):
            record[rel + "/"] = "dir " + meta
        elif not entry.is_file(follow_symlinks=False):
            record[rel] = "special"  # a FIFO or device node is never opened (nor waited on)
        else:
            record[rel] = f"{known.get(rel) or _sha256(entry.path)} {meta}"
    return record


def _mode_and_owner(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o} {st.st_uid}:{st.st_gid}"


def _sha256(path: str) -> str:
    """The record's value for a regular file: its sha256, read in chunks; "special" if
    it is no longer one (replaced by a FIFO or a symlink since it was listed: opened
    without following and without waiting for a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "special"
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _entries(top: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every entry under ``top``, by its /-path; symlinks to directories are entries,
    never followed. scandir's entries carry their type, and the one lstat each takes
    is a syscall, not a Path: for 6,050 files with every hash known, ~0.06 s of CPU
    against 0.24 s with a Path, a relative_to and an lstat per file. An explicit stack,
    not recursion: no tree is too deep for it."""
    stack = [(top, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as listing:
            for entry in listing:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, rel + "/"))
                yield rel, entry


def unchanged(directory: Path) -> bool:
    """True when ``directory`` holds exactly the files staging recorded (none changed or added)."""
    return changed_files(directory) == []


def changed_files(directory: Path) -> list[str] | None:
    """The files of ``directory`` that differ from staging's record, or are new or gone
    (None: no readable record, as when pip staged it). An older updater's record (a
    sha256 per file, no modes, owners or directories) is held to what it recorded: an
    unchanged release it staged has no changed file, not every file changed."""
    recorded = _read_record(directory)
    if recorded is None:
        return None
    try:
        now = file_record(directory)
    except OSError:
        return None
    if not _record_has_modes(recorded):
        now = {
            rel: value.split(" ", 1)[0] if value.startswith("sha256:") else value
            for rel, value in now.items()
            if not rel.endswith("/")
        }
    return sorted(rel for rel in recorded.keys() | now.keys() if recorded.get(rel) != now.get(rel))


def _read_record(directory: Path) -> dict[str, object] | None:
    try:
        recorded = json.loads((directory / STAGED_FILES).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _record_has_modes(recorded: dict[str, object]) -> bool:
    """Whether this updater wrote the record: every directory is in it (``dir/``), and a
    file's sha256 comes with its mode and owner. An older one's holds neither."""
    return any(
        rel.endswith("/")
        or (isinstance(value, str) and value.startswith("sha256:") and " " in value)
        for rel, value in recorded.items()
    )


def _has_modes(directory: Path) -> bool:
    recorded = _read_record(directory)
    return recorded is not None and _record_has_modes(recorded)


def shared_with_current(paths: Paths, directory: Path, files: list[str]) -> list[str]:
    """Those of ``files`` (relative to ``directory``) that are the running release's own
    file at the same place: one inode, shared by hard link (wheel_install.py)."""
    name = current_name(paths)
    if name is None or paths.release_dir(name) == directory:
        return []
    shared = []
    for rel in files:
        try:
            mine, theirs = (directory / rel).lstat(), (paths.release_dir(name) / rel).lstat()
        except OSError:
            continue
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            shared.append(rel)
    return shared


def _tool_wheel(wheels: Path, project: str) -> Path | None:
    found = sorted(wheels.glob(f"{project}-*-py3-none-any.whl"))
    return found[-1] if found else None


def _donor(paths: Paths) -> Path | None:
    """The running release's venv: the files a new build shares with it are linked."""
    name = current_name(paths)
    if name is None or not is_complete(paths.release_dir(name)):
        return None
    venv = paths.release_dir(name) / "venv"
    return venv if venv.is_dir() and not venv.is_symlink() else None


def _install(
    venv: Path, wheels: Path, version: str, python: str, *, donor: Path | None = None
) -> dict[str, str]:
    """Build ``venv`` with scalebox==version from ``wheels`` alone, offline.

    With the release's own PyPA ``installer`` and ``packaging`` wheels (every
    release since 0.2.0 ships them), a venv without pip and one program that
    installs every wheel and compiles the bytecode on every core: about a second, where
    ensurepip + pip took 8-10 s. Files byte-identical to the ``donor`` venv's
    (the running release) are hard links to them (wheel_install.py says why).
    While the updater gives way to a daemon serving (priority.lowered()), the
    install runs in one process, not one per core: lowered work on every core
    at once left a request waiting for a core, even at nice 10 in a session of
    nice 10, while lowered work on one core left the other free for it (a
    server answering under a load of 16 paced clients, four 8 s runs each on
    this 2-core host: its longest answer 7.4-11.5 ms with a busy loop on each
    core, 4.6-6.7 ms with one, 2.8-8.5 ms with none). The stage then takes
    longer, but nothing of the service is at stake yet.
    A release without them (an older one, being rolled back to) is built the
    old way, with pip.

    Returns the sha256 of the files the installer wrote, relative to the release
    directory (none with pip).
    """
    hint = "the release's wheels/ do not install on this server; nothing was changed"
    tools = [_tool_wheel(wheels, "installer"), _tool_wheel(wheels, "packaging")]
    if None in tools:
        process.run([python, "-m", "venv", str(venv)], "create the release venv")
        process.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-index",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--find-links",
                str(wheels),
                f"scalebox=={version}",
            ],
            f"install scalebox {version} from the release's wheels",
            env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
            hint=hint,
        )
        return {}
    process.run(
        [python, "-m", "venv", "--without-pip", str(venv)],
        "create the release venv",
        hint=DISK_HINT,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # Beside the venv, inside the unfinished release: gone with it if this run dies.
    hashes = venv.parent / ".install-hashes.json"
    try:
        process.run(
            [
                str(venv / "bin" / "python"),
                "-s",
                str(INSTALL_SCRIPT),
                "--hashes",
                str(hashes),
                *(["--workers", "1"] if priority.lowered() else []),
                # Killed with this updater, not left writing into the release it builds.
                "--parent",
                str(os.getpid()),
                str(wheels),
                f"scalebox=={version}",
                *([str(donor), str(donor.parent / STAGED_FILES)] if donor is not None else []),
            ],
            f"install scalebox {version} from the release's wheels",
            env={**env, "PYTHONPATH": os.pathsep.join(str(t) for t in tools)},
            hint=hint,
        )
    except CommandError as exc:
        if exc.exit_status != EXIT_DISK:
            raise
        # The server's disk failed under the install, not the release's wheels.
        raise CommandError(exc.what, DISK_HINT, exit_status=exc.exit_status) from None
    try:
        written = json.loads(hashes.read_bytes())
    except (OSError, ValueError):
        written = None  # the record then reads every file
    finally:
        hashes.unlink(missing_ok=True)
    if not isinstance(written, dict):
        return {}
    return {
        f"{venv.name}/{rel}": value
        for rel, value in written.items()
        if isinstance(rel, str) and isinstance(value, str)
    }


def _supported_pythons(manifest: bytes) -> list[str]:
    try:
        raw = json.loads(manifest).get("python", [])
    except (ValueError, AttributeError):
        return []
    return [str(v) for v in raw] if isinstance(raw, list) else []


def check_config(paths: Paths, name: str) -> None:
    """Run the staged release's own config check on the live config; refuse on failure."""
    scaleboxd = paths.release_dir(name) / "venv" / "bin" / "scaleboxd"
    try:
        process.run(
            [str(scaleboxd), "--check-config", str(paths.config)],
            f"the new release's config check ({scaleboxd} --check-config {paths.config})",
            timeout=60,
            hint="nothing was changed and scaleboxd keeps running; run scalebox-update "
            "again (a check that overran or was killed says nothing about the config)",
        )
    except Interrupted:
        raise  # a Ctrl-C is not the config's fault: keep its own words and hint
    except CommandError as exc:
        if exc.exit_status is None:
            raise  # it did not run to its end (missing, killed, overran): not the config's fault
        raise UpdateError(
            f"release {name} rejects the live config {paths.config}: {exc.what}",
            "nothing was changed and scaleboxd keeps running; fix the config "
            "(see /opt/scalebox/current/docs/operations.md) or wait for a release that accepts it",
        ) from None
