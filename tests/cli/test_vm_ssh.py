"""`scalebox vm ssh` against a real scaleboxd on a loopback port.

The process backend (what these tests run) has no sshd in its VMs, so the
real OpenSSH client cannot log in here: a stand-in `ssh`, first on PATH,
records the argv it was exec'd with and exits with a chosen code. That is a
test double, and the only one: the lookup, the HTTP and the exec are real.
Logging in with the real ssh into a real VM is in tests/system/test_sandbox_snapshot.py.
"""

# The fixtures (run, home, vm) come from test_e2e: pytest finds them by name.
# ruff: noqa: F811

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from tests.cli.test_e2e import Run, home, one_error_line, run, unique, vm  # noqa: F401

STAND_IN = """#!/bin/sh
# Stand-in for ssh: record the arguments (one per line as JSON) and stdin, exit 7.
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" > "{log}"
cat > "{log}.stdin"
exit 7
"""


def stand_in_ssh(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "ssh-argv.json"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(STAND_IN.format(log=log))
    ssh.chmod(0o755)
    return bin_dir, log


def test_vm_ssh_execs_ssh_with_port_user_host_and_command(
    run: Run, vm: dict[str, Any], tmp_path: Path
) -> None:
    bin_dir, log = stand_in_ssh(tmp_path)
    path = f"{bin_dir}:/usr/bin:/bin"
    done = run("vm", "ssh", vm["name"], "--", "echo", "two words", "-v", stdin="in\n", PATH=path)
    # exec: the exit code and stdin are ssh's own.
    assert done.returncode == 7, done.stderr
    assert json.loads(log.read_text()) == [
        "-p", str(vm["ssh_port"]), "--", f"user@{vm['ip']}", "echo", "two words", "-v",
    ]  # fmt: skip
    assert Path(f"{log}.stdin").read_text() == "in\n"
    # Options for ssh come before the destination; no command means a login shell.
    done = run("vm", "ssh", "-i", "/k/id", "-o", "BatchMode=yes", vm["id"], PATH=path)
    assert done.returncode == 7, done.stderr
    assert json.loads(log.read_text()) == [
        "-p", str(vm["ssh_port"]), "-i", "/k/id", "-o", "BatchMode=yes", "--",
        f"user@{vm['ip']}",
    ]  # fmt: skip


def test_vm_ssh_print_shows_the_command_line_without_running_it(
    run: Run, vm: dict[str, Any], tmp_path: Path
) -> None:
    bin_dir, log = stand_in_ssh(tmp_path)
    done = run("vm", "ssh", "--print", vm["name"], "--", "ls", "-la", PATH=f"{bin_dir}:/usr/bin")
    assert done.returncode == 0, done.stderr
    assert shlex.split(done.stdout) == [
        "ssh", "-p", str(vm["ssh_port"]), "--", f"user@{vm['ip']}", "ls", "-la",
    ]  # fmt: skip
    assert not log.exists()


def test_vm_ssh_without_ssh_installed_says_so(run: Run, vm: dict[str, Any], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run("vm", "ssh", vm["name"], "--", "true", PATH=str(empty))
    assert done.returncode == 2
    assert one_error_line(done).startswith("ssh is not installed (no ssh on PATH)")


def test_vm_ssh_to_an_unknown_vm_is_not_found(run: Run, tmp_path: Path) -> None:
    bin_dir, log = stand_in_ssh(tmp_path)
    name = unique("nope")
    done = run("vm", "ssh", name, PATH=f"{bin_dir}:/usr/bin")
    assert done.returncode == 5
    assert f"VM '{name}' not found" in one_error_line(done)
    assert not log.exists()
