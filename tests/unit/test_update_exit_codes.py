"""scalebox-update's exit codes: one table, decided at the program's boundary.

The oracle is docs/operations.md: its scalebox-update table is parsed here
and must list exactly the codes and ``--json`` results main.EXIT_CODES
decides, and every kind of error maps to the code the docs promise for it.
tests/system/test_update_exit_codes.py drives each code on a real server.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from scalebox import errors
from scalebox.cli import errors as cli_errors
from scalebox.errors import ConfigError, ScaleboxError, UsageError
from scalebox.migrations.errors import MigrationError, MigrationFailed
from scalebox.release.errors import ReleaseError
from scalebox.update import main, versions
from scalebox.update.errors import LockHeld, RollbackFailed, RolledBack, UpdateError
from scalebox.update.interrupt import Interrupted

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def docs_table(program: str) -> dict[int, list[str]]:
    """The rows of the ``### <program>`` exit-code table: code -> the other cells."""
    text = DOCS.read_text()
    section = text.split(f"### {program}\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows[int(cells[0])] = cells[1:]
    return rows


def test_the_docs_table_is_the_programs_table() -> None:
    table = docs_table("scalebox-update")
    assert sorted(table) == [0, 1, 2, 3, 4, 5, 10]
    assert {code: cells[0] for code, cells in table.items()} == {
        code: result for code, (result, _) in main.EXIT_CODES.items()
    }


def test_help_lists_every_code() -> None:
    shown = CliRunner().invoke(main.cli, ["--help"]).output
    for code, (_, meaning) in main.EXIT_CODES.items():
        assert re.search(rf"^\s+{code}\s+{re.escape(meaning[:30])}", shown, re.M), code


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RolledBack("x"), 3),
        (RollbackFailed("x"), 4),
        (LockHeld("x"), 5),
        (UsageError("x"), 2),
        (UpdateError("x"), 1),
        (Interrupted("x"), 1),
        # Kinds shared with other programs: for the updater each is a refusal.
        (ReleaseError("x"), 1),  # the verifier's 3 would read "rolled back" here
        (versions.InvalidVersion("x"), 1),  # a signed manifest's bad version is no usage error
        (ConfigError("x"), 1),
        (MigrationFailed("0001-x", "boom"), 1),
        (MigrationError("x"), 1),
        (ScaleboxError("x"), 1),
    ],
)
def test_each_kind_of_error_gets_the_documented_code(error: ScaleboxError, code: int) -> None:
    assert main.exit_code_for(error) == code
    assert code in docs_table("scalebox-update")


def test_error_classes_carry_no_exit_codes() -> None:
    """Codes are each program's decision, not an attribute shared between programs."""
    kinds = [errors.ScaleboxError, ReleaseError, MigrationFailed, RolledBack, cli_errors.NotFound]
    for kind in kinds:
        assert not hasattr(kind, "exit_code"), kind


def test_the_cli_table_matches_its_help() -> None:
    table = docs_table("scalebox (the CLI)")
    assert sorted(table) == sorted(code for code, _ in cli_errors.EXIT_CODES_HELP)
