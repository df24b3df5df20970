"""Migrations and system packages on a real systemd server (an nspawn machine).

Release A (1.0.0) is installed by install.sh, with one VM running. The other
releases are built by `./do tarball` from copies of the sources with one change:

- MIGRATES: a migration adds VM_PIDS_MAX=4096 (a real key, with its default);
- FAILS: a first migration adds a key, a second one raises;
- NEEDS_PACKAGE: pyproject.toml declares the Debian package `hello`, which the
  machine lacks and cannot fetch (it reaches no package mirror).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tools import keygen
from tools.machine import Machine
from tools.releases import ARCH, ROOT, build_tarball

from .conftest import BootMachine

A, MIGRATES, FAILS, NEEDS_PACKAGE = "1.0.0", "2.0.0", "2.1.0", "2.2.0"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvY6iHp0l8tMIW2RwA5d6kXyP1u7oSxDpvq2EN0lJ8k test"
STEPS = "src/scalebox/migrations/steps.py"

ADD_KEY = """

@migration("0001-add-pids-max", since="{since}", description="write VM_PIDS_MAX=4096")
def add_pids_max(config: ConfigFile) -> None:
    config.add("VM_PIDS_MAX", "4096", comment="Most processes in one VM (default: 4096).")
"""
FAILING = (
    ADD_KEY
    + """

@migration("0002-edit-caddyfile", since="{since}", description="edit the Caddyfile")
def edit_caddyfile(config: ConfigFile) -> None:
    with open("/etc/caddy/Caddyfile") as f:
        f.read()
"""
)
ADDED = b"\n# Most processes in one VM (default: 4096).\nVM_PIDS_MAX=4096\n"
DEBIAN_PACKAGES = 'debian-packages = ["python3", "python3-venv", "systemd"]'


def _changed_copy(tmp: Path, version: str, changes: dict[str, tuple[str, str]]) -> Path:
    """The project's sources with each file's text replaced (old must be there)."""
    src = tmp / f"src-{version}"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "uv.lock"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("src", "units", "scripts"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for relpath, (old, new) in changes.items():
        text = (src / relpath).read_text()
        assert old in text, f"{relpath} no longer contains {old!r}: update this test"
        (src / relpath).write_text(text.replace(old, new, 1))
    return src


def _append_steps(version: str, code: str) -> dict[str, tuple[str, str]]:
    """After this build's own migrations, as a later release appends its own."""
    text = (ROOT / STEPS).read_text()
    return {STEPS: (text, text + code.format(since=version))}


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("releases")
    key, _pub = keygen.keygen(tmp_path_factory.mktemp("keys"))
    tmp = tmp_path_factory.mktemp("sources")
    build_tarball(out, key, A)
    build_tarball(
        out, key, MIGRATES, _changed_copy(tmp, MIGRATES, _append_steps(MIGRATES, ADD_KEY))
    )
    build_tarball(out, key, FAILS, _changed_copy(tmp, FAILS, _append_steps(FAILS, FAILING)))
    needs = {
        "pyproject.toml": (
            DEBIAN_PACKAGES,
            'debian-packages = ["python3", "python3-venv", "systemd", "hello"]',
        )
    }
    build_tarball(out, key, NEEDS_PACKAGE, _changed_copy(tmp, NEEDS_PACKAGE, needs))
    shutil.copy2(ROOT / "scripts" / "install.sh", out / "install.sh")
    return out


def tarball(version: str) -> str:
    return f"/mnt/release/scalebox-{version}-{ARCH}.tar.gz"


@dataclass
class Server:
    machine: Machine
    vm_unit: str
    vm_pid: str

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.machine.run(["bash", "-c", script], check=check, timeout=600)

    def update(self, *args: str, env: str = "") -> tuple[int, dict[str, object], str]:
        done = self.sh(f"{env} scalebox-update --json {' '.join(args)}", check=False)
        lines = done.stdout.strip().splitlines()
        return done.returncode, json.loads(lines[-1]) if lines else {}, done.stderr

    def health(self) -> str:
        return str(httpx.get(self.machine.url(8080, "/health"), timeout=5).json()["version"])

    def config(self) -> bytes:
        return self.machine.run(["cat", "/etc/scaleboxd/config"]).stdout.encode()

    def config_stat(self) -> str:
        return self.sh("stat -c '%a %u %g' /etc/scaleboxd/config").stdout.strip()

    def main_pid(self, unit: str) -> str:
        return self.sh(f"systemctl show {unit} -p MainPID --value").stdout.strip()

    def current(self) -> str:
        return self.sh("readlink /opt/scalebox/current").stdout.strip()

    def last_history(self) -> dict[str, object]:
        lines = self.sh("scalebox-update history --json").stdout.strip().splitlines()
        return dict(json.loads(lines[-1]))

    def assert_runs(self, version: str) -> None:
        assert self.health() == version
        assert self.sh("cat /etc/scaleboxd/version").stdout.strip() == version
        assert self.sh("systemctl is-active scaleboxd").stdout.strip() == "active"
        assert self.main_pid(self.vm_unit) == self.vm_pid  # the VM never stopped
        assert self.sh("test -e /var/lib/scalebox-update/journal.json", check=False).returncode == 1


@pytest.fixture
def server(boot_machine: BootMachine, releases: Path) -> Iterator[Server]:
    m = boot_machine(releases)
    m.run(["bash", "/mnt/release/install.sh", "--backend", "process", tarball(A)], timeout=600)
    token = m.run(["sed", "-n", "s/^API_TOKEN=//p", "/etc/scaleboxd/config"]).stdout.strip()
    vm = httpx.post(
        m.url(8080, "/vms"),
        headers={"Authorization": f"Bearer {token}"},
        json={"template": "debian-base", "ssh_public_key": SSH_KEY},
        timeout=30,
    )
    assert vm.status_code == 201, vm.text
    s = Server(m, f"scalebox-vm@{vm.json()['id']}.service", "")
    s.vm_pid = s.main_pid(s.vm_unit)
    assert s.vm_pid not in ("", "0")
    yield s


APT_LOG = "cat /var/log/apt/history.log 2>/dev/null || true"
DPKG = "dpkg-query -W -f '${Package} ${Version} ${db:Status-Abbrev}\\n'"


def test_migration_adds_a_key_and_rollback_restores_the_config(server: Server) -> None:
    config, stat = server.config(), server.config_stat()
    assert not any(line.startswith(b"VM_PIDS_MAX=") for line in config.splitlines())
    packages_before = server.sh(DPKG).stdout
    apt_log_before = server.sh(APT_LOG).stdout

    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(MIGRATES)}")
    assert code == 0, err
    assert result["migrations"] == ["0001-add-pids-max"]
    # every byte of the old config, then exactly the migration's key
    assert server.config() == config + ADDED
    assert server.config_stat() == stat
    server.assert_runs(MIGRATES)
    assert server.last_history()["migrations"] == ["0001-add-pids-max"]
    # the no-op packages path: all declared packages present, nothing installed
    assert "needs Debian packages python3, python3-venv, systemd: all installed" in err
    assert "installing" not in err
    assert server.sh(DPKG).stdout == packages_before
    assert server.sh(APT_LOG).stdout == apt_log_before

    code, result, err = server.update("--rollback")
    assert code == 0, err
    assert (result["installed"], result["target"]) == (MIGRATES, A)
    assert server.config() == config
    assert server.config_stat() == stat
    server.assert_runs(A)
    assert "restored the config from before 2.0.0's migrations" in err


def test_dry_run_names_the_pending_migrations_and_the_missing_packages(server: Server) -> None:
    config, pid = server.config(), server.main_pid("scaleboxd.service")
    listing = "ls /opt/scalebox/releases && readlink /opt/scalebox/current"
    before = server.sh(listing).stdout

    code, result, err = server.update("--dry-run", env=f"SCALEBOX_RELEASE_URL={tarball(MIGRATES)}")
    assert code == 0, err
    assert result["result"] == "dry run"
    assert result["pending_migrations"] == [
        {"id": "0001-add-pids-max", "since": MIGRATES, "description": "write VM_PIDS_MAX=4096"}
    ]
    assert result["missing_packages"] == []
    assert "  migrations to run: 0001-add-pids-max (write VM_PIDS_MAX=4096)" in str(
        result["message"]
    )

    code, result, err = server.update(
        "--dry-run", env=f"SCALEBOX_RELEASE_URL={tarball(NEEDS_PACKAGE)}"
    )
    assert code == 0, err
    assert result["pending_migrations"] == []
    assert result["missing_packages"] == ["hello"]
    assert "  Debian packages to install: hello" in str(result["message"])

    # The text form says the same.
    text = server.sh(
        f"SCALEBOX_RELEASE_URL={tarball(NEEDS_PACKAGE)} scalebox-update --dry-run 2>/dev/null"
    ).stdout
    assert "  migrations to run: none\n  Debian packages to install: hello\n" in text

    # Nothing changed: no package, no release directory, same process, same config.
    assert server.sh("dpkg-query -W hello", check=False).returncode != 0
    assert server.sh(listing).stdout == before
    assert server.main_pid("scaleboxd.service") == pid
    assert server.config() == config
    server.assert_runs(A)
    # (Also on this installed server: the docs the units' Documentation= names are there.)
    assert (
        server.sh("test -f /opt/scalebox/current/docs/operations.md", check=False).returncode == 0
    )


def test_failing_migration_rolls_everything_back(server: Server) -> None:
    config, stat = server.config(), server.config_stat()
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(FAILS)}")
    assert code == 3, err
    assert result["result"] == "rolled back"
    message = str(result["message"])
    assert "migration 0002-edit-caddyfile of 2.1.0 failed" in message
    assert "FileNotFoundError" in message
    assert "/etc/caddy/Caddyfile" in message
    assert f"Rolled back to {A}, which is healthy" in message
    assert "applied 0001-add-pids-max" in err  # the first one ran, and was undone
    assert server.config() == config
    assert server.config_stat() == stat
    assert server.current() == f"releases/{A}"
    server.assert_runs(A)
    last = server.last_history()
    assert (last["to"], last["result"]) == (FAILS, "rolled back")


def test_release_needing_an_uninstallable_package_is_refused(server: Server) -> None:
    config, pid = server.config(), server.main_pid("scaleboxd.service")
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(NEEDS_PACKAGE)}")
    assert code == 1, err
    assert result["result"] == "refused"
    message = str(result["message"])
    assert "release 2.2.0 needs the Debian packages hello" in message
    assert "installing them failed" in message
    assert "apt-get install hello" in str(result["hint"])
    assert server.sh("dpkg-query -W hello", check=False).returncode != 0
    assert server.main_pid("scaleboxd.service") == pid  # not even restarted
    assert server.current() == f"releases/{A}"
    assert server.sh(f"test -e /opt/scalebox/releases/{NEEDS_PACKAGE}", check=False).returncode == 1
    assert server.config() == config
    server.assert_runs(A)


STOP_AND_KILL = """
SCALEBOX_UPDATE_STOP_AT=migrate SCALEBOX_RELEASE_URL={url} scalebox-update >/tmp/u.log 2>&1 &
pid=$!
for _ in $(seq 1 3000); do
  [ "$(awk '{{print $3}}' /proc/$pid/stat 2>/dev/null)" = T ] && break
  sleep 0.02
done
kill -9 $pid
wait $pid
echo "exit $?"
"""


def test_updater_killed_at_migrate_is_undone_by_the_boot_unit(server: Server) -> None:
    config, stat = server.config(), server.config_stat()
    killed = server.sh(STOP_AND_KILL.format(url=tarball(MIGRATES)))
    assert killed.stdout.strip() == "exit 137"  # SIGKILL
    journal = json.loads(server.sh("cat /var/lib/scalebox-update/journal.json").stdout)
    assert journal["step"] == "migrate"
    server.sh("systemctl start scalebox-update-recover.service")
    assert server.config() == config
    assert server.config_stat() == stat
    assert server.current() == f"releases/{A}"
    server.assert_runs(A)
    # and the update itself works afterwards, migration included
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(MIGRATES)}")
    assert code == 0, err
    assert result["migrations"] == ["0001-add-pids-max"]
    assert server.config() == config + ADDED
    server.assert_runs(MIGRATES)
