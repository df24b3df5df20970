"""Open a release tarball: prove it is signed, whole and fits here, then hand it out.

``open_release`` is the one way the installer and the updater look inside a
release. Order matters: the signature of RELEASE.json is checked before
anything else in the tarball is written or believed, and each member is
hashed against it as it is written (extract.unpack). Run as a program it is
install.sh's verifier:

    python -m scalebox.release.verify TARBALL DEST (--trusted-keys DIR | --trust-shipped-key)

prints the version on success; on failure prints what and what to do.
Exit codes (install.sh relies on them; docs/operations.md): 0 verified,
2 usage error (argparse), 3 the release was rejected (EXIT_REJECTED).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalebox.release import extract, manifest, signing
from scalebox.release.errors import ReleaseError

EXIT_REJECTED = 3
DEFAULT_MAX_BYTES = extract.DEFAULT_MAX_BYTES


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


RETIRED = "retired"


def trusted_keys_in(directory: Path) -> list[Path]:
    """The *.pub files of a trusted-keys directory, sorted; missing directory = none."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.pub") if p.is_file())


def retired_keys_in(directory: Path) -> list[Path]:
    """The keys an operator retired: ``<keys dir>/retired/*.pub`` (docs/threat-model.md)."""
    return trusted_keys_in(directory / RETIRED)


def open_release(
    tarball: Path,
    dest: Path,
    trusted_keys: Sequence[Path] | None,
    *,
    retired_keys: Sequence[Path] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Release:
    """Verify ``tarball`` and extract it into ``dest`` (absent or empty; made 0700).

    ``trusted_keys`` None trusts the key shipped in the tarball: only a first
    install, which has no trusted key yet, may do that. A release signed by
    one of ``retired_keys`` is refused as such. Raises ReleaseError on the
    first problem; ``dest`` is then left empty (or absent).
    """
    keys = None if trusted_keys is None else [signing.load_public_key(p) for p in trusted_keys]
    retired = [signing.load_public_key(p) for p in retired_keys]

    def fits(parsed: manifest.Manifest) -> None:
        check_fits_here(parsed, platform.machine(), this_python())

    unpacked = extract.unpack(tarball, dest, keys, check=fits, retired=retired, max_bytes=max_bytes)
    parsed, signer = unpacked.manifest, unpacked.signer
    return Release(
        version=parsed.version,
        arch=parsed.arch,
        python=parsed.python,
        entry_points=parsed.entry_points,
        units=parsed.units,
        root=unpacked.root,
        signed_by=f"{signer.source} ({signer.fingerprint})",
        manifest=parsed.to_json(),
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
        retired = [] if args.trust_shipped_key else retired_keys_in(args.trusted_keys)
        release = open_release(args.tarball, args.dest, keys, retired_keys=retired)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    print(release.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
