"""scalebox-update: the command line, and the one place errors become exit codes.

The exit code is decided here, at the program's boundary, from the kind of
error (``exit_code_for``); error classes carry no codes, because the same
class means different things to different programs. The table is
EXIT_CODES (also in --help, and docs/operations.md, which a test compares):

    0   updated, or already up to date (--check: up to date)
    1   refused before any change: nothing was changed
    2   usage error
    3   the new release failed and was rolled back: the old version runs, verified healthy
    4   rollback failed: manual intervention needed (the message says what to run)
    5   another scalebox-update is running
    10  --check: an update is available

Every OSError (a full disk, a read-only file system) ends in one line and a
hint, never a traceback; output to a terminal that is gone is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import httpx

import scalebox
from scalebox import priority
from scalebox.errors import ScaleboxError, UsageError
from scalebox.release.errors import ReleaseError
from scalebox.release.verify import Release, open_release, retired_keys_in, trusted_keys_in
from scalebox.update import (
    fetch,
    giveway,
    history,
    interrupt,
    journal,
    lock,
    migrate,
    packages,
    plan,
    preflight,
    resolve,
    stage,
    template_notice,
    transaction,
    versions,
)
from scalebox.update.context import DEFAULT_STABILITY_WINDOW, Context
from scalebox.update.errors import LockHeld, RollbackFailed, RolledBack, UpdateError, os_error
from scalebox.update.paths import Paths, private_dir
from scalebox.update.systemd import SERVICE, Systemctl

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_ROLLED_BACK = 3
EXIT_ROLLBACK_FAILED = 4
EXIT_BUSY = 5
EXIT_UPDATE_AVAILABLE = 10

# code -> (the "result" of --json, what it means); docs/operations.md has the same table.
EXIT_CODES: dict[int, tuple[str, str]] = {
    EXIT_OK: ("updated", "updated, or already up to date (--check: up to date)"),
    EXIT_REFUSED: ("refused", "refused before any change: nothing was changed"),
    EXIT_USAGE: ("usage error", "usage error"),
    EXIT_ROLLED_BACK: (
        "rolled back",
        "the new release failed and was rolled back; the old version runs, healthy",
    ),
    EXIT_ROLLBACK_FAILED: (
        "rollback failed",
        "rollback failed: manual intervention needed (the message says what to run)",
    ),
    EXIT_BUSY: ("busy", "another scalebox-update is running"),
    EXIT_UPDATE_AVAILABLE: ("update available", "--check: an update is available"),
}

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code:<3} {meaning}" for code, (_, meaning) in EXIT_CODES.items()
)


def exit_code_for(exc: BaseException) -> int:
    """The updater's exit code for an error, by its kind (the one table: EXIT_CODES)."""
    if isinstance(exc, RolledBack):
        return EXIT_ROLLED_BACK
    if isinstance(exc, RollbackFailed):
        return EXIT_ROLLBACK_FAILED
    if isinstance(exc, LockHeld):
        return EXIT_BUSY
    if isinstance(exc, (UsageError, click.UsageError)):
        return EXIT_USAGE
    # Everything else stopped before any change: a bad release (ReleaseError), a
    # version that is not PEP 440, a config the new release rejects, a full disk.
    return EXIT_REFUSED


Result = dict[str, Any]


def _say(text: str, *, err: bool = False) -> None:
    """Write one line; a terminal that is gone (hang-up, closed pipe) loses it, nothing else."""
    stream = sys.stderr if err else sys.stdout
    try:
        click.echo(text, err=err)
        stream.flush()
    except (OSError, ValueError):
        # Point the descriptor at /dev/null so that no later write (or the flush at
        # exit, which would turn the exit code into 120) fails again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


def _report(message: str) -> None:
    _say(f"scalebox-update: {message}", err=True)


def _paths() -> Paths:
    # The server's own paths; tests of the file-level steps build Paths(tmp_path) directly.
    return Paths(Path("/"))


def _stability_window(value: float | None) -> float:
    if value is not None:
        return value
    raw = os.environ.get("SCALEBOX_UPDATE_STABILITY", "")
    try:
        return float(raw) if raw else DEFAULT_STABILITY_WINDOW
    except ValueError:
        raise UsageError(
            f"SCALEBOX_UPDATE_STABILITY={raw!r} is not a number of seconds",
            "set it to e.g. 5, or unset it",
        ) from None


@contextmanager
def _context(window: float | None) -> Iterator[Context]:
    # The /health probes go to 127.0.0.1 only; no proxy from the environment applies.
    with httpx.Client(trust_env=False) as http:
        yield Context(
            paths=_paths(),
            service=Systemctl(),
            http=http,
            report=_report,
            stability_window=_stability_window(window),
        )


@contextmanager
def _transaction_guard(ctx: Context, *, change: bool = True) -> Iterator[str | None]:
    """Hold the lock, catch SIGTERM as an exception, and finish any interrupted transaction.

    ``change`` False (--dry-run promises to change nothing): an interrupted
    transaction is only told, and left for a run that may change things. (--check
    finishes it, as every other run does: a timer asking hourly is a recovery too.)"""
    with lock.held(ctx.paths.lock), interrupt.catching():
        recovered = transaction.recover(ctx) if change else None
        if recovered:
            _report(recovered)
        unfinished = not change and _tell_unfinished(ctx)
        if unfinished:  # only this run's scratch: the interrupted transaction's backup stays
            shutil.rmtree(ctx.paths.work, ignore_errors=True)
        else:
            transaction.clean_leftovers(ctx)
        try:
            yield recovered
        finally:
            shutil.rmtree(ctx.paths.work, ignore_errors=True)  # the extracted release


def _tell_unfinished(ctx: Context) -> bool:
    """Say so if a transaction is unfinished (or its journal unreadable); whether it is."""
    try:
        pending = journal.read(ctx.paths.journal)
    except UpdateError as exc:
        _report(f"warning: {exc.what}")
        return True
    if pending is not None:
        _report(
            f"warning: an interrupted {pending.action} {pending.from_version} -> "
            f"{pending.to_version} ({pending.step}) is not finished; this run changes "
            "nothing, so it is left as it is: `scalebox-update recover` (or the next update) "
            "finishes it, and what is installed may change then"
        )
    return pending is not None


@contextmanager
def _refusals_recorded(
    ctx: Context, action: str, to_version: str | None, *, record: bool
) -> Iterator[None]:
    """A disk's failure before the transaction began (no journal yet): a history entry.

    The transaction records its own refusals; this covers the steps before
    it (downloads, the trusted keys, the extracted release): a bare OSError
    becomes one line, and a download's or an extraction's error raised from
    an OSError is recorded and told in its own words.
    """
    try:
        yield
    except OSError as exc:
        what = f"the {action} failed before it began: {os_error(exc)}; "
        what += "nothing was changed"
        if record:
            _record_refusal(ctx, action, to_version, what)
        raise UpdateError(what, transaction.os_hint(exc)) from exc
    except (fetch.FetchError, ReleaseError, UpdateError) as exc:
        # The download's or the extraction's own words for the server's disk failing
        # under them ("cannot write ...: No space left on device"): recorded too.
        inner = exc.__cause__ if isinstance(exc.__cause__, ReleaseError) else exc
        if (
            record
            and isinstance(inner, fetch.FetchError | ReleaseError)
            and isinstance(inner.__cause__, OSError)
        ):
            said = "" if "nothing was changed" in exc.what else "; nothing was changed"
            _record_refusal(ctx, action, to_version, exc.what + said)
        raise


def _record_refusal(ctx: Context, action: str, to_version: str | None, what: str) -> None:
    try:
        from_version = preflight.installed(ctx.paths).version
    except (UpdateError, OSError):
        from_version = "unknown"
    problem = history.record_refusal(
        ctx.paths.history,
        action=action,
        from_version=from_version,
        to_version=to_version or "unknown",
        reason=what,
    )
    if problem:
        _report(f"{problem}; the history lacks this refusal")


def _emit(result: Result, as_json: bool) -> int:
    code = int(result.get("exit_code", 0))
    if as_json:
        _say(json.dumps(result, sort_keys=True))
    elif result.get("message"):
        _say(result["message"])
    return code


@click.group(
    invoke_without_command=True,
    epilog=EXIT_CODES_HELP,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("--to", "to_version", metavar="VERSION", help="Install this version.")
@click.option("--force", is_flag=True, help="Reinstall even when already at that version.")
@click.option("--allow-downgrade", is_flag=True, help="Allow installing an older version.")
@click.option("--allow-http", is_flag=True, help="Allow plain-http release URLs.")
@click.option("--check", is_flag=True, help="Only say whether an update is available (exit 10).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Resolve, download and verify; change nothing (with --rollback: name the release "
    "it would go back to).",
)
@click.option(
    "--stage",
    "stage_only",
    is_flag=True,
    help="Download, verify and build the release into releases/ but do not switch to it; "
    "scaleboxd keeps running. The next scalebox-update re-checks it and only switches.",
)
@click.option("--rollback", is_flag=True, help="Go back to the previous kept release.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result object on stdout.")
@click.option(
    "--stability-window",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="How long the new version must stay up (default 5, or SCALEBOX_UPDATE_STABILITY).",
)
@click.option("--version", "show_version", is_flag=True, help="Print the updater's version.")
@click.pass_context
def cli(  # noqa: PLR0917 - click passes every option as an argument
    click_ctx: click.Context,
    to_version: str | None,
    force: bool,
    allow_downgrade: bool,
    allow_http: bool,
    check: bool,
    dry_run: bool,
    stage_only: bool,
    rollback: bool,
    as_json: bool,
    stability_window: float | None,
    show_version: bool,
) -> None:
    """Update Scalebox on this server to the latest release (run as root).

    The release comes from SCALEBOX_RELEASE_URL (https URL, file URL or path)
    when set, else --to VERSION, else the latest GitHub release. It is
    verified before anything changes; a release that fails after the switch
    is rolled back automatically. Progress goes to stderr.
    """
    click_ctx.obj = as_json
    if click_ctx.invoked_subcommand is not None:
        return
    if show_version:
        click_ctx.exit(
            _emit(
                {
                    "result": "version",
                    "version": scalebox.__version__,
                    "message": f"scalebox-update {scalebox.__version__}",
                },
                as_json,
            )
        )
    if rollback and (to_version or force or allow_downgrade):
        raise UsageError(
            "--rollback cannot be combined with --to, --force or --allow-downgrade",
            "run `scalebox-update --rollback` alone",
        )
    if check and dry_run:
        raise UsageError("--check and --dry-run are separate modes", "choose one")
    if rollback and check:
        raise UsageError(
            "--check asks whether an update is available; it cannot be combined with --rollback",
            "`scalebox-update --rollback --dry-run` says what a rollback would do, "
            "`scalebox-update status` lists the kept releases",
        )
    if stage_only and (check or rollback):
        raise UsageError("--stage cannot be combined with --check or --rollback", "choose one")
    preflight.require_root()
    with (
        _giving_way(not rollback),
        _context(stability_window) as ctx,
        _transaction_guard(ctx, change=not dry_run) as recovered,
        _refusals_recorded(
            ctx, "rollback" if rollback else "update", to_version, record=not (check or dry_run)
        ),
    ):
        if rollback:
            result = _rollback(ctx, dry_run=dry_run)
        else:
            result = _update(
                ctx,
                to_version=to_version,
                force=force,
                allow_downgrade=allow_downgrade,
                allow_http=allow_http,
                check=check,
                dry_run=dry_run,
                stage_only=stage_only,
            )
    result["recovered"] = recovered
    click_ctx.exit(_emit(result, as_json))


@contextmanager
def _giving_way(give: bool) -> Iterator[None]:
    """An update gives way from before its context is made: the health probes' HTTP
    client costs ~20 ms of CPU (it loads the CA bundle; httpcore's ~70 ms import is made
    by the entry point, lowered), which at full priority, in a session at nice 0, slowed
    the daemon serving before any step. A rollback (``give`` False) never waits."""
    if give:
        giveway.give_way(_paths().config, _report)
    try:
        yield
    finally:
        priority.restore_process(_report)


def _update(ctx: Context, **options: Any) -> Result:
    """_update_steps() with the service first for the CPU until the switch, and again
    once the new daemon is verified (the commit, the pruning).

    Already lowered by _giving_way, unless the recovery of an interrupted update
    (a commit it finished) restored the priority. transaction._switch (and a rollback)
    restore it; the finally is for every way out.
    """
    giveway.give_way(ctx.paths.config, _report)
    try:
        return _update_steps(ctx, **options)
    finally:
        priority.restore_process(_report)


def _update_steps(
    ctx: Context,
    *,
    to_version: str | None,
    force: bool,
    allow_downgrade: bool,
    allow_http: bool,
    check: bool,
    dry_run: bool,
    stage_only: bool = False,
) -> Result:
    installed = preflight.check(ctx)
    source = resolve.source_from_env(os.environ, to_version=to_version, allow_http=allow_http)
    with fetch.make_client(
        source.github_token, api_base=source.api_base, allow_http=source.allow_http
    ) as client:
        candidate = resolve.resolve(source, client)
        _report(f"installed {installed.version}; release from {candidate.origin}: {candidate.url}")
        if candidate.version is not None:
            early = _decide(installed, candidate.version, force, allow_downgrade, check)
            if early is not None:
                return early
        tarball = ctx.paths.downloads / candidate.asset_name
        try:
            fetch.fetch(candidate.url, tarball, client)
            release = _open(ctx, tarball)
        finally:
            tarball.unlink(missing_ok=True)
    if candidate.version is not None and versions.compare(candidate.version, release.version):
        raise UpdateError(
            f"{candidate.url} was listed as version {candidate.version} "
            f"but its signed RELEASE.json says {release.version}; nothing was changed",
            "report this to the release's publisher",
        )
    decided = _decide(installed, release.version, force, allow_downgrade, check)
    if decided is not None:
        return decided
    if dry_run:
        return _dry_run(installed.version, release, stage_only=stage_only)
    if stage_only:
        return _pre_stage(ctx, installed.version, release)
    outcome = transaction.install(
        ctx,
        action="update",
        from_version=installed.version,
        from_release=installed.release,
        target=transaction.Target(release.version, release.root),
    )
    result = _result(
        outcome.result,
        outcome.from_version,
        outcome.to_version,
        outcome.message,
        pruned=outcome.pruned,
        step_times=outcome.step_times,
        migrations=outcome.migrations,
    )
    result["unfinished"] = outcome.unfinished
    if outcome.result == "updated":
        # Last, so it is what the operator reads at the end. Lowered like the commit:
        # it starts the new release's Python (~130 ms of CPU), which at full priority
        # stalled every request for 35-45 ms at the end of an update (perf sched).
        with giveway.waiting(ctx.paths.config, ctx.report):
            template = template_notice.notice(ctx.paths)
        if template is not None:
            result["template"] = template
            result["message"] = f"{result['message']}\n{template}"
    return result


def _pre_stage(ctx: Context, installed: str, release: Release) -> Result:
    """Build releases/<version> and check the live config with it; the service is not touched.

    No journal: nothing live changes. The lock is held, and the directory is
    marked .complete only once whole, so a crash leaves an unfinished
    directory that the next run removes; a complete one is re-checked
    (RELEASE.json bytes and every staged file) before an update reuses it.
    """
    name = stage.check_name(release.version)
    if stage.current_name(ctx.paths) == name:
        return _result(
            "up to date", installed, release.version, f"{release.version} is the running release"
        )
    stage.ensure_packages(release.root, release.version, _report)
    try:
        built = stage.build(
            ctx.paths, release.root, release.version, python=ctx.python, report=_report
        )
    except BaseException:
        # Failed or interrupted: the unfinished directory goes now (else the next run removes it).
        if not stage.is_complete(ctx.paths.release_dir(name)):
            shutil.rmtree(ctx.paths.release_dir(name), ignore_errors=True)
        raise
    stage.check_config(ctx.paths, name)
    how = "built" if built else "already built and re-checked"
    return _result(
        "staged",
        installed,
        release.version,
        f"staged {release.version} in {ctx.paths.release_dir(name)} ({how}, verified, "
        f"accepts the live config); scaleboxd {installed} keeps running; "
        f"{_switch_command(installed, release.version)} switches to it",
    )


def _switch_command(installed: str, version: str) -> str:
    """The command that switches to a pre-staged ``version``, as this one found it."""
    older = False
    with contextlib.suppress(versions.InvalidVersion):
        older = versions.compare(version, installed) < 0
    flag = " --allow-downgrade" if older else ""
    if os.environ.get("SCALEBOX_RELEASE_URL"):
        return f"`scalebox-update{flag}` with the same SCALEBOX_RELEASE_URL"
    return f"`scalebox-update --to {version}{flag}`"


def _dry_run(installed: str, release: Release, *, stage_only: bool = False) -> Result:
    """What the update would do beyond the switch: migrations to run, packages to install."""
    pending = migrate.would_run(release.root, installed, release.version)
    need = packages.missing_now(stage.declared_packages(release.root))
    verb = "stage" if stage_only else "update"
    lines = [
        f"would {verb} {installed} -> {release.version} "
        f"(verified, signed by {release.signed_by}); nothing was changed",
        "  migrations to run: "
        + (", ".join(f"{m.id} ({m.description})" for m in pending) or "none"),
        "  Debian packages to install: " + (", ".join(need) or "none"),
    ]
    out = _result("dry run", installed, release.version, "\n".join(lines))
    out["pending_migrations"] = [m.to_json() for m in pending]
    out["missing_packages"] = need
    return out


def _decide(
    installed: preflight.Installed, version: str, force: bool, allow_downgrade: bool, check: bool
) -> Result | None:
    """A final answer without installing (up to date, --check), or None to go on."""
    decision = plan.decide(
        installed.version, version, force=force, allow_downgrade=allow_downgrade or check
    )
    if check:
        if decision is plan.Decision.UPDATE:
            return _result(
                "update available",
                installed.version,
                version,
                f"update available: {installed.version} -> {version}",
                exit_code=EXIT_UPDATE_AVAILABLE,
            )
        return _result(
            "up to date",
            installed.version,
            version,
            f"up to date: installed {installed.version}, latest {version}",
        )
    if decision is plan.Decision.UP_TO_DATE:
        return _result(
            "up to date",
            installed.version,
            version,
            f"already at {version}; nothing to do (--force reinstalls)",
        )
    return None


def _open(ctx: Context, tarball: Path) -> Release:
    keys = trusted_keys_in(ctx.paths.keys_dir)
    if not keys:
        raise UpdateError(
            f"no trusted release keys in {ctx.paths.keys_dir}; cannot verify any release",
            f"put the release-signing public key (*.pub) into {ctx.paths.keys_dir}",
        )
    _report(f"verifying {tarball.name}")
    try:
        return open_release(
            tarball,
            private_dir(ctx.paths.work) / "release",
            keys,
            retired_keys=retired_keys_in(ctx.paths.keys_dir),
        )
    except ReleaseError as exc:
        raise UpdateError(f"{exc.what}; nothing was changed", exc.hint) from exc


def _rollback(ctx: Context, *, dry_run: bool = False) -> Result:
    installed = preflight.check(ctx)
    kept = {r.version: r.name for r in stage.list_releases(ctx.paths) if r.complete}
    previous = plan.choose_previous(history.read(ctx.paths.history), installed.version, list(kept))
    if previous is None:
        raise UpdateError(
            f"there is no earlier release kept to roll back to from {installed.version}",
            "install a specific version with `scalebox-update --to VERSION --allow-downgrade`",
        )
    if dry_run:
        return _result(
            "dry run",
            installed.version,
            previous,
            f"would roll back {installed.version} -> {previous} (releases/{kept[previous]}); "
            "nothing was changed",
        )
    _report(f"rolling back {installed.version} -> {previous} (releases/{kept[previous]})")
    outcome = transaction.install(
        ctx,
        action="rollback",
        from_version=installed.version,
        from_release=installed.release,
        target=transaction.Target(previous, None),
    )
    return _result(
        outcome.result,
        outcome.from_version,
        outcome.to_version,
        f"rolled back {installed.version} -> {previous}; scaleboxd {previous} is healthy",
        pruned=outcome.pruned,
        step_times=outcome.step_times,
        migrations=outcome.migrations,
    )


def _result(
    result: str,
    installed: str,
    target: str,
    message: str,
    *,
    exit_code: int = 0,
    pruned: list[str] | None = None,
    step_times: dict[str, float] | None = None,
    migrations: list[str] | None = None,
) -> Result:
    out: Result = {
        "result": result,
        "installed": installed,
        "target": target,
        "message": message,
        "exit_code": exit_code,
    }
    if pruned is not None:
        out["pruned"] = pruned
    if step_times is not None:
        out["step_times"] = step_times
    if migrations is not None:
        out["migrations"] = migrations
    return out


@cli.command("recover")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result object.")
@click.pass_context
def recover_command(click_ctx: click.Context, as_json: bool) -> None:
    """Finish an update a crash or power loss interrupted (run at boot by a unit)."""
    as_json = as_json or bool(click_ctx.obj)
    preflight.require_root()
    try:
        with _context(None) as ctx, _transaction_guard(ctx) as recovered:
            pass
    except transaction.CommitUnfinished as exc:
        # The update stands, as an update whose bookkeeping failed says "updated" (exit
        # 0) with what is left: not "refused ... nothing was changed", which it is not.
        result: Result = {
            "result": "recovered",
            "message": f"recovered: {exc.what}",
            "unfinished": exc.left,
            "exit_code": 0,
        }
        click_ctx.exit(_emit(result, as_json))
    message = recovered or "no interrupted update; nothing to do"
    click_ctx.exit(
        _emit(
            {
                "result": "recovered" if recovered else "nothing to recover",
                "message": message,
                "unfinished": None,
                "exit_code": 0,
            },
            as_json,
        )
    )


@cli.command("history")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def history_command(click_ctx: click.Context, as_json: bool) -> None:
    """Show every update: when, from, to, result and reason."""
    entries = history.read(_paths().history)
    if as_json or click_ctx.obj:
        for entry in entries:
            click.echo(json.dumps(entry.to_json(), sort_keys=True))
        return
    if not entries:
        click.echo("no updates recorded yet")
        return
    click.echo(f"{'WHEN':20}  {'ACTION':8}  {'FROM':12}  {'TO':12}  {'RESULT':15}  REASON")
    for e in entries:
        click.echo(
            f"{e.at:20}  {e.action:8}  {e.from_version:12}  {e.to_version:12}  "
            f"{e.result:15}  {e.reason or ''}"
        )


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def status_command(click_ctx: click.Context, as_json: bool) -> None:
    """Show the installed release, kept releases, the service and any unfinished update."""
    p = _paths()
    current = stage.current_name(p)
    try:
        pending = journal.read(p.journal)
    except interrupt.Interrupted:
        raise  # a Ctrl-C, not an unreadable journal
    except UpdateError as exc:
        pending = None
        _report(str(exc))
    try:
        state = Systemctl().state(SERVICE)
        service = f"{state.active}/{state.sub} (main PID {state.main_pid})"
    except interrupt.Interrupted:
        raise  # a Ctrl-C, not a missing systemctl
    except UpdateError:
        service = "unknown (systemctl unavailable)"
    try:
        version_file = p.version_file.read_text().strip()
    except OSError:
        version_file = ""
    # A journal with an updater at work is its transaction in progress, not one to recover.
    running = lock.holder(p.lock)
    info: Result = {
        "current": current,
        "version": stage.manifest_version(p.release_dir(current)) if current else None,
        "version_file": version_file or None,
        "releases": [r.name for r in stage.list_releases(p) if r.complete],
        "service": service,
        "unfinished": None
        if pending is None
        else {"step": pending.step, "from": pending.from_version, "to": pending.to_version},
        "updater_pid": running,  # a scalebox-update running now, else null
    }
    if as_json or click_ctx.obj:
        click.echo(json.dumps(info, sort_keys=True))
        return
    where = f"current -> releases/{current}" if current else f"no {p.current}"
    click.echo(f"installed: {info['version'] or 'none'} ({where})")
    click.echo(f"/etc/scaleboxd/version: {info['version_file'] or 'missing'}")
    click.echo(f"kept releases: {', '.join(info['releases']) or 'none'}")
    click.echo(f"scaleboxd: {service}")
    if running is not None and pending is not None:
        click.echo(
            f"IN PROGRESS: {pending.action} {pending.from_version} -> {pending.to_version} "
            f"at step {pending.step} (scalebox-update PID {running}): wait for it to finish"
        )
    elif running is not None:
        click.echo(f"scalebox-update is running (PID {running}); it has not begun a transaction")
    elif pending is not None:
        click.echo(
            f"UNFINISHED {pending.action} {pending.from_version} -> {pending.to_version} "
            f"at step {pending.step}: run `scalebox-update recover`"
        )


def main(argv: list[str] | None = None) -> int:
    """The entry point: the one handler that turns errors into a line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    # The caller's umask must not decide the modes of what root runs later (the venv).
    os.umask(0o022)
    try:
        # One signal scope for the whole run: once a transaction's outcome is
        # settled, no later signal can change the exit code (interrupt.py).
        with interrupt.catching(last=True):
            interrupt.replay_early()  # a SIGTERM while the entry point imported: stop here
            # standalone_mode=False: click returns the code of ctx.exit() instead of exiting.
            code = cli.main(args=args, prog_name="scalebox-update", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        with contextlib.suppress(OSError, ValueError):
            exc.show()
        return _fail_json(as_json, exc.format_message(), None, EXIT_USAGE)
    except click.exceptions.Abort:
        return _fail_json(as_json, "interrupted", None, EXIT_REFUSED, result="interrupted")
    except ScaleboxError as exc:
        return _fail(as_json, exc.what, exc.hint, exit_code_for(exc), exc)
    except OSError as exc:
        # A file system refused a write or a read outside any transaction step
        # (those record it themselves): one line, no traceback.
        return _fail(as_json, os_error(exc), transaction.os_hint(exc), EXIT_REFUSED, exc)
    return code if isinstance(code, int) else 0


def _fail(as_json: bool, what: str, hint: str | None, code: int, exc: BaseException) -> int:
    _say(f"scalebox-update: error: {what}", err=True)
    if hint:
        _say(f"  hint: {hint}", err=True)
    step_times = exc.step_times if isinstance(exc, RolledBack) else None
    return _fail_json(as_json, what, hint, code, step_times)


def _fail_json(
    as_json: bool,
    message: str,
    hint: str | None,
    code: int,
    step_times: dict[str, float] | None = None,
    *,
    result: str | None = None,
) -> int:
    if as_json:
        out: Result = {
            "result": result or EXIT_CODES[code][0],
            "message": message,
            "hint": hint,
            "exit_code": code,
        }
        if step_times is not None:
            out["step_times"] = step_times
        _say(json.dumps(out, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
