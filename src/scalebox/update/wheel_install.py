"""Install one requirement and its dependencies from a directory of wheels into this venv.

Run by the *new* release venv's own interpreter (``venv/bin/python``, made
``--without-pip``) with ``PYTHONPATH`` naming the ``installer`` and
``packaging`` wheels of the release, so it imports nothing of the running
scalebox and its tags and markers are those of the interpreter that will run
the release. It does what ``pip install --no-index --find-links WHEELS REQ``
does: for every requirement, the best-matching wheel by this interpreter's
tags; dependencies from each wheel's METADATA with their markers evaluated;
PyPA ``installer`` unpacks them, writes the entry-point scripts and
RECORD. A pool of one process per core unpacks the wheels side by side and
compiles each wheel's bytecode as soon as it is unpacked, as unchecked-hash
.pyc: they do not embed the files' mtimes, and
their code names its file relative to site-packages (the import puts in the
real path when it loads them), so two builds are byte-identical wherever
they are built, and the import skips the staleness check (a release's files
never change after staging). The same files get a .pyc as with pip (every
.py a wheel puts into site-packages), so the first start costs no compiling.

With a DONOR venv (the running release's) and the record its staging
wrote, a file in site-packages whose bytes and mode are exactly those of the
donor's file at the same place is made a hard link to it instead of a new
file (the donor's bytes are checked against the size and CRC-32 of the
wheel's zip directory and the sha256 of its RECORD: such a file is never
unpacked), and so is a .pyc the donor's staging compiled from the same
source (see pyc_of). Most of an update's files are unchanged dependencies: a link
costs a directory entry, where a new file costs an inode (0.4-1 ms each on
some ext4 disks, ~2,600 of them) and a .pyc its compiling (~2 s of CPU in
all). The tree is byte for byte what it would be without a donor.

With ``--hashes FILE`` it also writes, as JSON, the sha256 of every file it
wrote or linked (relative to the venv), from the bytes it had in hand: the
updater's record of the release (stage.write_record) then reads none of
them again. With ``--workers N`` the pool has N processes instead of one per
core: the updater asks for one while a daemon serves (stage.py says why).

Usage: python wheel_install.py [--hashes FILE] [--workers N] WHEELS_DIR REQUIREMENT
                               [DONOR_VENV DONOR_RECORD]
Prints one line per installed distribution; exits 1 with a one-line reason.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import importlib.util
import io
import json
import marshal
import os
import platform
import signal
import stat
import sys
import sysconfig
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from types import CodeType
from typing import BinaryIO

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.records import Hash, RecordEntry
from installer.sources import WheelFile
from installer.utils import Scheme
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

TYPE_CHECKING = False
if TYPE_CHECKING:  # not in installer's __all__: a later installer may rename it
    from installer.sources import WheelContentElement

INSTALLER = b"scalebox-update\n"
SITE_SCHEMES = ("purelib", "platlib")


# .py files per task for the compile pool: small enough to spread a big wheel
# (pygments: 340 files) over every core, large enough to keep the overhead low.
CHUNK = 24


class InstallError(Exception):
    pass


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def python_of(venv: Path) -> str | None:
    """The Python version a venv was made with (its pyvenv.cfg ``version``)."""
    try:
        lines = (venv / "pyvenv.cfg").read_text().splitlines()
    except (OSError, UnicodeError):
        return None
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "version":
            return value.strip()
    return None


@dataclass(frozen=True)
class Donor:
    """The running release's venv, and what its staging recorded it wrote."""

    venv: Path
    # "venv/<path>" -> "sha256:<hex> <mode> <uid>:<gid>", as stage.file_record wrote it
    # (an older updater's record: "sha256:<hex>" alone; empty: no record)
    record: dict[str, str]

    @classmethod
    def load(cls, venv: Path, record: Path) -> Donor:
        try:
            raw = json.loads(record.read_bytes())
        except (OSError, ValueError, RecursionError):
            raw = {}  # staged by pip or an older updater: plain files only
        if not isinstance(raw, dict) or python_of(venv) != platform.python_version():
            # Its .pyc came from another Python's compiler (the magic number stays the
            # same across patch releases, the bytes need not): they are compiled again.
            raw = {}
        return cls(venv, raw)

    def path(self, mine: str) -> str | None:
        """Where the donor holds the file this venv gets at ``mine`` (None: outside it)."""
        prefix = sys.prefix + os.sep
        if mine.startswith(prefix) and os.sep + "." not in mine[len(prefix) - 1 :]:
            # A plain path below this venv (no "." or ".." part to resolve): the same
            # place below the donor's, by slicing (relpath costs ~20 us, twice per file).
            return os.fspath(self.venv) + mine[len(prefix) - 1 :]
        relative = os.path.relpath(os.path.normpath(mine), sys.prefix)
        if relative in (os.curdir, os.pardir) or relative.startswith(os.pardir + os.sep):
            return None
        return os.path.join(self.venv, relative)  # noqa: PTH118 -- hot path

    def recorded(self, theirs: str) -> str | None:
        """The sha256 the record holds for the donor's file ``theirs`` (a path from
        ``path()``), as "sha256:<hex>"."""
        top = os.fspath(self.venv.parent) + os.sep
        if theirs.startswith(top):
            relative = theirs[len(top) :]
        else:
            relative = os.path.relpath(theirs, self.venv.parent)
        value = self.record.get(relative.replace(os.sep, "/"))
        return value.split(" ", 1)[0] if isinstance(value, str) else None


def link_if(
    theirs: str | None,
    target: str,
    mode: int,
    same: Callable[[bytes], bool],
    *,
    size: int | None = None,
    make_dir: Callable[[str], None] | None = None,
) -> bytes | None:
    """Make ``target`` a hard link to ``theirs`` if that is a regular file with permission
    bits ``mode`` (and ``size`` bytes, when given) whose bytes ``same`` accepts: its bytes,
    or None (nothing made). ``make_dir`` makes target's directory, only when it links."""
    try:
        # O_NONBLOCK: a FIFO put in the donor's place fails fstat's check below
        # instead of waiting for a writer.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(theirs or "", flags)
    except OSError:
        return None  # no donor, or no such file
    try:
        held = os.fstat(fd)
        if not (
            stat.S_ISREG(held.st_mode)
            and stat.S_IMODE(held.st_mode) == mode
            and size in (None, held.st_size)
        ):
            return None
        # Unbuffered: one read of the whole file, no tty check, no second descriptor.
        with open(fd, "rb", buffering=0, closefd=False) as f:
            data = f.readall()
        if not same(data):
            return None
        if make_dir is not None:
            make_dir(os.path.dirname(target))  # noqa: PTH120
        try:
            os.link(theirs or "", target, follow_symlinks=False)
        except OSError:
            return None  # another filesystem, or links not allowed: write it instead
        linked = os.lstat(target)
        if (linked.st_dev, linked.st_ino) != (held.st_dev, held.st_ino):
            os.unlink(target)  # noqa: PTH108 -- the donor's entry changed under us: write it
            return None
        return data
    finally:
        os.close(fd)


def pyc_bytes(source: bytes, name: str) -> bytes:
    """What py_compile writes in UNCHECKED_HASH mode, with ``name`` as the code's file."""
    code = compile(source, name, "exec", dont_inherit=True)
    return pyc_header(source) + marshal.dumps(code)


def pyc_header(source: bytes) -> bytes:
    flags = (0b01).to_bytes(4, "little")  # hash-based, unchecked (PEP 552)
    return importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source)


def pyc_of(held: bytes, source: bytes, name: str, recorded: str | None) -> bool:
    """Whether ``held`` is the .pyc this build would write for ``source`` as ``name``.

    It is when the donor's staging wrote it (its sha256 is in the donor's
    record) from the same source (the source hash in its header) for the same
    bytecode (the magic number) and the same file name (its code's
    co_filename), as this module compiles: compiling it again would give the
    same bytes, at about 30 times the cost of these checks.
    """
    if recorded != "sha256:" + hashlib.sha256(held).hexdigest():
        return False
    if not held.startswith(pyc_header(source)):
        return False
    try:
        code = marshal.loads(held[16:])  # noqa: S302 -- the donor's own staged file
    except (ValueError, EOFError, TypeError):
        return False
    return isinstance(code, CodeType) and code.co_filename == name


@dataclass(frozen=True)
class Member:
    """What is known of one file of a wheel: its size, CRC-32 and sha256."""

    size: int
    crc: int
    sha256: bytes

    def matches(self, data: bytes) -> bool:
        return (
            len(data) == self.size
            and zlib.crc32(data) == self.crc
            and hashlib.sha256(data).digest() == self.sha256
        )


class NotingWheel(WheelFile):
    """A wheel that says what it knows of the file installer is writing, without
    unpacking it: the size and CRC-32 its zip directory holds, the sha256 its RECORD
    holds. A donor's file that has all three is taken for the file, and linked with
    no inflating: the wheels' ~40 MB cost ~0.2 s of CPU to inflate, ~0.05 s to check
    this way. The CRC-32 ties the RECORD to the bytes in the zip: a RECORD that is
    wrong by mistake links nothing. Two things this trusts that inflating would
    not, both only the release's signer could ship (every wheel's sha256 is in the
    signed manifest, checked before staging): a RECORD made to match the donor's
    bytes where the zip holds others with the same size and CRC-32, and deflated
    bytes that are damaged while the directory is whole (a wheel built broken and
    signed so: a build without a donor, install.sh's first one for instance,
    refuses it).

    This file is the running release's, the installer the new release's: all
    that is read of installer's items is guarded, and a shape it does not know
    makes the file unpacked as before, never an install that fails."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        super().__init__(archive)
        self.archive = archive
        names = archive.namelist()
        self.unique = len(names) == len(set(names))  # else getinfo() could name another
        self.current: tuple[object, Member | None] | None = None

    def get_contents(self) -> Iterator[WheelContentElement]:
        for item in super().get_contents():
            self.current = self._member(item)
            yield item
        self.current = None

    def member(self, stream: BinaryIO) -> Member | None:
        """What the wheel knows of the file ``stream`` reads (None: nothing it can vouch for)."""
        if self.current is None or self.current[0] is not stream:
            return None  # not a file of the wheel (INSTALLER, RECORD, a script)
        return self.current[1]

    def _member(self, item: WheelContentElement) -> tuple[object, Member | None] | None:
        try:
            (path, recorded, _), stream, _ = item
            algorithm, _, value = recorded.partition("=")
            if not self.unique or algorithm != "sha256" or getattr(stream, "name", None) != path:
                return (stream, None)
            info = self.archive.getinfo(path)
            digest = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except Exception:  # noqa: BLE001 -- any shape not known here: unpacked as before
            return None
        return (stream, Member(info.file_size, info.CRC, digest) if len(digest) == 32 else None)


class CollectingDestination(SchemeDictionaryDestination):
    """Installs as usual, but links what the donor holds byte for byte, and notes every
    .py file in site-packages whose .pyc is still to be compiled."""

    def __init__(self, *args: object, donor: Donor | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.python_files: list[tuple[str, str]] = []  # (file, its site-packages)
        # file -> "sha256:<hex>" of the bytes written or linked there
        self.hashes: dict[str, str] = {}
        self.donor = donor
        self.umask = current_umask()
        self.sites: dict[str, str] = {}  # scheme -> its directory, absolute
        self.made: set[str] = set()  # directories known to exist
        self.wheel: NotingWheel | None = None  # the wheel being installed

    def make_dir(self, directory: str) -> None:
        """``directory`` and its parents exist afterwards; each is made (or found) once,
        then remembered: most files of a wheel share a directory.

        Wheels unpack side by side: a directory two of them share (a namespace
        package) may appear between a check and a mkdir, which exist_ok allows."""
        if directory not in self.made:
            os.makedirs(directory, exist_ok=True)  # noqa: PTH103 -- hot path, str
            self.made.add(directory)

    def write_to_fs(
        self, scheme: Scheme, path: str, stream: BinaryIO, is_executable: bool
    ) -> RecordEntry:
        try:
            return self._write_to_fs(scheme, path, stream, is_executable)
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            # A failed write(2) names no file (No space left on device); the admin needs it.
            where = os.path.join(self.scheme_dict[scheme], path)  # noqa: PTH118
            raise OSError(exc.errno, exc.strerror, os.path.normpath(where)) from exc

    def _write_to_fs(
        self, scheme: Scheme, path: str, stream: BinaryIO, is_executable: bool
    ) -> RecordEntry:
        site = self.sites.get(scheme)
        if site is None:
            site = self.sites[scheme] = os.path.abspath(self.scheme_dict[scheme])  # noqa: PTH100
        target = os.path.abspath(os.path.join(site, path))  # noqa: PTH100, PTH118 -- hot path
        if not target.startswith(site + os.sep):
            return super().write_to_fs(scheme, path, stream, is_executable)  # refuses it
        self.make_dir(os.path.dirname(target))  # noqa: PTH120
        theirs = self.donor.path(target) if self.donor else None
        if scheme not in SITE_SCHEMES or theirs is None or os.path.lexists(target):
            entry = super().write_to_fs(scheme, path, stream, is_executable)
            self.note(target, entry)
            if scheme in SITE_SCHEMES and target.endswith(".py"):
                self.python_files.append((target, site))
            return entry
        # The modes installer's open() and make_file_executable() give.
        mode = (0o777 & ~self.umask | 0o111) if is_executable else 0o666 & ~self.umask
        member = None
        if self.wheel is not None and self.hash_algorithm == "sha256":
            member = self.wheel.member(stream)
        if member is not None:
            linked = link_if(theirs, target, mode, member.matches, size=member.size)
            data = stream.read() if linked is None else linked
        else:
            data = stream.read()
            linked = link_if(theirs, target, mode, data.__eq__, size=len(data))
        if linked is not None:
            if member is not None:
                digest = member.sha256  # matches() saw that the linked bytes have it
            else:
                digest = hashlib.new(self.hash_algorithm, data).digest()
            value = base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
            entry = RecordEntry(path, Hash(self.hash_algorithm, value), len(data))
        else:
            entry = super().write_to_fs(scheme, path, io.BytesIO(data), is_executable)
        self.note(target, entry)
        if target.endswith(".py") and not self.link_pyc(site, target, data, mode):
            self.python_files.append((target, site))
        return entry

    def note(self, target: str, entry: RecordEntry) -> None:
        """Keep the sha256 installer computed of what it wrote (its RECORD's, in hex)."""
        if entry.hash_ is not None and entry.hash_.name == "sha256":
            value = entry.hash_.value
            digest = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            self.hashes[target] = "sha256:" + digest.hex()

    def link_pyc(self, site: str, target: str, source: bytes, mode: int) -> bool:
        if self.donor is None:
            return False
        cfile = importlib.util.cache_from_source(target)
        theirs = self.donor.path(cfile)
        if theirs is None:
            return False
        recorded = self.donor.recorded(theirs)
        if recorded is None:
            return False
        name = target[len(site) + 1 :]  # below site: write_to_fs checked it
        pyc_mode = (mode | 0o200) & 0o666 & ~self.umask  # as py_compile makes it
        if (
            link_if(
                theirs,
                cfile,
                pyc_mode,
                lambda held: pyc_of(held, source, name, recorded),
                make_dir=self.make_dir,  # __pycache__, as py_compile makes it: with a .pyc
            )
            is None
        ):
            return False
        self.hashes[cfile] = recorded  # pyc_of saw that the linked bytes have it
        return True


def compile_files(files: list[tuple[str, str]]) -> dict[str, str]:
    """Write each file's .pyc, naming it relative to its site-packages; as pip does,
    one that does not compile (a Python 2 leftover, a test fixture) stays without,
    instead of failing the install. Returns each written .pyc's sha256."""
    hashes = {}
    for file, site in files:
        source = Path(file).read_bytes()
        mode = (Path(file).stat().st_mode | 0o200) & 0o666  # as py_compile
        try:
            data = pyc_bytes(source, os.path.relpath(file, site))
        except Exception:  # noqa: BLE001, S112 -- as py_compile: any failure leaves no .pyc
            continue
        cfile = Path(importlib.util.cache_from_source(file))
        cfile.parent.mkdir(exist_ok=True)
        fd = os.open(cfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        hashes[str(cfile)] = "sha256:" + hashlib.sha256(data).hexdigest()
    return hashes


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


# The donor of this process: set once in each pool worker (see install_all).
_donor: Donor | None = None


def _use_donor(donor: Donor | None, parent: int) -> None:
    global _donor  # noqa: PLW0603 -- one per worker process, set by its initializer
    _donor = donor
    die_with(parent)


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with(parent: int) -> None:
    """Be killed (SIGKILL) when ``parent`` dies: an updater killed mid-stage must not
    leave this install writing into releases/<v> while its next run removes that
    directory and builds it again at the same path. Best effort: without prctl the
    next run's removal still wins in the end."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def install_one(path: Path, requested: bool) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Unpack one wheel into this venv, linking what the donor shares; the .py files
    (with their site-packages) whose .pyc are still to be compiled, and the sha256 of
    every file written or linked."""
    paths = sysconfig.get_paths()
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
        scheme, interpreter=sys.executable, script_kind="posix", donor=_donor
    )
    with contextlib.ExitStack() as stack:
        archive = stack.enter_context(zipfile.ZipFile(path))
        source: WheelFile
        try:
            source = destination.wheel = NotingWheel(archive)
        except Exception:  # noqa: BLE001 -- a later installer's WheelFile, made otherwise
            source = stack.enter_context(WheelFile.open(path))
        extra = {"REQUESTED": b""} if requested else {}
        install(source, destination, {"INSTALLER": INSTALLER, **extra})
    return destination.python_files, destination.hashes


def install_all(
    wheels: Path, root: Requirement, donor: Donor | None = None, workers: int | None = None
) -> dict[str, str]:
    """Every wheel ``root`` needs, unpacked in a pool of ``workers`` processes (one per
    core by default; the largest wheel first), each wheel's .pyc compiled in the same
    pool as soon as it is unpacked, in chunks so that one large wheel spreads over
    every worker.

    Returns the sha256 of every file written or linked, relative to the venv; a
    file two wheels wrote with different bytes is left out (which one is on the
    disk is not known here)."""
    chosen = resolve(root, best_wheels(wheels))
    chosen.sort(key=lambda path: path.stat().st_size, reverse=True)
    wanted = canonicalize_name(root.name)
    with ProcessPoolExecutor(
        max_workers=workers or os.cpu_count(),
        initializer=_use_donor,
        initargs=(donor, os.getpid()),
    ) as pool:
        unpacked = [
            pool.submit(install_one, path, parse_wheel_filename(path.name)[0] == wanted)
            for path in chosen
        ]
        compiled: list[Future[dict[str, str]]] = []
        hashes: dict[str, str | None] = {}

        def keep(found: dict[str, str]) -> None:
            for file, value in found.items():
                hashes[file] = value if hashes.get(file, value) == value else None

        for done in as_completed(unpacked):
            files, written = done.result()  # an OSError (disk full) in a worker fails it
            keep(written)
            for start in range(0, len(files), CHUNK):
                compiled.append(pool.submit(compile_files, files[start : start + CHUNK]))
        for task in compiled:
            keep(task.result())
    for path in sorted(chosen):
        print(path.name)
    return {
        Path(os.path.relpath(file, sys.prefix)).as_posix(): value
        for file, value in hashes.items()
        if value is not None
    }


EXIT_DISK = 3  # writing the venv failed (No space left on device, Read-only file system)


def main(argv: list[str]) -> int:
    hashes_file, workers = None, None
    while argv[:1] in (["--hashes"], ["--workers"], ["--parent"]) and len(argv) > 1:
        if argv[0] == "--hashes":
            hashes_file = Path(argv[1])
        elif argv[0] == "--parent" and argv[1].isdigit():
            die_with(int(argv[1]))
        elif argv[0] == "--workers" and argv[1].isdigit() and int(argv[1]) > 0:
            workers = int(argv[1])
        else:
            wanted = "a number of processes" if argv[0] == "--workers" else "a process id"
            print(f"{argv[0]} wants {wanted}, not {argv[1]!r}", file=sys.stderr)
            return 2
        argv = argv[2:]
    if len(argv) not in (2, 4):
        print(
            "usage: wheel_install.py [--hashes FILE] [--workers N] [--parent PID] "
            "WHEELS_DIR REQUIREMENT "
            "[DONOR_VENV DONOR_RECORD]",
            file=sys.stderr,
        )
        return 2
    wheels, root = Path(argv[0]), Requirement(argv[1])
    donor = Donor.load(Path(argv[2]), Path(argv[3])) if len(argv) == 4 else None
    try:
        hashes = install_all(wheels, root, donor, workers)
        if hashes_file is not None:
            hashes_file.write_text(json.dumps(hashes, sort_keys=True))
    except OSError as exc:  # the server's disk, not the wheels: a full or read-only fs
        where = f": {exc.filename}" if exc.filename else ""
        print(f"cannot install {root}: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_DISK
    except Exception as exc:  # noqa: BLE001 -- one line, whatever failed (a worker killed, a bad wheel)
        print(f"cannot install {root}: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
