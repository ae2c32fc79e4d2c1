"""Human output of the operator commands: rich tables and hex dumps rendered to plain text
(no colour codes, so a pipe or a log gets the same text). rich is imported only when a command
prints for a human, so ``farebox --help`` stays fast."""

from __future__ import annotations

import io
import os
import shutil
import sys
from collections.abc import Iterable, Sequence


#: the width of tables in a pipe or a log (``$COLUMNS`` overrides it)
PIPE_WIDTH = 100


def output_width() -> int:
    """On a terminal: its width. In a pipe or a log: ``$COLUMNS`` when set, else 100 columns.
    A table wider than that wraps its cells (a hex dump at its spaces) rather than running off
    the screen or the page."""
    if sys.stdout.isatty():
        return max(40, shutil.get_terminal_size((PIPE_WIDTH, 24)).columns)
    try:
        return max(40, int(os.environ["COLUMNS"]))
    except (KeyError, ValueError):
        return PIPE_WIDTH


def render(*items: object) -> str:
    """Strings and rich renderables, one after another, as text."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=output_width(), color_system=None, force_terminal=False,
                      highlight=False, emoji=False)
    for item in items:
        console.print(item, markup=False) if isinstance(item, str) else console.print(item)
    return buffer.getvalue().rstrip("\n")


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]],
          right: Sequence[str] = ()):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    # Cells are Text, never markup: "[0a]" in a hex dump must print as it is.
    result = Table(title=None if title is None else Text(title), box=box.SIMPLE_HEAD,
                   title_justify="left", show_edge=False)
    for column in columns:
        result.add_column(Text(column), justify="right" if column in right else "left")
    for row in rows:
        result.add_row(*(Text("" if cell is None else str(cell)) for cell in row))
    return result


def hex_line(data: bytes, highlight: Iterable[int] = ()) -> str:
    """``00 11 22 ...`` with the bytes at ``highlight`` marked ``[..]``."""
    marked = set(highlight)
    return " ".join(f"[{b:02x}]" if i in marked else f"{b:02x}" for i, b in enumerate(data))


def hexdump(title: str, blocks: Sequence[tuple[str, bytes, str]]):
    """One row per block: label, hex, ASCII, note."""
    rows = []
    for label, data, note in blocks:
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in data)
        rows.append((label, hex_line(data), text, note))
    return table(title, ("block", "data", "ascii", ""), rows)
