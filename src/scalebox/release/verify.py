"""Open a release tarball: extract it safely, then prove it is whole, signed and fits here.

``open_release`` is the one way the installer and the updater look inside a
release. Order matters: the signature is checked before anything in
RELEASE.json is believed, and every file is hashed before the release is
handed out. Run as a program it is install.sh's verifier:

    python -m scalebox.release.verify TARBALL DEST (--trusted-keys DIR | --trust-shipped-key)

prints the version on success; on failure prints what and what to do.
Exit codes (install.sh relies on them; docs/operations.md): 0 verified,
2 usage error (argparse), 3 the release was rejected (EXIT_REJECTED).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalebox.release import extract, manifest, signing
from scalebox.release.errors import ReleaseError

EXIT_REJECTED = 3
DEFAULT_MAX_BYTES = extract.DEFAULT_MAX_BYTES
_MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Release:
    """A verified release, extracted at ``root``."""

    version: str
    arch: str
    python: tuple[str, ...]
    entry_points: tuple[str, ...]
    units: tuple[str, ...]
    root: Path
    signed_by: str  # the trusted key's source and fingerprint
    manifest: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def wheels_dir(self) -> Path:
        return self.root / "wheels"

    @property
    def units_dir(self) -> Path:
        return self.root / "units"


def this_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def trusted_keys_in(directory: Path) -> list[Path]:
    """The *.pub files of a trusted-keys directory, sorted; missing directory = none."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.pub") if p.is_file())


def open_release(
    tarball: Path,
    dest: Path,
    trusted_keys: Sequence[Path] | None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Release:
    """Extract ``tarball`` into ``dest`` and verify it completely.

    ``trusted_keys`` None trusts the key shipped in the tarball: only a first
    install, which has no trusted key yet, may do that. Raises ReleaseError on
    the first problem; ``dest`` is then left empty (or absent).
    """
    root = extract.extract(tarball, dest, max_bytes=max_bytes)
    try:
        return _verify_tree(tarball, root, trusted_keys)
    except BaseException:
        for child in list(dest.iterdir()):
            shutil.rmtree(child, ignore_errors=True)
        raise


def _read(root: Path, relpath: str, limit: int) -> bytes:
    path = root / relpath
    if not path.is_file():
        raise ReleaseError(
            f"the release has no {relpath}",
            "it is incomplete or not a scalebox release; get the release again",
        )
    if path.stat().st_size > limit:
        raise ReleaseError(f"{relpath} is larger than {limit} bytes", "get the release again")
    return path.read_bytes()


def _verify_tree(tarball: Path, root: Path, trusted_keys: Sequence[Path] | None) -> Release:
    manifest_bytes = _read(root, manifest.MANIFEST, _MAX_MANIFEST_BYTES)
    signature = _read(root, manifest.SIGNATURE, 4096)
    if trusted_keys is None:
        shipped = signing.load_public_key(root / manifest.SHIPPED_KEY)
        keys = [signing.PublicKey(f"the shipped {manifest.SHIPPED_KEY}", shipped.key)]
    else:
        keys = [signing.load_public_key(p) for p in trusted_keys]
    signer = signing.find_signer(manifest_bytes, signature, keys)

    parsed = manifest.parse(manifest_bytes)
    if root.name != parsed.top_dir:
        raise ReleaseError(
            f"{tarball.name}: top directory {root.name!r} does not match RELEASE.json "
            f"(expected {parsed.top_dir!r})",
            "the tarball was repacked by hand; get the release again",
        )
    check_files(root, parsed)
    missing = manifest.missing_parts(parsed)
    if missing:
        raise ReleaseError(
            f"the release is incomplete: it lacks {', '.join(missing)}",
            "rebuild it with ./do tarball, which refuses incomplete releases",
        )
    check_fits_here(parsed, platform.machine(), this_python())
    return Release(
        version=parsed.version,
        arch=parsed.arch,
        python=parsed.python,
        entry_points=parsed.entry_points,
        units=parsed.units,
        root=root,
        signed_by=f"{signer.source} ({signer.fingerprint})",
        manifest=parsed.to_json(),
    )


def tree_files(root: Path) -> set[str]:
    """Every file under ``root`` as a relative POSIX path, except the manifest and signature."""
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in {manifest.MANIFEST, manifest.SIGNATURE}:
                found.add(rel)
    return found


def check_files(root: Path, parsed: manifest.Manifest) -> None:
    """Exactly the listed files are present, each with its listed sha256."""
    present = tree_files(root)
    listed = set(parsed.files)
    missing = sorted(listed - present)
    if missing:
        raise ReleaseError(
            f"the release lacks {len(missing)} file(s) that RELEASE.json lists: "
            f"{', '.join(missing[:5])}",
            "the release is incomplete; get it again or rebuild it with ./do tarball",
        )
    extra = sorted(present - listed)
    if extra:
        raise ReleaseError(
            f"the release holds {len(extra)} file(s) that RELEASE.json does not list: "
            f"{', '.join(extra[:5])}",
            "files were added after signing; get the release again from a trusted source",
        )
    for relpath in sorted(listed):
        actual = manifest.sha256_file(root / relpath)
        if actual != parsed.files[relpath]:
            raise ReleaseError(
                f"{relpath} does not match RELEASE.json (sha256 {actual[:16]}..., "
                f"expected {parsed.files[relpath][:16]}...)",
                "the file was damaged or changed after signing; get the release again",
            )


def check_fits_here(parsed: manifest.Manifest, machine: str, python: str) -> None:
    """Pure: the release's arch and Python versions fit this machine."""
    if parsed.arch != machine:
        raise ReleaseError(
            f"the release is for {parsed.arch}, this machine is {machine}",
            f"use the release built for {machine}: scalebox-{parsed.version}-{machine}.tar.gz",
        )
    if python not in parsed.python:
        raise ReleaseError(
            f"the release supports Python {', '.join(parsed.python)}; python3 here is {python}",
            "use a release built for this Python, or a Debian release whose python3 it supports",
        )


def _required_keys(directory: Path) -> list[Path]:
    keys = trusted_keys_in(directory)
    if not keys:
        raise ReleaseError(
            f"no trusted keys (*.pub) in {directory}",
            "install the release-signing public key there, or pass --trust-shipped-key "
            "for a first install",
        )
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scalebox.release.verify",
        description="Extract a scalebox release tarball into DEST and verify it.",
    )
    parser.add_argument("tarball", type=Path)
    parser.add_argument("dest", type=Path, help="a new or empty directory")
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--trusted-keys", type=Path, metavar="DIR", help="*.pub keys to trust")
    trust.add_argument(
        "--trust-shipped-key",
        action="store_true",
        help="trust the key inside the tarball (first install only)",
    )
    args = parser.parse_args(argv)
    try:
        keys = None if args.trust_shipped_key else _required_keys(args.trusted_keys)
        release = open_release(args.tarball, args.dest, keys)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    print(release.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
