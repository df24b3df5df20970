"""Printing: tables and fields for people, the API's JSON for scripts.

On a terminal tables are drawn by rich and fold long cells instead of cutting
them. When stdout is a pipe or a file, tables are plain columns separated by
two spaces, never truncated (rich would squeeze them to 80 columns).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text


def is_terminal() -> bool:
    return sys.stdout.isatty()


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def render_rich_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], console: Console
) -> None:
    table = Table(*headers, header_style="bold", box=None, pad_edge=False)
    for index, column in enumerate(table.columns):
        column.overflow = "fold"
        if index == 0:
            # The first column is the identifier people copy: keep it on one line.
            column.min_width = max(len(str(row[0])) for row in [headers, *rows])
    for row in rows:
        # Text, not markup: a cell is the server's text, and "[link=...]" in a VM's
        # status drew a link, "[/oops]" raised a traceback.
        table.add_row(*(Text(printable(cell)) for cell in row))
    console.print(table)


def render_plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    if is_terminal():
        render_rich_table(headers, rows, Console())
    else:
        click.echo(render_plain_table(headers, rows))


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    """``label  value`` lines, labels aligned, for one object."""
    width = max((len(label) for label, _ in fields), default=0)
    for label, value in fields:
        click.echo(f"{label.ljust(width)}  {printable(value)}")


def printable(value: str) -> str:
    """``value`` with every character a terminal could act on written as an escape.

    What the server sends is shown to a person: an escape sequence in a VM's name
    or status set the terminal's title, cleared the screen or hid text. Control,
    format (bidi overrides) and separator characters other than the space become
    ``\x1b``, ``\u202e``, ...
    """
    if value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in value)


def text(value: object) -> str:
    """A cell: None is shown as '-', everything else as str(), printable."""
    return "-" if value is None or value == "" else printable(str(value))


def timestamp(value: object) -> str:
    """An API time such as 2026-01-02T03:04:05.678Z shown to the second."""
    if not isinstance(value, str):
        return text(value)
    return printable(re.sub(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d+", r"\1", value))


def size(num_bytes: object) -> str:
    if not isinstance(num_bytes, int | float):
        return text(num_bytes)
    amount = float(num_bytes)
    if amount < 1024:
        return f"{amount:.0f} B"
    for unit in ("KiB", "MiB"):
        amount /= 1024
        if amount < 1024:
            return f"{amount:.1f} {unit}"
    return f"{amount / 1024:.1f} GiB"
