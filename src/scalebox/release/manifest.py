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
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalebox.release.errors import ReleaseError
from scalebox.update import versions

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
# A part of a path in the release, an entry point, a unit: plain names only.
_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+@-]{0,254}$")
_ENTRY_POINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".path", ".target", ".slice")
_UNIT = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,200}\.(" + "|".join(s[1:] for s in UNIT_SUFFIXES) + ")$"
)
MAX_FILES = 10_000
# Levels of a path: extract holds every parent of every listed path in memory.
MAX_DEPTH = 16


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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def check_name(kind: str, value: str) -> str:
    if not _SAFE_NAME.match(value):
        raise ReleaseError(
            f"{kind} {_short(value)} is not allowed",
            f"a {kind} is 1-64 letters, digits and . _ + - and starts with a letter or digit",
        )
    return value


def check_relpath(path: str) -> str:
    """A manifest path: relative, POSIX, each part a plain name (no '.', '..' or empty parts)."""
    parts = path.split("/")
    if (
        not path
        or len(path) > 1024
        or not all(_PATH_PART.match(p) for p in parts)
        or any(p in {".", ".."} for p in parts)
    ):
        raise ReleaseError(
            f"{MANIFEST} lists an unsafe path {_short(path)}",
            "a path is plain names (letters, digits, . _ + @ -) joined by '/'; "
            "the release is malformed; rebuild it with ./do tarball",
        )
    if len(parts) > MAX_DEPTH:
        raise ReleaseError(
            f"{MANIFEST} lists a path more than {MAX_DEPTH} levels deep: {_short(path)}",
            "the release is malformed; rebuild it with ./do tarball",
        )
    return path


def fold(name: str) -> str:
    """The form under which two names are the same on some file system or to a reader:
    Unicode compatibility normalisation, then case folding (pure)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def check_distinct(kind: str, names: list[str]) -> None:
    """Refuse names that differ only in case or Unicode normalisation (pure)."""
    seen: dict[str, str] = {}
    for name in names:
        key = fold(name)
        if key in seen and seen[key] != name:
            raise _bad(
                f"{kind} {_short(seen[key])} and {_short(name)} differ only in case "
                "or Unicode form; they would collide on a server"
            )
        if key in seen:
            raise _bad(f"{kind}: {_short(name)} is listed twice")
        seen[key] = name


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


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: json.loads would keep the last of two,
    other readers the first, so signed bytes with a repeated key mean two things."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def parse(raw_bytes: bytes) -> Manifest:
    """Parse and check RELEASE.json's bytes; every problem is a ReleaseError."""
    try:
        data = json.loads(raw_bytes, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise _bad(f"it gives the key {_short(exc.args[0])} twice") from None
    except RecursionError:
        raise _bad("its JSON is nested too deeply") from None
    except ValueError as exc:  # also UnicodeDecodeError and an int of too many digits
        raise _bad(f"not JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise _bad("not a JSON object")
    if data.get("format") != FORMAT:
        raise ReleaseError(
            f"{MANIFEST} has format {_short(data.get('format'))}; "
            f"this program reads format {FORMAT}",
            "use a scalebox release made for this version of the installer",
        )
    if data.get("name") != NAME:
        raise _bad(f"name is {_short(data.get('name'))}, expected {NAME!r}")
    version, arch = data.get("version"), data.get("arch")
    if not isinstance(version, str) or not isinstance(arch, str):
        raise _bad("version and arch must be strings")
    check_name("version", version)
    try:
        versions.parse(version)  # the updater compares it: a refusal here, not later
    except versions.InvalidVersion as exc:
        raise _bad(f"version {exc.what}") from None
    check_name("arch", arch)
    python = _str_list(data, "python")
    for py in python:
        if not _PYTHON.match(py):
            raise _bad(f"python version {_short(py)} is not like '3.11'")
    files = _files(data)
    units, entry_points = _names(data)
    return Manifest(
        version=version,
        arch=arch,
        python=python,
        entry_points=entry_points,
        units=units,
        files=files,
        raw=data,
        migrations=parse_migrations(data.get("migrations", [])),
        debian_packages=parse_debian_packages(data.get("debian_packages", [])),
    )


def _files(data: Mapping[str, Any]) -> dict[str, str]:
    """``files``: safe relative paths, none colliding, each with a sha256."""
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad("'files' must be an object of path -> sha256")
    if len(files) > MAX_FILES:
        raise _bad(f"'files' lists more than {MAX_FILES} files")
    for path, digest in files.items():
        check_relpath(path)
        if path in {MANIFEST, SIGNATURE}:
            raise _bad(f"'files' must not list {path}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise _bad(f"the sha256 of {path} is not 64 hex digits")
    _check_no_file_under_file(list(files))
    check_distinct("the paths", [*files, MANIFEST, SIGNATURE])
    return dict(files)


def check_units(value: Any) -> tuple[str, ...]:
    """A ``units`` list: plain unit file names with a unit suffix, none colliding."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad("'units' must be a list of names")
    for unit in value:
        if not _UNIT.match(unit):
            raise _bad(
                f"unit {_short(unit)} is not a plain unit file name ending in "
                f"{', '.join(UNIT_SUFFIXES)}"
            )
    check_distinct("the units", list(value))
    return tuple(value)


def _names(data: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``units`` and ``entry_points``: plain names, none colliding with another."""
    units = check_units(data.get("units"))
    entry_points = _str_list(data, "entry_points")
    for name in entry_points:
        if not _ENTRY_POINT.match(name):
            raise _bad(
                f"entry point {_short(name)} is not a plain program name "
                "(letters, digits, . _ -; no '/')"
            )
    check_distinct("the entry points", list(entry_points))
    return units, entry_points


def _check_no_file_under_file(paths: list[str]) -> None:
    listed = set(paths)
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in listed:
                raise _bad(f"{path!r} lies under {'/'.join(parts[:i])!r}, which is a file")


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
            raise _bad(f"migration id {_short(item['id'])} is not allowed")
        try:
            versions.parse(item["since"])
        except versions.InvalidVersion as exc:
            raise _bad(f"migration {item['id']}: since {exc.what}") from None
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
