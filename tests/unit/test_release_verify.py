"""open_release: a good release verifies; every kind of bad tarball is refused with its reason.

Real ed25519 keys, real gzip tarballs, real files under tmp_path. Malicious
archives are written member by member with tarfile, the way an attacker would.
Each refusal also proves that nothing was written outside ``dest`` and that
``dest`` is left empty.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scalebox.release import build, extract, manifest, signing
from scalebox.release.errors import ReleaseError
from scalebox.release.verify import EXIT_REJECTED, open_release, this_python

VERSION = "1.2.3"
SERVICE = b"[Service]\nExecStart=/bin/true\n"
ARCH = platform.machine()


def write_key(directory: Path, name: str = "release") -> tuple[Ed25519PrivateKey, Path]:
    """A fresh key pair; the public half is written to directory/<name>.pub."""
    private_pem, public_pem = signing.generate()
    directory.mkdir(parents=True, exist_ok=True)
    pub = directory / f"{name}.pub"
    pub.write_bytes(public_pem)
    return signing.load_private_key(private_pem, name), pub


def make_tree(root: Path, key: Ed25519PrivateKey, version: str = VERSION) -> Path:
    """A small but complete release tree (the wheel is a stand-in: only its bytes matter here)."""
    (root / "wheels").mkdir(parents=True)
    (root / "wheels" / f"scalebox-{version}-py3-none-any.whl").write_bytes(b"wheel " * 1000)
    (root / "wheels" / "click-8.5.1-py3-none-any.whl").write_bytes(b"click")
    (root / "units").mkdir()
    (root / "units" / "scaleboxd.service").write_bytes(SERVICE)
    (root / "units" / "scaleboxd.socket").write_text("[Socket]\nListenStream=8080\n")
    (root / "scripts").mkdir()
    (root / "scripts" / "install.sh").write_text("#!/bin/bash\n")
    (root / "scripts" / "install.sh").chmod(0o755)
    (root / "keys").mkdir()
    (root / "keys" / "release.pub").write_bytes(signing.public_pem(key.public_key()))
    return root


def pack(
    tmp: Path,
    key: Ed25519PrivateKey,
    *,
    version: str = VERSION,
    arch: str = ARCH,
    python: tuple[str, ...] = ("3.11", "3.13", this_python()),
    after_seal: Callable[[Path], None] | None = None,
    name: str = "release",
) -> Path:
    """Build, seal and pack a release; ``after_seal`` may tamper with the tree before packing."""
    tree = make_tree(tmp / f"{name}-tree", key, version)
    release = build.make_manifest(
        tree,
        version=version,
        arch=arch,
        python=sorted(set(python)),
        entry_points=["scalebox", "scalebox-update", "scaleboxd"],
    )
    build.seal(tree, release, key)
    if after_seal is not None:
        after_seal(tree)
    out = tmp / f"{name}-out" / f"{release.top_dir}.tar.gz"
    return build.write_tarball(tree, out, release.top_dir)


@pytest.fixture
def key_pair(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    return write_key(tmp_path / "trusted")


def refused(tarball: Path, dest: Path, keys: list[Path] | None, match: str) -> ReleaseError:
    """open_release refuses with ``match`` in its message and leaves ``dest`` empty."""
    with pytest.raises(ReleaseError, match=match) as caught:
        open_release(tarball, dest, keys)
    assert not dest.exists() or list(dest.iterdir()) == []
    assert caught.value.hint  # every refusal says what to do next
    return caught.value


def test_good_release_verifies_and_is_extracted(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tarball = pack(tmp_path, key)
    release = open_release(tarball, tmp_path / "dest", [pub])
    assert release.version == VERSION
    assert release.arch == ARCH
    assert this_python() in release.python
    assert release.root == tmp_path / "dest" / f"scalebox-{VERSION}-{ARCH}"
    assert release.units == ("scaleboxd.service", "scaleboxd.socket")
    assert release.entry_points == ("scalebox", "scalebox-update", "scaleboxd")
    assert (release.wheels_dir / f"scalebox-{VERSION}-py3-none-any.whl").is_file()
    assert (release.units_dir / "scaleboxd.socket").read_text().startswith("[Socket]")
    assert os.access(release.root / "scripts" / "install.sh", os.X_OK)
    assert str(pub) in release.signed_by
    assert release.manifest["files"]["keys/release.pub"] == manifest.sha256_file(
        release.root / "keys" / "release.pub"
    )


def test_first_install_may_trust_the_shipped_key(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    tarball = pack(tmp_path, key_pair[0])
    release = open_release(tarball, tmp_path / "dest", None)
    assert "shipped keys/release.pub" in release.signed_by


def test_key_not_trusted_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    _, trusted_pub = key_pair
    other_key, _ = write_key(tmp_path / "other")
    tarball = pack(tmp_path, other_key)
    refused(tarball, tmp_path / "dest", [trusted_pub], "not signed by a trusted key")


def test_no_trusted_keys_at_all_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    tarball = pack(tmp_path, key_pair[0])
    refused(tarball, tmp_path / "dest", [], "no trusted release keys")


def test_manifest_changed_after_signing_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair

    def edit_manifest(tree: Path) -> None:
        path = tree / manifest.MANIFEST
        path.write_bytes(path.read_bytes().replace(b'"1.2.3"', b'"9.9.9"'))

    tarball = pack(tmp_path, key, after_seal=edit_manifest)
    refused(tarball, tmp_path / "dest", [pub], "not signed by a trusted key")


def test_garbage_signature_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair

    def break_signature(tree: Path) -> None:
        (tree / manifest.SIGNATURE).write_bytes(b"not a signature")

    tarball = pack(tmp_path, key, after_seal=break_signature)
    refused(tarball, tmp_path / "dest", [pub], "signature is 15 bytes")


def test_unsigned_release_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tarball = pack(tmp_path, key, after_seal=lambda tree: (tree / manifest.SIGNATURE).unlink())
    refused(tarball, tmp_path / "dest", [pub], "expected RELEASE.json.sig next")


def test_corrupt_byte_in_a_file_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair

    def flip_a_byte(tree: Path) -> None:
        wheel = tree / "wheels" / f"scalebox-{VERSION}-py3-none-any.whl"
        data = bytearray(wheel.read_bytes())
        data[100] ^= 0x01
        wheel.write_bytes(bytes(data))

    tarball = pack(tmp_path, key, after_seal=flip_a_byte)
    refused(tarball, tmp_path / "dest", [pub], r"scalebox-1\.2\.3-py3-none-any\.whl does not match")


def test_truncated_file_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair

    def truncate(tree: Path) -> None:
        unit = tree / "units" / "scaleboxd.service"
        unit.write_bytes(unit.read_bytes()[:5])

    tarball = pack(tmp_path, key, after_seal=truncate)
    refused(tarball, tmp_path / "dest", [pub], r"units/scaleboxd\.service does not match")


def test_truncated_tarball_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tarball = pack(tmp_path, key)
    data = tarball.read_bytes()
    tarball.write_bytes(data[: len(data) // 2])
    refused(tarball, tmp_path / "dest", [pub], "damaged or truncated")


@pytest.mark.parametrize("where", [1 / 3, 1 / 2, 2 / 3, -6, -2])
def test_corrupt_byte_in_the_compressed_tarball_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path], where: float
) -> None:
    """Anywhere past the gzip header: a damaged header, deflate data, CRC or size."""
    key, pub = key_pair
    tarball = pack(tmp_path, key)
    data = bytearray(tarball.read_bytes())
    data[int(len(data) * where) if where > 0 else int(where)] ^= 0x20
    tarball.write_bytes(bytes(data))
    refused(tarball, tmp_path / "dest", [pub], "damaged|not a readable tar archive")


def test_not_a_tarball_is_refused(tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]) -> None:
    bogus = tmp_path / "scalebox-1.2.3-x86_64.tar.gz"
    bogus.write_text("<html>404</html>")
    refused(bogus, tmp_path / "dest", [key_pair[1]], "not a gzip-compressed tar archive")


def test_missing_listed_file_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tarball = pack(
        tmp_path, key, after_seal=lambda tree: (tree / "units" / "scaleboxd.socket").unlink()
    )
    refused(tarball, tmp_path / "dest", [pub], r"lacks 1 file\(s\) that RELEASE.json lists")


def test_extra_unlisted_file_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tarball = pack(
        tmp_path, key, after_seal=lambda tree: (tree / "wheels" / "evil.whl").write_text("x")
    )
    refused(tarball, tmp_path / "dest", [pub], r"wheels/evil\.whl")


def test_wrong_arch_is_refused(tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]) -> None:
    key, pub = key_pair
    other = "aarch64" if ARCH != "aarch64" else "x86_64"
    tarball = pack(tmp_path, key, arch=other)
    refused(tarball, tmp_path / "dest", [pub], f"is for {other}, this machine is {ARCH}")


def test_unsupported_python_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tarball = pack(tmp_path, key, python=("3.9",))
    refused(
        tarball, tmp_path / "dest", [pub], f"supports Python 3.9; python3 here is {this_python()}"
    )


def test_top_directory_must_match_the_manifest(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tree = make_tree(tmp_path / "tree", key)
    release = build.make_manifest(
        tree, version=VERSION, arch=ARCH, python=[this_python()], entry_points=["scaleboxd"]
    )
    build.seal(tree, release, key)
    tarball = build.write_tarball(tree, tmp_path / "x.tar.gz", "scalebox-6.6.6-" + ARCH)
    refused(tarball, tmp_path / "dest", [pub], "does not match RELEASE.json")


def test_signed_but_malformed_manifest_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair

    def resign_garbage(tree: Path) -> None:
        data = b'{"format": 1, "name": "scalebox", "version": "1.2.3"}'
        (tree / manifest.MANIFEST).write_bytes(data)
        (tree / manifest.SIGNATURE).write_bytes(signing.sign(key, data))

    tarball = pack(tmp_path, key, after_seal=resign_garbage)
    refused(tarball, tmp_path / "dest", [pub], "RELEASE.json is malformed")


def test_a_release_bigger_than_the_limit_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tarball = pack(tmp_path, key)
    dest = tmp_path / "dest"
    with pytest.raises(ReleaseError, match="unpacks to more than 1000 bytes"):
        open_release(tarball, dest, [pub], max_bytes=1000)
    assert not dest.exists()


FULL_DISK = """
import json, subprocess, sys
from pathlib import Path
from scalebox.release.errors import ReleaseError
from scalebox.release.verify import open_release

tarball, dest, pub = (Path(a) for a in sys.argv[1:4])
dest.mkdir()
# A file system with no inode left: the release's top directory cannot be made.
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=1", "full", str(dest)], check=True)
try:
    open_release(tarball, dest, [pub])
except ReleaseError as exc:
    print(json.dumps([exc.what, exc.hint]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a full file system (root)")
def test_a_full_disk_is_named_as_such_not_as_a_damaged_archive(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    """Any OSError from the extraction used to read "the archive is damaged or truncated",
    with the hint to get the release again: a good release, sent for another copy."""
    key, pub = key_pair
    tarball = pack(tmp_path, key)
    done = subprocess.run(  # in a mount namespace of its own: the mount goes with it
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", FULL_DISK,
         str(tarball), str(tmp_path / "dest"), str(pub)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    what, hint = json.loads(done.stdout.splitlines()[-1])
    assert what.startswith("cannot write ")
    assert "No space left on device" in what
    assert "damaged" not in what
    assert "free disk space" in hint


def test_dest_must_be_empty(tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]) -> None:
    key, pub = key_pair
    tarball = pack(tmp_path, key)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ReleaseError, match="not an empty directory"):
        open_release(tarball, dest, [pub])
    assert (dest / "keep.txt").read_text() == "mine"


# --- hostile archives, written member by member ----------------------------------


def hostile_tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


TOP = f"scalebox-{VERSION}-{ARCH}"


def outside_untouched(tmp_path: Path, before: set[Path]) -> None:
    """Nothing but dest changed under tmp_path."""
    after = {p for p in tmp_path.rglob("*") if "dest" not in p.relative_to(tmp_path).parts}
    assert after == before


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(member(f"{TOP}/../escaped.txt"), b"pwned")], r"points outside the release \('\.\.'\)"),
        ([(member("../escaped.txt"), b"pwned")], r"points outside the release"),
        ([(member("ABSOLUTE"), b"pwned")], "has an absolute path"),
        (
            [
                (member(TOP, tarfile.DIRTYPE), None),
                (member(f"{TOP}/wheels", tarfile.SYMTYPE, "../../.."), None),
                (member(f"{TOP}/wheels/escaped.txt"), b"pwned"),
            ],
            "is a symbolic link",
        ),
        (
            [
                (member(TOP, tarfile.DIRTYPE), None),
                (member(f"{TOP}/passwd", tarfile.LNKTYPE, "/etc/passwd"), None),
            ],
            "is a hard link",
        ),
        (
            [
                (member(TOP, tarfile.DIRTYPE), None),
                (member(f"{TOP}/escaped.txt", tarfile.LNKTYPE, "../escaped.txt"), None),
            ],
            "is a hard link",
        ),
        (
            [(member(TOP, tarfile.DIRTYPE), None), (member(f"{TOP}/sda", tarfile.BLKTYPE), None)],
            "is a device or fifo",
        ),
        (
            [(member(TOP, tarfile.DIRTYPE), None), (member(f"{TOP}/null", tarfile.CHRTYPE), None)],
            "is a device or fifo",
        ),
        (
            [(member(TOP, tarfile.DIRTYPE), None), (member(f"{TOP}/pipe", tarfile.FIFOTYPE), None)],
            "is a device or fifo",
        ),
        ([(member("loose.txt"), b"a")], "outside the top directory"),
    ],
    ids=[
        "dotdot-inside",
        "dotdot-top",
        "absolute",
        "symlink-out",
        "hardlink-etc",
        "hardlink-out",
        "block-device",
        "char-device",
        "fifo",
        "loose-file",
    ],
)
def test_hostile_member_is_refused_and_nothing_escapes(
    tmp_path: Path,
    key_pair: tuple[Ed25519PrivateKey, Path],
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    message: str,
) -> None:
    absolute_target = tmp_path / "abs-escaped.txt"
    for info, _ in members:
        if info.name == "ABSOLUTE":
            info.name = str(absolute_target)
    tarball = hostile_tarball(tmp_path / "hostile.tar.gz", members)
    before = set(tmp_path.rglob("*"))
    refused(tarball, tmp_path / "dest", [key_pair[1]], message)
    outside_untouched(tmp_path, before)
    assert not absolute_target.exists()
    assert not (tmp_path / "escaped.txt").exists()


def signed_then(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    extra: list[tuple[tarfile.TarInfo, bytes | None]],
    *,
    at: int = 3,
) -> Path:
    """A good signed release with ``extra`` members put in at index ``at`` (3: right
    after the top directory, RELEASE.json and RELEASE.json.sig)."""
    good = pack(tmp_path, key)
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(good) as archive:
        for info in archive:
            data = archive.extractfile(info) if info.isreg() else None
            members.append((info, data.read() if data else None))
    members[at:at] = extra
    return hostile_tarball(tmp_path / "hostile.tar.gz", members)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([(member("other-top/b.txt"), b"b")], "more than one top directory"),
        ([(member(f"{TOP}/units/scaleboxd.service"), SERVICE)], "appears twice"),
        ([(member(f"{TOP}/units/evil.service"), b"[Unit]\n")], "does not list"),
        ([(member(f"{TOP}/evil", tarfile.DIRTYPE), None)], "directory evil/"),
        (
            [(member(f"{TOP}/units/scaleboxd.socket"), b"[Socket]\nListenStream=22\n")],
            "does not match",
        ),
    ],
    ids=["two-tops", "duplicate", "unlisted-unit", "unlisted-directory", "changed-listed-file"],
)
def test_after_the_signed_manifest_each_member_must_be_listed_and_match(
    tmp_path: Path,
    key_pair: tuple[Ed25519PrivateKey, Path],
    extra: list[tuple[tarfile.TarInfo, bytes | None]],
    message: str,
) -> None:
    tarball = signed_then(tmp_path, key_pair[0], extra)
    refused(tarball, tmp_path / "dest", [key_pair[1]], message)


def test_a_member_before_the_manifest_is_refused_before_anything_is_written(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    """Even a file the manifest lists, with the right bytes, may not come first."""
    key, pub = key_pair
    tarball = signed_then(
        tmp_path, key, [(member(f"{TOP}/units/scaleboxd.service"), SERVICE)], at=1
    )
    error = refused(tarball, tmp_path / "dest", [pub], "expected RELEASE.json next")
    assert "checked before anything else is written" in error.what


def test_nothing_is_written_before_the_signature_is_checked(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    """An untrusted release is refused with dest still empty: not one member was written."""
    other_key, _ = write_key(tmp_path / "other")
    tarball = pack(tmp_path, other_key)
    dest = tmp_path / "dest"
    dest.mkdir()
    written: list[str] = []
    real_open = os.open

    def spy(path: object, *args: object, **kwargs: object) -> int:
        written.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    os.open = spy  # type: ignore[assignment]
    try:
        refused(tarball, dest, [key_pair[1]], "not signed by a trusted key")
    finally:
        os.open = real_open
    assert [w for w in written if str(dest) in w] == []


def test_too_many_members_are_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tarball = pack(tmp_path, key)
    dest = tmp_path / "dest"
    with pytest.raises(ReleaseError, match="more than 10 members"):
        extract.unpack(tarball, dest, [signing.load_public_key(pub)], max_members=10)
    assert not dest.exists()


def test_the_extraction_area_is_root_only_whatever_the_umask(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = key_pair
    tarball = pack(tmp_path, key)
    old = os.umask(0)
    try:
        release = open_release(tarball, tmp_path / "dest", [pub])
    finally:
        os.umask(old)
    assert (tmp_path / "dest").stat().st_mode & 0o777 == 0o700
    for path in release.root.rglob("*"):
        assert path.stat().st_mode & 0o022 == 0, path


# --- hostile tar headers: refused before their data is read ------------------------


def raw_tarball(path: Path, blocks: bytes) -> Path:
    path.write_bytes(gzip.compress(blocks, compresslevel=9))
    return path


def header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (tarfile.XHDTYPE, "pax extended header of 1073741824 bytes"),
        (tarfile.GNUTYPE_LONGNAME, "GNU long-name header"),
        (tarfile.GNUTYPE_LONGLINK, "GNU long-link header"),
        (tarfile.XGLTYPE, "pax global header"),
        (tarfile.GNUTYPE_SPARSE, "GNU sparse file"),
    ],
    ids=["pax-1GiB", "gnu-longname", "gnu-longlink", "pax-global", "gnu-sparse"],
)
def test_a_huge_or_foreign_tar_header_is_refused_before_it_is_read(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path], kind: bytes, message: str
) -> None:
    """1 GiB declared: refused from the 512-byte header, so the data need not even be there
    (tools/bench_hostile.py measures the memory with all of it present)."""
    path = tmp_path / "huge.tar.gz"
    path.write_bytes(gzip.compress(header("././@LongLink", kind, 1 << 30) + bytes(1 << 20)))
    refused(path, tmp_path / "dest", [key_pair[1]], message)


def test_chained_pax_headers_are_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    record = b"13 comment=x\n"
    pax = header("pax", tarfile.XHDTYPE, len(record)) + record.ljust(512, b"\0")
    tarball = raw_tarball(tmp_path / "chain.tar.gz", pax * 5000 + bytes(1024))
    refused(tarball, tmp_path / "dest", [key_pair[1]], "two pax extended headers follow")


def test_a_gnu_sparse_map_in_a_pax_header_is_refused(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    """tarfile would read a version-1.0 sparse map of any length into a list."""
    records = b"".join(
        f"{len(r) + len(str(len(r))) + 1} {r}".encode()
        for r in ("GNU.sparse.major=1\n", "GNU.sparse.minor=0\n", "GNU.sparse.name=a\n")
    )
    pax = header("pax", tarfile.XHDTYPE, len(records)) + records.ljust(512, b"\0")
    body = header(f"{TOP}/a", tarfile.REGTYPE, 0) + b"999999999\n" + b"1\n" * 100_000
    tarball = raw_tarball(tmp_path / "sparse.tar.gz", pax + body)
    refused(tarball, tmp_path / "dest", [key_pair[1]], "GNU sparse file")


# --- the command install.sh runs --------------------------------------------------


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalebox.release.verify", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_prints_the_version_of_a_good_release(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    tarball = pack(tmp_path, key_pair[0])
    result = run_cli(tarball, tmp_path / "dest", "--trusted-keys", key_pair[1].parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{VERSION}\n"
    shipped = run_cli(tarball, tmp_path / "dest2", "--trust-shipped-key")
    assert shipped.stdout == f"{VERSION}\n"


def test_cli_fails_with_the_reason_and_a_hint(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    other_key, _ = write_key(tmp_path / "other")
    tarball = pack(tmp_path, other_key)
    result = run_cli(tarball, tmp_path / "dest", "--trusted-keys", key_pair[1].parent)
    assert result.returncode == EXIT_REJECTED
    assert "not signed by a trusted key" in result.stderr
    assert "hint:" in result.stderr
    assert result.stdout == ""


def test_cli_refuses_an_empty_trusted_keys_directory(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    tarball = pack(tmp_path, key_pair[0])
    (tmp_path / "empty").mkdir()
    result = run_cli(tarball, tmp_path / "dest", "--trusted-keys", tmp_path / "empty")
    assert result.returncode != 0
    assert "no trusted keys (*.pub)" in result.stderr
    assert not (tmp_path / "dest").exists()


def test_a_trusted_key_file_that_is_huge_is_refused_without_reading_it_whole(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    """A PEM ed25519 key is 113 bytes; a key path that leads to a huge file (a mistake,
    a symlink to a disk image) was read whole into memory."""
    tarball = pack(tmp_path, key_pair[0])
    huge = key_pair[1].parent / "huge.pub"
    with huge.open("wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GiB that cost no disk
    err = refused(tarball, tmp_path / "dest", [key_pair[1], huge], "larger than 16384 bytes")
    assert str(huge) in err.what


# --- key rotation ---------------------------------------------------------------------


def test_after_rotation_the_retired_key_is_refused_by_name_and_the_new_one_trusted(
    tmp_path: Path,
) -> None:
    """docs/threat-model.md: add the new key, then move the old one to keys/retired/."""
    keys = tmp_path / "keys"
    old_key, old_pub = write_key(keys, "2025")
    new_key, _ = write_key(keys, "2026")
    (keys / "retired").mkdir()
    old_pub.rename(keys / "retired" / "2025.pub")
    by_old = pack(tmp_path, old_key, name="old")
    by_new = pack(tmp_path, new_key, name="new")

    result = run_cli(by_old, tmp_path / "dest-old", "--trusted-keys", keys)
    assert result.returncode == EXIT_REJECTED
    assert "signed by the retired key" in result.stderr
    assert "retired/2025.pub" in result.stderr
    assert not (tmp_path / "dest-old").exists()

    result = run_cli(by_new, tmp_path / "dest-new", "--trusted-keys", keys)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{VERSION}\n"


def pax_record(text: str) -> bytes:
    """One pax record "<length> <text>", its length counting itself."""
    n = len(text) + 2
    while len(f"{n} {text}") != n:
        n += 1
    return f"{n} {text}".encode()


WHOLE = pax_record("comment=a\n")


@pytest.mark.parametrize(
    ("data", "size", "message"),
    [
        # tarfile < 3.11.10 keeps a keyword from each record up to the last '=': ~1 GB.
        (b"2 " * 30_000 + b"=\n", None, "pax extended header is malformed at byte 0"),
        # ... and its r"\d+ hdrcharset=" search is quadratic in a run of digits: minutes.
        (pax_record("comment=" + "1" * 60_000 + "\n"), None, "run of more than 64 digits"),
        (WHOLE + b"9 a=b\n" * 5, len(WHOLE), "data past its declared size"),
        (WHOLE + b"99 x=y\n", None, "malformed at byte 13"),
    ],
    ids=["overlapping-keywords", "digit-run", "records-in-padding", "record-past-the-end"],
)
def test_a_pax_header_that_is_not_whole_records_is_refused(
    tmp_path: Path,
    key_pair: tuple[Ed25519PrivateKey, Path],
    data: bytes,
    size: int | None,
    message: str,
) -> None:
    block = data.ljust(-(-len(data) // 512) * 512, b"\0")
    pax = header("pax", tarfile.XHDTYPE, len(data) if size is None else size) + block
    tarball = raw_tarball(tmp_path / "pax.tar.gz", pax + header(f"{TOP}/a", tarfile.REGTYPE, 0))
    refused(tarball, tmp_path / "dest", [key_pair[1]], message)


def test_a_pax_header_of_whole_records_still_names_its_member(
    tmp_path: Path, key_pair: tuple[Ed25519PrivateKey, Path]
) -> None:
    """The check lets good records through: the path= record is what names the member."""
    records = pax_record("path=" + "x" * 200 + "\n") + pax_record("mtime=1700000000.5\n")
    pax = header("pax", tarfile.XHDTYPE, len(records)) + records.ljust(512, b"\0")
    tarball = raw_tarball(tmp_path / "pax.tar.gz", pax + header("a", tarfile.REGTYPE, 0))
    refused(tarball, tmp_path / "dest", [key_pair[1]], "'" + "x" * 100)
