"""What the scalebox-update system tests share: releases, a server with A, the end checks.

``releases`` (one per run, shared by xdist's workers) is a folder bound
read-only at /mnt/release in each machine: install.sh, real signed tarballs
of A, B and the deliberately broken releases (tools/releases.py), tarballs
crafted from B that must be refused (corrupt, badly signed, unsafe members,
another arch), a throwaway TLS CA with a certificate for 127.0.0.1, and
fake_github.py.

``server`` is a fresh machine with A installed by install.sh and one VM
running. ``Server.assert_intact`` is the one end-of-test check the issue asks
for; with a ``Snapshot`` it also proves that nothing at all was changed.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import fcntl
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from tools import keygen
from tools.machine import Machine
from tools.releases import ARCH, BROKEN, ROOT, A, B, broken_copy, build_tarball, tarball_name

from scalebox.release import signing
from tests.interrupt import WORKER
from tests.tls import make_tls

SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvY6iHp0l8tMIW2RwA5d6kXyP1u7oSxDpvq2EN0lJ8k test"
MNT = "/mnt/release"
OTHER_ARCH = "aarch64" if ARCH != "aarch64" else "x86_64"
# Crafted from B, each wrong in one way (see _craft_refused). Names under /mnt/release.
CORRUPT = f"corrupt-{tarball_name(B)}"
BAD_SIGNATURE = f"bad-signature-{tarball_name(B)}"
UNTRUSTED_KEY = f"untrusted-key-{tarball_name(B)}"
DOTDOT = f"dotdot-{tarball_name(B)}"
ABSOLUTE = f"absolute-{tarball_name(B)}"
SYMLINK = f"symlink-{tarball_name(B)}"
WRONG_ARCH = f"scalebox-{B}-{OTHER_ARCH}.tar.gz"
# Where the unsafe members would land if an extractor obeyed them.
ESCAPED = (
    "/tmp/scalebox-escaped-dotdot",
    "/tmp/scalebox-escaped-absolute",
    "/etc/scalebox-escaped",
)

BootMachine = Callable[..., Machine]


def tarball(version: str) -> str:
    """The path, inside a machine, of the release tarball of ``version``."""
    return f"{MNT}/{tarball_name(version)}"


# --- the session's releases -------------------------------------------------------


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per run for every machine's /mnt/release (see the module docstring).

    Built once per run, not once per xdist worker: its eight `./do tarball` builds
    took ~60 s of CPU on each worker, beside the other worker's machines. The first
    worker to get here builds it under a lock in the run's base temp (shared by the
    workers); the others wait and then use it. Machines bind it read-only.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get(WORKER):
        base = base.parent  # the run's, above each worker's own
    out = base / "shared-releases"
    with (base / "shared-releases.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (out / COMPLETE).exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed midway
            out.mkdir()
            _build_releases(out, tmp_path_factory)
            (out / COMPLETE).write_text("")
    return out


COMPLETE = ".complete"


def _build_releases(out: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tarballs two builds at a time: the other worker only waits for them."""
    key, _pub = keygen.keygen(tmp_path_factory.mktemp("keys"))
    broken = tmp_path_factory.mktemp("broken")

    def build(version: str) -> Path:
        src = broken_copy(broken, version) if version in BROKEN else ROOT
        return build_tarball(out, key, version, src)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(build, [A, B, *BROKEN]))  # list(): a failed build raises here
    shutil.copy2(ROOT / "scripts" / "install.sh", out / "install.sh")
    shutil.copy2(Path(__file__).with_name("fake_github.py"), out / "fake_github.py")
    _craft_refused(out, key, tmp_path_factory.mktemp("other-key"))
    make_tls(out / "tls")


@dataclass
class Tree:
    """A release tarball's members in memory, to change and write back."""

    members: list[tuple[tarfile.TarInfo, bytes | None]]

    @classmethod
    def read(cls, path: Path) -> Tree:
        members = []
        with tarfile.open(path) as archive:
            for info in archive:
                data = archive.extractfile(info) if info.isreg() else None
                members.append((info, data.read() if data else None))
        return cls(members)

    @property
    def top(self) -> str:
        return self.members[0][0].name.split("/")[0]

    def _index(self, relpath: str) -> int:
        name = f"{self.top}/{relpath}"
        return next(i for i, (info, _) in enumerate(self.members) if info.name == name)

    def get(self, relpath: str) -> bytes:
        data = self.members[self._index(relpath)][1]
        assert data is not None
        return data

    def put(self, relpath: str, data: bytes) -> None:
        i = self._index(relpath)
        self.members[i][0].size = len(data)
        self.members[i] = (self.members[i][0], data)

    def manifest(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads(self.get("RELEASE.json"))
        return loaded

    def sign(self, manifest: dict[str, object], key: Path) -> None:
        """Write ``manifest`` and a valid signature by ``key``: only what else changed is wrong."""
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        self.put("RELEASE.json", data)
        private = signing.load_private_key(key.read_bytes(), str(key))
        self.put("RELEASE.json.sig", signing.sign(private, data))

    def rename_top(self, top: str) -> None:
        old = self.top
        for info, _ in self.members:
            info.name = top + info.name[len(old) :]
            # A long name read from a pax header would otherwise be written back unchanged.
            info.pax_headers = {k: v for k, v in info.pax_headers.items() if k != "path"}

    def insert(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        """Add a member right after the top directory, before anything a check would read."""
        if data is not None:
            info.size = len(data)
        self.members.insert(1, (info, data))

    def write(self, path: Path) -> None:
        with tarfile.open(path, "w:gz") as archive:
            for info, data in self.members:
                archive.addfile(info, io.BytesIO(data) if data is not None else None)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, 0o644, 0
    return info


def _craft_refused(out: Path, key: Path, scratch: Path) -> None:
    """Tarballs made from B that scalebox-update must refuse, each for one reason."""
    good = out / tarball_name(B)

    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    (out / CORRUPT).write_bytes(bytes(data))

    tree = Tree.read(good)
    sig = bytearray(tree.get("RELEASE.json.sig"))
    sig[0] ^= 0x01
    tree.put("RELEASE.json.sig", bytes(sig))
    tree.write(out / BAD_SIGNATURE)

    # Signed by a key the server does not trust, and shipping that key:
    # consistent in itself, as an attacker would make it.
    other_key, other_pub = keygen.keygen(scratch)
    tree = Tree.read(good)
    manifest = tree.manifest()
    pub = other_pub.read_bytes()
    tree.put("keys/release.pub", pub)
    files = manifest["files"]
    assert isinstance(files, dict)
    files["keys/release.pub"] = hashlib.sha256(pub).hexdigest()
    tree.sign(manifest, other_key)
    tree.write(out / UNTRUSTED_KEY)

    escaped = b"written outside the release\n"
    tree = Tree.read(good)
    tree.insert(_member(f"{tree.top}/../../../../../../../..{ESCAPED[0]}"), escaped)
    tree.sign(tree.manifest(), key)
    tree.write(out / DOTDOT)

    tree = Tree.read(good)
    tree.insert(_member(ESCAPED[1]), escaped)
    tree.sign(tree.manifest(), key)
    tree.write(out / ABSOLUTE)

    # A link out of the tree, then a file written through it.
    tree = Tree.read(good)
    inside = "units/escape/scalebox-escaped"
    tree.insert(_member(f"{tree.top}/{inside}"), escaped)
    tree.insert(_member(f"{tree.top}/units/escape", tarfile.SYMTYPE, "/etc"))
    manifest = tree.manifest()
    files = manifest["files"]
    assert isinstance(files, dict)
    files[inside] = hashlib.sha256(escaped).hexdigest()
    tree.sign(manifest, key)
    tree.write(out / SYMLINK)

    tree = Tree.read(good)
    manifest = tree.manifest()
    manifest["arch"] = OTHER_ARCH
    tree.rename_top(f"scalebox-{B}-{OTHER_ARCH}")
    tree.sign(manifest, key)
    tree.write(out / WRONG_ARCH)


# --- a server with A installed ----------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What an update refused before any change must leave exactly as it was."""

    daemon_pid: str
    current: str
    releases: str
    units: str


@dataclass
class Server:
    machine: Machine
    token: str
    vm_unit: str
    vm_pid: str = ""
    config: str = ""
    data: str = ""
    notes: list[str] = field(default_factory=list)

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.machine.run(["bash", "-c", script], check=check, timeout=600)

    def update(self, *args: str, env: str = "") -> tuple[int, dict[str, object], str]:
        """``scalebox-update --json ARGS`` with ``env`` (VAR=value ...): code, result, stderr."""
        done = self.sh(f"{env} scalebox-update --json {shlex.join(args)}", check=False)
        lines = done.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines else {}
        return done.returncode, result, done.stderr

    def health(self) -> str:
        return str(httpx.get(self.machine.url(8080, "/health"), timeout=5).json()["version"])

    def main_pid(self, unit: str) -> str:
        return self.sh(f"systemctl show {unit} -p MainPID --value").stdout.strip()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            daemon_pid=self.main_pid("scaleboxd.service"),
            current=self.sh("readlink /opt/scalebox/current").stdout.strip(),
            releases=self.sh("ls -A /opt/scalebox/releases").stdout,
            # Unit files and the links `systemctl enable` made: contents, modes, targets.
            units=self.sh(
                "cd /etc/systemd/system && find . -printf '%p %y %m %l\\n' | sort && "
                "find . -type f -print0 | sort -z | xargs -0 sha256sum"
            ).stdout,
        )

    def assert_intact(self, version: str, unchanged: Snapshot | None = None) -> None:
        """The issue's end-of-test checks; with ``unchanged``, also that nothing changed."""
        assert self.health() == version
        assert self.sh("cat /etc/scaleboxd/version").stdout.strip() == version
        assert self.sh("systemctl is-active scaleboxd").stdout.strip() == "active"
        # One daemon: no handover instance left beside it (scalebox.update.switch).
        handover = self.sh("systemctl is-active scaleboxd-handover", check=False).stdout.strip()
        assert handover in ("inactive", "failed"), handover
        assert self.sh("readlink /opt/scalebox/current").stdout.strip() == f"releases/{version}"
        assert _digest(self, "/etc/scaleboxd/config") == self.config
        data = _data_digest(self)
        assert data == self.data, "DATA_DIR changed:\n" + "\n".join(
            difflib.unified_diff(self.data.splitlines(), data.splitlines(), lineterm="")
        )
        assert self.main_pid(self.vm_unit) == self.vm_pid
        assert self.sh("test -e /var/lib/scalebox-update/journal.json", check=False).returncode == 1
        if unchanged is not None:
            assert self.snapshot() == unchanged


def _digest(s: Server, path: str) -> str:
    return s.sh(f"stat -c '%a %u %g' {path}; sha256sum {path}").stdout


def _data_digest(s: Server) -> str:
    # Every file's content and mode under DATA_DIR (the VM's disk, the templates, the state).
    return s.sh(
        "cd /var/lib/scalebox && find . -type f -printf '%p %m\\n' | sort && "
        "find . -type f -print0 | sort -z | xargs -0 sha256sum"
    ).stdout


def install_a(m: Machine) -> Server:
    """Install A with install.sh on ``m`` and start one VM."""
    m.run(["bash", f"{MNT}/install.sh", "--backend", "process", tarball(A)], timeout=600)
    token = m.run(["sed", "-n", "s/^API_TOKEN=//p", "/etc/scaleboxd/config"]).stdout.strip()
    vm = httpx.post(
        m.url(8080, "/vms"),
        headers={"Authorization": f"Bearer {token}"},
        json={"template": "debian-base", "ssh_public_key": SSH_KEY},
        timeout=30,
    )
    assert vm.status_code == 201, vm.text
    s = Server(m, token, f"scalebox-vm@{vm.json()['id']}.service")
    s.vm_pid = s.main_pid(s.vm_unit)
    assert s.vm_pid not in ("", "0")
    s.config = _digest(s, "/etc/scaleboxd/config")
    s.data = _data_digest(s)
    return s


@pytest.fixture
def server(boot_machine: BootMachine, releases: Path) -> Server:
    """A fresh machine with A installed by install.sh and one VM running."""
    return install_a(boot_machine(releases))


# --- fake GitHub inside the machine -------------------------------------------------

API_PORT, ASSETS_PORT = 8443, 8444
API = f"https://127.0.0.1:{API_PORT}/api"
ASSETS = f"https://127.0.0.1:{ASSETS_PORT}"
TRUST_TEST_CA = f"SSL_CERT_FILE={MNT}/tls/ca.pem"
API_LOG, ASSETS_LOG = "/run/fake-gh-api.jsonl", "/run/fake-gh-assets.jsonl"


def start_fake_github(s: Server) -> None:
    """The releases API on API_PORT and the asset host on ASSETS_PORT, https on 127.0.0.1.

    Two ports are two origins: GITHUB_TOKEN must reach the first only.
    """
    common = (
        f"python3 {MNT}/fake_github.py --root {MNT} "
        f"--tls {MNT}/tls/server.pem {MNT}/tls/server.key --latest {B}"
    )
    s.sh(
        f"systemd-run --quiet --unit=fake-gh-api {common} --port {API_PORT} "
        f"--log {API_LOG} --assets-base {ASSETS} && "
        f"systemd-run --quiet --unit=fake-gh-assets {common} --port {ASSETS_PORT} "
        f"--log {ASSETS_LOG}"
    )
    deadline = time.monotonic() + 30
    for port in (API_PORT, ASSETS_PORT):
        while s.sh(f"exec 3<>/dev/tcp/127.0.0.1/{port}", check=False).returncode != 0:
            assert time.monotonic() < deadline, s.sh("journalctl -u 'fake-gh-*' -o cat").stdout
            time.sleep(0.1)


def requests_seen(s: Server, log: str) -> list[dict[str, str | None]]:
    """The requests a fake server logged, in order."""
    text = s.sh(f"cat {log} 2>/dev/null || true").stdout
    return [json.loads(line) for line in text.splitlines()]
