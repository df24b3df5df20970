"""RELEASE.json: what a release holds, as data.

The manifest is pure data: ``Manifest`` is built from a tree by the builder,
serialised to canonical bytes (which the signature covers), and parsed back
with every field checked. Unknown fields are kept in ``raw`` so a newer
release's manifest still reads; fields added later (``migrations``,
``debian_packages``) are empty when an older manifest lacks them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from scalebox.release.errors import ReleaseError

FORMAT = 1
NAME = "scalebox"
MANIFEST = "RELEASE.json"
SIGNATURE = "RELEASE.json.sig"
SHIPPED_KEY = "keys/release.pub"
INSTALL_SCRIPT = "scripts/install.sh"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PYTHON = re.compile(r"^3\.[0-9]{1,2}$")
# Versions and arches become directory names on servers: keep them to a safe alphabet.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
# Debian policy 5.6.1: lower case, digits, + - . ; at least two characters.
_DEBIAN_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,99}$")
_MIGRATION_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


@dataclass(frozen=True)
class MigrationInfo:
    """One migration the release ships (scalebox.migrations), as the manifest lists it."""

    id: str
    since: str
    description: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "since": self.since, "description": self.description}


@dataclass(frozen=True)
class Manifest:
    version: str
    arch: str
    python: tuple[str, ...]
    entry_points: tuple[str, ...]
    units: tuple[str, ...]
    files: Mapping[str, str]  # relative path -> sha256 hex, every file but RELEASE.json(.sig)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)
    migrations: tuple[MigrationInfo, ...] = ()  # in the order they run
    debian_packages: tuple[str, ...] = ()  # the updater installs the missing ones

    @property
    def top_dir(self) -> str:
        """The tarball's one top directory: scalebox-<version>-<arch>."""
        return f"{NAME}-{self.version}-{self.arch}"

    def to_json(self) -> dict[str, Any]:
        data = dict(self.raw)
        data.update(
            {
                "format": FORMAT,
                "name": NAME,
                "version": self.version,
                "arch": self.arch,
                "python": list(self.python),
                "entry_points": list(self.entry_points),
                "units": list(self.units),
                "files": dict(sorted(self.files.items())),
                "migrations": [m.to_json() for m in self.migrations],
                "debian_packages": list(self.debian_packages),
            }
        )
        return data

    def to_bytes(self) -> bytes:
        """Canonical bytes: the same manifest always gives the same bytes (and signature)."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_name(kind: str, value: str) -> str:
    if not _SAFE_NAME.match(value):
        raise ReleaseError(
            f"{kind} {value!r} is not allowed",
            f"a {kind} is 1-64 letters, digits and . _ + - and starts with a letter or digit",
        )
    return value


def check_relpath(path: str) -> str:
    """A manifest path: relative, POSIX, no '.', '..' or empty parts."""
    parts = PurePosixPath(path).parts
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or any(p in {"", ".", ".."} for p in path.split("/"))
        or not parts
    ):
        raise ReleaseError(
            f"{MANIFEST} lists an unsafe path {path!r}",
            "the release is malformed; rebuild it with ./do tarball",
        )
    return path


def _bad(what: str) -> ReleaseError:
    return ReleaseError(
        f"{MANIFEST} is malformed: {what}",
        "the release is damaged or was not made by ./do tarball; get the release again",
    )


def _str_list(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(f"{key!r} must be a list of names")
    return tuple(value)


def parse(raw_bytes: bytes) -> Manifest:
    """Parse and check RELEASE.json's bytes; every problem is a ReleaseError."""
    try:
        data = json.loads(raw_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _bad("not a JSON object")
    if data.get("format") != FORMAT:
        raise ReleaseError(
            f"{MANIFEST} has format {data.get('format')!r}; this program reads format {FORMAT}",
            "use a scalebox release made for this version of the installer",
        )
    if data.get("name") != NAME:
        raise _bad(f"name is {data.get('name')!r}, expected {NAME!r}")
    version, arch = data.get("version"), data.get("arch")
    if not isinstance(version, str) or not isinstance(arch, str):
        raise _bad("version and arch must be strings")
    check_name("version", version)
    check_name("arch", arch)
    python = _str_list(data, "python")
    for py in python:
        if not _PYTHON.match(py):
            raise _bad(f"python version {py!r} is not like '3.11'")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad("'files' must be an object of path -> sha256")
    for path, digest in files.items():
        check_relpath(path)
        if path in {MANIFEST, SIGNATURE}:
            raise _bad(f"'files' must not list {path}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise _bad(f"the sha256 of {path} is not 64 hex digits")
    units = _str_list(data, "units")
    for unit in units:
        check_relpath(unit)
    return Manifest(
        version=version,
        arch=arch,
        python=python,
        entry_points=_str_list(data, "entry_points"),
        units=units,
        files=dict(files),
        raw=data,
        migrations=parse_migrations(data.get("migrations", [])),
        debian_packages=parse_debian_packages(data.get("debian_packages", [])),
    )


def parse_migrations(value: Any) -> tuple[MigrationInfo, ...]:
    """The ``migrations`` list: objects with a safe id, a since version and a description."""
    if not isinstance(value, list):
        raise _bad("'migrations' must be a list")
    out = []
    for item in value:
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) for k in ("id", "since", "description")
        ):
            raise _bad("each migration needs the strings 'id', 'since' and 'description'")
        if not _MIGRATION_ID.match(item["id"]):
            raise _bad(f"migration id {item['id']!r} is not allowed")
        out.append(MigrationInfo(item["id"], item["since"], item["description"]))
    if len({m.id for m in out}) != len(out):
        raise _bad("a migration id is listed twice")
    return tuple(out)


def parse_debian_packages(value: Any) -> tuple[str, ...]:
    """The ``debian_packages`` list: plain Debian package names (no versions, no arch)."""
    if not isinstance(value, list) or not all(
        isinstance(v, str) and _DEBIAN_PACKAGE.match(v) for v in value
    ):
        raise _bad("'debian_packages' must be a list of Debian package names such as python3-venv")
    return tuple(value)


def missing_parts(manifest: Manifest) -> list[str]:
    """What a complete release must hold but this manifest does not list (pure)."""
    missing = [path for path in (SHIPPED_KEY, INSTALL_SCRIPT) if path not in manifest.files]
    missing += [f"units/{u}" for u in manifest.units if f"units/{u}" not in manifest.files]
    if not manifest.units:
        missing.append("units/ (no unit files listed)")
    if not manifest.entry_points:
        missing.append("entry_points (none listed)")
    if not any(p.startswith(f"wheels/{NAME}-") and p.endswith(".whl") for p in manifest.files):
        missing.append(f"wheels/{NAME}-<version>-*.whl")
    return missing
