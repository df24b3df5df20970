"""The release ledger, ./do release in a real git repository, and check-update's decisions.

./do release runs against a scratch git repository (real git, real commits);
the GitHub lookup of check-update against a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import time
from datetime import date
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from tools import check_update, checks, ledger, release
from tools.checks import CheckFailed

from scalebox.errors import ScaleboxError, UsageError
from scalebox.migrations.configfile import ConfigFile
from scalebox.migrations.registry import Migration
from scalebox.update import resolve
from tests.unit.loopback_http import send_body, send_json, serve, unused_port

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
CHANGELOG = """# Changelog

Intro.

## Unreleased

### Added
- a thing

## 0.0.1 — 2025-01-01

- the first
"""

# --- the ledger --------------------------------------------------------------------


def test_ledger_round_trips_and_newest_is_by_version_not_order() -> None:
    entries = (
        ledger.Entry("0.10.0", COMMIT_A, "2025-02-01"),
        ledger.Entry("0.9.0", COMMIT_B, "2025-01-01"),
    )
    text = ledger.render(entries)
    assert ledger.parse(text) == entries
    assert json.loads(text)["format"] == 1
    newest = ledger.newest(entries)
    assert newest is not None
    assert newest.version == "0.10.0"
    assert ledger.newest(()) is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("not json", "not JSON"),
        ('{"releases": []}', "not a format 1 ledger"),
        ('{"format": 1, "releases": {}}', "must be a list"),
        ('{"format": 1, "releases": [{"version": "1.0.0", "commit": "abc", "date": "2025-01-01"}]}',
         "full 40-digit hash"),
        ('{"format": 1, "releases": [{"version": "one", "commit": "' + COMMIT_A
         + '", "date": "2025-01-01"}]}', "not a version"),
        ('{"format": 1, "releases": [{"version": "1.0.0", "commit": "' + COMMIT_A
         + '", "date": "yesterday"}]}', "not YYYY-MM-DD"),
        ('{"format": 1, "releases": [{"version": "1.0.0", "commit": "' + COMMIT_A
         + '", "date": "2025-01-01", "extra": 1}]}', "exactly version, commit and date"),
    ],
)  # fmt: skip
def test_ledger_refuses_what_it_cannot_trust(text: str, complaint: str) -> None:
    with pytest.raises(ledger.LedgerError, match=complaint):
        ledger.parse(text)


def test_ledger_refuses_a_version_twice_and_an_older_addition() -> None:
    one = ledger.Entry("1.0.0", COMMIT_A, "2025-01-01")
    twice = ledger.render((one, ledger.Entry("1.0", COMMIT_B, "2025-01-02")))
    with pytest.raises(ledger.LedgerError, match="twice"):
        ledger.parse(twice)
    with pytest.raises(ledger.LedgerError, match=re.escape("not newer than 1.0.0")):
        ledger.add((one,), ledger.Entry("0.9.0", COMMIT_B, "2025-01-02"))
    assert ledger.add((one,), ledger.Entry("1.0.1", COMMIT_B, "2025-01-02"))[-1].version == "1.0.1"


def test_a_missing_ledger_file_has_no_entries(tmp_path: Path) -> None:
    assert ledger.load(tmp_path / "releases.json") == ()


def test_the_repository_ledger_parses() -> None:
    entries = ledger.load(release.ROOT / "releases.json")
    # The first release ever recorded; every later one is appended after it.
    assert entries[0].version == "0.1.0"
    assert len({e.version for e in entries}) == len(entries)


# --- release decisions ----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["0.2", "v0.2.0", "0.2.0+local", "1!0.2.0", "0.2.0.0", "x", ""])
def test_malformed_versions_are_refused(bad: str) -> None:
    with pytest.raises(UsageError, match="not a release version"):
        release.check_version(bad, "0.1.0", ())


def test_the_version_must_pass_the_current_one_and_the_ledger() -> None:
    assert release.check_version("0.1.0", "0.1.0.dev0", ()) == "0.1.0"
    assert release.check_version("0.2.0rc1", "0.1.0", ()) == "0.2.0rc1"
    with pytest.raises(
        release.ReleaseRefused, match=re.escape("not newer than the current version 0.1.0")
    ):
        release.check_version("0.1.0", "0.1.0", ())
    entries = (ledger.Entry("0.3.0", COMMIT_A, "2025-01-01"),)
    with pytest.raises(release.ReleaseRefused, match=re.escape("0.3.0, the last release")):
        release.check_version("0.2.0", "0.1.0", entries)


def test_changelog_unreleased_becomes_the_dated_release_under_a_fresh_heading() -> None:
    dated = release.date_changelog(CHANGELOG, "0.2.0", "2025-03-04")
    assert dated == CHANGELOG.replace("## Unreleased\n", "## Unreleased\n\n## 0.2.0 — 2025-03-04\n")


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("# Changelog\n\n## 0.1.0 — 2025-01-01\n", '0 "## Unreleased" headings'),
        ("## Unreleased\n\n## 0.1.0 — 2025-01-01\n- x\n", "is empty"),
        ("## Unreleased\n- a\n## Unreleased\n- b\n", '2 "## Unreleased" headings'),
    ],
)
def test_changelog_without_one_filled_unreleased_section_is_refused(
    text: str, complaint: str
) -> None:
    with pytest.raises(release.ReleaseRefused, match=complaint):
        release.date_changelog(text, "0.2.0", "2025-03-04")


# --- ./do release in a real repository ------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "src" / "scalebox").mkdir(parents=True)
    (repo / "src" / "scalebox" / "__init__.py").write_text('"""x"""\n\n__version__ = "0.1.0"\n')
    (repo / "CHANGELOG.md").write_text(CHANGELOG)
    (repo / "releases.json").write_text(ledger.render(()))
    _git(repo, "init", "--quiet", "--initial-branch=main")
    _git(repo, "config", "user.email", "test@example.invalid")
    _git(repo, "config", "user.name", "test")
    _git(repo, "add", ".")
    _git(repo, "commit", "--quiet", "-m", "start")
    return repo


def _state(repo: Path) -> tuple[str, str, str, str, str]:
    return (
        _git(repo, "rev-parse", "HEAD"),
        _git(repo, "status", "--porcelain"),
        (repo / "src/scalebox/__init__.py").read_text(),
        (repo / "CHANGELOG.md").read_text(),
        (repo / "releases.json").read_text(),
    )


def test_release_commits_the_bump_and_records_that_commit(repo: Path) -> None:
    today = date(2025, 3, 4)
    said = release.release(repo, "0.2.0", dry_run=False, day=today)
    subjects = _git(repo, "log", "--format=%s").splitlines()
    assert subjects[:2][1] == "Release 0.2.0"
    assert subjects[0].startswith("Record release 0.2.0 (")
    release_commit = _git(repo, "rev-parse", "HEAD~1").strip()
    assert ledger.load(repo / "releases.json") == (
        ledger.Entry("0.2.0", release_commit, "2025-03-04"),
    )
    assert release_commit in said
    # The release commit itself carries the new version and the dated changelog.
    init = _git(repo, "show", f"{release_commit}:src/scalebox/__init__.py")
    assert '__version__ = "0.2.0"' in init
    changelog = _git(repo, "show", f"{release_commit}:CHANGELOG.md")
    assert "## Unreleased\n\n## 0.2.0 — 2025-03-04\n\n### Added\n- a thing\n" in changelog
    assert _git(repo, "status", "--porcelain") == ""
    # The next release needs something new under Unreleased.
    with pytest.raises(release.ReleaseRefused, match="is empty"):
        release.release(repo, "0.3.0", dry_run=False, day=today)


def test_dry_run_dirty_tree_and_bad_versions_change_nothing(repo: Path) -> None:
    before = _state(repo)
    plan = release.release(repo, "0.2.0", dry_run=True, day=date(2025, 3, 4))
    assert "0.1.0" in plan and "## 0.2.0 — 2025-03-04" in plan and "--dry-run" in plan
    assert _state(repo) == before
    for bad in ("0.1.0", "0.0.9", "0.2"):
        with pytest.raises(ScaleboxError):
            release.release(repo, bad, dry_run=False, day=date(2025, 3, 4))
        assert _state(repo) == before
    (repo / "notes.txt").write_text("not committed\n")
    with pytest.raises(release.ReleaseRefused, match=r"uncommitted changes:\n    \?\? notes.txt"):
        release.release(repo, "0.2.0", dry_run=False, day=date(2025, 3, 4))
    (repo / "notes.txt").unlink()
    assert _state(repo) == before


def test_a_failing_commit_puts_the_files_back(repo: Path) -> None:
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'refused by hook' >&2\nexit 1\n")
    hook.chmod(0o755)
    before = _state(repo)
    with pytest.raises(release.ReleaseRefused, match="refused by hook"):
        release.release(repo, "0.2.0", dry_run=False, day=date(2025, 3, 4))
    assert _state(repo) == before


def test_main_prints_what_and_hint_and_exits_non_zero(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert release.main(["--repo", str(repo), "0.1"]) == 2
    err = capsys.readouterr().err
    assert "release: error: '0.1' is not a release version X.Y.Z" in err
    assert "hint:" in err


# --- check-update's decisions ------------------------------------------------------------


def test_this_build_is_its_own_version_or_marked_when_already_released() -> None:
    assert check_update.this_build_version("0.2.0.dev0", "0.1.0") == "0.2.0.dev0"
    assert check_update.this_build_version("0.1.0", "0.1.0") == "0.1.0+check"
    with pytest.raises(CheckFailed, match=re.escape("older than the last release 0.2.0")):
        check_update.this_build_version("0.1.0", "0.2.0")


def test_the_ledger_pick_is_the_newest_release_not_above_this_build() -> None:
    entries = (
        ledger.Entry("0.1.0", COMMIT_A, "2025-01-01"),
        ledger.Entry("0.2.0", COMMIT_B, "2025-02-01"),
    )
    assert check_update.ledger_pick(entries, "0.2.1.dev0") == entries[1]
    assert check_update.ledger_pick(entries, "0.2.0") == entries[1]
    assert check_update.ledger_pick(entries, "0.1.5") == entries[0]
    assert check_update.ledger_pick(entries, "0.0.1") is None
    assert check_update.ledger_pick((), "1.0.0") is None


def test_data_changes_ignore_only_the_daemons_records() -> None:
    before = {
        "state.json": "0o600 s1",
        "vms/vm-1/vm.json": "0o600 r1",
        "vms/vm-1/disk/hello.txt": "0o644 h",
        "templates/debian-base/disk/hello.txt": "0o644 t",
    }
    rewritten = {**before, "state.json": "0o600 s2", "vms/vm-1/vm.json": "0o600 r2"}
    assert checks.data_changes(before, rewritten, new_files_allowed=False) == []
    touched = {
        **before,
        "vms/vm-1/disk/hello.txt": "0o600 h",
        "vms/vm-2/disk/hello.txt": "0o644 x",
    }
    del touched["templates/debian-base/disk/hello.txt"]
    assert checks.data_changes(before, touched, new_files_allowed=False) == [
        "removed: templates/debian-base/disk/hello.txt",
        "changed: vms/vm-1/disk/hello.txt (0o644 h -> 0o600 h)",
        "added: vms/vm-2/disk/hello.txt",
    ]
    # After the API suite its own new files are fine; the old ones must still be intact.
    assert checks.data_changes(before, touched, new_files_allowed=True) == [
        "removed: templates/debian-base/disk/hello.txt",
        "changed: vms/vm-1/disk/hello.txt (0o644 h -> 0o600 h)",
    ]
    assert checks.is_bookkeeping("vms/vm-1/vm.json")
    assert not checks.is_bookkeeping("vms/vm-1/disk/vm.json")


def test_without_migrations_the_expected_config_is_the_old_one_byte_for_byte() -> None:
    text = "API_TOKEN=x\n# a comment\nAPI_PORT=8080\n"
    assert checks.expected_config(text, "0.2.0", "0.2.1") == text  # none pending in between
    # 0.1.0 -> 0.2.0 has this build's 0001-keep-process-backend: the old text, then its key.
    migrated = checks.expected_config(text, "0.1.0", "0.2.0")
    assert migrated.startswith(text) and migrated.endswith("\nVM_BACKEND=process\n")


def test_the_expected_config_is_the_old_one_plus_exactly_the_pending_migrations() -> None:
    def add_port(config: ConfigFile) -> None:
        config.add("METRICS_PORT", "9100", comment="Port of the metrics endpoint.")

    declared = [Migration("0001-add-metrics-port", "0.3.0", "add METRICS_PORT", add_port)]
    text = "# kept\nAPI_TOKEN=sb-x\n"
    migrated = checks.expected_config(text, "0.2.0", "0.3.0", declared)
    assert migrated.startswith(text)
    assert migrated.endswith("METRICS_PORT=9100\n")
    # Not pending (already past it, or going back): the old text byte for byte.
    assert checks.expected_config(text, "0.3.0", "0.4.0", declared) == text
    assert checks.expected_config(text, "0.3.0", "0.2.0", declared) == text


# --- check-update: finding the last release -------------------------------------------


def _release_tarball(where: Path, version: str) -> Path:
    """A small tarball shaped like a release: what check-update reads from one."""
    top = f"scalebox-{version}-x86_64"
    path = where / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (
            ("RELEASE.json", json.dumps({"version": version}).encode()),
            ("scripts/install.sh", b"#!/bin/bash\necho install\n"),
            ("keys/release.pub", b"PUBLIC KEY\n"),
        ):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_override_wins_and_a_missing_file_is_refused(tmp_path: Path) -> None:
    tarball = _release_tarball(tmp_path, "0.0.9")
    found = check_update.find_previous(
        {"SCALEBOX_PREVIOUS_RELEASE": str(tarball)}, tmp_path / "none.json", "0.1.0", tmp_path
    )
    assert (found.tarball, found.version) == (tarball, "0.0.9")
    assert checks.tar_member(tarball, "scripts/install.sh").startswith(b"#!/bin/bash")
    with pytest.raises(CheckFailed, match="no such file"):
        check_update.from_override({"SCALEBOX_PREVIOUS_RELEASE": str(tmp_path / "gone.tar.gz")})
    with pytest.raises(CheckFailed, match="has no units/x"):
        checks.tar_member(tarball, "units/x")


def test_github_latest_release_is_downloaded(tmp_path: Path) -> None:
    body = _release_tarball(tmp_path, "0.1.0").read_bytes()
    with serve() as api:
        api.routes["/repos/o/r/releases/latest"] = lambda req: send_json(
            req,
            {
                "tag_name": "v0.1.0",
                "assets": [
                    {
                        "name": f"scalebox-0.1.0-{resolve.host_arch()}.tar.gz",
                        "browser_download_url": api.url("/asset"),
                    }
                ],
            },
        )
        api.routes["/asset"] = lambda req: send_body(req, body)
        environ = {
            "SCALEBOX_GITHUB_API": api.base,
            "SCALEBOX_UPDATE_REPO": "o/r",
            "SCALEBOX_ALLOW_HTTP": "1",
            # Ignored: check-update looks for the latest release, not the updater's URL.
            "SCALEBOX_RELEASE_URL": str(tmp_path / "elsewhere.tar.gz"),
        }
        found, why_not = check_update.from_github(environ, tmp_path / "dl")
    assert why_not == ""
    assert found is not None
    assert found.version == "0.1.0"
    assert found.tarball.read_bytes() == body
    assert "o/r" in found.origin


def test_no_github_and_an_empty_ledger_is_a_skip_with_the_reasons(tmp_path: Path) -> None:
    def no_release(req: BaseHTTPRequestHandler) -> None:
        send_json(req, {"message": "Not Found"}, status=404)

    with serve() as api:
        api.routes["/repos/o/r/releases/latest"] = no_release
        api.routes["/repos/o/r"] = lambda req: send_json(req, {"full_name": "o/r"})
        environ = {"SCALEBOX_GITHUB_API": api.base, "SCALEBOX_UPDATE_REPO": "o/r"}
        environ["SCALEBOX_ALLOW_HTTP"] = "1"
        environ["SCALEBOX_CHECK_GITHUB"] = "1"
        (tmp_path / "releases.json").write_text(ledger.render(()))
        with pytest.raises(check_update.NoPreviousRelease) as caught:
            check_update.find_previous(environ, tmp_path / "releases.json", "0.1.0", tmp_path)
    assert "has no published release" in caught.value.what
    assert "lists no release" in caught.value.what


def test_github_is_not_asked_unless_the_run_asks_for_it(tmp_path: Path) -> None:
    """Local and CI runs here must send nothing outside: no SCALEBOX_CHECK_GITHUB, no lookup."""
    with serve() as api:
        environ = {"SCALEBOX_GITHUB_API": api.base, "SCALEBOX_ALLOW_HTTP": "1"}
        (tmp_path / "releases.json").write_text(ledger.render(()))
        with pytest.raises(check_update.NoPreviousRelease) as caught:
            check_update.find_previous(environ, tmp_path / "releases.json", "0.1.0", tmp_path)
        assert api.seen == []
    assert "SCALEBOX_CHECK_GITHUB=1" in caught.value.what


def test_an_unreachable_github_falls_through_quickly(tmp_path: Path) -> None:
    environ = {"SCALEBOX_GITHUB_API": f"https://127.0.0.1:{unused_port()}"}
    start = time.monotonic()
    found, why_not = check_update.from_github(environ, tmp_path)
    assert found is None
    assert "cannot reach the releases API" in why_not
    assert time.monotonic() - start < check_update.GITHUB_DEADLINE


def test_a_ledger_commit_this_clone_lacks_is_refused_with_a_hint(tmp_path: Path) -> None:
    with (
        pytest.raises(CheckFailed, match="does not have") as caught,
        check_update.worktree("0" * 40, tmp_path / "tree"),
    ):
        pass
    assert caught.value.hint is not None
    assert "fetch-depth: 0" in caught.value.hint
