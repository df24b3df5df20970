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
        table.add_row(*row)
    console.print(table)


def render_plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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
        click.echo(f"{label.ljust(width)}  {value}")


def text(value: object) -> str:
    """A cell: None is shown as '-', everything else as str()."""
    return "-" if value is None or value == "" else str(value)


def timestamp(value: object) -> str:
    """An API time such as 2026-01-02T03:04:05.678Z shown to the second."""
    if not isinstance(value, str):
        return text(value)
    return re.sub(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d+", r"\1", value)


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
