"""murderctl's output: rich tables and progress bars on a terminal, plain lines otherwise.

Plain lines are what a CI log or a pipe wants: one line per table row (columns aligned with
spaces, no box drawing, no colour) and one line per progress step that matters (a state
change or 10 % more), never a redraw.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

PLAIN_STEP = 0.1  # a plain progress line each time this much more is done


def human_size(size: int | float | None) -> str:
    return "-" if size is None else decimal(int(size))


def human_age(seconds: float | None) -> str:
    """12s, 5m, 3h, 2d."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


class Bar:
    """A table cell showing a fraction: a bar on a terminal, a percentage in plain text."""

    def __init__(self, fraction: float, width: int = 20):
        self.fraction = min(max(float(fraction), 0.0), 1.0)
        self.width = width

    def __str__(self) -> str:
        return f"{100 * self.fraction:.1f}%"


class Digest(str):
    """A hash in a table: shortened on a terminal (to fit), whole in plain text and JSON."""

    keep = 12

    def short(self) -> str:
        return self if len(self) <= self.keep + 1 else self[: self.keep] + "…"


class Output:
    """Where a command writes: rich when the stream is a terminal, plain lines when not."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.console = Console(file=self.stream, highlight=False, soft_wrap=False)
        self.rich = self.console.is_terminal

    def line(self, text: str = "") -> None:
        if self.rich:
            self.console.print(Text(text))
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def table(self, columns: list[str], rows: list[list], title: str | None = None) -> None:
        if self.rich:
            table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
            for name in columns:
                table.add_column(name, no_wrap=True)
            for row in rows:
                cells = []
                for cell in row:
                    if isinstance(cell, Bar):
                        bar = ProgressBar(total=1.0, completed=cell.fraction, width=cell.width)
                        cells.append(Table.grid(padding=(0, 1)))
                        cells[-1].add_row(bar, f"{100 * cell.fraction:5.1f}%")
                    elif isinstance(cell, Digest):
                        cells.append(Text(cell.short()))
                    else:
                        cells.append(Text(str(cell)))
                table.add_row(*cells)
            self.console.print(table)
            return
        if title:
            self.line(title)
        text_rows = [columns] + [[str(cell) for cell in row] for row in rows]
        widths = [max(len(r[i]) for r in text_rows) for i in range(len(columns))]
        for r in text_rows:
            self.line("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())

    def progress(self, description: str, total: float | None, bytes_unit: bool = False):
        return (
            _RichProgress(self, description, total, bytes_unit)
            if self.rich
            else _PlainProgress(self, description, total, bytes_unit)
        )


class _RichProgress:
    def __init__(self, out: Output, description: str, total, bytes_unit: bool):
        columns = [TextColumn("{task.description}"), BarColumn()]
        if total is not None:  # else a pulsing bar: nothing to count
            columns.append(TaskProgressColumn())
            columns.append(DownloadColumn() if bytes_unit else MofNCompleteColumn())
        columns += [TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
        self.progress = Progress(*columns, console=out.console, transient=False)
        self.bytes_unit = bytes_unit
        self.task = self.progress.add_task(description, total=total, status="")

    def __enter__(self) -> _RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, completed: float, status: str = "", total: float | None = None) -> None:
        fields = {"completed": completed, "status": status}
        if total is not None:
            fields["total"] = total
        self.progress.update(self.task, **fields)


class _PlainProgress:
    """Progress as lines: printed when the status text changes or PLAIN_STEP more is done."""

    def __init__(self, out: Output, description: str, total, bytes_unit: bool):
        self.out = out
        self.description = description
        self.total = total
        self.bytes_unit = bytes_unit
        self.last_status: str | None = None
        self.last_fraction = -1.0
        self.started = time.monotonic()

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, completed: float, status: str = "", total: float | None = None) -> None:
        if total is not None:
            self.total = total
        fraction = min(completed / self.total, 1.0) if self.total else 0.0
        if status == self.last_status and (
            fraction - self.last_fraction < PLAIN_STEP
            and (fraction < 1.0 or self.last_fraction >= 1.0)
        ):
            return
        self.last_status, self.last_fraction = status, fraction
        parts = [f"{self.description}:"]
        if self.bytes_unit and self.total:
            parts.append(
                f"{human_size(completed)}/{human_size(self.total)} ({100 * fraction:.0f}%)"
            )
        elif self.total:
            parts.append(f"{completed:g}/{self.total:g}")
        if status:
            parts.append(status)
        parts.append(f"[{human_age(time.monotonic() - self.started)}]")
        self.out.line(" ".join(parts))
