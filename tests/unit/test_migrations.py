"""Migrations: the config-editing API, the registry, the runner and its CLI, and the
updater's migrate step on real files and real processes.

The transaction tests use the ProcessService double for systemd (systemd is not
PID 1 here; tests/system/test_migrations.py runs the same against the real one).
Each "release" runs its migrations with its own interpreter: a copy of src/ with
migrations appended to steps.py, as a release built from changed sources would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tools import tarball

from scalebox import config as config_module
from scalebox.migrations import configfile, registry, runner
from scalebox.migrations.configfile import ConfigFile
from scalebox.migrations.errors import MigrationError, MigrationFailed
from scalebox.migrations.registry import Migration
from scalebox.release import manifest
from scalebox.release.errors import ReleaseError
from scalebox.update import history, interrupt, journal, packages, stage, transaction
from scalebox.update.context import Context
from scalebox.update.errors import RolledBack, UpdateError
from scalebox.update.paths import Paths
from scalebox.update.systemd import SERVICE
from scalebox.update.transaction import Target
from tests.unit.update_service_double import (
    ProcessService,
    free_port,
    make_release,
    run_crashing_child,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = b"# written by install.sh\nAPI_TOKEN=sb-" + b"0" * 48 + b"\nHOST_IP=10.0.0.7\n"


def _config(tmp_path: Path, text: bytes = CONFIG) -> Path:
    path = tmp_path / "config"
    path.write_bytes(text)
    path.chmod(0o600)
    return path


# --- the config-editing API ----------------------------------------------------------


def test_add_appends_a_commented_key_and_keeps_every_byte_before_it(tmp_path: Path) -> None:
    path = _config(tmp_path)
    config = ConfigFile.load(path)
    assert config.add("METRICS_PORT", "9100", comment="Port of the metrics endpoint.")
    config.save()
    text = path.read_bytes()
    assert text.startswith(CONFIG)
    assert text[len(CONFIG) :] == b"\n# Port of the metrics endpoint.\nMETRICS_PORT=9100\n"
    assert path.stat().st_mode & 0o7777 == 0o600
    assert ConfigFile.load(path).get("METRICS_PORT") == "9100"


def test_add_is_idempotent_and_never_overrides_a_key_the_file_sets(tmp_path: Path) -> None:
    path = _config(tmp_path, CONFIG + b"METRICS_PORT=7000\n")
    config = ConfigFile.load(path)
    assert not config.add("METRICS_PORT", "9100", comment="default")
    assert not config.changed
    config.save()
    assert path.read_bytes() == CONFIG + b"METRICS_PORT=7000\n"

    (tmp_path / "fresh").mkdir()
    fresh = ConfigFile.load(_config(tmp_path / "fresh"))
    assert fresh.add("NEW_KEY", "1", comment="c")
    assert not fresh.add("NEW_KEY", "2", comment="c")
    assert fresh.get("NEW_KEY") == "1"


def test_a_file_without_a_final_newline_gets_one_and_nothing_else_changes() -> None:
    assert configfile.with_key(b"API_TOKEN=abc", "X", "1", "c") == b"API_TOKEN=abc\n\n# c\nX=1\n"
    assert (
        configfile.with_key(b"A=1\n\n", "X", "1", "two\nlines") == b"A=1\n\n# two\n# lines\nX=1\n"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("lower", "1"), ("A B", "1"), ("X", "two\nlines"), ("X", " padded"), ("X", '"quoted"')],
)
def test_a_bad_key_or_value_is_refused_and_changes_nothing(
    tmp_path: Path, key: str, value: str
) -> None:
    path = _config(tmp_path)
    config = ConfigFile.load(path)
    with pytest.raises(MigrationError):
        config.add(key, value, comment="c")
    assert not config.changed
    config.save()
    assert path.read_bytes() == CONFIG


def test_a_config_scaleboxd_would_refuse_is_not_migrated(tmp_path: Path) -> None:
    path = _config(tmp_path, CONFIG + b"this is not an assignment\n")
    with pytest.raises(MigrationError, match="line 4"):
        ConfigFile.load(path)


def test_save_keeps_mode_and_owner(tmp_path: Path) -> None:
    path = _config(tmp_path)
    if os.geteuid() == 0:
        os.chown(path, 1234, 5678)
    before = path.stat()
    config = ConfigFile.load(path)
    config.add("X", "1", comment="c")
    config.save()
    after = path.stat()
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )


# --- registry and pending --------------------------------------------------------------


def _m(mid: str, since: str, apply: registry.Apply = lambda _c: None) -> Migration:
    return Migration(mid, since, f"does {mid}", apply)


def test_registry_refuses_duplicates_bad_ids_and_release_order_violations() -> None:
    existing = [_m("0001-a", "1.1.0")]
    with pytest.raises(ValueError, match="twice"):
        registry.check_next(existing, _m("0001-a", "1.2.0"))
    with pytest.raises(ValueError, match="lower-case"):
        registry.check_next(existing, _m("Bad_Id", "1.2.0"))
    with pytest.raises(ValueError, match="release order"):
        registry.check_next(existing, _m("0002-b", "1.0.0"))
    with pytest.raises(ValueError, match="description"):
        registry.check_next(existing, Migration("0002-b", "1.2.0", " ", lambda _c: None))
    registry.check_next(existing, _m("0002-b", "1.1.0"))  # same release: fine


def test_pending_is_the_window_from_installed_to_target_minus_applied() -> None:
    ms = [_m("a", "1.1.0"), _m("b", "1.2.0"), _m("c", "1.3.0")]
    ids = lambda found: [m.id for m in found]  # noqa: E731
    assert ids(registry.pending(ms, "1.0.0", "1.2.0", ())) == ["a", "b"]
    assert ids(registry.pending(ms, "1.1.0", "1.3.0", ())) == ["b", "c"]
    assert ids(registry.pending(ms, "1.1.0", "1.3.0", ["b"])) == ["c"]
    # a dev or pre-release build of 1.3.0 already runs 1.3.0's migrations
    assert ids(registry.pending(ms, "1.2.0", "1.3.0.dev0", ())) == ["c"]
    assert ids(registry.pending(ms, "1.2.0", "1.3.0rc1", ())) == ["c"]
    assert registry.pending(ms, "1.3.0", "1.3.0", ()) == []  # reinstall
    assert registry.pending(ms, "1.3.0", "1.0.0", ()) == []  # downgrade


def test_this_release_registers_valid_migrations() -> None:
    from scalebox.migrations import steps  # noqa: F401, PLC0415 - registers them

    seen: list[Migration] = []
    for m in registry.MIGRATIONS:
        registry.check_next(seen, m)  # raises on a bad id, version or order
        seen.append(m)
    assert len({m.id for m in seen}) == len(seen), "migration ids must be unique"


# What 0.1.0's install.sh wrote: VM_BACKEND only in a comment (its default was process).
CONFIG_0_1_0 = CONFIG + b"#   VM_BACKEND=process\n"


def _this_release(config: Path, from_version: str, to_version: str = "0.2.0") -> runner.Outcome:
    from scalebox.migrations import steps  # noqa: F401, PLC0415 - registers them

    return runner.run(
        registry.MIGRATIONS,
        config_path=config,
        from_version=from_version,
        to_version=to_version,
        state_path=config.with_name("state.json"),
    )


def test_an_update_from_0_1_0_pins_the_process_backend_its_vms_run_on(tmp_path: Path) -> None:
    """0.1.0's VMs are stand-in processes: the update keeps them, not the new nspawn default."""
    path = _config(tmp_path, CONFIG_0_1_0)
    assert config_module.parse(CONFIG_0_1_0.decode(), "c", {}).vm_backend == "nspawn"
    outcome = _this_release(path, "0.1.0")
    assert outcome.applied == ("0001-keep-process-backend",)
    text = path.read_bytes()
    assert text.startswith(CONFIG_0_1_0) and text.endswith(b"\nVM_BACKEND=process\n")
    assert config_module.parse(text.decode(), "c", {}).vm_backend == "process"
    # Idempotent (a crash between saving and recording runs it again): the key once.
    from scalebox.migrations.steps import keep_process_backend  # noqa: PLC0415

    again = ConfigFile.load(path)
    keep_process_backend(again)
    assert not again.changed


def test_a_config_that_names_its_backend_and_a_new_install_are_left_alone(tmp_path: Path) -> None:
    chosen = CONFIG + b"VM_BACKEND=nspawn\n"
    path = _config(tmp_path, chosen)
    assert _this_release(path, "0.1.0").applied == ("0001-keep-process-backend",)
    assert path.read_bytes() == chosen  # the admin's value wins
    fresh = _config(tmp_path, CONFIG)
    fresh.with_name("state.json").unlink()
    assert _this_release(fresh, "0.2.0", "0.2.1").applied == ()  # not pending after 0.2.0
    assert fresh.read_bytes() == CONFIG


# --- the runner -------------------------------------------------------------------------


def _add(key: str, value: str) -> registry.Apply:
    def apply(config: ConfigFile) -> None:
        config.add(key, value, comment=f"{key} (default {value})")

    return apply


def _boom(config: ConfigFile) -> None:
    config.add("HALF", "1", comment="never saved")
    raise RuntimeError("cannot reach /etc/caddy")


def test_runner_says_when_a_migration_found_nothing_to_change(tmp_path: Path) -> None:
    path, state = _config(tmp_path), tmp_path / "state.json"
    before = path.read_bytes()
    lines: list[str] = []
    out = runner.run(
        [_m("0001-a", "1.1.0", lambda _config: None)], config_path=path, from_version="1.0.0",
        to_version="1.1.0", state_path=state, report=lines.append,
    )  # fmt: skip
    assert out.applied == ("0001-a",)
    assert not out.config_changed
    assert lines == ["applied 0001-a: does 0001-a (the config already said so: no change)"]
    assert path.read_bytes() == before


def test_runner_applies_in_order_records_state_and_a_rerun_skips(tmp_path: Path) -> None:
    path, state = _config(tmp_path), tmp_path / "state.json"
    ms = [_m("0001-a", "1.1.0", _add("A_KEY", "1")), _m("0002-b", "1.1.0", _add("B_KEY", "2"))]
    lines: list[str] = []
    out = runner.run(
        ms, config_path=path, from_version="1.0.0", to_version="1.1.0", state_path=state,
        report=lines.append,
    )  # fmt: skip
    assert out.applied == ("0001-a", "0002-b")
    assert out.config_changed
    assert lines == ["applied 0001-a: does 0001-a", "applied 0002-b: does 0002-b"]
    migrated = path.read_bytes()
    assert migrated.startswith(CONFIG)
    assert migrated.index(b"A_KEY=1") < migrated.index(b"B_KEY=2")
    assert runner.read_state(state) == ["0001-a", "0002-b"]

    again = runner.run(
        ms, config_path=path, from_version="1.0.0", to_version="1.1.0", state_path=state
    )
    assert (again.applied, again.skipped) == ((), ("0001-a", "0002-b"))
    assert path.read_bytes() == migrated


def test_a_crash_between_saving_and_recording_reapplies_safely(tmp_path: Path) -> None:
    path, state = _config(tmp_path), tmp_path / "state.json"
    ms = [_m("0001-a", "1.1.0", _add("A_KEY", "1"))]
    runner.run(ms, config_path=path, from_version="1.0.0", to_version="1.1.0", state_path=state)
    migrated = path.read_bytes()
    state.unlink()  # as if the runner died after saving the config, before the state
    out = runner.run(
        ms, config_path=path, from_version="1.0.0", to_version="1.1.0", state_path=state
    )
    assert out.applied == ("0001-a",)
    assert not out.config_changed
    assert path.read_bytes() == migrated  # idempotent: added once


def test_a_failing_migration_stops_the_run_naming_it(tmp_path: Path) -> None:
    path, state = _config(tmp_path), tmp_path / "state.json"
    ms = [
        _m("0001-a", "1.1.0", _add("A_KEY", "1")),
        _m("0002-boom", "1.1.0", _boom),
        _m("0003-c", "1.1.0", _add("C_KEY", "3")),
    ]
    with pytest.raises(MigrationFailed) as failed:
        runner.run(ms, config_path=path, from_version="1.0.0", to_version="1.1.0", state_path=state)
    assert failed.value.migration_id == "0002-boom"
    assert failed.value.message == "RuntimeError: cannot reach /etc/caddy"
    text = path.read_bytes()
    assert b"A_KEY=1" in text
    assert b"HALF" not in text  # the failed migration's edits are never saved
    assert b"C_KEY" not in text
    assert runner.read_state(state) == ["0001-a"]


def test_an_unreadable_state_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    with pytest.raises(MigrationError, match="unreadable"):
        runner.read_state(state)


# --- a release's own runner, as a program ---------------------------------------------

FAILING_STEP = """

@migration("0001-add-metrics-port", since="{since}", description="add METRICS_PORT=9100")
def add_metrics_port(config: ConfigFile) -> None:
    config.add("METRICS_PORT", "9100", comment="Port of the metrics endpoint (default 9100).")


@migration("0002-needs-caddy", since="{since}", description="edit the Caddyfile")
def needs_caddy(config: ConfigFile) -> None:
    raise FileNotFoundError("/etc/caddy/Caddyfile")
"""

ADD_STEP = """

@migration("0001-add-metrics-port", since="{since}", description="add METRICS_PORT=9100")
def add_metrics_port(config: ConfigFile) -> None:
    config.add("METRICS_PORT", "9100", comment="Port of the metrics endpoint (default 9100).")
"""


def _then(step_id: str, description: str, *body: str) -> str:
    """ADD_STEP, then a second migration running ``body`` (the first one saved by then)."""
    lines = "".join(f"    {line}\n" for line in body)
    return ADD_STEP + (
        f'\n@migration("{step_id}", since="{{since}}", description="{description}")\n'
        f"def second(config: ConfigFile) -> None:\n{lines}"
    )


# Kills the updater (its parent) and itself: a crash in the middle of the migrate step.
DYING_STEP = _then(
    "0002-power-cut", "the power fails here",
    "import os, signal", "os.kill(os.getppid(), signal.SIGKILL)", "os._exit(9)",
)  # fmt: skip
# The admin presses Ctrl-C (SIGINT to the updater, its parent); the step waits to be stopped.
INTERRUPTED_STEP = _then(
    "0002-ctrl-c", "the admin presses Ctrl-C here",
    "import os, signal, time", "os.kill(os.getppid(), signal.SIGINT)", "time.sleep(30)",
)  # fmt: skip


def _sources(tmp: Path, name: str, steps: str, since: str) -> Path:
    """A copy of src/ whose steps.py has ``steps`` appended (a release's own code)."""
    src = tmp / f"src-{name}"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    target = src / "scalebox" / "migrations" / "steps.py"
    target.write_text(target.read_text() + steps.format(since=since))
    return src


def _runner(src: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalebox.migrations", *args],
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_list_and_run_of_a_release_with_a_failing_migration(tmp_path: Path) -> None:
    src = _sources(tmp_path, "x", FAILING_STEP, "2.0.0")
    listed = _runner(src, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [m["id"] for m in json.loads(listed.stdout)] == [
        "0001-keep-process-backend",  # this build's own, then the two appended here
        "0001-add-metrics-port",
        "0002-needs-caddy",
    ]

    path, state = _config(tmp_path), tmp_path / "state.json"
    run = _runner(src, "run", "--config", str(path), "--from", "1.0.0", "--to", "2.0.0",
                  "--state", str(state), "--json")  # fmt: skip
    assert run.returncode == 3
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["result"] == "failed"
    assert result["failed"] == {
        "id": "0002-needs-caddy",
        "message": "FileNotFoundError: /etc/caddy/Caddyfile",
    }
    assert "applied 0001-add-metrics-port" in run.stderr
    assert runner.read_state(state) == ["0001-add-metrics-port"]


def test_cli_run_with_nothing_pending_and_with_a_bad_version(tmp_path: Path) -> None:
    src = _sources(tmp_path, "y", ADD_STEP, "2.0.0")
    path, state = _config(tmp_path), tmp_path / "state.json"
    run = _runner(src, "run", "--config", str(path), "--from", "2.0.0", "--to", "2.1.0",
                  "--state", str(state))  # fmt: skip
    assert (run.returncode, run.stdout.strip()) == (0, "no pending migrations from 2.0.0 to 2.1.0")
    assert path.read_bytes() == CONFIG
    bad = _runner(src, "run", "--config", str(path), "--from", "yesterday", "--to", "2.1.0",
                  "--state", str(state), "--json")  # fmt: skip
    assert bad.returncode == 2
    assert "yesterday" in json.loads(bad.stdout)["message"]


# --- manifest and builder ----------------------------------------------------------------


def test_manifest_lists_migrations_and_packages_and_old_manifests_read_as_none() -> None:
    m = manifest.Manifest(
        version="1.0.0", arch="x86_64", python=("3.11",), entry_points=("scaleboxd",),
        units=("scaleboxd.service",), files={"units/scaleboxd.service": "0" * 64},
        migrations=(manifest.MigrationInfo("0001-a", "1.0.0", "adds A"),),
        debian_packages=("python3-venv",),
    )  # fmt: skip
    again = manifest.parse(m.to_bytes())
    assert again.migrations == m.migrations
    assert again.debian_packages == ("python3-venv",)
    old = m.to_json()
    del old["migrations"], old["debian_packages"]
    parsed = manifest.parse(json.dumps(old).encode())
    assert (parsed.migrations, parsed.debian_packages) == ((), ())
    for bad in (["python3 ; rm -rf /"], ["Python3"], "python3", [3]):
        with pytest.raises(ReleaseError):
            manifest.parse_debian_packages(bad)
    with pytest.raises(ReleaseError):
        manifest.parse_migrations([{"id": "../x", "since": "1", "description": "d"}])


def test_builder_reads_the_declared_packages_and_the_sources_own_migrations(
    tmp_path: Path,
) -> None:
    assert tarball.debian_packages({"tool": {"scalebox": {"debian-packages": ["systemd"]}}}) == [
        "systemd"
    ]
    assert tarball.debian_packages({}) == []
    with pytest.raises(ReleaseError, match="debian-packages"):
        tarball.debian_packages({"tool": {"scalebox": {"debian-packages": "systemd"}}})
    declared = tarball.debian_packages(
        __import__("tomllib").loads((REPO / "pyproject.toml").read_text())
    )
    assert declared == ["python3", "python3-venv", "systemd"]

    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copytree(_sources(tmp_path, "b", ADD_STEP, "2.0.0"), copy / "src")
    found = tarball.release_migrations(copy)
    assert [m.id for m in found[:-1]] == ["0001-keep-process-backend"]  # this build's own
    assert found[-1] == manifest.MigrationInfo(
        "0001-add-metrics-port", "2.0.0", "add METRICS_PORT=9100"
    )


# --- packages ---------------------------------------------------------------------------


def test_packages_installed_and_missing_from_dpkg_output() -> None:
    out = "python3\tii \nfoo\trc \nheld\thi \nhalf\tiU \n"
    assert packages.installed(out) == {"python3", "held"}
    assert packages.missing(["python3", "foo", "new", "new"], {"python3"}) == ["foo", "new"]


def test_ensure_with_everything_installed_runs_no_apt() -> None:
    """The real dpkg of this host: python3 is installed (it runs these tests)."""
    if shutil.which("dpkg-query") is None:
        pytest.fail("these tests run on Debian: dpkg-query is missing")
    lines: list[str] = []
    assert packages.ensure(["python3"], "9.9.9", lines.append, timeout=60) == []
    assert lines == ["9.9.9 needs Debian packages python3: all installed"]


def test_an_apt_get_that_overruns_is_asked_to_stop_and_the_hint_names_dpkg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in apt-get (first on PATH) that hangs: a real one cannot be made to
    hang here on cue. The real dpkg-query says the package is missing."""
    fake = tmp_path / "apt-get"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(packages, "APT_STOP_GRACE", 30.0)
    with pytest.raises(UpdateError) as refused:
        packages.ensure(["scalebox-no-such-package"], "9.9.9", lambda _: None, timeout=1)
    assert "did not finish within 1 s (stopped with SIGTERM)" in refused.value.what
    hint = str(refused.value.hint)
    assert hint.startswith(
        "if apt-get now says that dpkg was interrupted, run `dpkg --configure -a` first"
    )
    assert "nothing was switched" in hint


# --- the updater's migrate step -----------------------------------------------------------


class Server:
    def __init__(self, root: Path) -> None:
        self.paths = Paths(root)
        self.root = root
        self.service = ProcessService(self.paths, root)
        self.lines: list[str] = []
        self.http = httpx.Client(trust_env=False)

    def ctx(self) -> Context:
        return Context(
            paths=self.paths,
            service=self.service,
            http=self.http,
            report=self.lines.append,
            stability_window=0.5,
            restart_timeout=10,
            verify_timeout=5,
        )

    def release(self, version: str, steps: str = "", since: str = "") -> Path:
        """A release whose venv/bin/python runs its own copy of scalebox."""
        root = make_release(self.paths, version)
        src = _sources(self.root / "sources", version, steps, since or version)
        python = root / "venv" / "bin" / "python"
        python.write_text(f'#!/bin/sh\nPYTHONPATH={src} exec {sys.executable} "$@"\n')
        python.chmod(0o755)
        listed = json.loads(_runner(src, "list", "--json").stdout)
        data = json.loads((root / stage.MANIFEST).read_text())
        (root / stage.MANIFEST).write_text(json.dumps({**data, "migrations": listed}))
        return root

    def install(self, version: str, frm: str, action: str = "update") -> transaction.Outcome:
        return transaction.install(
            self.ctx(), action=action, from_version=frm, from_release=frm,
            target=Target(version, None),
        )  # fmt: skip

    def digest(self) -> str:
        st = self.paths.config.stat()
        data = self.paths.config.read_bytes()
        return f"{st.st_mode:o} {hashlib.sha256(data).hexdigest()}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """Release 1.0.0 installed and running."""
    s = Server(tmp_path)
    p = s.paths
    (tmp_path / "sources").mkdir()
    s.release("1.0.0")
    p.config.parent.mkdir(parents=True)
    p.config.write_bytes(CONFIG + f"API_PORT={free_port()}\n".encode())
    p.config.chmod(0o600)
    p.systemd_dir.mkdir(parents=True)
    for unit in (p.release_dir("1.0.0") / "units").iterdir():
        (p.systemd_dir / unit.name).write_bytes(unit.read_bytes())
    p.version_file.write_text("1.0.0\n")
    p.current.symlink_to("releases/1.0.0")
    s.service.restart(SERVICE, 10)
    try:
        yield s
    finally:
        s.service.kill_everything()
        s.http.close()


def test_update_applies_the_new_release_migrations_then_rollback_restores_the_config(
    server: Server,
) -> None:
    before = server.paths.config.read_bytes()
    digest = server.digest()
    server.release("2.0.0", ADD_STEP)
    outcome = server.install("2.0.0", "1.0.0")
    assert outcome.migrations == ["0001-add-metrics-port"]
    after = server.paths.config.read_bytes()
    assert after.startswith(before)
    assert after[len(before) :].endswith(b"METRICS_PORT=9100\n")
    assert server.paths.config.stat().st_mode & 0o7777 == 0o600
    [entry] = history.read(server.paths.history)
    assert entry.migrations == ["0001-add-metrics-port"]
    assert journal.read(server.paths.journal) is None

    back = server.install("1.0.0", "2.0.0", action="rollback")
    assert back.migrations == []
    assert server.digest() == digest
    assert server.paths.config.read_bytes() == before
    assert any("restored the config from before 2.0.0's migrations" in x for x in server.lines)


def test_the_migrations_run_away_from_the_terminal(server: Server, tmp_path: Path) -> None:
    """In the updater's process group, a hang-up of the admin's SSH session killed the
    migration runner and rolled the update back; the updater itself carries on."""
    release = server.release("2.0.0", ADD_STEP)
    python = release / "venv" / "bin" / "python"
    seen = tmp_path / "session"
    # /proc/PID/stat's fifth and sixth fields: process group, session ("sh" has no space).
    record = f"cut -d' ' -f6,5 /proc/$$/stat > {seen}\n"
    wrapper = python.read_text().replace("exec ", record + "exec ", 1)
    python.write_text(wrapper)
    server.install("2.0.0", "1.0.0")
    group, session = (int(n) for n in seen.read_text().split())
    assert session != os.getsid(0)
    assert group != os.getpgrp()
    assert session == group  # it leads a session of its own


def test_rollback_keeps_a_config_edited_after_the_migrations(server: Server) -> None:
    server.release("2.0.0", ADD_STEP)
    server.install("2.0.0", "1.0.0")
    with server.paths.config.open("ab") as f:
        f.write(b"MAX_DISK_SIZE_GIB=200\n")
    edited = server.paths.config.read_bytes()
    server.install("1.0.0", "2.0.0", action="rollback")
    assert server.paths.config.read_bytes() == edited
    assert any("edited after 2.0.0's migrations" in x for x in server.lines)


def test_a_failing_migration_rolls_back_with_the_config_byte_identical(server: Server) -> None:
    digest = server.digest()
    server.release("2.0.0", FAILING_STEP)
    with pytest.raises(RolledBack) as rolled:
        server.install("2.0.0", "1.0.0")
    assert "migration 0002-needs-caddy of 2.0.0 failed" in rolled.value.what
    assert "FileNotFoundError: /etc/caddy/Caddyfile" in rolled.value.what
    assert server.digest() == digest
    assert str(server.paths.current.readlink()) == "releases/1.0.0"
    assert journal.read(server.paths.journal) is None
    last = history.read(server.paths.history)[-1]
    assert (last.to_version, last.result) == ("2.0.0", history.ROLLED_BACK)


def test_a_ctrl_c_while_the_migrations_run_refuses_with_the_config_as_it_was(
    server: Server,
) -> None:
    """Before the switch, as the docs say of any signal there: refused (exit 1), not
    "2.0.0 failed ... rolled back" (exit 3), which blamed the release and marked it
    failed for the pruning; the half-migrated config goes back byte for byte."""
    digest = server.digest()
    server.release("2.0.0", INTERRUPTED_STEP)
    pid = server.service.state(SERVICE).main_pid
    with interrupt.catching(), pytest.raises(interrupt.Interrupted) as stopped:
        server.install("2.0.0", "1.0.0")
    assert stopped.value.what == (
        "interrupted by SIGINT; nothing was changed (the config is as it was)"
    )
    assert server.digest() == digest
    assert str(server.paths.current.readlink()) == "releases/1.0.0"
    assert server.service.state(SERVICE).main_pid == pid  # never restarted
    assert journal.read(server.paths.journal) is None
    last = history.read(server.paths.history)[-1]
    assert (last.to_version, last.result) == ("2.0.0", history.REFUSED)


def test_a_full_disk_after_the_migrations_refuses_with_the_config_as_it_was(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal write that names the switch fails: a full disk of this server's,
    refused with its errno and a hint to free space. The write fails by a stand-in
    here (a disk that fills at that moment cannot be had on cue); the system tests
    fill a real one."""
    digest = server.digest()
    server.release("2.0.0", ADD_STEP)
    advance = journal.advance

    def full_at_the_switch(path: Path, j: journal.Journal, step: str, **kw: object) -> object:
        if step == "switch":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return advance(path, j, step, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(journal, "advance", full_at_the_switch)
    with pytest.raises(UpdateError) as refused:
        server.install("2.0.0", "1.0.0")
    assert not isinstance(refused.value, RolledBack)
    assert "failed during migrate: No space left on device" in refused.value.what
    assert refused.value.hint is not None and "free space" in refused.value.hint
    assert server.digest() == digest
    assert str(server.paths.current.readlink()) == "releases/1.0.0"
    assert history.read(server.paths.history)[-1].result == history.REFUSED


# In a mount namespace of its own: /etc/scaleboxd on a tmpfs shrunk to what it holds,
# so the migration's save of the config fails with ENOSPC, then the update runs.
FULL_ETC = """
import json, os, subprocess, sys
from pathlib import Path
import httpx
from scalebox.update import transaction
from scalebox.update.context import Context
from scalebox.update.errors import UpdateError
from scalebox.update.paths import Paths
from tests.unit.update_service_double import ProcessService

root = Path(sys.argv[1])
paths = Paths(root)
saved = paths.config.read_bytes()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "etc", str(paths.config.parent)],
               check=True)
paths.config.write_bytes(saved)
paths.config.chmod(0o600)
fs = os.statvfs(paths.config.parent)
used = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
subprocess.run(["mount", "-o", f"remount,size={used}", str(paths.config.parent)], check=True)
ctx = Context(paths=paths, service=ProcessService(paths, root),
              http=httpx.Client(trust_env=False), report=print, stability_window=0.5,
              restart_timeout=10, verify_timeout=5)
out = {}
try:
    transaction.install(ctx, action="update", from_version="1.0.0", from_release="1.0.0",
                        target=transaction.Target("2.0.0", None))
except UpdateError as exc:
    out = {"error": type(exc).__name__, "what": exc.what, "hint": exc.hint}
out["config_kept"] = paths.config.read_bytes() == saved
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a file system (root)")
def test_a_full_etc_under_the_migrations_refuses_as_a_full_disk(server: Server) -> None:
    """The runner's save of the config hit ENOSPC: an OSError it did not catch, a
    traceback, and the updater rolled back blaming the release (exit 3). The runner
    now says the errno, and a disk's refusal before the switch refuses (exit 1)."""
    server.release("2.0.0", ADD_STEP)
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", FULL_ETC,
         str(server.paths.root)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, start_new_session=True,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["error"] == "UpdateError", out
    assert "failed during migrate: No space left on device" in out["what"]
    assert out["what"].endswith("nothing was changed (the config is as it was)")
    assert "free space" in out["hint"]
    assert out["config_kept"] is True
    assert "Traceback" not in done.stdout
    assert history.read(server.paths.history)[-1].result == history.REFUSED


CHILD = """
import sys
from pathlib import Path
import httpx
from scalebox.update import transaction
from scalebox.update.context import Context
from scalebox.update.paths import Paths
from tests.unit.update_service_double import ProcessService

root = Path(sys.argv[1])
paths = Paths(root)
ctx = Context(paths=paths, service=ProcessService(paths, root), http=httpx.Client(trust_env=False),
              report=print, stability_window=0.5, restart_timeout=10, verify_timeout=5)
transaction.install(ctx, action="update", from_version="1.0.0", from_release="1.0.0",
                    target=transaction.Target("2.0.0", None))
"""


def test_a_crash_during_migrate_is_recovered_with_the_config_restored(server: Server) -> None:
    digest = server.digest()
    server.release("2.0.0", DYING_STEP)
    child = run_crashing_child(CHILD, str(server.paths.root))
    assert child.returncode == -signal.SIGKILL, child.stderr
    crashed = journal.read(server.paths.journal)
    assert crashed is not None
    assert crashed.step == "migrate"
    assert b"METRICS_PORT=9100" in server.paths.config.read_bytes()  # half migrated

    pid = server.service.state(SERVICE).main_pid
    said = transaction.recover(server.ctx())
    # Before the switch: the config is put back and the update dropped, not rolled back
    # (no restart, no verify; the release is not blamed for a power cut).
    assert said == (
        "recovered: the interrupted update to 2.0.0 had changed nothing (its migrations were "
        "undone: the config is as it was); 1.0.0 still runs"
    )
    assert server.digest() == digest
    assert str(server.paths.current.readlink()) == "releases/1.0.0"
    assert journal.read(server.paths.journal) is None
    assert server.service.state(SERVICE).main_pid == pid
    last = history.read(server.paths.history)[-1]
    assert (last.to_version, last.result) == ("2.0.0", history.REFUSED)


def test_a_release_that_needs_an_unknown_package_is_refused_before_anything(
    server: Server,
) -> None:
    """apt-get really runs: a package no mirror has cannot be installed."""
    digest = server.digest()
    root = server.release("2.0.0", ADD_STEP)
    data = json.loads((root / stage.MANIFEST).read_text())
    data["debian_packages"] = ["python3", "scalebox-no-such-package"]
    (root / stage.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(UpdateError) as refused:
        server.install("2.0.0", "1.0.0")
    assert "needs the Debian packages scalebox-no-such-package" in refused.value.what
    assert "apt-get install scalebox-no-such-package" in str(refused.value.hint)
    assert server.digest() == digest
    assert str(server.paths.current.readlink()) == "releases/1.0.0"
    last = history.read(server.paths.history)[-1]
    assert last.result == history.REFUSED
