"""./do release X.Y.Z: cut a release on a clean tree.

    ./do release X.Y.Z [--dry-run]

Sets __version__ in src/scalebox/__init__.py, turns CHANGELOG.md's
"## Unreleased" into "## X.Y.Z — YYYY-MM-DD" under a fresh empty Unreleased
heading, and commits that as "Release X.Y.Z". Then it records
{version, commit, date} of that release commit in releases.json (the release
ledger, tools/ledger.py) and commits the ledger. Refused, with nothing
changed: a dirty tree, a malformed version, one not newer than the current
version or the newest ledger entry, a CHANGELOG.md without an Unreleased
section or with nothing in it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from scalebox.errors import ScaleboxError, UsageError
from scalebox.update import versions
from tools import ledger

ROOT = Path(__file__).resolve().parent.parent
INIT = Path("src/scalebox/__init__.py")
CHANGELOG = Path("CHANGELOG.md")
LEDGER = Path("releases.json")
UNRELEASED = "## Unreleased"
_VERSION_LINE = re.compile(r'^__version__ = "([^"]*)"$', re.MULTILINE)


class ReleaseRefused(ScaleboxError):
    """The release cannot be cut as asked; nothing was changed."""


@dataclass(frozen=True)
class Plan:
    """What the release changes: the new texts of the two files it edits."""

    version: str
    previous: str
    day: str
    init_text: str
    changelog_text: str

    @property
    def message(self) -> str:
        return f"Release {self.version}"


def check_version(requested: str, current: str, entries: tuple[ledger.Entry, ...]) -> str:
    """``requested`` if it is a well-formed version above the current one and the ledger's."""
    try:
        parsed = versions.parse(requested)
    except versions.InvalidVersion:
        parsed = None
    well_formed = (
        parsed is not None
        and str(parsed) == requested
        and len(parsed.release) == 3
        and parsed.local is None
        and parsed.epoch == 0
    )
    if not well_formed:
        raise UsageError(
            f"{requested!r} is not a release version X.Y.Z",
            "give a normalized version such as 0.2.0 (or 0.2.0rc1), without a leading v",
        )
    if not versions.is_newer(requested, current):
        raise ReleaseRefused(
            f"{requested} is not newer than the current version {current} ({INIT})",
            f"choose a version above {current}",
        )
    last = ledger.newest(entries)
    if last is not None and not versions.is_newer(requested, last.version):
        raise ReleaseRefused(
            f"{requested} is not newer than {last.version}, the last release in {LEDGER}",
            f"choose a version above {last.version}",
        )
    return requested


def current_version(init_text: str) -> str:
    match = _VERSION_LINE.search(init_text)
    if match is None:
        raise ReleaseRefused(f'{INIT} has no line __version__ = "..."', f"restore it in {INIT}")
    return match.group(1)


def set_version(init_text: str, version: str) -> str:
    return _VERSION_LINE.sub(f'__version__ = "{version}"', init_text, count=1)


def date_changelog(text: str, version: str, day: str) -> str:
    """The changelog with its Unreleased section dated as ``version``, a new one above."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip() == UNRELEASED]
    if len(starts) != 1:
        raise ReleaseRefused(
            f'{CHANGELOG} has {len(starts)} "{UNRELEASED}" headings, not one',
            f'keep exactly one "{UNRELEASED}" section above the released ones',
        )
    start = starts[0]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    if not "".join(lines[start + 1 : end]).strip():
        raise ReleaseRefused(
            f'{CHANGELOG}\'s "{UNRELEASED}" section is empty: the release would say nothing',
            "write what changed under it (Added / Changed / Fixed) and commit that first",
        )
    heading = [f"{UNRELEASED}\n", "\n", f"## {version} — {day}\n"]
    return "".join([*lines[:start], *heading, *lines[start + 1 :]])


def make_plan(
    requested: str, init_text: str, changelog_text: str, entries: tuple[ledger.Entry, ...], day: str
) -> Plan:
    previous = current_version(init_text)
    version = check_version(requested, previous, entries)
    return Plan(
        version=version,
        previous=previous,
        day=day,
        init_text=set_version(init_text, version),
        changelog_text=date_changelog(changelog_text, version, day),
    )


# --- git and files ----------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ReleaseRefused(
            f"`git {' '.join(args)}` failed (exit {result.returncode}): "
            + (result.stderr.strip() or result.stdout.strip()),
            "fix the git problem above and run ./do release again",
        )
    return result.stdout


def require_clean(repo: Path) -> None:
    dirty = _git(repo, "status", "--porcelain").splitlines()
    if dirty:
        shown = "\n".join("    " + line for line in dirty[:10])
        more = f"\n    ... and {len(dirty) - 10} more" if len(dirty) > 10 else ""
        raise ReleaseRefused(
            f"the working tree has uncommitted changes:\n{shown}{more}",
            "a release is built from a commit: commit or remove these changes first",
        )


def cut(repo: Path, plan: Plan) -> ledger.Entry:
    """Write and commit the release, then record its commit in the ledger. Returns the entry."""
    edited = {INIT: plan.init_text, CHANGELOG: plan.changelog_text}
    originals = {path: (repo / path).read_text() for path in edited}
    try:
        for path, text in edited.items():
            (repo / path).write_text(text)
        _git(repo, "add", "--", *map(str, edited))
        _git(repo, "commit", "--quiet", "-m", plan.message, "--", *map(str, edited))
    except BaseException:
        # Bad input changes nothing: the tree was clean, so put it back as it was.
        for path, text in originals.items():
            (repo / path).write_text(text)
        subprocess.run(
            ["git", "-C", str(repo), "restore", "--staged", "--", *map(str, edited)],
            capture_output=True,
            check=False,
        )
        raise
    commit = _git(repo, "rev-parse", "HEAD").strip()
    entry = ledger.Entry(plan.version, commit, plan.day)
    entries = ledger.add(ledger.load(repo / LEDGER), entry)
    (repo / LEDGER).write_text(ledger.render(entries))
    _git(repo, "add", "--", str(LEDGER))
    _git(
        repo,
        "commit",
        "--quiet",
        "-m",
        f"Record release {plan.version} ({commit[:12]}) in {LEDGER}",
        "--",
        str(LEDGER),
    )
    return entry


def describe(plan: Plan) -> str:
    return "\n".join(
        [
            f"would release {plan.version} (current version {plan.previous}):",
            f'  {INIT}: __version__ = "{plan.previous}" -> "{plan.version}"',
            f'  {CHANGELOG}: "{UNRELEASED}" -> "## {plan.version} — {plan.day}",'
            f' a new empty "{UNRELEASED}" above it',
            f'  commit "{plan.message}"',
            f'  {LEDGER}: add {{"version": "{plan.version}", "commit": <that commit>,'
            f' "date": "{plan.day}"}}',
            f'  commit "Record release {plan.version} (<commit>) in {LEDGER}"',
        ]
    )


def release(repo: Path, requested: str, *, dry_run: bool, day: date) -> str:
    require_clean(repo)
    plan = make_plan(
        requested,
        (repo / INIT).read_text(),
        (repo / CHANGELOG).read_text(),
        ledger.load(repo / LEDGER),
        day.isoformat(),
    )
    if dry_run:
        return describe(plan) + "\nnothing was changed (--dry-run)"
    entry = cut(repo, plan)
    return (
        f"released {entry.version}: commit {entry.commit}, recorded in {LEDGER}\n"
        f"next: push, then publish builds/scalebox-{entry.version}-<arch>.tar.gz"
        f" (./do tarball on that commit) as the GitHub release v{entry.version}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./do release", description=__doc__.splitlines()[0])
    parser.add_argument("version", help="the new version, e.g. 0.2.0")
    parser.add_argument("--dry-run", action="store_true", help="print what would change")
    parser.add_argument("--repo", type=Path, default=ROOT, help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args(argv)
    try:
        print(release(args.repo, args.version, dry_run=args.dry_run, day=date.today()))
    except ScaleboxError as exc:
        print(f"release: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
