"""Switch and restore on real files: atomic swap, byte-for-byte restore, idempotence."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from scalebox.update import switch
from scalebox.update.errors import CommandError, UpdateError
from scalebox.update.paths import Paths
from scalebox.update.systemd import UnitState
from tests.unit.update_service_double import ProcessService

UNITS = ["scalebox-vm@.service", "scaleboxd.service"]


def _server(tmp_path: Path) -> Paths:
    p = Paths(tmp_path)
    for version in ("1.0.0", "1.1.0"):
        units = p.release_dir(version) / "units"
        units.mkdir(parents=True)
        (units / "scaleboxd.service").write_text(f"[Service]\n# {version}\n")
        (units / "scalebox-vm@.service").write_text("[Service]\n# unchanged\n")
    (p.release_dir("1.1.0") / "units" / "new.service").write_text("[Service]\n")
    for version, listed in (("1.0.0", UNITS), ("1.1.0", [*UNITS, "new.service"])):
        (p.release_dir(version) / "RELEASE.json").write_text(json.dumps({"units": listed}))
    # Shipped but not listed in RELEASE.json: never installed.
    (p.release_dir("1.1.0") / "units" / "unlisted.service").write_text("[Service]\n")
    p.systemd_dir.mkdir(parents=True)
    for unit in (p.release_dir("1.0.0") / "units").glob("*.service"):
        (p.systemd_dir / unit.name).write_bytes(unit.read_bytes())
    p.config.parent.mkdir(parents=True)
    p.config.write_bytes(b"API_TOKEN=sb-x\r\n# odd bytes stay: \xff\n")
    p.config.chmod(0o600)
    p.current.symlink_to("releases/1.0.0")
    return p


def test_swap_is_one_rename_readers_never_miss_current(tmp_path: Path) -> None:
    p = _server(tmp_path)
    seen: set[str] = set()
    missing: list[OSError] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(str(p.current.readlink()))
            except OSError as exc:  # current missing, even for an instant
                missing.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(200):
        switch.swap_current(p, "1.1.0")
        switch.swap_current(p, "1.0.0")
    stop.set()
    thread.join()
    assert missing == []
    assert seen <= {"releases/1.0.0", "releases/1.1.0"}
    assert not [f for f in p.opt.iterdir() if f.name.startswith(".current")]


def test_only_changed_units_are_installed(tmp_path: Path) -> None:
    p = _server(tmp_path)
    changed = switch.install_units(p, p.release_dir("1.1.0"))
    assert changed == ["new.service", "scaleboxd.service"]
    assert (p.systemd_dir / "scaleboxd.service").read_text().endswith("1.1.0\n")


def test_restore_puts_back_every_byte_mode_and_removes_added_units(tmp_path: Path) -> None:
    p = _server(tmp_path)
    before = {f.name: f.read_bytes() for f in p.systemd_dir.iterdir()}
    config = p.config.read_bytes()
    backup = p.backup_dir("t1")
    names = switch.release_units(p.release_dir("1.1.0")) + switch.release_units(
        p.release_dir("1.0.0")
    )
    switch.back_up(p, backup, names)
    switch.install_units(p, p.release_dir("1.1.0"))
    p.config.write_text("API_TOKEN=changed by a migration\n")
    p.config.chmod(0o644)

    touched = switch.restore(p, backup)
    assert touched == ["new.service", "scaleboxd.service"]
    assert {f.name: f.read_bytes() for f in p.systemd_dir.iterdir()} == before
    assert p.config.read_bytes() == config
    assert p.config.stat().st_mode & 0o777 == 0o600
    assert switch.restore(p, backup) == []  # idempotent: nothing left to do


def test_only_the_units_release_json_lists_are_installed(tmp_path: Path) -> None:
    p = _server(tmp_path)
    changed = switch.install_units(p, p.release_dir("1.1.0"))
    assert "unlisted.service" not in changed
    assert not (p.systemd_dir / "unlisted.service").exists()
    assert (p.systemd_dir / "new.service").exists()


def test_a_unit_name_with_a_path_in_release_json_is_refused(tmp_path: Path) -> None:
    p = _server(tmp_path)
    (p.release_dir("1.1.0") / "RELEASE.json").write_text(
        json.dumps({"units": ["../../../etc/cron.d/x.service"]})
    )
    with pytest.raises(UpdateError, match="not a plain unit file name"):
        switch.install_units(p, p.release_dir("1.1.0"))


def test_a_daemon_reload_runs_only_when_a_unit_changed_or_systemd_has_one_out_of_date(
    tmp_path: Path,
) -> None:
    """Most updates change no unit file (only `current` moves): they skip the reload, which
    re-reads every unit on the server. A changed unit, or one edited by hand and not yet
    reloaded, is reloaded as before. Systemd here is the double's (see its module)."""
    p = _server(tmp_path)
    service = ProcessService(p, tmp_path)  # "boots" with the units installed now
    units = ("scaleboxd.service", "scaleboxd.socket")

    said: list[str] = []
    assert switch.reload_if_needed(service, [], units, said.append) is False
    assert service.calls == []

    assert switch.reload_if_needed(service, ["scaleboxd.service"], units, said.append) is True
    assert service.calls == ["daemon-reload"]
    assert said == []  # the changed unit was already reported by the switch

    # An admin's drop-in, written without `systemctl daemon-reload`.
    dropin = p.systemd_dir / "scaleboxd.service.d" / "override.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nEnvironment=X=1\n")
    assert switch.reload_if_needed(service, [], units, said.append) is True
    assert said == ["systemctl daemon-reload: scaleboxd.service changed on disk"]
    assert switch.reload_if_needed(service, [], units, said.append) is False  # loaded now
    assert service.calls == ["daemon-reload", "daemon-reload"]


class CgroupHiccup:
    """systemd's part in one case the test machines show (nested cgroup v1): a unit
    started again soon after it stopped fails with 219/CGROUP until a daemon-reload.
    A double: the failure cannot be made to order on real systemd.

    ``hangs``: the start is not ready in time and its process still runs, with an
    older 219 still in ExecMainStatus.
    """

    def __init__(self, fails_with: int, *, hangs: bool = False) -> None:
        self.fails_with = fails_with
        self.hangs = hangs
        self.calls: list[str] = []
        self.reloaded = False
        self.status = 0
        self.main_pid = 0

    def daemon_reload(self) -> None:
        self.calls.append("daemon-reload")
        self.reloaded = True

    def reload_reason(self, units: object) -> str | None:
        return None

    def reset_failed(self, unit: str) -> None:
        self.calls.append(f"reset-failed {unit}")

    def _begin(self, verb: str, unit: str) -> None:
        self.calls.append(f"{verb} {unit}")
        if self.hangs:
            self.status, self.main_pid = self.fails_with, 4242
            raise CommandError(f"{verb} {unit} did not become ready within 10 s")
        if not self.reloaded:
            self.status = self.fails_with
            raise CommandError(f"{verb} {unit} failed: the unit is failed/failed")
        self.status = 0

    def start(self, unit: str, timeout: float) -> None:
        self._begin("start", unit)

    def restart(self, unit: str, timeout: float) -> None:
        self._begin("restart", unit)

    def stop(self, unit: str, timeout: float) -> None:
        self.calls.append(f"stop {unit}")
        self.main_pid = 0

    def state(self, unit: str) -> UnitState:
        return UnitState("inactive", "dead", self.main_pid, 0, exit_status=self.status)


def _retried(unit: str) -> str:
    return (
        f"{unit} could not start: systemd could not set up its cgroup (status "
        "219/CGROUP); systemctl daemon-reload, then once more"
    )


def test_a_handover_start_systemd_could_not_set_a_cgroup_up_for_is_reloaded_and_retried() -> None:
    service = CgroupHiccup(fails_with=219)
    said: list[str] = []
    switch.start_handover(service, [], 10.0, said.append)
    handover = "scaleboxd-handover.service"
    assert service.calls == [
        f"start {handover}",
        f"stop {handover}",
        "daemon-reload",
        f"reset-failed {handover}",
        f"start {handover}",
    ]
    assert said == [_retried(handover)]


def test_a_restart_of_scaleboxd_systemd_could_not_set_a_cgroup_up_for_is_retried() -> None:
    """The same race on the main unit: an update's restart, the restart that ends a
    handover, and a rollback's restart (all restart_service) try once more."""
    service = CgroupHiccup(fails_with=219)
    said: list[str] = []
    switch.restart(service, [], 10.0, said.append)
    retried = ["daemon-reload", "reset-failed scaleboxd.service", "restart scaleboxd.service"]
    assert service.calls == ["restart scaleboxd.service", *retried]
    assert said == [_retried("scaleboxd.service")]

    service = CgroupHiccup(fails_with=219)
    said = []
    switch.finish_handover(service, 10.0, said.append)
    assert service.calls == [
        "restart scaleboxd.service",
        *retried,
        "stop scaleboxd-handover.service",  # after the main daemon serves again
    ]
    assert said == [_retried("scaleboxd.service")]


def test_a_restart_that_fails_for_its_own_reasons_or_hangs_is_not_retried() -> None:
    for service in (CgroupHiccup(fails_with=1), CgroupHiccup(fails_with=219, hangs=True)):
        with pytest.raises(CommandError):
            switch.restart(service, [], 10.0, lambda _: None)
        assert service.calls == ["restart scaleboxd.service"], service.hangs


def test_a_handover_that_fails_for_its_own_reasons_is_not_retried() -> None:
    service = CgroupHiccup(fails_with=70)  # the release's daemon exited: a bad release
    with pytest.raises(CommandError):
        switch.start_handover(service, [], 10.0, lambda _: None)
    assert "daemon-reload" not in service.calls
    assert service.calls[-1] == "stop scaleboxd-handover.service"
