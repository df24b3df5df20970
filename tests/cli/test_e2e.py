"""The real `scalebox` program against a real scaleboxd on a loopback port.

Each command runs as its own process (the installed entry point), over real
HTTP; output is checked as text (stdout is a pipe, so plain columns) and as
--json, together with the exit codes documented in `scalebox --help`.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import socket
import stat
import struct
import subprocess
import sys
import termios
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from scalebox.cli.main import cli
from tests.conftest import Scaleboxd

SCALEBOX = Path(sys.executable).parent / "scalebox"
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvG0Y2Kt0eQ4vJ0p8uJ5b5h2nAq9F0dQ0y9xkqk7x9Z t@e"


@dataclass
class Run:
    """`scalebox ...` as a subprocess, seeing only ``home`` and the given environment."""

    home: Path
    env: dict[str, str]

    def __call__(
        self, *args: str, stdin: str = "", **extra: str
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "XDG_"))}
        env.update({"HOME": str(self.home), **self.env, **extra})
        return subprocess.run(
            [str(SCALEBOX), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    def json(self, *args: str) -> Any:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("scalebox: error: "), done.stderr
    return lines[0].removeprefix("scalebox: error: ")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def guest_answer(run: Run, port: int) -> dict[str, Any]:
    """What the VM's guest says on its ssh port (the process backend's greeting)."""
    host = urlsplit(run.env["SCALEBOX_URL"]).hostname or "127.0.0.1"
    with socket.create_connection((host, port), timeout=10) as conn:
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    return dict(json.loads(data))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    (path / ".ssh").mkdir(parents=True)
    (path / ".ssh" / "id_ed25519.pub").write_text(PUBLIC_KEY + "\n")
    return path


@pytest.fixture
def run(scaleboxd: Scaleboxd, home: Path) -> Run:
    return Run(home, {"SCALEBOX_URL": scaleboxd.url, "SCALEBOX_TOKEN": scaleboxd.token})


@pytest.fixture
def vm(run: Run) -> Iterator[dict[str, Any]]:
    """A VM made by `scalebox vm create`, deleted afterwards if the test did not."""
    created = run.json("vm", "create", "--name", unique("cli"))
    yield created
    run("vm", "delete", created["id"])


# -- status and templates ----------------------------------------------------


def test_status_shows_health_and_info(run: Run, scaleboxd: Scaleboxd) -> None:
    with scaleboxd.client() as http:
        version = http.get("/health").json()["version"]
    done = run("status")
    assert done.returncode == 0, done.stderr
    assert re.search(rf"^server\s+{re.escape(scaleboxd.url)}$", done.stdout, re.M)
    assert re.search(r"^status\s+ok$", done.stdout, re.M)
    assert re.search(rf"^version\s+{re.escape(version)}$", done.stdout, re.M)
    assert re.search(r"^storage\s+[\d.]+ GB free of [\d.]+ GB$", done.stdout, re.M)


def test_status_json_is_the_apis_json(run: Run) -> None:
    answer = run.json("status")
    assert answer["health"]["status"] == "ok"
    assert {"host_ip", "vms_count", "templates_count", "storage", "memory"} <= set(answer["info"])


def test_status_needs_no_token(run: Run) -> None:
    done = run("status", SCALEBOX_TOKEN="")
    assert done.returncode == 0, done.stderr


def test_template_list_shows_debian_base(run: Run) -> None:
    done = run("template", "list")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "CREATED"]
    assert any(row.split()[0] == "debian-base" for row in rows)
    names = [t["name"] for t in run.json("template", "list")["templates"]]
    assert "debian-base" in names


# -- the life of a VM --------------------------------------------------------


def test_vm_create_list_get_snapshot_delete(run: Run, home: Path) -> None:
    name = unique("life")
    done = run("vm", "create", "--name", name, "--vcpu", "1", "--mem", "256", "--disk", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Created VM {name} (vm-")
    vm_id = re.search(r"\((vm-[0-9a-f]{12})\)", done.stdout)
    assert vm_id is not None
    vm_id_text = vm_id.group(1)
    try:
        # The VM is real: its guest answers on the ssh port the CLI printed.
        port = int(re.search(r"^ssh port\s+(\d+)$", done.stdout, re.M).group(1))  # type: ignore[union-attr]
        assert guest_answer(run, port)["vm"] == vm_id_text
        assert f"ssh -p {port} " in done.stdout

        listed = run("vm", "list")
        assert listed.returncode == 0
        header, *rows = listed.stdout.splitlines()
        assert header.split() == ["ID", "NAME", "TEMPLATE", "STATUS", "SSH", "CREATED"]
        row = next(r for r in rows if r.startswith(vm_id_text))
        assert row.split()[1:4] == [name, "debian-base", "running"]
        assert vm_id_text in [v["id"] for v in run.json("vm", "list")["vms"]]

        got = run("vm", "get", name)
        assert got.returncode == 0
        assert re.search(rf"^id\s+{vm_id_text}$", got.stdout, re.M)
        by_id = run.json("vm", "get", vm_id_text)
        assert (by_id["name"], by_id["ssh_port"], by_id["status"]) == (name, port, "running")

        snap = unique("snap")
        saved = run("vm", "snapshot", name, snap)
        assert saved.returncode == 0, saved.stderr
        assert saved.stdout.startswith(f"Saved VM {name} as template {snap} (")
        assert snap in [t["name"] for t in run.json("template", "list")["templates"]]

        # A second snapshot with the same name is the server's 409, shown as is.
        again = run("vm", "snapshot", name, snap)
        assert again.returncode == 1
        assert "(HTTP 409)" in one_error_line(again)

        deleted = run("template", "delete", snap)
        assert (deleted.returncode, deleted.stdout) == (0, f"Deleted template {snap}.\n")
        assert snap not in [t["name"] for t in run.json("template", "list")["templates"]]
    finally:
        gone = run("vm", "delete", vm_id_text)
    assert (gone.returncode, gone.stdout) == (0, f"Deleted VM {vm_id_text}.\n")
    after = run("vm", "get", vm_id_text)
    assert after.returncode == 5
    assert vm_id_text not in [v["id"] for v in run.json("vm", "list")["vms"]]


def test_vm_create_json_and_explicit_key_file(run: Run, home: Path) -> None:
    key = home / "other.pub"
    key.write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ other@host\n")
    done = run("vm", "create", "--ssh-key", str(key), "--json")
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    try:
        assert re.fullmatch(r"vm-[0-9a-f]{12}", created["id"])
        assert created["template"] == "debian-base"
        assert created["ssh"].startswith(f"ssh -p {created['ssh_port']} ")
    finally:
        gone = run("vm", "delete", created["id"], "--json")
    assert gone.returncode == 0, gone.stderr
    # The API answers 204 without a body; --json still says what happened.
    assert json.loads(gone.stdout) == {
        "deleted": created["id"],
        "message": f"Deleted VM {created['id']}",
    }


def saved_key(scaleboxd: Scaleboxd, vm_id: str) -> str:
    """The key the daemon stored for the VM (the API does not show it)."""
    if scaleboxd.data_dir is None:
        pytest.skip("needs the local daemon's data dir")
    record = json.loads((scaleboxd.data_dir / "vms" / vm_id / "vm.json").read_text())
    return str(record["ssh_public_key"])


def test_upstreams_short_options_create_with_key_text_and_snapshot_with_n(
    run: Run, scaleboxd: Scaleboxd
) -> None:
    """`vm create -t T -n N -m M -d D -k KEY` and `vm snapshot ID -n NAME`, as upstream teaches."""
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIShortOptionKeyText short@opt"
    name = unique("short")
    done = run("vm", "create", "-t", "debian-base", "-n", name, "-m", "256", "-d", "1", "-k", key)
    assert done.returncode == 0, done.stderr
    vm_id = re.search(r"\((vm-[0-9a-f]{12})\)", done.stdout).group(1)  # type: ignore[union-attr]
    snap = unique("shortsnap")
    try:
        assert done.stdout.startswith(f"Created VM {name} (vm-")
        assert saved_key(scaleboxd, vm_id) == key
        saved = run("vm", "snapshot", vm_id, "-n", snap, "--json")
        assert saved.returncode == 0, saved.stderr
        assert json.loads(saved.stdout)["template"] == snap
        assert json.loads(saved.stdout)["source_vm"] == vm_id
        gone = run("template", "delete", snap, "--json")
        assert json.loads(gone.stdout) == {"deleted": snap, "message": f"Deleted template {snap}"}
    finally:
        run("template", "delete", snap)
        assert run("vm", "delete", vm_id).returncode == 0


def test_key_at_file_reads_the_key_from_the_file(
    run: Run, scaleboxd: Scaleboxd, home: Path
) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyFromAtFile at@file"
    (home / "from-file.pub").write_text(key + "\n")
    created = run.json("vm", "create", "-k", f"@{home / 'from-file.pub'}")
    try:
        assert saved_key(scaleboxd, created["id"]) == key
    finally:
        assert run("vm", "delete", created["id"]).returncode == 0


def test_vm_from_a_snapshot_answers_like_its_source(run: Run, vm: dict[str, Any]) -> None:
    snap = unique("copy")
    assert run("vm", "snapshot", vm["id"], snap).returncode == 0
    try:
        child = run.json("vm", "create", "--template", snap)
        try:
            assert child["template"] == snap
            source, copy = (
                guest_answer(run, vm["ssh_port"]),
                guest_answer(run, child["ssh_port"]),
            )
            assert copy["vm"] == child["id"]
            assert copy["file"] == source["file"]
        finally:
            assert run("vm", "delete", child["id"]).returncode == 0
    finally:
        assert run("template", "delete", snap).returncode == 0


# -- errors --------------------------------------------------------------------


def test_wrong_token_is_exit_4_with_one_line(run: Run) -> None:
    done = run("vm", "list", SCALEBOX_TOKEN="sb-" + "0" * 48)
    assert done.returncode == 4
    assert done.stdout == ""
    assert one_error_line(done) == (
        "the server refused the token from environment variable SCALEBOX_TOKEN; "
        "run `scalebox login` to store a valid one"
    )


def test_unknown_vm_is_exit_5_with_one_line(run: Run) -> None:
    for command in ("get", "delete"):
        done = run("vm", command, "no-such-vm")
        assert done.returncode == 5
        assert one_error_line(done) == "VM 'no-such-vm' not found; `scalebox vm list` shows the VMs"
    done = run("vm", "snapshot", "no-such-vm", unique("t"))
    assert done.returncode == 5


def test_unknown_template_is_exit_5(run: Run) -> None:
    created = run("vm", "create", "--template", "no-such-template")
    assert created.returncode == 5
    assert one_error_line(created).startswith("template 'no-such-template' not found; ")
    deleted = run("template", "delete", "no-such-template")
    assert deleted.returncode == 5


def test_protected_template_shows_the_servers_error(run: Run) -> None:
    done = run("template", "delete", "debian-base")
    assert done.returncode == 1
    assert one_error_line(done).endswith(
        "(HTTP 403); new VMs are made from it; delete only templates you made"
    )
    assert "debian-base" in [t["name"] for t in run.json("template", "list")["templates"]]


def test_disk_too_large_shows_the_servers_error_and_creates_nothing(run: Run) -> None:
    before = run.json("vm", "list")["vms"]
    done = run("vm", "create", "--disk", "100000")
    assert done.returncode == 1
    assert "(HTTP 400)" in one_error_line(done)
    assert "--disk" in done.stderr  # the hint maps the API field to the option
    assert run.json("vm", "list")["vms"] == before


# -- login -------------------------------------------------------------------------


def test_login_checks_and_saves_then_commands_use_the_file(
    scaleboxd: Scaleboxd, home: Path
) -> None:
    bare = Run(home, {})
    done = bare("login", "--url", scaleboxd.url, "--token", scaleboxd.token)
    assert done.returncode == 0, done.stderr
    path = home / ".config" / "scalebox" / "config"
    assert done.stdout.startswith(f"Logged in to {scaleboxd.url} (")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"SCALEBOX_TOKEN={scaleboxd.token}" in path.read_text()
    listed = bare("vm", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "vms" in json.loads(listed.stdout)


def test_login_as_upstream_teaches_with_host_and_token_stdin(
    scaleboxd: Scaleboxd, home: Path
) -> None:
    done = Run(home, {})(
        "login", "--host", scaleboxd.url, "--token-stdin", stdin=scaleboxd.token + "\n"
    )
    assert done.returncode == 0, done.stderr
    saved = (home / ".config" / "scalebox" / "config").read_text()
    assert f"SCALEBOX_URL={scaleboxd.url}\n" in saved
    assert f"SCALEBOX_TOKEN={scaleboxd.token}\n" in saved


def test_login_token_stdin_that_is_empty_saves_nothing(scaleboxd: Scaleboxd, home: Path) -> None:
    done = Run(home, {})("login", "--host", scaleboxd.url, "--token-stdin", stdin="")
    assert done.returncode == 2
    assert one_error_line(done).startswith("--token-stdin read no token")
    assert not (home / ".config" / "scalebox" / "config").exists()


def test_login_with_a_wrong_token_saves_nothing(scaleboxd: Scaleboxd, home: Path) -> None:
    done = Run(home, {})("login", "--url", scaleboxd.url, "--token", "sb-" + "1" * 48)
    assert done.returncode == 4
    assert one_error_line(done).startswith("the server refused the token")
    assert not (home / ".config" / "scalebox" / "config").exists()


def test_login_prompts_with_hidden_token(scaleboxd: Scaleboxd, home: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["login"],
        input=f"{scaleboxd.url}\n{scaleboxd.token}\n",
        env={
            "HOME": str(home),
            "XDG_CONFIG_HOME": None,
            "SCALEBOX_URL": None,
            "SCALEBOX_TOKEN": None,
        },
    )
    assert result.exit_code == 0, result.output
    assert "Server URL" in result.output
    assert scaleboxd.token not in result.output  # the token is not echoed
    saved = (home / ".config" / "scalebox" / "config").read_text()
    assert f"SCALEBOX_URL={scaleboxd.url}\n" in saved


# -- a real terminal -------------------------------------------------------------------


def test_table_on_a_terminal_keeps_every_character(run: Run, vm: dict[str, Any]) -> None:
    """On a narrow pty rich folds long cells; nothing is cut off with an ellipsis."""
    leader, follower = pty.openpty()
    # A 60-column terminal, as a person with a narrow window would have.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    # COLUMNS and LINES go too: they outrank the terminal's own size, and pytest-xdist's
    # workers have them set (80x24).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SCALEBOX_", "XDG_")) and k not in ("COLUMNS", "LINES")
    }
    env.update({"HOME": str(run.home), "TERM": "xterm", **run.env})
    try:
        done = subprocess.run(
            [str(SCALEBOX), "vm", "list"],
            # stdin too, as in a person's shell: rich asks stdin for the size first, so an
            # inherited terminal (of another width) would decide it.
            stdin=follower,
            stdout=follower,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
            check=False,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert done.returncode == 0, done.stderr
    screen = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())
    assert "…" not in screen, screen
    assert max(len(line) for line in screen.splitlines()) <= 60, screen
    cells = read_folded_row(screen, vm["id"])
    assert cells[:4] == [vm["id"], vm["name"], "debian-base", "running"]
    assert cells[4] == vm["ssh"].replace(" ", "")


def read_folded_row(screen: str, first_cell: str) -> list[str]:
    """Join the folded pieces of one table row, column by column (spaces dropped)."""
    header, *lines = screen.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    row = next(i for i, line in enumerate(lines) if line.startswith(first_cell + " "))
    block = [lines[row]]
    for line in lines[row + 1 :]:
        if line[: starts[1]].strip():  # the next row begins
            break
        block.append(line)
    return ["".join(line[a:b].strip() for line in block).replace(" ", "") for a, b in bounds]
