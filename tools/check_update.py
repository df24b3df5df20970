"""./do check-update: the last release, installed on a fresh server, updated to this build.

    ./do check-update [--keep-vm] [--ledger FILE]

1. The last release, the first of: the tarball SCALEBOX_PREVIOUS_RELEASE
   names; when SCALEBOX_CHECK_GITHUB=1 (set in the upstream workflow), the
   latest GitHub release of SCALEBOX_UPDATE_REPO (the updater's own lookup,
   SCALEBOX_GITHUB_API and GITHUB_TOKEN apply; a short timeout, then on);
   the newest entry of releases.json (or --ledger FILE) at or
   below this build's version, built from that commit's own sources in a
   temporary git worktree with that commit's own ./do tarball. None: print
   why and "check-update: SKIPPED", exit 0.
2. Boot a machine (tools/machine.py) and install it with its own install.sh.
3. Create a VM; note /etc/scaleboxd/config and DATA_DIR.
4. Run the installed (old) scalebox-update to this build's tarball, as an
   operator would: the new release's code must be run by the old updater.
5. The API suite from the host against the updated server.
6. The config is byte-identical (or exactly what the release's migrations
   declare: expected_config), DATA_DIR untouched, and the VM still runs
   with the same unit main PID and its guest answers.

"Data untouched" means every file under DATA_DIR (VM disks, templates,
anything else) has the same bytes and mode, and none appeared or vanished,
across the update. The daemon's own records of its VMs (state.json and
vms/<id>/vm.json) are excluded: the daemon rewrites them as it reconciles
on start, and they may gain fields; the VM's presence is proved through the
API instead. After the API suite (which makes and deletes its own VMs and
templates) the files that existed before the update must still be there,
unchanged.

When the last release has this build's version (e.g. on the release commit
itself), this build is packed as <version>+check so that it is an update.
Both tarballs are signed with the same key (tools/check.py's signing_env);
a downloaded release signed with another key gets this build's public key
added to the machine's trusted keys, as an operator rotating keys would.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from scalebox.errors import ScaleboxError
from scalebox.update import fetch, resolve, versions
from tools import ledger
from tools.checks import (
    CACHE,
    CheckFailed,
    Phase,
    Report,
    Snapshot,
    Stop,
    api_suite,
    build_tarball,
    compare_config,
    compare_data,
    create_vm,
    indent,
    install,
    read_token,
    release_version,
    run_updater,
    say,
    serving_version,
    sha,
    signing_env,
    snapshot,
    tar_member,
    vm_still_running,
)
from tools.machine import Machine, sigterm_raises

ROOT = Path(__file__).resolve().parent.parent
LEDGER = ROOT / "releases.json"
GITHUB_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
GITHUB_DEADLINE = 20.0  # seconds for the whole lookup: DNS has no timeout of its own
THIS_BUILD_LOCAL = "check"

PLANNED = [
    "find the last release",
    "build this build's tarball",
    "boot a machine",
    "install the last release with its own install.sh",
    "read the API token",
    "create a VM; note the config and DATA_DIR",
    "scalebox-update (the installed one) to this build",
    "the update left config and DATA_DIR as they were",
    "API suite from the host",
    "config, data and the VM after the suite",
]


class NoPreviousRelease(ScaleboxError):
    """There is nothing to update from: the check is skipped."""


@dataclass(frozen=True)
class Previous:
    tarball: Path
    version: str
    origin: str


# --- pure decisions ---------------------------------------------------------------


def this_build_version(current: str, previous: str) -> str:
    """The version this build is packed as: its own, or <version>+check when already released."""
    order = versions.compare(current, previous)
    if order > 0:
        return current
    if order == 0:
        return f"{current}+{THIS_BUILD_LOCAL}"
    raise CheckFailed(
        f"this build's version {current} is older than the last release {previous}",
        f"set __version__ in src/scalebox/__init__.py above {previous} (the next version"
        " with .dev0), or pull the release commit",
    )


def ledger_pick(entries: tuple[ledger.Entry, ...], current: str) -> ledger.Entry | None:
    """The newest release this build can update from: the highest version not above its own."""
    eligible = tuple(e for e in entries if not versions.is_newer(e.version, current))
    return ledger.newest(eligible)


# --- finding the last release ------------------------------------------------------


def from_override(environ: Mapping[str, str]) -> Previous | None:
    value = environ.get("SCALEBOX_PREVIOUS_RELEASE", "").strip()
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise CheckFailed(
            f"SCALEBOX_PREVIOUS_RELEASE={value}: no such file",
            "point it at a release tarball (./do tarball --version 0.0.9 --out DIR), or unset it",
        )
    return Previous(path, release_version(path), f"SCALEBOX_PREVIOUS_RELEASE ({path})")


def _github_lookup(environ: Mapping[str, str], dest: Path) -> Previous:
    source = dataclasses.replace(
        resolve.source_from_env(environ), release_url=None, to_version=None
    )
    with resolve.client_for(source, timeout=GITHUB_TIMEOUT) as client:
        candidate = resolve.resolve(source, client, retries=0)
        dest.mkdir(parents=True, exist_ok=True)
        tarball = fetch.fetch(candidate.url, dest / candidate.asset_name, client, retries=1)
    return Previous(tarball, release_version(tarball), candidate.origin)


def from_github(environ: Mapping[str, str], dest: Path) -> tuple[Previous | None, str]:
    """The latest GitHub release, downloaded into ``dest``; else None and why not."""
    outcome: list[Previous | str] = []

    def look() -> None:
        try:
            outcome.append(_github_lookup(environ, dest))
        except ScaleboxError as exc:
            outcome.append(exc.what)
        except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable"
            outcome.append(f"{type(exc).__name__}: {exc}")

    # A thread with a deadline: name resolution can block longer than any socket timeout.
    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    thread.join(GITHUB_DEADLINE)
    if not outcome:
        return None, f"no answer within {GITHUB_DEADLINE:.0f} s"
    found = outcome[0]
    return (found, "") if isinstance(found, Previous) else (None, found)


def _git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def _key_env() -> dict[str, str]:
    """signing_env(), made explicit: the old tree has no keys/ of its own."""
    env = signing_env()
    if not env.get("SCALEBOX_SIGNING_KEY") and not env.get("SCALEBOX_SIGNING_KEY_FILE"):
        env["SCALEBOX_SIGNING_KEY_FILE"] = str(ROOT / "keys" / "release.key")
    return env


@contextlib.contextmanager
def worktree(commit: str, where: Path) -> Iterator[Path]:
    """A detached checkout of ``commit`` at ``where``, removed afterwards."""
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise CheckFailed(
            f"releases.json names commit {commit}, which this clone does not have",
            "fetch the full history (git fetch --unshallow; actions/checkout with fetch-depth: 0)",
        )
    added = _git("worktree", "add", "--detach", "--force", str(where), commit)
    if added.returncode != 0:
        raise CheckFailed(
            f"git worktree add {commit[:12]} failed: {added.stderr.strip()}",
            "`git worktree prune` removes stale worktrees; then run the check again",
        )
    try:
        yield where
    finally:
        _git("worktree", "remove", "--force", str(where))
        shutil.rmtree(where, ignore_errors=True)
        _git("worktree", "prune")


def build_from_commit(entry: ledger.Entry, work: Path, out: Path) -> Path:
    """The release ``entry`` names, built by that commit's own ./do tarball."""
    with worktree(entry.commit, work / "src") as tree:
        # Share the downloaded dependency wheels; everything else is the old tree's own.
        (tree / ".cache").mkdir(exist_ok=True)
        (CACHE / "wheels").mkdir(parents=True, exist_ok=True)
        (tree / ".cache" / "wheels").symlink_to(CACHE / "wheels")
        say(f"building {entry.version} from {entry.commit[:12]} with its own ./do tarball")
        result = subprocess.run(
            ["./do", "tarball", "--version", entry.version, "--out", str(out)],
            cwd=tree,
            env=_key_env(),
            capture_output=True,
            text=True,
            check=False,
        )
    built = sorted(out.glob("scalebox-*.tar.gz"))
    if result.returncode != 0 or len(built) != 1:
        raise CheckFailed(
            f"./do tarball of release {entry.version} ({entry.commit[:12]}) failed "
            f"(exit {result.returncode}):\n{indent(result.stderr)}",
            "the release's own sources must still build; see the output above",
        )
    return built[0]


def find_previous(
    environ: Mapping[str, str], ledger_path: Path, current: str, work: Path
) -> Previous:
    """The last release, by the order in the module doc; NoPreviousRelease when none."""
    override = from_override(environ)
    if override is not None:
        return override
    # Tests here must not reach outside the machine: GitHub only when asked for.
    if environ.get("SCALEBOX_CHECK_GITHUB") == "1":
        found, why_not = from_github(environ, work / "github")
        if found is not None:
            return found
    else:
        why_not = "not asked: set SCALEBOX_CHECK_GITHUB=1 to look there"
    say(f"GitHub: no release to use ({why_not}); trying {ledger_path.name}")
    entry = ledger_pick(ledger.load(ledger_path), current)
    if entry is None:
        raise NoPreviousRelease(
            f"no previous release: GitHub gave none ({why_not}) and {ledger_path} lists no "
            f"release at or below this build's version {current}",
            "this is expected before the first release (./do release X.Y.Z records one)",
        )
    out = work / "ledger-build"
    out.mkdir(parents=True)
    tarball = build_from_commit(entry, work, out)
    return Previous(tarball, release_version(tarball), f"{ledger_path.name}: {entry.commit[:12]}")


# --- in the machine ------------------------------------------------------------------


def trust_this_build(m: Machine, previous: Path, current: Path) -> str:
    """Add this build's key to the server's trusted keys if the last release used another."""
    ours = tar_member(current, "keys/release.pub")
    if tar_member(previous, "keys/release.pub") == ours:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "check-update.pub"
        key.write_bytes(ours)
        m.copy_in(key, "/etc/scalebox/keys/check-update.pub")
    m.run(["chmod", "0644", "/etc/scalebox/keys/check-update.pub"])
    return (
        "; this build's signing key was added to /etc/scalebox/keys (the last release used another)"
    )


def run_update(m: Machine, previous: Previous, current: Path, current_version: str) -> str:
    """The installed updater, i.e. the last release's own, updates to this build."""
    link = m.run(["readlink", "-f", "/usr/local/bin/scalebox-update"]).stdout.strip()
    said = m.run(["scalebox-update", "--version"]).stdout.strip()
    if not said.endswith(f" {previous.version}"):
        raise CheckFailed(
            f"the installed updater says {said!r}, not the last release {previous.version}",
            "install.sh of the last release must link its own scalebox-update",
        )
    code, outcome = run_updater(m, env={"SCALEBOX_RELEASE_URL": f"/mnt/release/{current.name}"})
    if code != 0 or outcome.get("result") != "updated":
        raise CheckFailed(
            f"scalebox-update {previous.version} -> {current_version} exited with code "
            f"{code}: {outcome.get('message')}",
            "its progress is above; rerun with --keep-vm and see `scalebox-update history`",
        )
    serving = serving_version(m)
    if serving != current_version:
        raise CheckFailed(
            f"after the update the server runs {serving}, not {current_version}",
            "the updater reported success without running the new release",
        )
    return f"{link} ({said}): {previous.version} -> {current_version}"


def added_keys(before: Snapshot, after: Snapshot) -> str:
    """The keys the update's migrations added to the config, for the phase's detail."""
    old = set(before.config_text.splitlines())
    new = [
        line
        for line in after.config_text.splitlines()
        if line not in old and line.strip() and not line.lstrip().startswith("#")
    ]
    return f" (migrations added {', '.join(new)})" if new else ""


# --- driver ---------------------------------------------------------------------------


def _current_version() -> str:
    text = (ROOT / "src" / "scalebox" / "__init__.py").read_text()
    for line in text.splitlines():
        if line.startswith("__version__ = "):
            return line.split('"')[1]
    raise CheckFailed("src/scalebox/__init__.py has no __version__", "restore it")


def build_this(stage: Path, version: str, own: str) -> Path:
    return build_tarball(stage, None if version == own else version)


def find_phase(
    report: Report, environ: Mapping[str, str], ledger_path: Path, work: Path
) -> Previous:
    """Phase 1, outside Report.phase: "nothing to update from" is a skip, not a failure."""
    phase = Phase("find the last release")
    report.phases.append(phase)
    say(f"{phase.name} ...")
    start = time.monotonic()
    try:
        previous = find_previous(environ, ledger_path, _current_version(), work)
    except NoPreviousRelease:
        phase.status = "skipped"
        raise
    except ScaleboxError as exc:
        phase.status, phase.detail = "FAIL", str(exc)
        say(f"FAILED: {phase.name}: {exc}")
        raise Stop from exc
    finally:
        phase.seconds = time.monotonic() - start
    phase.status, phase.detail = "ok", f"{previous.version} from {previous.origin}"
    say(f"ok: {phase.name}: {phase.detail}")
    return previous


def check_update(report: Report, previous: Previous, stage: Path, keep_vm: bool) -> None:
    """Phases 2 to 6 (module doc), each recorded in ``report``; stops at a required failure."""
    own = _current_version()
    with contextlib.ExitStack() as stack:
        with report.phase("build this build's tarball", required=True) as p:
            version = this_build_version(own, previous.version)
            current = build_this(stage, version, own)
            # The folder bound at /mnt/release: the last release with its own install.sh
            # at the top (as tools.check.install expects), this build beside it.
            shutil.copy2(previous.tarball, stage / previous.tarball.name)
            (stage / "install.sh").write_bytes(tar_member(previous.tarball, "scripts/install.sh"))
            p.detail = current.name
        with report.phase("boot a machine", required=True) as p:
            m = stack.enter_context(Machine.boot(stage, keep=keep_vm))
            p.detail = f"{m.name} at {m.ip}, running after {m.boot_seconds or 0:.1f} s"
        with report.phase("install the last release with its own install.sh", required=True) as p:
            said = [line for line in install(m, previous.tarball.name).splitlines() if line]
            p.detail = said[-1].removeprefix("==> ") if said else ""
        with report.phase("read the API token", required=True):
            token = read_token(m)
        with report.phase("create a VM; note the config and DATA_DIR", required=True) as p:
            vm = create_vm(m, token)
            before = snapshot(m)
            p.detail = (
                f"VM {vm.id} (main PID {vm.main_pid}); config sha256 "
                f"{sha(before.config_text)[:16]}; {len(before.data)} files in DATA_DIR"
            )
        with report.phase("scalebox-update (the installed one) to this build", required=True) as p:
            trusted = trust_this_build(m, previous.tarball, current)
            p.detail = run_update(m, previous, current, version) + trusted
        with report.phase("the update left config and DATA_DIR as they were") as p:
            after = snapshot(m)
            p.detail = (
                compare_config(before, after, previous.version, version)
                + added_keys(before, after)
                + "; "
                + compare_data(before, after, new_files_allowed=False)
            )
        with report.phase("API suite from the host") as p:
            p.detail = api_suite(m, token)
        with report.phase("config, data and the VM after the suite") as p:
            final = snapshot(m)
            compare_config(before, final, previous.version, version)
            compare_data(before, final, new_files_allowed=True)
            p.detail = vm_still_running(m, token, vm)


def run(keep_vm: bool, ledger_path: Path, environ: Mapping[str, str]) -> int:
    report = Report()
    stage = CACHE / "check-update" / f"{os.getpid()}-{int(time.time())}"
    work = stage.with_name(stage.name + "-work")
    stage.mkdir(parents=True)
    try:
        previous = find_phase(report, environ, ledger_path, work)
        check_update(report, previous, stage, keep_vm)
    except NoPreviousRelease as exc:
        print(f"check-update: {exc}")
        print("check-update: SKIPPED")
        return 0
    except Stop:
        pass  # recorded in its phase; the machine is already torn down
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if keep_vm:
            say(f"the release folder bound at /mnt/release stays at {stage}")
        else:
            shutil.rmtree(stage, ignore_errors=True)
    print(report.summary(PLANNED, title="./do check-update"), flush=True)
    print(f"check-update: {'FAILED' if report.failed() else 'PASSED'}", flush=True)
    return 1 if report.failed() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./do check-update", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep-vm", action="store_true", help="keep the machine afterwards (prints how to enter)"
    )
    parser.add_argument(
        "--ledger",
        type=Path,
        default=LEDGER,
        help="the release ledger to read (default: releases.json; for testing the ledger path)",
    )
    args = parser.parse_args(argv)
    try:
        with sigterm_raises():
            return run(args.keep_vm, args.ledger.resolve(), os.environ)
    except KeyboardInterrupt:
        say("interrupted; the machine was torn down")
        return 130


if __name__ == "__main__":
    sys.exit(main())
