"""scalebox-update on a real systemd server (an nspawn machine).

Releases are real signed tarballs made by `./do tarball` (A, B, and a B that
crashes at start, built from a modified copy of the sources). Every test ends
with what the issue asks: the expected version healthy, /etc/scaleboxd/config
byte-identical, DATA_DIR unchanged, and a running VM's unit with the same
main PID.
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
from tools.releases import ARCH, BROKEN, CRASH, DIES, HANG, REJECTS, ROOT, WRONG, A, B
from tools.releases import broken_copy as _broken_copy
from tools.releases import build_tarball as _tarball

from .conftest import BootMachine

SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvY6iHp0l8tMIW2RwA5d6kXyP1u7oSxDpvq2EN0lJ8k test"


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with install.sh and the tarballs of A, B and the broken releases."""
    out = tmp_path_factory.mktemp("releases")
    key, _pub = keygen.keygen(tmp_path_factory.mktemp("keys"))
    _tarball(out, key, A)
    _tarball(out, key, B)
    broken = tmp_path_factory.mktemp("broken")
    for version in BROKEN:
        _tarball(out, key, version, _broken_copy(broken, version))
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


@pytest.mark.parametrize(
    ("version", "why"),
    [
        (CRASH, "restart scaleboxd.service failed"),
        (HANG, "restart scaleboxd.service"),
        (WRONG, "/health reports version '0.0.0+impostor'"),
        (DIES, "did not stay healthy"),
    ],
    ids=["crashes-at-start", "hangs", "wrong-version", "dies-after-3s"],
)
def test_failing_release_is_rolled_back(server: Server, version: str, why: str) -> None:
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(version)}")
    assert code == 3, err
    assert result["result"] == "rolled back"
    assert why in str(result["message"])
    assert f"Rolled back to {A}, which is healthy" in str(result["message"])
    server.assert_intact(A)
    assert server.sh("readlink /opt/scalebox/current").stdout.strip() == f"releases/{A}"
    last = json.loads(server.sh("scalebox-update history --json").stdout.strip().splitlines()[-1])
    assert (last["to"], last["result"]) == (version, "rolled back")


def test_release_that_rejects_the_config_is_refused_before_any_change(server: Server) -> None:
    pid = _main_pid(server, "scaleboxd.service")
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(REJECTS)}")
    assert code == 1, err
    assert "NEW_REQUIRED_KEY is not set" in str(result["message"])
    assert _main_pid(server, "scaleboxd.service") == pid  # not even restarted
    server.assert_intact(A)
    assert server.sh(f"test -e /opt/scalebox/releases/{REJECTS}", check=False).returncode == 1


def test_downgrade_is_refused_unless_allowed(server: Server) -> None:
    code, _, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert code == 0, err
    code, result, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(A)}")
    assert code == 1
    assert f"older than the installed {B}" in str(result["message"])
    server.assert_intact(B)
    code, result, err = server.update("--allow-downgrade", env=f"SCALEBOX_RELEASE_URL={tarball(A)}")
    assert code == 0, err
    server.assert_intact(A)


def test_check_reports_an_available_update(server: Server) -> None:
    code, result, _ = server.update("--check", env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert (code, result["result"], result["installed"], result["target"]) == (
        10,
        "update available",
        A,
        B,
    )
    server.assert_intact(A)


KILL_AT = """
SCALEBOX_RELEASE_URL={url} scalebox-update >/tmp/update.log 2>&1 &
pid=$!
for _ in $(seq 1 3000); do
  grep -qs '"step": "{step}"' /var/lib/scalebox-update/journal.json && break
  sleep 0.01
done
kill -9 $pid
wait $pid
echo "exit $?"
"""


@pytest.mark.parametrize("step", ["stage", "switch", "verify"])
def test_updater_killed_mid_step_is_recovered_by_the_boot_unit(server: Server, step: str) -> None:
    killed = server.sh(KILL_AT.format(url=tarball(B), step=step))
    assert killed.stdout.strip() == "exit 137"  # SIGKILL
    journal = json.loads(server.sh("cat /var/lib/scalebox-update/journal.json").stdout)
    assert journal["step"] == step
    # What happens at the next boot: the recover unit finishes the transaction.
    server.sh("systemctl start scalebox-update-recover.service")
    server.assert_intact(A)
    assert server.sh("readlink /opt/scalebox/current").stdout.strip() == f"releases/{A}"
    code, result, err = server.update("recover")
    assert (code, result["result"]) == (0, "nothing to recover"), err
    # And the update itself works afterwards.
    code, _, err = server.update(env=f"SCALEBOX_RELEASE_URL={tarball(B)}")
    assert code == 0, err
    server.assert_intact(B)


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
