"""python -m scalebox.migrations {list,run}: the runner the updater calls from the new release.

    list [--json]
    run --config PATH --from VERSION --to VERSION --state FILE [--json]

Exit codes: 0 done (or nothing pending), 1 the config or the state file
cannot be used (a disk that refused a write too: with --json, ``{"result":
"error", "errno", "filename"}``), 2 usage error, 3 a migration failed (its id
and message are printed; with --json: ``{"result": "failed", "failed": {"id",
"message"}}``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scalebox.errors import ScaleboxError
from scalebox.migrations import steps as _steps  # noqa: F401 - registers the migrations
from scalebox.migrations.errors import MigrationFailed
from scalebox.migrations.registry import MIGRATIONS
from scalebox.migrations.runner import run
from scalebox.update import versions

EXIT_UNUSABLE = 1  # the config or the state file cannot be used
EXIT_USAGE = 2  # a version on the command line is not PEP 440 (argparse's own errors too)
EXIT_FAILED = 3  # a migration failed (the updater then rolls back)


def _exit_code_for(exc: ScaleboxError) -> int:
    if isinstance(exc, MigrationFailed):
        return EXIT_FAILED
    if isinstance(exc, versions.InvalidVersion):
        return EXIT_USAGE
    return EXIT_UNUSABLE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scalebox.migrations",
        description="List or run this release's config migrations.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every migration of this release, in order")
    listing.add_argument("--json", action="store_true", help="one JSON array on stdout")
    running = commands.add_parser("run", help="apply the pending migrations")
    running.add_argument("--config", type=Path, required=True, help="/etc/scaleboxd/config")
    running.add_argument("--from", dest="from_version", required=True, metavar="VERSION")
    running.add_argument("--to", dest="to_version", required=True, metavar="VERSION")
    running.add_argument("--state", type=Path, required=True, help="records applied ids")
    running.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser


def _list(as_json: bool) -> int:
    if as_json:
        print(json.dumps([m.to_json() for m in MIGRATIONS], indent=2))
        return 0
    if not MIGRATIONS:
        print("this release has no migrations")
    for m in MIGRATIONS:
        print(f"{m.id}  (since {m.since})  {m.description}")
    return 0


def _run(args: argparse.Namespace) -> int:
    for version in (args.from_version, args.to_version):
        versions.parse(version)
    outcome = run(
        MIGRATIONS,
        config_path=args.config,
        from_version=args.from_version,
        to_version=args.to_version,
        state_path=args.state,
        report=(lambda line: print(line, file=sys.stderr)) if args.json else print,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "result": "ok",
                    "applied": list(outcome.applied),
                    "skipped": list(outcome.skipped),
                    "config_changed": outcome.config_changed,
                },
                sort_keys=True,
            )
        )
    elif not outcome.applied:
        print(f"no pending migrations from {args.from_version} to {args.to_version}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _list(args.json) if args.command == "list" else _run(args)
    except OSError as exc:
        # This server's disk (a full or read-only /etc), not the release: said with its
        # errno, so that the updater refuses the update instead of blaming the release.
        what = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
        print(f"migrations: error: {what}", file=sys.stderr)
        if args.json:
            print(json.dumps({"result": "error", "message": what, "errno": exc.errno,
                              "filename": exc.filename}, sort_keys=True))  # fmt: skip
        return EXIT_UNUSABLE
    except ScaleboxError as exc:
        print(f"migrations: error: {exc.what}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        if args.json:
            out: dict[str, object] = {"result": "error", "message": exc.what, "hint": exc.hint}
            if isinstance(exc.__cause__, OSError):  # the disk refused a write: its errno
                out["errno"], out["filename"] = exc.__cause__.errno, exc.__cause__.filename
            if isinstance(exc, MigrationFailed):
                out["result"] = "failed"
                out["failed"] = {"id": exc.migration_id, "message": exc.message}
            print(json.dumps(out, sort_keys=True))
        return _exit_code_for(exc)


if __name__ == "__main__":
    sys.exit(main())
