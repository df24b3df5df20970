"""Unpack an untrusted release tarball: the signed manifest first, then each member hashed.

The order is the one systemd-sysupdate and RAUC keep: nothing from the
tarball is believed or written before its signed manifest is checked.

1. The tarball is read as a gzip stream through a reader that refuses any
   single read over ``MAX_READ`` bytes, with tar headers parsed by a strict
   ``TarInfo``: a pax extended header is at most ``MAX_HEADER_BYTES`` (all of
   them together ``MAX_HEADERS_TOTAL``), no two in a row, and GNU long-name,
   long-link, sparse and global headers are refused before their data is
   read. So metadata from outside costs a bounded amount of memory.
2. The first members must be ``<top>/RELEASE.json`` and
   ``<top>/RELEASE.json.sig`` (a ``<top>/`` directory entry may come before
   them): both are read into memory (bounded) and the signature is checked
   against the trusted keys. With no trusted keys (a first install trusts the
   shipped key), ``<top>/keys/release.pub`` must follow and is read the same way.
3. The manifest is parsed, and the caller's ``check`` (arch, Python,
   completeness) runs, still before anything is written.
4. Every other member is written only if RELEASE.json lists it, hashed while
   it is written; the first mismatch refuses the release. At the end every
   listed file must have been seen.

Only regular files and directories under one top directory are accepted: no
absolute paths, no '..', no links of any kind, no devices or fifos, no
duplicates. Files are written by this module (O_EXCL, O_NOFOLLOW), never by
tarfile.extractall. On any failure everything written into ``dest`` is removed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from scalebox.release import manifest, signing
from scalebox.release.errors import ReleaseError

KiB = 1024
MiB = 1024 * KiB
DEFAULT_MAX_BYTES = 512 * MiB
DEFAULT_MAX_MEMBERS = 10_000
MAX_READ = 1 * MiB  # any one read from the decompressed stream (tarfile's or ours)
MAX_HEADER_BYTES = 64 * KiB  # one pax extended header (ours hold one long path)
MAX_HEADERS_TOTAL = 1 * MiB  # every extended header of the archive together
MAX_MANIFEST_BYTES = 1 * MiB
MAX_SIGNATURE_BYTES = 4 * KiB
MAX_KEY_BYTES = 16 * KiB
_CHUNK = 256 * KiB
# tar pads to 10 KiB records; anything far beyond that is not padding.
_MAX_PADDING = 1 * MiB
_GZIP_MAGIC = b"\x1f\x8b"
# A pax record: "<length> <keyword>=<value>\n", its length counting all of it.
_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")
# tarfile searches a pax header with r"\d+ hdrcharset=": quadratic in a run of digits.
_PAX_DIGIT_RUN = re.compile(rb"[0-9]{65}")
# The header types a release may hold. Symlinks, hard links, devices and fifos
# are let through tarfile (their headers carry no data) so that member_parts can
# name them in its refusal; the rest are refused before tarfile reads anything.
_PASSED_TYPES = {
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.DIRTYPE,
    tarfile.XHDTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
}
_TYPE_NAMES = {
    tarfile.GNUTYPE_LONGNAME: "a GNU long-name header",
    tarfile.GNUTYPE_LONGLINK: "a GNU long-link header",
    tarfile.GNUTYPE_SPARSE: "a GNU sparse file",
    tarfile.XGLTYPE: "a pax global header",
    tarfile.SOLARIS_XHDTYPE: "a Solaris extended header",
    tarfile.CONTTYPE: "a contiguous file",
}


def _short(name: str) -> str:
    """repr() of a name from the archive, cut short: names may be 64 KiB long."""
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "..."


def _refuse(tarball: Path, what: str) -> ReleaseError:
    return ReleaseError(
        f"{tarball.name}: {what}; refusing to extract it",
        "this is not a release made by ./do tarball; get the release again from a trusted source",
    )


class _Refused(Exception):
    """Raised inside tarfile's parsing; turned into a ReleaseError naming the tarball."""


# --- bounded reading ------------------------------------------------------------------


class _BoundedReads:
    """The decompressed stream as tarfile sees it: no single read may exceed MAX_READ.

    tarfile reads a pax or GNU long-name header's whole declared size in one
    read; the strict TarInfo below refuses large headers first, and this is
    the backstop should any other path ask for a large read.
    """

    def __init__(self, stream: gzip.GzipFile) -> None:
        self._stream = stream
        self._peeked = b""  # read ahead by peek(), handed out first
        self.name = None
        self.mode = "rb"

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > MAX_READ:
            raise _Refused(f"a tar header asks to read {size} bytes at once (limit {MAX_READ})")
        if self._peeked:
            data, self._peeked = self._peeked[:size], self._peeked[size:]
            return data + self._stream.read(size - len(data))
        return self._stream.read(size)

    def peek(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer at the end), which the next read returns again."""
        self._peeked += self.read(size - len(self._peeked))
        return self._peeked[:size]

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET and offset < self.tell():
            # Going back would decompress the stream again from its start.
            raise _Refused("the archive asks to go back in the stream")
        if self._peeked:
            if whence != os.SEEK_SET:  # pragma: no cover - tarfile seeks from the start only
                raise _Refused("the archive asks for a relative seek")
            ahead = offset - self.tell()
            if ahead <= len(self._peeked):
                self._peeked = self._peeked[ahead:]
                return offset
            self._peeked = b""  # the stream is already past what was peeked
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell() - len(self._peeked)

    def close(self) -> None:
        self._stream.close()


class _StrictTarFile(tarfile.TarFile):
    extended_header_bytes = 0
    in_extended_header = False


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's header parsing, with the types and sizes a release never needs refused."""

    def _proc_member(self, tarfile_: Any) -> Any:  # tarfile's documented extension point
        if not isinstance(tarfile_, _StrictTarFile):  # pragma: no cover - always ours
            raise TypeError("_StrictTarInfo reads only a _StrictTarFile")
        if self.type not in _PASSED_TYPES:
            kind = _TYPE_NAMES.get(self.type, f"an unknown type {self.type!r}")
            raise _Refused(f"member {_short(self.name)} is {kind}, which a release never holds")
        if self.type != tarfile.XHDTYPE:
            return super()._proc_member(tarfile_)  # type: ignore[misc]
        if tarfile_.in_extended_header:
            raise _Refused("two pax extended headers follow each other")
        if self.size > MAX_HEADER_BYTES:
            raise _Refused(f"a pax extended header of {self.size} bytes (limit {MAX_HEADER_BYTES})")
        tarfile_.extended_header_bytes += self.size
        if tarfile_.extended_header_bytes > MAX_HEADERS_TOTAL:
            raise _Refused(f"more than {MAX_HEADERS_TOTAL} bytes of pax extended headers")
        check_pax_records(tarfile_.fileobj.peek(self._block(self.size)), self.size)  # type: ignore[attr-defined]
        tarfile_.in_extended_header = True
        try:
            return super()._proc_member(tarfile_)  # type: ignore[misc]
        finally:
            tarfile_.in_extended_header = False

    # GNU sparse maps in pax headers (tarfile reads version 1.0's map with no bound).
    def _proc_gnusparse_00(self, *args: Any) -> None:
        raise _Refused(f"member {_short(self.name)} is a GNU sparse file")

    _proc_gnusparse_01 = _proc_gnusparse_00
    _proc_gnusparse_10 = _proc_gnusparse_00


def check_pax_records(block: bytes, size: int) -> None:
    """A pax header's data (``size`` bytes, then zero padding) must be whole records (pure).

    tarfile (before Python 3.11.10) matches each record's keyword up to the
    next '=' anywhere in the header and keeps it: a 60 KB header of "2 2 2 ...="
    costs about 1 GB of memory, and a run of 60 K digits minutes of CPU. So
    each record must end where its length says, with a '=' and a newline
    inside it, and no run of digits may be longer than a length or a time needs.
    """
    data, pos = block[:size], 0
    if len(data) < size or block[size:].count(0) != len(block) - size:
        raise _Refused("a pax extended header has data past its declared size")
    while pos < size:
        prefix = _PAX_LENGTH.match(data, pos)
        end = pos + int(prefix[1]) if prefix else pos
        if (
            prefix is None
            or end > size
            or end <= prefix.end()
            or data[end - 1] != ord("\n")
            or data.find(b"=", prefix.end(), end - 1) < 0
        ):
            raise _Refused(f"a pax extended header is malformed at byte {pos}")
        pos = end
    if _PAX_DIGIT_RUN.search(data):
        raise _Refused("a pax extended header holds a run of more than 64 digits")


# --- names ----------------------------------------------------------------------------


def member_parts(tarball: Path, member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path parts after the safety checks on its name and type (pure)."""
    name = member.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _refuse(tarball, f"member {_short(name)} has an absolute path")
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if ".." in parts:
        raise _refuse(tarball, f"member {_short(name)} points outside the release ('..')")
    if not parts or "\\" in name or "\x00" in name:
        raise _refuse(tarball, f"member {_short(name)} has an unusable name")
    if member.issym():
        raise _refuse(
            tarball, f"member {_short(name)} is a symbolic link (to {_short(member.linkname)})"
        )
    if member.islnk():
        raise _refuse(
            tarball, f"member {_short(name)} is a hard link (to {_short(member.linkname)})"
        )
    if member.isdev() or member.isfifo():
        raise _refuse(tarball, f"member {_short(name)} is a device or fifo")
    if not (member.isreg() or member.isdir()):
        raise _refuse(tarball, f"member {_short(name)} is not a regular file or directory")
    return parts


# --- the verified unpacking -----------------------------------------------------------


@dataclass(frozen=True)
class Unpacked:
    """What ``unpack`` proved: the release at ``root``, its manifest and who signed it."""

    root: Path
    manifest: manifest.Manifest
    signer: signing.PublicKey


Check = Callable[[manifest.Manifest], None]


def unpack(
    tarball: Path,
    dest: Path,
    keys: Sequence[signing.PublicKey] | None,
    *,
    check: Check = lambda _m: None,
    retired: Sequence[signing.PublicKey] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Unpacked:
    """Verify ``tarball``'s signed manifest, then write exactly what it lists into ``dest``.

    ``dest`` must be absent or an empty directory; it is made mode 0700 (the
    tarball is untrusted until the end). ``keys`` None trusts the key the
    tarball ships (a first install only). ``check`` runs on the verified
    manifest before any file is written. Raises ReleaseError; ``dest`` is then
    left empty (or absent).
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ReleaseError(
            f"cannot extract into {dest}: it exists and is not an empty directory",
            "give a new or empty directory",
        )
    created = not dest.exists()
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest.chmod(0o700)
    try:
        unpacker = _Unpacker(tarball, dest, keys, check, max_bytes, max_members)
        unpacker.retired = retired
        return unpacker.run()
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for child in dest.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


def _open_stream(tarball: Path) -> IO[bytes]:
    try:
        raw = tarball.open("rb")
    except FileNotFoundError:
        raise ReleaseError(
            f"release tarball {tarball} does not exist", "check the path and try again"
        ) from None
    except OSError as exc:
        raise ReleaseError(
            f"cannot read the release tarball {tarball}: {exc.strerror or exc}",
            "check that the file is readable",
        ) from None
    if raw.read(2) != _GZIP_MAGIC:
        raw.close()
        raise _refuse(tarball, "not a gzip-compressed tar archive")
    raw.seek(0)
    return raw


class _Unpacker:
    def __init__(  # noqa: PLR0917 - one private caller, unpack()
        self,
        tarball: Path,
        dest: Path,
        keys: Sequence[signing.PublicKey] | None,
        check: Check,
        max_bytes: int,
        max_members: int,
    ) -> None:
        self.tarball = tarball
        self.dest = dest
        self.keys = keys
        self.check = check
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.retired: Sequence[signing.PublicKey] = ()
        self.top: str | None = None
        self.seen: set[tuple[str, ...]] = set()
        self.count = 0
        self.total = 0

    def run(self) -> Unpacked:
        with _open_stream(self.tarball) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            try:
                return self._read(gz)
            except ReleaseError:
                # A damaged download makes a bad signature or hash too: say what it really is.
                damage = _gzip_damage(self.tarball, self.max_bytes + 2 * _MAX_PADDING)
                if damage is not None:
                    raise _refuse(self.tarball, damage) from None
                raise
            except _Refused as exc:
                raise _refuse(self.tarball, str(exc)) from None
            except RecursionError:
                raise _refuse(self.tarball, "its headers are nested too deeply") from None
            except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
                damaged = f"the archive is damaged or truncated ({exc})"
                raise _refuse(self.tarball, damaged) from None

    def _read(self, gz: gzip.GzipFile) -> Unpacked:
        stream = _BoundedReads(gz)
        with _StrictTarFile(fileobj=stream, mode="r", tarinfo=_StrictTarInfo) as archive:  # type: ignore[arg-type]
            members = self._members(archive)
            manifest_bytes = self._small_file(archive, members, manifest.MANIFEST)
            signature = self._small_file(archive, members, manifest.SIGNATURE)
            shipped_key = None
            if self.keys is None:
                shipped_key = self._small_file(archive, members, manifest.SHIPPED_KEY)
                keys = [_shipped_key(shipped_key)]
            else:
                keys = list(self.keys)
            signer = signing.find_signer(manifest_bytes, signature, keys, self.retired)
            parsed = manifest.parse(manifest_bytes)
            if self.top != parsed.top_dir:
                raise ReleaseError(
                    f"{self.tarball.name}: top directory {_short(self.top or '')} does not match "
                    f"RELEASE.json (expected {parsed.top_dir!r})",
                    "the tarball was repacked by hand; get the release again",
                )
            missing = manifest.missing_parts(parsed)
            if missing:
                raise ReleaseError(
                    f"the release is incomplete: it lacks {', '.join(missing)}",
                    "rebuild it with ./do tarball, which refuses incomplete releases",
                )
            self.check(parsed)
            root = self.dest / self.top
            with _writing(root):
                root.mkdir(mode=0o755)
            _write_bytes(root / manifest.MANIFEST, manifest_bytes)
            _write_bytes(root / manifest.SIGNATURE, signature)
            written = set()
            if shipped_key is not None:
                self._expect_hash(parsed, manifest.SHIPPED_KEY, hashlib.sha256(shipped_key))
                with _writing(root / manifest.SHIPPED_KEY):
                    (root / manifest.SHIPPED_KEY).parent.mkdir(mode=0o755)
                _write_bytes(root / manifest.SHIPPED_KEY, shipped_key)
                written.add(manifest.SHIPPED_KEY)
            self._rest(archive, members, parsed, root, written)
            _check_rest_is_padding(self.tarball, stream)
        return Unpacked(root, parsed, signer)

    def _members(self, archive: tarfile.TarFile) -> Any:
        """Every member, each checked for its name, type, place and the archive's bounds."""
        for member in archive:
            self.count += 1
            if self.count > self.max_members:
                raise _refuse(self.tarball, f"more than {self.max_members} members")
            parts = member_parts(self.tarball, member)
            if parts in self.seen:
                raise _refuse(self.tarball, f"member {_short(member.name)} appears twice")
            self.seen.add(parts)
            if self.top is None:
                self.top = parts[0]
            elif parts[0] != self.top:
                tops = f"{_short(self.top)} and {_short(parts[0])}"
                raise _refuse(self.tarball, f"more than one top directory ({tops})")
            if len(parts) == 1 and not member.isdir():
                raise _refuse(
                    self.tarball, f"member {_short(member.name)} is outside the top directory"
                )
            self.total += max(member.size, 0) if member.isreg() else 0
            if self.total > self.max_bytes:
                raise _refuse(self.tarball, f"it unpacks to more than {self.max_bytes} bytes")
            # Directories are made as the files in them are written: none is taken from here.
            if len(parts) == 1:
                continue
            yield member, "/".join(parts[1:])

    def _small_file(self, archive: tarfile.TarFile, members: Any, relpath: str) -> bytes:
        """The member ``relpath``, which must come next, read whole (it is small)."""
        limit = {
            manifest.MANIFEST: MAX_MANIFEST_BYTES,
            manifest.SIGNATURE: MAX_SIGNATURE_BYTES,
        }.get(relpath, MAX_KEY_BYTES)
        item = next(members, None)
        # The shipped key may have its directory entry (keys/) before it.
        while item is not None and relpath == manifest.SHIPPED_KEY and item[0].isdir():
            item = next(members, None)
        if item is None or item[1] != relpath or not item[0].isreg():
            found = "the end of the archive" if item is None else _short(item[0].name)
            order = "RELEASE.json, then RELEASE.json.sig"
            if relpath == manifest.SHIPPED_KEY:
                order += ", then keys/release.pub"
            raise _refuse(
                self.tarball,
                f"expected {relpath} next but found {found}; a release starts with {order}, "
                "so they are checked before anything else is written",
            )
        member = item[0]
        if member.size > limit:
            raise _refuse(self.tarball, f"{relpath} is {member.size} bytes (limit {limit})")
        return _read_exactly(archive, member)

    def _expect_hash(self, parsed: manifest.Manifest, relpath: str, digest: Any) -> None:
        expected = parsed.files.get(relpath)
        actual = digest.hexdigest()
        if expected is None:
            raise ReleaseError(
                f"the release holds {_short(relpath)[1:-1]}, which RELEASE.json does not list",
                "files were added after signing; get the release again from a trusted source",
            )
        if actual != expected:
            raise ReleaseError(
                f"{relpath} does not match RELEASE.json (sha256 {actual[:16]}..., "
                f"expected {expected[:16]}...)",
                "the file was damaged or changed after signing; get the release again",
            )

    def _rest(
        self,
        archive: tarfile.TarFile,
        members: Any,
        parsed: manifest.Manifest,
        root: Path,
        written: set[str],
    ) -> None:
        listed = set(parsed.files)
        parents = {p for f in listed for p in _parents(f)}
        for member, relpath in members:
            if member.isdir():
                if relpath not in parents:
                    raise ReleaseError(
                        f"the release holds a directory {relpath}/ with no file RELEASE.json lists",
                        "files were added after signing; get the release again from a "
                        "trusted source",
                    )
                continue
            if relpath not in listed:
                raise ReleaseError(
                    f"the release holds {_short(relpath)[1:-1]}, which RELEASE.json does not list",
                    "files were added after signing; get the release again from a trusted source",
                )
            target = root / relpath
            with _writing(target):
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            digest = _write_member(archive, member, target)
            try:
                self._expect_hash(parsed, relpath, digest)
            except ReleaseError:
                with _writing(target):
                    target.unlink()
                raise
            written.add(relpath)
        missing = sorted(listed - written)
        if missing:
            raise ReleaseError(
                f"the release lacks {len(missing)} file(s) that RELEASE.json lists: "
                f"{', '.join(missing[:5])}",
                "the release is incomplete; get it again or rebuild it with ./do tarball",
            )


def _gzip_damage(tarball: Path, limit: int) -> str | None:
    """Why the gzip stream of ``tarball`` is damaged (its CRC, a cut), or None if it is whole.

    Reads at most ``limit`` decompressed bytes: a release is never bigger, and a
    zip bomb must not cost minutes of CPU for a better message.
    """
    try:
        with tarball.open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            while gz.read(_CHUNK):
                limit -= _CHUNK
                if limit < 0:
                    return None
    except (OSError, EOFError, zlib.error) as exc:
        return f"the archive is damaged or truncated ({exc})"
    return None


def _parents(relpath: str) -> list[str]:
    parts = relpath.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _shipped_key(pem: bytes) -> signing.PublicKey:
    return signing.load_public_key_bytes(pem, f"the shipped {manifest.SHIPPED_KEY}")


def _read_exactly(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = archive.extractfile(member)
    if source is None:  # pragma: no cover - isreg() members always have data
        raise tarfile.TarError(f"no data for {member.name}")
    data = source.read(member.size)
    if len(data) != member.size:
        raise tarfile.TarError(f"{member.name} is truncated")
    return data


def _disk_error(target: Path, exc: OSError) -> ReleaseError:
    return ReleaseError(
        f"cannot write {target}: {exc.strerror or exc}",
        f"free disk space or fix permissions in {target.parent}, then run again",
    )


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[None]:
    """An OSError here is the local disk's (full, read-only, failing), not the archive's:
    the generic catch in _Unpacker.run would call the archive damaged and send the admin
    for another copy of a release that was fine."""
    try:
        yield
    except OSError as exc:
        raise _disk_error(target, exc) from exc


def _create(target: Path) -> IO[bytes]:
    """A new file, root-only until its data is complete and its mode is set."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise _disk_error(target, exc) from exc
    return os.fdopen(fd, "wb")


def _write_bytes(target: Path, data: bytes, mode: int = 0o644) -> None:
    with _create(target) as out:
        try:
            out.write(data)
            out.flush()
        except OSError as exc:
            raise _disk_error(target, exc) from exc
        with _writing(target):
            os.fchmod(out.fileno(), mode)


def _write_member(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> Any:
    """Write the member's data to ``target`` (new); return the sha256 of what was written."""
    source = archive.extractfile(member)
    if source is None:  # pragma: no cover - isreg() members always have data
        raise tarfile.TarError(f"no data for {member.name}")
    # The umask must not decide whether install.sh runs or who may write a file.
    mode = 0o755 if member.mode & 0o111 else 0o644
    digest = hashlib.sha256()
    remaining = member.size
    with _create(target) as out:
        while remaining > 0:
            chunk = source.read(min(_CHUNK, remaining))
            if not chunk:
                raise tarfile.TarError(f"{member.name} is truncated")
            digest.update(chunk)
            try:
                out.write(chunk)
            except OSError as exc:
                raise _disk_error(target, exc) from exc
            remaining -= len(chunk)
        try:
            out.flush()
        except OSError as exc:
            raise _disk_error(target, exc) from exc
        with _writing(target):
            os.fchmod(out.fileno(), mode)
    return digest


def _check_rest_is_padding(tarball: Path, stream: _BoundedReads) -> None:
    """After the last member only zero padding may follow.

    tarfile silently ends the archive at the first unreadable header after the
    first one, so a damaged archive would otherwise look like a shorter one.
    Reading to the end also makes gzip check its CRC.
    """
    remaining = _MAX_PADDING
    while chunk := stream.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            raise _refuse(tarball, "the archive is damaged: data follows an unreadable header")
        remaining -= len(chunk)
        if remaining < 0:
            raise _refuse(tarball, "the archive is damaged: too much padding at its end")
