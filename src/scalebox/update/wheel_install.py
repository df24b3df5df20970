"""Install one requirement and its dependencies from a directory of wheels into this venv.

Run by the *new* release venv's own interpreter (``venv/bin/python``, made
``--without-pip``) with ``PYTHONPATH`` naming the ``installer`` and
``packaging`` wheels of the release, so it imports nothing of the running
scalebox and its tags and markers are those of the interpreter that will run
the release. It does what ``pip install --no-index --find-links WHEELS REQ``
does: for every requirement, the best-matching wheel by this interpreter's
tags; dependencies from each wheel's METADATA with their markers evaluated;
PyPA ``installer`` unpacks them, writes the entry-point scripts and
RECORD. Bytecode is compiled while the next wheel unpacks, on every core
(a pool of forked workers gets each wheel's .py files as soon as they are
written), as unchecked-hash .pyc: they do not embed the files' mtimes, so
two builds are byte-identical, and the import skips the staleness check (a
release's files never change after staging). The same files get a .pyc as
with pip (every .py a wheel puts into site-packages), so the first start
costs no compiling.

Usage: python wheel_install.py WHEELS_DIR REQUIREMENT
Prints one line per installed distribution; exits 1 with a one-line reason.
"""

from __future__ import annotations

import os
import py_compile
import sys
import sysconfig
from concurrent.futures import Future, ProcessPoolExecutor
from email.parser import Parser
from pathlib import Path
from typing import BinaryIO

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.records import RecordEntry
from installer.sources import WheelFile
from installer.utils import Scheme
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

INSTALLER = b"scalebox-update\n"


# .py files per task for the compile pool: small enough to spread a big wheel
# (pygments: 340 files) over every core, large enough to keep the overhead low.
CHUNK = 24


class InstallError(Exception):
    pass


class CollectingDestination(SchemeDictionaryDestination):
    """Installs as usual and notes every .py file written into site-packages."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.python_files: list[str] = []

    def write_file(
        self, scheme: Scheme, path: str | os.PathLike[str], stream: BinaryIO, is_executable: bool
    ) -> RecordEntry:
        entry = super().write_file(scheme, path, stream, is_executable)
        if scheme in ("purelib", "platlib") and str(path).endswith(".py"):
            self.python_files.append(str(Path(self.scheme_dict[scheme], path)))
        return entry


def compile_files(files: list[str]) -> None:
    """Write each file's .pyc; as pip does, one that does not compile (a Python 2
    leftover, a test fixture) stays without, instead of failing the install."""
    for file in files:
        try:
            py_compile.compile(
                file,
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except (py_compile.PyCompileError, SyntaxError, UnicodeError):
            continue


def best_wheels(wheels: Path) -> dict[str, tuple[Version, Path]]:
    """Per project, the wheel whose tags this interpreter prefers most (as pip ranks them)."""
    rank = {tag: i for i, tag in enumerate(sys_tags())}
    best: dict[str, tuple[int, Version, Path]] = {}
    for path in sorted(wheels.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(path.name)
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is None:
            continue  # built for another Python or platform
        held = best.get(name)
        if held is None or (version, -score) > (held[1], -held[0]):
            best[name] = (score, version, path)
    return {name: (version, path) for name, (_, version, path) in best.items()}


def requires(path: Path) -> list[Requirement]:
    with WheelFile.open(path) as source:
        metadata = Parser().parsestr(source.read_dist_info("METADATA"))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def resolve(root: Requirement, wheels: dict[str, tuple[Version, Path]]) -> list[Path]:
    """The wheels ``root`` needs here, each project once (the release pins one version each)."""
    chosen: dict[str, Path] = {}
    extras: dict[str, set[str]] = {}
    todo = [root]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name not in wheels:
            raise InstallError(f"no wheel for {req} that this Python can use")
        version, path = wheels[name]
        if not req.specifier.contains(version, prereleases=True):
            raise InstallError(f"{req} is wanted but the release holds {name} {version}")
        new_extras = set(req.extras) - extras.get(name, set())
        if name in chosen and not new_extras:
            continue
        chosen[name] = path
        extras.setdefault(name, set()).update(new_extras)
        for dep in requires(path):
            wanted = {""} | extras[name]
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(dep)
    return [chosen[name] for name in sorted(chosen)]


def install_all(wheels: Path, root: Requirement) -> None:
    paths = sysconfig.get_paths()
    compiled: list[Future[None]] = []
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for path in resolve(root, best_wheels(wheels)):
            name = parse_wheel_filename(path.name)[0]
            scheme = {
                "purelib": paths["purelib"],
                "platlib": paths["platlib"],
                "scripts": paths["scripts"],
                "data": paths["data"],
                # Where pip puts a venv's headers.
                "headers": str(
                    Path(
                        sys.prefix,
                        "include",
                        "site",
                        f"python{sys.version_info[0]}.{sys.version_info[1]}",
                        name,
                    )
                ),
            }
            destination = CollectingDestination(
                scheme,
                interpreter=sys.executable,
                script_kind="posix",
            )
            with WheelFile.open(path) as source:
                extra = {"REQUESTED": b""} if name == canonicalize_name(root.name) else {}
                install(source, destination, {"INSTALLER": INSTALLER, **extra})
            files = destination.python_files
            for start in range(0, len(files), CHUNK):
                compiled.append(pool.submit(compile_files, files[start : start + CHUNK]))
            print(path.name)
        for done in compiled:
            done.result()  # an OSError (disk full) in a worker fails the install


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: wheel_install.py WHEELS_DIR REQUIREMENT", file=sys.stderr)
        return 2
    wheels, root = Path(argv[0]), Requirement(argv[1])
    try:
        install_all(wheels, root)
    except (InstallError, ValueError, OSError) as exc:
        print(f"cannot install {root}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
