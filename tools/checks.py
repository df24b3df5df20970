"""The building blocks of ./do check and ./do check-update.

Phases and their report, the release build and install, the API suite from
the host, and what proves an update left a server as it should: a snapshot
of the config and DATA_DIR, a running VM, and their comparisons.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scalebox.config import parse_lines
from scalebox.errors import ScaleboxError
from scalebox.migrations import steps  # noqa: F401 - registers this build's migrations
from scalebox.migrations.registry import MIGRATIONS, Migration
from scalebox.migrations.runner import run as run_migrations
from tools.machine import Machine

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
API_PORT = 8080
CHECK_TEMPLATE = "debian-base"
Files = Mapping[str, str]  # DATA_DIR-relative path -> "<mode> <sha256>"
CONFIG = "/etc/scaleboxd/config"


class CheckFailed(ScaleboxError):
    """One phase of ./do check found a problem."""


class Stop(Exception):
    """A phase that later phases need has failed (it is recorded in its Phase)."""


@dataclass
class Phase:
    name: str
    status: str = "not run"  # ok | FAIL | not run
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Report:
    phases: list[Phase] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def phase(self, name: str, *, required: bool = False) -> Iterator[Phase]:
        """Time one phase; a failure is recorded, and re-raised when later phases need it."""
        phase = Phase(name)
        self.phases.append(phase)
        say(f"{name} ...")
        start = time.monotonic()
        try:
            yield phase
        except Exception as exc:
            if isinstance(exc, ScaleboxError):
                phase.detail = str(exc)
            else:
                # Unexpected: keep the traceback for whoever fixes it.
                traceback.print_exception(exc)
                phase.detail = f"{type(exc).__name__}: {exc}"
            phase.status = "FAIL"
            say(f"FAILED: {name}: {phase.detail}")
            if required:
                raise Stop from exc
        else:
            phase.status = "ok"
            say(f"ok: {name}{': ' + phase.detail if phase.detail else ''}")
        finally:
            phase.seconds = time.monotonic() - start

    def failed(self) -> bool:
        return any(p.status == "FAIL" for p in self.phases)

    def summary(self, planned: list[str], title: str = "./do check") -> str:
        seen = {p.name for p in self.phases}
        rows = [*self.phases, *(Phase(n) for n in planned if n not in seen)]
        width = max(len(p.name) for p in rows)
        lines = ["", f"{title} summary:"]
        for p in rows:
            detail = p.detail.splitlines()[0] if p.detail else ""
            lines.append(f"  {p.status:7} {p.seconds:7.1f} s  {p.name:{width}}  {detail}")
        total = time.monotonic() - self.started
        verdict = "FAILED" if self.failed() else "passed"
        lines.append(f"  total   {total:7.1f} s  {title} {verdict}")
        return "\n".join(lines)


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def indent(text: str, lines: int = 60) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


def signing_env() -> dict[str, str]:
    """The environment for ./do tarball: the real key, or a throwaway one for the check."""
    env = dict(os.environ)
    if env.get("SCALEBOX_SIGNING_KEY") or env.get("SCALEBOX_SIGNING_KEY_FILE"):
        return env
    if (ROOT / "keys/release.key").is_file():
        return env
    key_dir = CACHE / "check-key"
    if not (key_dir / "release.key").is_file():
        say(f"no keys/release.key: making a throwaway signing key in {key_dir} for this check")
        subprocess.run(
            [sys.executable, "-m", "tools.keygen", "--dir", str(key_dir)],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    env["SCALEBOX_SIGNING_KEY_FILE"] = str(key_dir / "release.key")
    return env


def build_tarball(out: Path, version: str | None = None) -> Path:
    """Build this tree's release (as ``version`` if given) into ``out``; return the tarball."""
    # Into this run's own folder, not builds/: two checks at once must not
    # write the same file.
    result = subprocess.run(
        [
            str(ROOT / "do"),
            "tarball",
            "--out",
            str(out),
            *(["--version", version] if version else []),
        ],
        cwd=ROOT,
        env=signing_env(),
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise CheckFailed(
            f"./do tarball {'--version ' + version if version else ''}failed "
            f"with exit code {result.returncode}",
            "run ./do tarball by hand and fix what it reports (its output is above)",
        )
    return Path(lines[-1])


def stage_release(tarball: Path, stage: Path) -> None:
    """The folder bound at /mnt/release: the tarball and the install.sh beside it."""
    if not tarball.is_file():
        raise CheckFailed(f"tarball {tarball} does not exist", "run ./do tarball")
    stage.mkdir(parents=True, exist_ok=True)
    if tarball.parent.resolve() != stage.resolve():
        shutil.copy2(tarball, stage / tarball.name)
    shutil.copy2(ROOT / "scripts/install.sh", stage / "install.sh")


def install(m: Machine, tarball_name: str, *options: str) -> str:
    """install.sh OPTIONS TARBALL in the machine; its output."""
    result = m.run(
        ["bash", "/mnt/release/install.sh", *options, f"/mnt/release/{tarball_name}"], timeout=600
    )
    print(indent(result.stdout + result.stderr), file=sys.stderr, flush=True)
    return result.stdout


def read_token(m: Machine) -> str:
    text = m.run(["cat", "/etc/scaleboxd/config"]).stdout
    values = parse_lines(text, "/etc/scaleboxd/config (in the machine)")
    if "API_TOKEN" not in values or not values["API_TOKEN"][0]:
        raise CheckFailed(
            "install.sh wrote /etc/scaleboxd/config without an API_TOKEN",
            "install.sh must generate a token on a fresh install",
        )
    return values["API_TOKEN"][0]


def api_suite(m: Machine, token: str) -> str:
    env = {**os.environ, "SCALEBOX_URL": m.url(API_PORT), "SCALEBOX_TOKEN": token}
    result = subprocess.run(
        [str(ROOT / ".venv/bin/pytest"), "tests/api", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    print(indent(result.stdout, 40), file=sys.stderr, flush=True)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0:
        raise CheckFailed(
            f"the API suite failed against {m.ip} (pytest exit {result.returncode}): {last}",
            "the output is above; rerun with --keep-vm to reproduce against the same server",
        )
    return last.strip("= ")


def ssh_public_key() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode() + " scalebox-check"


def main_pid(m: Machine, unit: str) -> int:
    return int(m.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).stdout.strip())


def guest_answer(m: Machine, port: int, timeout: float = 30) -> dict[str, object]:
    """The one JSON line a VM's guest sends on each connection to its ssh_port."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        address = m.address()  # the route guard, before every connection
        try:
            with socket.create_connection((address, port), timeout=5) as conn:
                data = conn.makefile("rb").readline()
            answer = json.loads(data)
            if isinstance(answer, dict):
                return answer
        except (OSError, ValueError) as exc:
            last_error = exc
        time.sleep(0.2)
    raise CheckFailed(
        f"the guest on {m.ip}:{port} did not answer with a JSON line within {timeout:.0f} s"
        f" (last error: {last_error})",
        "see `journalctl -u 'scalebox-vm@*'` in the machine (--keep-vm)",
    )


def is_bookkeeping(path: str) -> bool:
    parts = path.split("/")
    return path == "state.json" or (len(parts) == 3 and parts[0] == "vms" and parts[2] == "vm.json")


def data_changes(before: Files, after: Files, *, new_files_allowed: bool) -> list[str]:
    """What happened to the user data between two listings, one line per file; [] = untouched."""
    changes = []
    for path in sorted(set(before) | set(after)):
        if is_bookkeeping(path):
            continue
        if path not in after:
            changes.append(f"removed: {path}")
        elif path not in before:
            if not new_files_allowed:
                changes.append(f"added: {path}")
        elif before[path] != after[path]:
            changes.append(f"changed: {path} ({before[path]} -> {after[path]})")
    return changes


def expected_config(
    before: str,
    from_version: str,
    to_version: str,
    declared: Sequence[Migration] = MIGRATIONS,
) -> str:
    """The config the update must leave: the old one, changed only by declared migrations.

    This build's migrations that are pending from ``from_version`` to
    ``to_version`` are applied to a copy of the old text, so the check proves
    the update made exactly those edits (with none pending: the old text, byte
    for byte).
    """
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config"
        config.write_text(before)
        run_migrations(
            declared,
            config_path=config,
            from_version=from_version,
            to_version=to_version,
            state_path=Path(tmp) / "state.json",
        )
        return config.read_text()


@dataclass(frozen=True)
class Snapshot:
    config_text: str
    config_meta: str  # mode uid gid
    data: dict[str, str]


_LIST_DATA = """
import hashlib, json, os, stat, sys
root = sys.argv[1]
skip_guest_disks = sys.argv[2:] == ["--skip-guest-disks"]
out = {}
for base, dirs, files in os.walk(root):
    rel = os.path.relpath(base, root).split(os.sep)
    if skip_guest_disks and len(rel) == 2 and rel[0] == "vms":
        # disk (the overlay), disk.img and fs (its image, mounted): the guest's own.
        dirs[:] = [d for d in dirs if not d.startswith("disk") and d != "fs"]
        files = [f for f in files if not f.startswith("disk")]
    for name in files:
        path = os.path.join(base, name)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            out[os.path.relpath(path, root)] = "link " + os.readlink(path)
            continue
        mode = oct(st.st_mode & 0o7777)
        if not stat.S_ISREG(st.st_mode):  # a device or fifo: reading it could block
            out[os.path.relpath(path, root)] = mode + " special " + oct(stat.S_IFMT(st.st_mode))
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[os.path.relpath(path, root)] = mode + " " + digest.hexdigest()
print(json.dumps(out))
"""


def snapshot(m: Machine, *, skip_guest_disks: bool = False) -> Snapshot:
    """The config and every file under DATA_DIR; ``skip_guest_disks``: not the VMs' disks.

    A real container writes to its own disk as it runs (its journal), so on
    the nspawn backend the VMs' disks (vms/<id>/disk*, vms/<id>/fs) are left out; the VM's
    life is proved by its unit's main PID and ssh instead.
    """
    config_text = m.run(["cat", CONFIG]).stdout
    values = parse_lines(config_text, f"{CONFIG} (in the machine)")
    data_dir = values.get("DATA_DIR", ("/var/lib/scalebox", ""))[0]
    skip = ["--skip-guest-disks"] if skip_guest_disks else []
    listing = m.run(["python3", "-c", _LIST_DATA, data_dir, *skip], timeout=300).stdout
    return Snapshot(
        config_text=config_text,
        config_meta=m.run(["stat", "-c", "%a %u %g", CONFIG]).stdout.strip(),
        data=json.loads(listing),
    )


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class RunningVM:
    id: str
    port: int
    unit: str
    main_pid: int


def create_vm(m: Machine, token: str) -> RunningVM:
    response = httpx.post(
        m.url(API_PORT, "/vms"),
        headers={"Authorization": f"Bearer {token}"},
        json={"template": CHECK_TEMPLATE, "ssh_public_key": ssh_public_key()},
        timeout=60,
    )
    if response.status_code != 201:
        raise CheckFailed(
            f"POST /vms on the last release answered {response.status_code}: "
            + response.text[:300],
            f"the last release must create a VM from {CHECK_TEMPLATE}",
        )
    vm_id, port = response.json()["id"], int(response.json()["ssh_port"])
    answer = guest_answer(m, port)
    if answer.get("vm") != vm_id:
        raise CheckFailed(f"the guest on port {port} says it is {answer!r}, not VM {vm_id}")
    unit = f"scalebox-vm@{vm_id}.service"
    pid = main_pid(m, unit)
    if pid == 0:
        raise CheckFailed(f"{unit} has no main process", "VMs must run in their own unit")
    return RunningVM(vm_id, port, unit, pid)


def compare_config(before: Snapshot, after: Snapshot, previous: str, current: str) -> str:
    want = expected_config(before.config_text, previous, current)
    if after.config_text != want or after.config_meta != before.config_meta:
        raise CheckFailed(
            f"{CONFIG} changed across the update: sha256 {sha(before.config_text)[:16]}"
            f" ({before.config_meta}) -> {sha(after.config_text)[:16]} ({after.config_meta}),"
            f" expected {sha(want)[:16]}",
            "the updater must never rewrite the config; a release that must change it "
            "declares a migration (expected_config in tools/checks.py applies it)",
        )
    return f"config sha256 {sha(after.config_text)[:16]} ({after.config_meta})"


def compare_data(before: Snapshot, after: Snapshot, *, new_files_allowed: bool) -> str:
    changes = data_changes(before.data, after.data, new_files_allowed=new_files_allowed)
    if changes:
        raise CheckFailed(
            f"DATA_DIR changed across the update ({len(changes)} files):\n"
            + indent("\n".join(changes)),
            "an update must not touch VM disks or templates (docs/compatibility.md)",
        )
    kept = sum(1 for p in before.data if not is_bookkeeping(p))
    return f"{kept} data files byte-identical"


def vm_still_running(m: Machine, token: str, vm: RunningVM) -> str:
    pid = main_pid(m, vm.unit)
    if pid != vm.main_pid:
        raise CheckFailed(
            f"{vm.unit} main PID {vm.main_pid} -> {pid}: the VM was restarted or stopped",
            "an update must leave running VMs alone (docs/compatibility.md)",
        )
    answer = guest_answer(m, vm.port)
    if answer.get("vm") != vm.id:
        raise CheckFailed(f"the guest on port {vm.port} now says {answer!r}, not {vm.id}")
    got = httpx.get(
        m.url(API_PORT, f"/vms/{vm.id}"), headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    if got.status_code != 200 or got.json().get("status") != "running":
        raise CheckFailed(
            f"GET /vms/{vm.id} answered {got.status_code}: {got.text[:300]}",
            "the new scaleboxd must adopt the VMs the old one started",
        )
    return f"VM {vm.id}: main PID {pid} unchanged, guest answers, API says running"


def run_updater(
    m: Machine, *args: str, env: Mapping[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    """Run the installed scalebox-update --json in the machine; its exit code and JSON result."""
    assignments = [f"{k}={v}" for k, v in (env or {}).items()]
    result = m.run(
        ["env", *assignments, "scalebox-update", "--json", *args], check=False, timeout=900
    )
    print(indent(result.stderr), file=sys.stderr, flush=True)
    lines = result.stdout.strip().splitlines()
    try:
        outcome = json.loads(lines[-1]) if lines else {}
    except ValueError:
        outcome = {"message": result.stdout.strip()[-300:]}
    return result.returncode, outcome if isinstance(outcome, dict) else {}


def serving_version(m: Machine) -> str:
    """The version /health reports and the one /etc/scaleboxd/version records, if they agree."""
    health = httpx.get(m.url(API_PORT, "/health"), timeout=10).json()
    installed = m.run(["cat", "/etc/scaleboxd/version"]).stdout.strip()
    if health.get("version") != installed:
        raise CheckFailed(
            f"/health says {health.get('version')!r} but /etc/scaleboxd/version says {installed!r}",
            "the updater must record the version it really runs",
        )
    return installed


def tar_member(tarball: Path, relpath: str) -> bytes:
    """One file of a release tarball, by its path under the top directory (read, not extracted)."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                _top, _, rest = member.name.partition("/")
                if rest == relpath and member.isfile():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        return handle.read()
    except (OSError, tarfile.TarError) as exc:
        raise CheckFailed(
            f"cannot read {tarball}: {exc}", "give a scalebox-<version>-<arch>.tar.gz"
        ) from None
    raise CheckFailed(
        f"{tarball.name} has no {relpath}",
        "the last release must be a complete tarball made by ./do tarball",
    )


def release_version(tarball: Path) -> str:
    try:
        version = json.loads(tar_member(tarball, "RELEASE.json"))["version"]
    except (ValueError, KeyError, TypeError):
        version = None
    if not isinstance(version, str):
        raise CheckFailed(f"{tarball.name}'s RELEASE.json names no version", "rebuild it")
    return version
