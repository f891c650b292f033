"""Where a command's text goes: data to stdout (`emit`), progress and notes to `info`, errors and
log records to `err` (both stderr). With -q, `info` is silent, so stderr stays empty unless the
command fails. A reader that goes away (`dsm list | head -1`) is not an error: the rest is dropped.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.text import Text

from dsm import logs


def drop(stream: Any) -> None:
    """Point a stream whose reader went away at /dev/null: later writes and flushes vanish."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


def emit(text: str) -> None:
    """Write data to stdout. A reader that stops reading (`dsm list | head -1`) is not an error:
    the rest of the data is dropped and the command ends with the exit code it has anyway."""
    try:
        sys.stdout.write(text)
    except BrokenPipeError:
        drop(sys.stdout)


def print_json(value: Any) -> None:
    emit(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def table(rows: list[list[str]], *, right: frozenset[int] = frozenset()) -> str:
    """Rows as text columns, each as wide as its widest cell; `right` columns aligned right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows)
    return "".join(line.rstrip() + "\n" for line in lines)


class StderrConsole(Console):
    """stderr for people: a closed pipe drops the rest instead of ending the process (rich's default).

    With `--log-format json` (`json_lines`), stderr is for machines: each line printed becomes a
    JSON log line (`dsm.logs`) at this console's level, or WARNING for `dsm: warning: ...`; `fields`
    name the instance a line is about. No spinners or progress bars then.
    """

    def __init__(self, level: str) -> None:
        self.level = level
        self.json_lines = False
        super().__init__(stderr=True, highlight=False, soft_wrap=True)

    @property
    def is_terminal(self) -> bool:
        return not self.json_lines and bool(Console.is_terminal.fget(self))  # type: ignore[attr-defined]

    def print(self, *objects: Any, fields: dict[str, Any] | None = None,
              level: str | None = None, **options: Any) -> None:
        if not self.json_lines:
            super().print(*objects, **options)
            return
        if self.quiet:
            return
        markup = options.get("markup") is not False
        text = " ".join(Text.from_markup(o).plain if markup and isinstance(o, str) else str(o) for o in objects)
        level = level or self.level
        text = text.strip().removeprefix("dsm: ")
        for prefix, named in (("warning: ", "WARNING"), ("note: ", "INFO")):
            if text.startswith(prefix):
                text, level = text.removeprefix(prefix), named
        try:
            self.file.write(logs.line(level, "dsm.cli", text, fields) + "\n")
        except BrokenPipeError:
            self.on_broken_pipe()

    def write_line(self, text: str) -> None:
        """One line of plain text as it is, without rich's rendering (markup, emoji codes, wrapping):
        for text with nothing to render, too many lines to render each (progress on a pipe)."""
        if self.quiet:
            return
        try:
            self.file.write(text + "\n")
        except BrokenPipeError:
            self.on_broken_pipe()

    def on_broken_pipe(self) -> None:
        self.quiet = True
        drop(sys.stderr)


err = StderrConsole("ERROR")  # errors and logs
info = StderrConsole("INFO")  # progress and notes: silenced by -q


@contextmanager
def counting(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """`with counting("submitting", n) as advance`: a progress bar with a count on stderr while a
    long job runs, when stderr is a terminal (and -q was not given); otherwise nothing."""
    if total <= 0 or not info.is_terminal or info.quiet:
        yield lambda done: None
        return
    from rich import progress

    columns = (progress.TextColumn(what), progress.BarColumn(), progress.MofNCompleteColumn(),
               progress.TimeElapsedColumn())
    # stdout carries data: it passes through the display only when it is the terminal as well
    with progress.Progress(*columns, console=info, transient=True, redirect_stdout=sys.stdout.isatty(),
                           redirect_stderr=False) as bar:
        task = bar.add_task(what, total=total)
        yield lambda done: bar.advance(task, done)
