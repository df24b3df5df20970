"""Switch: back up units and config, swap ``current``, install changed units, restart.

The restart is a handover when the release ships scaleboxd-handover.service
(``hand_over``): that second instance starts on the new release, on the
listening socket systemd holds, and only once it is ready is
scaleboxd.service restarted, while it serves; then it stops. Otherwise
(an older release, or a changed socket) it is a plain restart.

The backup lives in /var/lib/scalebox-update/backups/<transaction id>/:
``units/<name>`` copies (and ``units/scaleboxd.socket.d/port.conf``, the
socket's port drop-in, see socket_port), ``config`` (bytes, mode and owner
kept) and ``backup.json`` naming which units existed before, written last,
so a rollback also removes units this update added. Every copy is fsynced
before ``backup.json`` vouches for it (fsutil.durable_copy).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from scalebox.fsutil import atomic_symlink, atomic_write, durable_copy, fsync_dir
from scalebox.release import manifest
from scalebox.release.errors import ReleaseError
from scalebox.update import socket_port
from scalebox.update.errors import CommandError, UpdateError
from scalebox.update.paths import Paths
from scalebox.update.systemd import EXIT_CGROUP, HANDOVER, SERVICE, SOCKET, ServiceManager

BACKUP_INDEX = "backup.json"


def release_units(release_dir: Path) -> list[str]:
    """Every file under the release's units/ (what a backup must cover)."""
    units = release_dir / "units"
    return sorted(p.name for p in units.iterdir() if p.is_file()) if units.is_dir() else []


def listed_units(release_dir: Path) -> list[str]:
    """The units the release's signed RELEASE.json lists: the only ones installed."""
    try:
        raw = json.loads((release_dir / "RELEASE.json").read_bytes())
        return sorted(manifest.check_units(raw.get("units") if isinstance(raw, dict) else None))
    except (OSError, ValueError, RecursionError, ReleaseError) as exc:
        what = exc.what if isinstance(exc, ReleaseError) else str(exc)[:200]
        raise UpdateError(
            f"cannot read the units of {release_dir / 'RELEASE.json'}: {what}",
            "the release is damaged; remove it and run scalebox-update again",
        ) from None


def back_up(paths: Paths, backup_dir: Path, unit_names: Iterable[str]) -> None:
    """Copy every unit the switch may replace, and the config, into ``backup_dir``."""
    if backup_dir.exists():
        shutil.rmtree(backup_dir)  # a half-made backup from an interrupted run
    (backup_dir / "units").mkdir(parents=True)
    present: dict[str, bool] = {}
    for name in sorted({*unit_names, str(socket_port.DROPIN)}):
        installed = paths.systemd_dir / name
        present[name] = installed.is_file()
        if present[name]:
            (backup_dir / "units" / name).parent.mkdir(exist_ok=True)  # the drop-in's .d
            durable_copy(installed, backup_dir / "units" / name)
    durable_copy(paths.config, backup_dir / "config")
    st = paths.config.stat()
    fsync_dir(backup_dir)
    # Written last, after every copy's data is on disk: it says the backup is whole.
    atomic_write(
        backup_dir / BACKUP_INDEX,
        json.dumps({"units": present, "config_uid": st.st_uid, "config_gid": st.st_gid}),
        mode=0o600,
    )


def swap_current(paths: Paths, release_name: str) -> None:
    """Point ``current`` at releases/<release_name> in one rename."""
    atomic_symlink(Path("releases") / release_name, paths.current)


def install_units(paths: Paths, release_dir: Path) -> list[str]:
    """Copy the release's unit files that differ into /etc/systemd/system; return their names.

    The socket's port drop-in is made to match the config's API_PORT too
    (socket_port); a change to it counts as a change of scaleboxd.socket.
    """
    changed = []
    for name in listed_units(release_dir):
        new = (release_dir / "units" / name).read_bytes()
        installed = paths.systemd_dir / name
        if installed.is_file() and installed.read_bytes() == new:
            continue
        atomic_write(installed, new, mode=0o644)
        changed.append(name)
    if socket_port.apply(paths) and SOCKET not in changed:
        changed.append(SOCKET)
    return changed


def can_hand_over(release_dir: Path, changed_units: Iterable[str]) -> bool:
    """Whether the restart onto ``release_dir`` can be a handover (see ``hand_over``).

    Only a release that lists the handover unit knows `scaleboxd --handover`;
    a changed socket is a new listening socket, which only a restart can pass on.
    """
    return SOCKET not in set(changed_units) and HANDOVER in listed_units(release_dir)


def reload_if_needed(
    service: ServiceManager,
    changed_units: Iterable[str],
    units: Sequence[str],
    report: Callable[[str], None],
) -> bool:
    """daemon-reload when a unit file changed or systemd has one of ``units`` out of date.

    An update whose units are unchanged (most are: only ``current`` moved) skips
    it: a daemon-reload makes systemd re-read every unit on the server, CPU the
    daemon serving needs during the switch. A unit edited by hand without a
    reload is still reloaded, as before, and the reason reported. True if it ran.
    """
    if not list(changed_units):
        reason = service.reload_reason(units)
        if reason is None:
            return False
        report(f"systemctl daemon-reload: {reason}")
    service.daemon_reload()
    return True


def restart(
    service: ServiceManager,
    changed_units: Iterable[str],
    timeout: float,
    report: Callable[[str], None],
) -> None:
    """daemon-reload if needed, then restart scaleboxd (and its socket first if it changed)."""
    changed_units = list(changed_units)
    reload_if_needed(service, changed_units, (SERVICE, SOCKET), report)
    if SOCKET in set(changed_units):
        # Restarting the socket stops the service too (Requires=); it is started below.
        service.restart(SOCKET, timeout)
    restart_service(service, timeout, report)


def restart_service(service: ServiceManager, timeout: float, report: Callable[[str], None]) -> None:
    """Restart scaleboxd.service and wait for READY=1, once more if systemd could not
    set up its cgroup (see ``_once_more_on_cgroup``)."""
    _once_more_on_cgroup(service, SERVICE, lambda: service.restart(SERVICE, timeout), report)


def start_handover(
    service: ServiceManager,
    changed_units: Iterable[str],
    timeout: float,
    report: Callable[[str], None],
) -> None:
    """daemon-reload if needed, then start the handover instance on ``current`` and wait
    for READY=1.

    Until this returns scaleboxd.service is untouched: a release that crashes
    or hangs here fails the update while the old daemon goes on serving.
    """
    reload_if_needed(service, changed_units, (SERVICE, SOCKET, HANDOVER), report)
    left = service.state(HANDOVER).active
    if left not in ("inactive", "failed"):
        service.stop(HANDOVER, timeout)  # one left by a run that was killed
    if left == "failed":
        service.reset_failed(HANDOVER)  # its start limit must not refuse this start
    _once_more_on_cgroup(service, HANDOVER, lambda: _start_or_stop(service, timeout), report)


def _once_more_on_cgroup(
    service: ServiceManager, unit: str, attempt: Callable[[], None], report: Callable[[str], None]
) -> None:
    """Run ``attempt`` (a start of ``unit``); if it failed because systemd could not set
    up the unit's cgroup (status 219/CGROUP), daemon-reload and run it once more.

    Seen in nested cgroup-v1 test machines when a unit started again seconds after
    it stopped ("Failed to kill control group ... Input/output error"), and traced
    later to the test harness: two machines shared one cgroup tree, and each one's
    systemd removed the other's unit cgroups (tools/cgroups.py gives each its own).
    Kept as a guard: a daemon-reload sets a unit's cgroups up again. A unit that
    fails for any other reason (a release's daemon that exits) is not retried.
    """
    try:
        attempt()
    except CommandError as first:
        try:
            state = service.state(unit)
        except CommandError:
            raise first from None  # why it failed matters more than why we cannot look
        if state.exit_status != EXIT_CGROUP or state.main_pid:
            raise  # not systemd's cgroup: a release's own failure, or one still running
        report(
            f"{unit} could not start: systemd could not set up its cgroup "
            f"(status {EXIT_CGROUP}/CGROUP); systemctl daemon-reload, then once more"
        )
        service.daemon_reload()
        service.reset_failed(unit)
        attempt()


def _start_or_stop(service: ServiceManager, timeout: float) -> None:
    """Start the handover instance; on any failure stop it, so that a hanging one does
    not keep taking the socket's connections."""
    try:
        service.start(HANDOVER, timeout)
    except BaseException:
        _stop_after_a_failure(service, timeout)
        raise


def _stop_after_a_failure(service: ServiceManager, timeout: float) -> None:
    """Stop the handover instance after another failure, which is the one to tell: a stop
    that fails too must not take its place (the rollback stops the instance again, and
    says so if it still cannot)."""
    with contextlib.suppress(CommandError):
        service.stop(HANDOVER, timeout)


def finish_handover(service: ServiceManager, timeout: float, report: Callable[[str], None]) -> None:
    """Restart scaleboxd.service while the handover instance serves, then stop that instance.

    The old daemon stops accepting at once and drains what it accepted; new
    connections go to the handover instance, then also to the new daemon
    once it is ready; stopping the handover instance drains it the same way.
    """
    try:
        restart_service(service, timeout, report)
    except BaseException:
        _stop_after_a_failure(service, timeout)
        raise
    service.stop(HANDOVER, timeout)


def restore(paths: Paths, backup_dir: Path) -> list[str]:
    """Put units and config back exactly as backed up; return the unit names touched.

    Idempotent: a file that already matches its backup is not rewritten.
    """
    index = json.loads((backup_dir / BACKUP_INDEX).read_text())
    touched = []
    for name, was_present in sorted(index["units"].items()):
        installed = paths.systemd_dir / name
        if was_present:
            saved = (backup_dir / "units" / name).read_bytes()
            if not installed.is_file() or installed.read_bytes() != saved:
                atomic_write(installed, saved, mode=0o644)
                touched.append(name)
        elif installed.exists():
            installed.unlink()
            fsync_dir(installed.parent)
            if installed.parent != paths.systemd_dir and not any(installed.parent.iterdir()):
                installed.parent.rmdir()  # the drop-in's .d that this update made
            touched.append(name)
    saved_config = backup_dir / "config"
    config = saved_config.read_bytes()
    if not paths.config.is_file() or paths.config.read_bytes() != config:
        atomic_write(paths.config, config, mode=saved_config.stat().st_mode & 0o7777)
        os.chown(paths.config, index["config_uid"], index["config_gid"])
    if str(socket_port.DROPIN) in touched and SOCKET not in touched:
        touched.append(SOCKET)  # the socket's port drop-in was put back
    return touched
