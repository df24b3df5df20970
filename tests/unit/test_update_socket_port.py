"""scaleboxd.socket's port drop-in follows API_PORT: written, kept, removed, backed up, restored."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from scalebox.update import socket_port, switch
from scalebox.update.paths import Paths

ROOT = Path(__file__).resolve().parents[2]
TOKEN = f"API_TOKEN=sb-{'0' * 48}\n"


def _server(tmp_path: Path, config: str) -> Paths:
    p = Paths(tmp_path)
    p.config.parent.mkdir(parents=True)
    p.config.write_text(config)
    p.systemd_dir.mkdir(parents=True)
    units = p.release_dir("1.0.0") / "units"
    units.mkdir(parents=True)
    (units / "scaleboxd.socket").write_bytes((ROOT / "units/scaleboxd.socket").read_bytes())
    # The updater installs only the units the release's RELEASE.json lists.
    (units.parent / "RELEASE.json").write_text('{"units": ["scaleboxd.socket"]}')
    return p


def test_the_unit_listens_on_api_ports_default() -> None:
    """No drop-in for the default port is right only while the unit and the config agree."""
    text = (ROOT / "units/scaleboxd.socket").read_text()
    assert re.findall(r"^ListenStream=(.*)$", text, re.MULTILINE) == ["8080"]
    assert socket_port.configured_port("", "cfg") == 8080


def test_another_port_writes_a_drop_in_that_replaces_listen_stream(tmp_path: Path) -> None:
    p = _server(tmp_path, TOKEN + "API_PORT=8181\n")
    assert socket_port.apply(p) is True
    dropin = p.systemd_dir / "scaleboxd.socket.d/port.conf"
    lines = [line for line in dropin.read_text().splitlines() if not line.startswith("#")]
    assert lines == ["[Socket]", "ListenStream=", "ListenStream=8181"]
    assert stat.S_IMODE(dropin.stat().st_mode) == 0o644
    assert stat.S_IMODE(dropin.parent.stat().st_mode) == 0o755
    assert socket_port.apply(p) is False  # already true: nothing to do


def test_the_default_port_removes_the_drop_in(tmp_path: Path) -> None:
    p = _server(tmp_path, TOKEN + "API_PORT=8181\n")
    socket_port.apply(p)
    p.config.write_text(TOKEN)
    assert socket_port.apply(p) is True
    assert not (p.systemd_dir / "scaleboxd.socket.d/port.conf").exists()
    assert socket_port.apply(p) is False


@pytest.mark.parametrize("value", ["http", "0", "70000", ""])
def test_a_bad_port_is_refused_by_name(tmp_path: Path, value: str) -> None:
    p = _server(tmp_path, TOKEN + f"API_PORT={value}\n")
    code = socket_port.main(["--root", str(tmp_path)])
    assert code == 1
    assert not (p.systemd_dir / "scaleboxd.socket.d").exists()


def test_command_line_prints_the_port_and_whether_it_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _server(tmp_path, TOKEN + "API_PORT='9090'\n")
    assert socket_port.main(["--root", str(tmp_path)]) == 0
    assert socket_port.main(["--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["9090 changed", "9090 unchanged"]


def test_installing_units_writes_the_drop_in_and_counts_it_as_the_socket(tmp_path: Path) -> None:
    p = _server(tmp_path, TOKEN + "API_PORT=8181\n")
    (p.systemd_dir / "scaleboxd.socket").write_bytes((ROOT / "units/scaleboxd.socket").read_bytes())
    assert switch.install_units(p, p.release_dir("1.0.0")) == ["scaleboxd.socket"]
    assert "ListenStream=8181" in (p.systemd_dir / "scaleboxd.socket.d/port.conf").read_text()


def test_rollback_puts_the_drop_in_back_as_it_was(tmp_path: Path) -> None:
    """Absent before the update: removed again (and its .d); present: its bytes come back."""
    p = _server(tmp_path, TOKEN + "API_PORT=8181\n")
    backup = tmp_path / "backup"
    switch.back_up(p, backup, ["scaleboxd.socket"])
    switch.install_units(p, p.release_dir("1.0.0"))
    touched = switch.restore(p, backup)
    assert "scaleboxd.socket" in touched
    assert not (p.systemd_dir / "scaleboxd.socket.d").exists()

    socket_port.apply(p)
    before = (p.systemd_dir / "scaleboxd.socket.d/port.conf").read_bytes()
    switch.back_up(p, tmp_path / "backup2", ["scaleboxd.socket"])
    (p.systemd_dir / "scaleboxd.socket.d/port.conf").write_text("[Socket]\nListenStream=1\n")
    switch.restore(p, tmp_path / "backup2")
    assert (p.systemd_dir / "scaleboxd.socket.d/port.conf").read_bytes() == before
