"""The release path under attack (issue 8): each attack on a real server with A installed.

One machine per module, A installed by install.sh and a VM running. Every
attack must be refused with exit 1, a message that says what and what to do,
and leave everything as it was: the same scaleboxd PID, ``current``, units,
config, DATA_DIR and VM (``Server.assert_intact`` with a snapshot), no
journal, the lock free, and nothing written outside the updater's root-only
areas (``find -newer`` over /opt, /etc, /usr/local, /var/lib/scalebox and
/tmp; /var/lib/scalebox-update/{downloads,work} must be 0700).

The hostile tarballs are made on the host from a real signed B, re-signed
with the server's trusted key where the attack is in what the key signs.
Hostile servers run inside the machine (hostile_server.py, 127.0.0.1).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tools import keygen
from tools.releases import A, B, build_tarball, tarball_name

from scalebox.release import signing

from .update_helpers import MNT, BootMachine, Server, Tree, install_a

HOSTILE_PORT = 8450
HOSTILE = f"http://127.0.0.1:{HOSTILE_PORT}"
HTTP_OK = "SCALEBOX_ALLOW_HTTP=1 SCALEBOX_UPDATE_REPO=acme/scalebox"
SHADOW_COPY = "/root/secret-token"
# Where the release path may write during a refused run (all root-only).
WATCHED = "/opt /etc /usr/local /var/lib/scalebox /tmp /root"


MEASURE_RSS = """#!/usr/bin/python3
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"peak RSS {peak:.1f} MB", file=sys.stderr)
sys.exit(code)
"""


@dataclass(frozen=True)
class Attack:
    env: str
    what: tuple[str, ...]
    hint: tuple[str, ...]
    args: tuple[str, ...] = ()


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _huge(path: Path, kind: bytes) -> None:
    """A 1 GiB header declared, 1 GiB of zeros present: about 1 MB compressed."""
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz:
        gz.write(_header("././@LongLink", kind, 1 << 30))
        zeros = bytes(1 << 20)
        for _ in range(1024):
            gz.write(zeros)


def _write_with(
    tree: Tree, path: Path, after_sig: list[tuple[tarfile.TarInfo, bytes | None]]
) -> None:
    """``tree`` with members put right after RELEASE.json.sig (what a reader sees next)."""
    members = list(tree.members)
    at = next(i for i, (info, _) in enumerate(members) if info.name.endswith("/RELEASE.json.sig"))
    members[at + 1 : at + 1] = after_sig
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


@pytest.fixture(scope="module")
def attacks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/mnt/release: install.sh, A, B, the servers and every hostile tarball below."""
    out = tmp_path_factory.mktemp("attacks")
    keys = tmp_path_factory.mktemp("keys")
    key, _pub = keygen.keygen(keys)
    build_tarball(out, key, A)
    good = build_tarball(out, key, B)
    root = Path(__file__).resolve().parents[2]
    shutil.copy2(root / "scripts" / "install.sh", out / "install.sh")
    shutil.copy2(Path(__file__).with_name("hostile_server.py"), out / "hostile_server.py")

    # Point 8: a listed file (right bytes) before the manifest; an unlisted file after it.
    tree = Tree.read(good)
    unit = tree.get("units/scaleboxd.service")
    first = Tree(list(tree.members))
    first.members.insert(1, _file(f"{tree.top}/units/scaleboxd.service", unit))
    first.write(out / "manifest-not-first.tar.gz")
    _write_with(
        Tree.read(good),
        out / "unlisted-member.tar.gz",
        [_file(f"{tree.top}/units/x.service", b"[Service]\n")],
    )

    # Point 3: 1 GiB headers in about 1 MB, unsigned.
    _huge(out / "pax-1gib.tar.gz", tarfile.XHDTYPE)
    _huge(out / "gnu-longname-1gib.tar.gz", tarfile.GNUTYPE_LONGNAME)

    # Point 3 again: a 60 KB pax header of overlapping records ("2 2 2 ...="), which
    # Python 3.11.7's tarfile turned into about 1 GB of keywords.
    overlapping = b"2 " * 30_000 + b"=\n"
    (out / "pax-overlapping.tar.gz").write_bytes(
        gzip.compress(
            _header("pax", tarfile.XHDTYPE, len(overlapping))
            + overlapping.ljust(60416, b"\0")
            + _header("scalebox/RELEASE.json", tarfile.REGTYPE, 0)
            + bytes(1024)
        )
    )

    # Point 5: deeply nested JSON, signed by the trusted key.
    tree = Tree.read(good)
    nested = b"[" * 100_000 + b"]" * 100_000
    tree.put("RELEASE.json", nested)
    private = signing.load_private_key(key.read_bytes(), str(key))
    tree.put("RELEASE.json.sig", signing.sign(private, nested))
    tree.write(out / "nested-manifest.tar.gz")

    # Point 6: names, signed by the trusted key.
    for name, change in (
        ("entry-point-path", lambda m: m.__setitem__("entry_points", ["../../../../tmp/pwned"])),
        ("unit-path", lambda m: m.__setitem__("units", ["../../../etc/cron.d/pwned.service"])),
        ("colliding-units", lambda m: m.__setitem__("units", [*m["units"], "ScaleboxD.service"])),
    ):
        tree = Tree.read(good)
        manifest = tree.manifest()
        change(manifest)
        tree.sign(manifest, key)
        tree.write(out / f"{name}.tar.gz")
    # A unit shipped but not listed, and listed under a colliding file name.
    tree = Tree.read(good)
    manifest = tree.manifest()
    files = manifest["files"]
    assert isinstance(files, dict)
    files["units/ScaleboxD.service"] = hashlib.sha256(unit).hexdigest()
    tree.sign(manifest, key)
    _write_with(
        tree, out / "colliding-files.tar.gz", [_file(f"{tree.top}/units/ScaleboxD.service", unit)]
    )

    # Key rotation: B signed by a key the server has retired (copied in by the test).
    shutil.copy2(keys / "release.pub", out / "retired.pub")
    _new_key, new_pub = keygen.keygen(tmp_path_factory.mktemp("new-key"))
    shutil.copy2(new_pub, out / "new.pub")
    # Runs a command and prints its peak RSS as the kernel counted it (ru_maxrss).
    rss = out / "measure-rss"
    rss.write_text(MEASURE_RSS)
    rss.chmod(0o755)
    return out


@pytest.fixture(scope="module")
def shared(module_boot_machine: BootMachine, attacks: Path) -> Iterator[Server]:
    s = install_a(module_boot_machine(attacks))
    s.sh(
        f"systemd-run --quiet --unit=hostile python3 {MNT}/hostile_server.py "
        f"--port {HOSTILE_PORT} --root {MNT} && "
        f"for i in $(seq 100); do exec 3<>/dev/tcp/127.0.0.1/{HOSTILE_PORT} && break; "
        "sleep 0.1; done"
    )
    # A secret only root may read, for the symlink attack of point 2.
    s.sh(f"umask 077 && echo 'TOKEN=do-not-leak' > {SHADOW_COPY}")
    yield s


def _url(path: str) -> str:
    return f"SCALEBOX_RELEASE_URL={path}"


ATTACKS = {
    # 8: the signed manifest first, every member listed
    "8-manifest-not-first": Attack(
        _url(f"{MNT}/manifest-not-first.tar.gz"),
        ("expected RELEASE.json next", "checked before anything else is written"),
        ("get the release again from a trusted source",),
    ),
    "8-unlisted-member": Attack(
        _url(f"{MNT}/unlisted-member.tar.gz"),
        ("units/x.service, which RELEASE.json does not list",),
        ("files were added after signing",),
    ),
    # 3: memory spent before trust
    "3-pax-header-1gib": Attack(
        _url(f"{MNT}/pax-1gib.tar.gz"),
        ("pax extended header of 1073741824 bytes", "refusing to extract"),
        ("get the release again",),
    ),
    "3-gnu-longname-1gib": Attack(
        _url(f"{MNT}/gnu-longname-1gib.tar.gz"),
        ("GNU long-name header", "refusing to extract"),
        ("get the release again",),
    ),
    "3-api-endless-body": Attack(
        f"{HTTP_OK} SCALEBOX_GITHUB_API={HOSTILE}/endless",
        ("sent more than 1048576 bytes",),
        ("SCALEBOX_GITHUB_API",),
    ),
    "3-api-gzip-bomb": Attack(
        f"{HTTP_OK} SCALEBOX_GITHUB_API={HOSTILE}/bomb",
        ("sent more than 1048576 bytes",),
        ("SCALEBOX_GITHUB_API",),
    ),
    "3-pax-overlapping-records": Attack(
        _url(f"{MNT}/pax-overlapping.tar.gz"),
        ("pax extended header is malformed", "refusing to extract"),
        ("get the release again",),
    ),
    "3-download-gzip-encoded": Attack(
        # Names of their own: a partial download another attack left is not resumed.
        "SCALEBOX_ALLOW_HTTP=1 " + _url(f"{HOSTILE}/bomb/scalebox-9.9.8-x86_64.tar.gz"),
        ("refusing to extract it",),
        ("get the release again",),
    ),
    # 4: a server that drips a byte every two seconds
    "4-dripping-download": Attack(
        "SCALEBOX_ALLOW_HTTP=1 SCALEBOX_DOWNLOAD_TIMEOUT=6 "
        + _url(f"{HOSTILE}/drip/{tarball_name(B)}"),
        ("took more than 6 s (SCALEBOX_DOWNLOAD_TIMEOUT)", "nothing was changed"),
        ("SCALEBOX_DOWNLOAD_MIN_RATE",),
    ),
    "4-dripping-headers": Attack(
        "SCALEBOX_ALLOW_HTTP=1 SCALEBOX_DOWNLOAD_TIMEOUT=6 "
        + _url(f"{HOSTILE}/drip-headers/{tarball_name(B)}"),
        ("took more than 6 s (SCALEBOX_DOWNLOAD_TIMEOUT)", "nothing was changed"),
        ("SCALEBOX_DOWNLOAD_MIN_RATE",),
    ),
    # 5: parse failures of outside input
    "5-etag-that-cannot-be-sent-back": Attack(
        "SCALEBOX_ALLOW_HTTP=1 " + _url(f"{HOSTILE}/bad-etag/scalebox-9.9.9-x86_64.tar.gz"),
        ("not a gzip-compressed tar archive",),
        ("get the release again",),
    ),
    "5-api-terminal-escape": Attack(
        f"{HTTP_OK} SCALEBOX_GITHUB_API={HOSTILE}/escape",
        ("has no build for", "\\x1b]0;owned"),
        ("--to VERSION",),
    ),
    "5-signed-nested-manifest": Attack(
        _url(f"{MNT}/nested-manifest.tar.gz"),
        ("RELEASE.json is malformed: its JSON is nested too deeply",),
        ("get the release again",),
    ),
    "5-api-nested-json": Attack(
        f"{HTTP_OK} SCALEBOX_GITHUB_API={HOSTILE}/nested",
        ("JSON nested too deeply",),
        ("SCALEBOX_GITHUB_API",),
    ),
    "5-api-absurd-tag": Attack(
        f"{HTTP_OK} SCALEBOX_GITHUB_API={HOSTILE}/absurd-tag",
        ("is not a version",),
        ("tag releases v<version>",),
    ),
    "5-to-absurd-version": Attack(
        f"{HTTP_OK} SCALEBOX_GITHUB_API={HOSTILE}/nested",
        ("is not a version", "at most 128"),
        ("PEP 440",),
        args=("--to", "9" * 5000),
    ),
    # 2: local sources that are not release files
    "2-symlink-to-secret": Attack(
        _url("/root/link-to-secret"),
        ("not a gzip-compressed tar archive",),
        ("get the release again",),
    ),
    "2-directory": Attack(
        _url("/opt/scalebox"), ("is a directory, not a release file",), ("tar.gz file",)
    ),
    "2-fifo": Attack(
        _url("/root/release.fifo"), ("is a FIFO (named pipe), not a release file",), ("tar.gz",)
    ),
    "2-device": Attack(_url("/dev/zero"), ("is a character device",), ("tar.gz",)),
    "2-symlink-to-directory": Attack(
        _url("/root/link-to-dir"),
        ("is a symbolic link to /etc, which is a directory",),
        ("tar.gz",),
    ),
    "2-missing": Attack(_url("/root/nothing-here.tar.gz"), ("does not exist",), ("tar.gz",)),
    # 6: names in the signed manifest
    "6-entry-point-with-a-path": Attack(
        _url(f"{MNT}/entry-point-path.tar.gz"),
        ("is not a plain program name",),
        ("get the release again",),
    ),
    "6-unit-with-a-path": Attack(
        _url(f"{MNT}/unit-path.tar.gz"), ("is not a plain unit file name",), ("get the release",)
    ),
    "6-units-colliding-by-case": Attack(
        _url(f"{MNT}/colliding-units.tar.gz"),
        ("differ only in case or Unicode form",),
        ("get the release again",),
    ),
    "6-files-colliding-by-case": Attack(
        _url(f"{MNT}/colliding-files.tar.gz"),
        ("differ only in case or Unicode form",),
        ("get the release again",),
    ),
}


def _outside_writes(s: Server) -> str:
    return s.sh(
        f"find {WATCHED} -xdev -newer /run/attack-marker ! -path /root/release.fifo "
        "! -path /root/link-to-secret ! -path /root/link-to-dir 2>/dev/null || true"
    ).stdout.strip()


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_attack_is_refused_and_changes_nothing(shared: Server, attack: Attack) -> None:
    shared.sh(
        f"ln -sfn {SHADOW_COPY} /root/link-to-secret && ln -sfn /etc /root/link-to-dir && "
        "{ test -p /root/release.fifo || mkfifo /root/release.fifo; }"
    )
    before = shared.snapshot()
    shared.sh("sleep 1.1 && touch /run/attack-marker")
    # The peak RSS of the whole scalebox-update process, as the kernel counted it.
    code, result, err = shared.update(*attack.args, env=f"{attack.env} {MNT}/measure-rss")
    print(f"{result.get('message')}\n  hint: {result.get('hint')}\n{err.splitlines()[-1:]}")
    assert code == 1, err
    assert result["result"] == "refused"
    for words in attack.what:
        assert words in str(result["message"])
    for words in attack.hint:
        assert words in str(result["hint"])
    assert "Traceback" not in err
    # Nothing from outside reaches the terminal raw: no escapes, no second line.
    assert str(result["message"]).isprintable(), result["message"]
    assert str(result["hint"]).isprintable(), result["hint"]
    shared.assert_intact(A, unchanged=before)
    assert _outside_writes(shared) == ""
    modes = shared.sh(
        "stat -c '%a %n' /var/lib/scalebox-update/downloads /var/lib/scalebox-update/work "
        "2>/dev/null || true"
    ).stdout.split("\n")
    assert all(line.startswith("700 ") for line in modes if line), modes
    # The lock is free: another run gets it at once.
    assert shared.sh("flock -n /var/lib/scalebox-update/lock true", check=False).returncode == 0
    assert shared.sh("grep -rl do-not-leak /var/lib/scalebox-update", check=False).stdout == ""
    peak = [line for line in err.splitlines() if line.startswith("peak RSS ")]
    assert peak, err
    assert float(peak[-1].split()[2]) < 100, peak


def test_a_release_signed_by_a_retired_key_is_refused(shared: Server) -> None:
    """Rotation as docs/threat-model.md says: add the new key, move the old one to retired/."""
    keys = "/etc/scalebox/keys"
    shared.sh(
        f"install -m 0644 {MNT}/new.pub {keys}/2026.pub && mkdir -p {keys}/retired && "
        f"mv {keys}/release.pub {keys}/retired/release.pub"
    )
    try:
        before = shared.snapshot()
        code, result, err = shared.update(env=_url(f"{MNT}/{tarball_name(B)}"))
        print(f"{result.get('message')}\n  hint: {result.get('hint')}")
        assert code == 1, err
        assert "signed by the retired key /etc/scalebox/keys/retired/release.pub" in str(
            result["message"]
        )
        assert "get a release signed by a current key" in str(result["hint"])
        shared.assert_intact(A, unchanged=before)
    finally:
        shared.sh(f"mv {keys}/retired/release.pub {keys}/release.pub && rm {keys}/2026.pub")


def test_update_with_umask_000_leaves_nothing_world_writable(
    boot_machine: BootMachine, attacks: Path
) -> None:
    """Point 7: the caller's umask does not reach the release, its venv or the working areas."""
    s = install_a(boot_machine(attacks))
    code, result, err = s.update(env=f"umask 000; {_url(f'{MNT}/{tarball_name(B)}')}")
    assert code == 0, err
    assert result["result"] == "updated", result
    writable = s.sh(
        f"find /opt/scalebox/releases/{B} /var/lib/scalebox-update /etc/systemd/system "
        "-perm -o+w ! -type l"
    ).stdout
    assert writable == ""
    assert s.health() == B
