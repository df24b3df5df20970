"""scalebox-update on a real systemd server (an nspawn machine).

Releases are real signed tarballs made by `./do tarball` (A, B, and a B that
crashes at start, built from a modified copy of the sources). Every test ends
with what the issue asks: the expected version healthy, /etc/scaleboxd/config
byte-identical, DATA_DIR unchanged, and a running VM's unit with the same
main PID.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tools import keygen
from tools.machine import Machine

from .conftest import BootMachine

ROOT = Path(__file__).resolve().parents[2]
ARCH = platform.machine()
A, B, CRASH = "1.0.0", "1.1.0", "1.2.0"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvY6iHp0l8tMIW2RwA5d6kXyP1u7oSxDpvq2EN0lJ8k test"


def _tarball(out: Path, key: Path, version: str, src: Path = ROOT) -> None:
    done = subprocess.run(
        [
            str(ROOT / "do"),
            "tarball",
            "--version",
            version,
            "--key",
            str(key),
            "--out",
            str(out),
            "--src",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _crashing_copy(tmp: Path) -> Path:
    """The project's sources, changed so that scaleboxd exits at start (its config check passes)."""
    src = tmp / "crashing-src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "uv.lock"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("src", "units", "scripts"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    main = src / "src" / "scalebox" / "daemon" / "main.py"
    text = main.read_text()
    serving = "        return serve(load_config(args.config), args.bind)"
    assert serving in text, "daemon/main.py changed: update this test's crash point"
    main.write_text(text.replace(serving, "        raise SystemExit(70)  # a release that crashes"))
    return src


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with install.sh and the tarballs of A, B and a crashing release."""
    out = tmp_path_factory.mktemp("releases")
    key, _pub = keygen.keygen(tmp_path_factory.mktemp("keys"))
    _tarball(out, key, A)
    _tarball(out, key, B)
    _tarball(out, key, CRASH, _crashing_copy(tmp_path_factory.mktemp("crash")))
    shutil.copy2(ROOT / "scripts" / "install.sh", out / "install.sh")
    return out


def tarball(version: str) -> str:
    return f"/mnt/release/scalebox-{version}-{ARCH}.tar.gz"


@dataclass
class Server:
    machine: Machine
    token: str
    vm_unit: str
    vm_pid: str
    config: str
    data: str

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.machine.run(["bash", "-c", script], check=check, timeout=600)

    def update(self, *args: str, env: str = "") -> tuple[int, dict[str, object], str]:
        done = self.sh(f"{env} scalebox-update --json {' '.join(args)}", check=False)
        lines = done.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines else {}
        return done.returncode, result, done.stderr

    def health(self) -> str:
        return str(httpx.get(self.machine.url(8080, "/health"), timeout=5).json()["version"])

    def assert_intact(self, version: str) -> None:
        """The issue's end-of-test checks."""
        assert self.health() == version
        assert self.sh("cat /etc/scaleboxd/version").stdout.strip() == version
        assert self.sh("systemctl is-active scaleboxd").stdout.strip() == "active"
        assert _digest(self, "/etc/scaleboxd/config") == self.config
        assert _data_digest(self) == self.data
        assert _main_pid(self, self.vm_unit) == self.vm_pid
        assert self.sh("test -e /var/lib/scalebox-update/journal.json", check=False).returncode == 1


def _digest(s: Server, path: str) -> str:
    return s.sh(f"stat -c '%a %u %g' {path}; sha256sum {path}").stdout


def _data_digest(s: Server) -> str:
    # Every file's content and mode under DATA_DIR (the VM's disk, the templates, the state).
    return s.sh(
        "cd /var/lib/scalebox && find . -type f -printf '%p %m\\n' | sort && "
        "find . -type f -print0 | sort -z | xargs -0 sha256sum"
    ).stdout


def _main_pid(s: Server, unit: str) -> str:
    return s.sh(f"systemctl show {unit} -p MainPID --value").stdout.strip()


@pytest.fixture
def server(boot_machine: BootMachine, releases: Path) -> Iterator[Server]:
    """A machine with A installed by install.sh and one VM running."""
    m = boot_machine(releases)
    m.run(["bash", "/mnt/release/install.sh", tarball(A)], timeout=600)
    token = m.run(["sed", "-n", "s/^API_TOKEN=//p", "/etc/scaleboxd/config"]).stdout.strip()
    vm = httpx.post(
        m.url(8080, "/vms"),
        headers={"Authorization": f"Bearer {token}"},
        json={"template": "debian-base", "ssh_public_key": SSH_KEY},
        timeout=30,
    )
    assert vm.status_code == 201, vm.text
    unit = f"scalebox-vm@{vm.json()['id']}.service"
    s = Server(m, token, unit, "", "", "")
    s.vm_pid = _main_pid(s, unit)
    assert s.vm_pid not in ("", "0")
    s.config = _digest(s, "/etc/scaleboxd/config")
    s.data = _data_digest(s)
    yield s


def test_update_a_to_b_from_a_tarball_then_rollback_to_a(server: Server) -> None:
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert code == 0, err
    assert result["result"] == "updated"
    assert (result["installed"], result["target"]) == (A, B)
    server.assert_intact(B)
    assert server.sh("readlink /opt/scalebox/current").stdout.strip() == f"releases/{B}"

    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert (code, result["result"]) == (0, "up to date"), err

    code, result, err = server.update("--rollback")
    assert code == 0, err
    assert (result["installed"], result["target"]) == (B, A)
    server.assert_intact(A)
    history = server.sh("scalebox-update history --json").stdout.strip().splitlines()
    assert [(json.loads(h)["to"], json.loads(h)["result"]) for h in history] == [
        (B, "updated"),
        (A, "updated"),
    ]


def test_release_that_crashes_at_start_is_rolled_back(server: Server) -> None:
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(CRASH)}")
    assert code == 3, err
    assert result["result"] == "rolled back"
    assert f"Rolled back to {A}" in str(result["message"])
    server.assert_intact(A)
    assert server.sh("readlink /opt/scalebox/current").stdout.strip() == f"releases/{A}"
    last = json.loads(server.sh("scalebox-update history --json").stdout.strip().splitlines()[-1])
    assert (last["to"], last["result"]) == (CRASH, "rolled back")


def test_second_concurrent_run_is_refused_naming_the_first(server: Server) -> None:
    first = subprocess.Popen(
        [
            "nsenter",
            "-t",
            str(server.machine.init_pid),
            "-a",
            "--",
            "bash",
            "-c",
            f"SCALEBOX_RELEASE_URL={tarball(B)} scalebox-update",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        holder = ""
        for _ in range(100):
            holder = server.sh(
                "cat /var/lib/scalebox-update/lock 2>/dev/null", check=False
            ).stdout.strip()
            if holder:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert holder, "the first run never took the lock"
        code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
        assert code == 5
        assert f"PID {holder}" in err
        assert result["result"] == "busy"
    finally:
        assert first.wait(timeout=600) == 0
    server.assert_intact(B)
