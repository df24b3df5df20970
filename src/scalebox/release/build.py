"""Turn a release tree into a signed, deterministic tarball.

The tree (``root``) holds everything but RELEASE.json and its signature:
keys/release.pub, wheels/, units/, scripts/install.sh. ``seal`` hashes
every file into RELEASE.json and signs it; ``write_tarball`` packs the tree
with sorted names and fixed times, owners and modes, so the same tree
always gives the same archive bytes. tools/tarball.py gathers the tree; the
tests use these functions to make good and deliberately broken releases.
"""

from __future__ import annotations

import gzip
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scalebox.release import manifest, signing
from scalebox.release.errors import ReleaseError

# 1980-01-01: the earliest time a zip (wheel) can hold; used when SOURCE_DATE_EPOCH is unset.
DEFAULT_EPOCH = 315532800


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` except RELEASE.json(.sig)."""
    hashes: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not path.is_file():
                raise ReleaseError(
                    f"{rel} in the release tree is not a regular file",
                    "a release holds only regular files; copy the link's target instead",
                )
            if rel not in {manifest.MANIFEST, manifest.SIGNATURE}:
                hashes[rel] = manifest.sha256_file(path)
    return hashes


def make_manifest(
    root: Path,
    *,
    version: str,
    arch: str,
    python: Sequence[str],
    entry_points: Sequence[str],
    migrations: Sequence[manifest.MigrationInfo] = (),
    debian_packages: Sequence[str] = (),
) -> manifest.Manifest:
    """The manifest of the tree at ``root``; units are the files in units/."""
    units_dir = root / "units"
    units = sorted(p.name for p in units_dir.iterdir()) if units_dir.is_dir() else []
    return manifest.Manifest(
        version=manifest.check_name("version", version),
        arch=manifest.check_name("arch", arch),
        python=tuple(python),
        entry_points=tuple(entry_points),
        units=tuple(units),
        files=tree_hashes(root),
        migrations=tuple(migrations),
        debian_packages=manifest.parse_debian_packages(list(debian_packages)),
    )


def check_complete(root: Path, release: manifest.Manifest) -> None:
    """Refuse a release that lacks a required part or a file its manifest lists."""
    missing = manifest.missing_parts(release)
    missing += sorted(p for p in release.files if not (root / p).is_file())
    if missing:
        raise ReleaseError(
            f"refusing to build an incomplete release: it lacks {', '.join(missing)}",
            "every release needs the scalebox wheel, unit files, scripts/install.sh and "
            "keys/release.pub; see docs/release-format.md",
        )


def seal(root: Path, release: manifest.Manifest, key: Ed25519PrivateKey) -> None:
    """Write RELEASE.json and its signature into ``root`` after checking completeness."""
    check_complete(root, release)
    data = release.to_bytes()
    (root / manifest.MANIFEST).write_bytes(data)
    (root / manifest.SIGNATURE).write_bytes(signing.sign(key, data))


def _normalized(info: tarfile.TarInfo, mtime: int) -> tarfile.TarInfo:
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if info.isdir():
        info.mode = 0o755
    else:
        info.mode = 0o755 if info.mode & 0o100 else 0o644
    return info


# A reader checks these before it writes anything (extract.unpack): they come first,
# in this order. 0.1.0's reader takes members in any order, so it reads these too.
FIRST_MEMBERS = (manifest.MANIFEST, manifest.SIGNATURE, "keys", manifest.SHIPPED_KEY)


def _member_order(relpath: str) -> tuple[int, str]:
    if relpath in FIRST_MEMBERS:
        return (FIRST_MEMBERS.index(relpath), "")
    return (len(FIRST_MEMBERS), relpath)


def write_tarball(root: Path, out: Path, top: str, *, mtime: int = DEFAULT_EPOCH) -> Path:
    """Pack ``root`` as ``top/`` into the .tar.gz ``out``, byte-for-byte deterministic."""
    entries: list[Path] = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(dirpath)
        entries.extend(base / d for d in dirs)
        entries.extend(base / f for f in sorted(files))
    entries.sort(key=lambda p: _member_order(p.relative_to(root).as_posix()))
    for path in entries:
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ReleaseError(
                f"{path} is not a regular file or directory",
                "a release holds only regular files and directories",
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own, so two builds into one folder cannot mix their bytes.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _write_tar(tmp, top, root, entries, mtime)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def _write_tar(tmp: Path, top: str, root: Path, entries: list[Path], mtime: int) -> None:
    # filename="" and a fixed mtime keep the gzip header free of build-time data.
    with (
        tmp.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        top_info = tarfile.TarInfo(top)
        top_info.type = tarfile.DIRTYPE
        archive.addfile(_normalized(top_info, mtime))
        for path in entries:
            arcname = f"{top}/{path.relative_to(root).as_posix()}"
            info = _normalized(archive.gettarinfo(str(path), arcname), mtime)
            if info.isreg():
                with path.open("rb") as f:
                    archive.addfile(info, f)
            else:
                archive.addfile(info)
