"""The one error root of Scalebox.

Every error a person may see is a ScaleboxError: it says what happened and
what to do next. Exactly one top-level handler per program turns it into a
single line on stderr and an exit code. The code is that program's decision,
made at its boundary from the kind of error (one table per program, in
docs/operations.md): the classes here carry none, because one kind of error
means different things to different programs. This module imports nothing
from the rest of the package, so every module may use it.
"""

from __future__ import annotations


class ScaleboxError(Exception):
    """Something went wrong that a person can act on.

    ``what`` says what happened; ``hint`` says what to do next.
    """

    def __init__(self, what: str, hint: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.what}\n  hint: {self.hint}"
        return self.what


class ConfigError(ScaleboxError):
    """A config file or value is invalid."""


class UsageError(ScaleboxError):
    """The command line asked for something impossible."""
