"""Safe extraction of an untrusted release tarball.

Only regular files and directories under one top directory are accepted:
no absolute paths, no '..', no links of any kind, no devices or fifos, no
duplicate names, and bounded member count and total size. Files are written
by this module (O_EXCL, O_NOFOLLOW) rather than by tarfile.extractall, so the
checks and the writes cannot disagree. Nothing is ever written outside
``dest``; on failure what was extracted into ``dest`` is removed.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from scalebox.release.errors import ReleaseError

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_MEMBERS = 10_000
_CHUNK = 1 << 20
# tar pads to 10 KiB records; anything far beyond that is not padding.
_MAX_PADDING = 1 << 20


def _refuse(tarball: Path, what: str) -> ReleaseError:
    return ReleaseError(
        f"{tarball.name}: {what}; refusing to extract it",
        "this is not a release made by ./do tarball; get the release again from a trusted source",
    )


def member_parts(tarball: Path, member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path parts after the safety checks on its name and type (pure)."""
    name = member.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _refuse(tarball, f"member {name!r} has an absolute path")
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if ".." in parts:
        raise _refuse(tarball, f"member {name!r} points outside the release ('..')")
    if not parts or "\\" in name or "\x00" in name:
        raise _refuse(tarball, f"member {name!r} has an unusable name")
    if member.issym():
        raise _refuse(tarball, f"member {name!r} is a symbolic link (to {member.linkname!r})")
    if member.islnk():
        raise _refuse(tarball, f"member {name!r} is a hard link (to {member.linkname!r})")
    if member.isdev() or member.isfifo():
        raise _refuse(tarball, f"member {name!r} is a device or fifo")
    if not (member.isreg() or member.isdir()):
        raise _refuse(tarball, f"member {name!r} is not a regular file or directory")
    return parts


def extract(
    tarball: Path,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Path:
    """Extract ``tarball`` into the empty or absent directory ``dest``; return its top dir."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ReleaseError(
            f"cannot extract into {dest}: it exists and is not an empty directory",
            "give a new or empty directory",
        )
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return _extract_into(tarball, dest, max_bytes, max_members)
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


def _open(tarball: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tarball, "r:*")
    except FileNotFoundError:
        raise ReleaseError(
            f"release tarball {tarball} does not exist", "check the path and try again"
        ) from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _refuse(tarball, f"not a readable tar archive ({exc})") from None


def _extract_into(tarball: Path, dest: Path, max_bytes: int, max_members: int) -> Path:
    seen: set[tuple[str, ...]] = set()
    tops: set[str] = set()
    total = 0
    with _open(tarball) as archive:
        try:
            for count, member in enumerate(archive, start=1):
                if count > max_members:
                    raise _refuse(tarball, f"more than {max_members} members")
                parts = member_parts(tarball, member)
                if parts in seen:
                    raise _refuse(tarball, f"member {member.name!r} appears twice")
                seen.add(parts)
                tops.add(parts[0])
                if len(tops) > 1:
                    raise _refuse(tarball, f"more than one top directory ({sorted(tops)})")
                if len(parts) == 1 and not member.isdir():
                    raise _refuse(tarball, f"member {member.name!r} is outside the top directory")
                total += max(member.size, 0)
                if total > max_bytes:
                    raise _refuse(tarball, f"it unpacks to more than {max_bytes} bytes")
                _write_member(archive, member, dest.joinpath(*parts))
            _check_rest_is_padding(tarball, archive)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise _refuse(tarball, f"the archive is damaged or truncated ({exc})") from None
    if not tops:
        raise _refuse(tarball, "it is empty")
    return dest / tops.pop()


def _check_rest_is_padding(tarball: Path, archive: tarfile.TarFile) -> None:
    """After the last member only zero padding may follow.

    tarfile silently ends the archive at the first unreadable header after the
    first one, so a damaged archive would otherwise look like a shorter one.
    Reading to the end also makes gzip check its CRC.
    """
    stream = archive.fileobj
    if stream is None:  # pragma: no cover - tarfile.open always sets it
        return
    remaining = _MAX_PADDING
    while chunk := stream.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            raise _refuse(tarball, "the archive is damaged: data follows an unreadable header")
        remaining -= len(chunk)
        if remaining < 0:
            raise _refuse(tarball, "the archive is damaged: too much padding at its end")


def _write_member(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    # Every directory on the way was made by us (links are never extracted), so
    # creating parents cannot follow a link out of dest.
    if member.isdir():
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        return
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    source = archive.extractfile(member)
    if source is None:  # pragma: no cover - isreg() members always have data
        raise tarfile.TarError(f"no data for {member.name}")
    mode = 0o755 if member.mode & 0o111 else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    remaining = member.size
    with os.fdopen(fd, "wb") as out:
        while remaining > 0:
            chunk = source.read(min(_CHUNK, remaining))
            if not chunk:
                raise tarfile.TarError(f"{member.name} is truncated")
            out.write(chunk)
            remaining -= len(chunk)
        os.fchmod(out.fileno(), mode)  # the umask must not decide whether install.sh runs
