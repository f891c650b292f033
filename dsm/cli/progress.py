"""How `dsm run` shows an instance going: its transitions as they commit, and how it ended.

A loop can commit thousands of transitions a second, so a transition costs the display as little
as it can. On a pipe or a file, each is one plain line written as it is: no rich rendering per
line (which once took most of a long run's time), no dict made of the entry first, and stderr
written in blocks while lines come fast, flushed FLUSH_AFTER seconds after a line at the latest
(other writers to stderr go through the same buffer, so nothing changes order). With -q nothing
about them is even formatted. On a terminal, lines come as long as a person can read them
(`Budget`); faster than that, they fold into the live status line below them, which changes at
most RATE times a second.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.markup import escape

from dsm import logs, records
from dsm.records import HistoryEntry

from .output import err, info

RATE = 10.0  # a second, on a terminal: transition lines on average, and changes of the status line at most
BURST = 20  # transition lines a terminal takes at once before RATE applies
FLUSH_AFTER = 0.1  # seconds a line written to a pipe or a file may wait in stderr's buffer


class Budget:
    """A token bucket: `burst` at once, then `rate` a second. Pure: the caller says what time it is."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at: float | None = None

    def take(self, now: float) -> bool:
        """Whether one more fits in the budget at `now` (and, if so, spend it)."""
        if self.at is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def line(seq: int, state: str, targets: Sequence[str], branch: Sequence[str], attempt: int, outcome: str | None,
         *, styled: bool = False) -> str:
    """A transition's line, `   5  bill -> ship [bill] attempt 3`; with rich markup for a terminal
    when `styled`."""
    went = f" ({outcome})" if outcome else ""
    where = f" [{'/'.join(branch)}]" if branch else ""
    again = f" attempt {attempt}" if attempt > 1 else ""
    to = ", ".join(targets)
    if not styled:
        return f"{seq:>4}  {state}{went} -> {to}{where}{again}"
    return (f"[dim]{seq:>4}[/dim]  [bold]{escape(state)}[/bold]" + (f" [cyan]{escape(went[1:])}[/cyan]" if went else "")
            + f" -> {escape(to)}" + (f" [dim]{escape(where[1:])}[/dim]" if where else "")
            + (f" [yellow]{again[1:]}[/yellow]" if again else ""))


def entry_line(entry: dict[str, Any], *, styled: bool = False) -> str:
    """The line of a history entry of the record (`line`)."""
    return line(entry["seq"], entry["state"], entry["next"], entry["branch"], entry["attempt"], entry["outcome"],
                styled=styled)


class Progress:
    """Transitions as they commit on stderr: one plain line each on a pipe or a file; on a terminal,
    coloured lines while they come slowly and a live status line of the states still active; one
    JSON line each with --log-format json. With -q, only the end of an instance that did not
    succeed, in one line."""

    def __init__(self, machine: str | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.machine = machine
        self.instance: str | None = None  # once started
        self.plain = not info.is_terminal and not info.json_lines  # lines as they are, to a pipe or a file
        self.live = info.status("starting", spinner="dots") if info.is_terminal and not info.quiet else None
        self.lines = Budget(RATE, BURST)  # of a terminal's transition lines
        self.shown = float("-inf")  # when the status line last changed
        self.folded = ""  # the last transition that went to the status line instead of a line of its own
        self.flushing = False  # a flush of stderr is due
        self.buffered = self.plain and _buffer(sys.stderr)
        if self.live is not None:
            self.live.start()

    @property
    def silent(self) -> bool:
        """Whether transitions show at all (not with -q): when not, nobody need report them."""
        return info.quiet

    def note(self, instance_id: str, text: str) -> None:
        """A note about the instance (the first names it: it is the one this progress follows)."""
        self.instance = self.instance or instance_id
        info.print(text, markup=False, fields=logs.about(instance_id, self.machine))

    def committed(self, entry: HistoryEntry) -> None:
        """A transition committed in this process (`history`): on a pipe, its line straight from the
        entry, without the record's dict of it (its timestamps cost more than the line)."""
        if not self.plain or entry.failures:
            self.history(entry.as_dict())
        elif not info.quiet:
            self.write(line(entry.seq, entry.state, entry.next, entry.branch, entry.attempt, entry.outcome))

    def history(self, entry: dict[str, Any]) -> None:
        """A committed transition: a history entry of the record."""
        if info.quiet:
            return
        failures = entry.get("failures", ())  # the attempts of this visit that failed before it
        if self.plain:
            self.write(entry_line(entry))
        elif self.live is None:  # --log-format json (or the status line has gone)
            info.print(entry_line(entry), markup=False, fields=self.about(entry))
        elif failures or self.lines.take(self.clock()):
            self.folded = ""
            info.print(entry_line(entry, styled=True), fields=self.about(entry))
        else:  # faster than a person reads: the status line shows it
            self.folded = entry_line(entry).strip()
            return
        for failed in failures:
            info.print(f"[dim]      attempt {failed['attempt']} failed:[/dim] "
                       + escape(f"{failed['error']['type']}: {failed['error']['message']}"),
                       fields=logs.about(self.instance or "?", self.machine, entry["state"], failed["attempt"],
                                         failed["worker"]))

    def write(self, text: str) -> None:
        """A line to a pipe or a file; while stderr is block-buffered, flushed FLUSH_AFTER seconds later
        at the latest (sooner when the buffer fills, or another writer flushes it)."""
        info.write_line(text)
        if not self.buffered or self.flushing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the event loop: no timer to wait for
            self.flush()
            return
        self.flushing = True
        loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        self.flushing = False
        try:
            info.file.flush()
        except BrokenPipeError:
            info.on_broken_pipe()

    def about(self, entry: dict[str, Any]) -> dict[str, Any]:
        return logs.about(self.instance or "?", self.machine, entry["state"], entry["attempt"], entry["worker"])

    def update(self, transitions: int, active: list[str]) -> None:
        """How far the instance is: the status line, on a terminal, at most RATE times a second."""
        if self.live is None:
            return
        now = self.clock()
        if now - self.shown < 1 / RATE:
            return
        self.shown = now
        last = f"; last: {self.folded}" if self.folded else ""
        self.live.update(escape(f"{transitions} transitions, {now - self.started:.1f}s; "
                                f"active: {', '.join(active) or '-'}{last}"))

    def finished(self, record: dict[str, Any]) -> None:
        self.stop()
        took = self.clock() - self.started
        state, status, iid = record["state"], record["status"], record["id"]
        where = f" at {state}" if state else ""
        e = record["error"]
        error = f"{e['type']} in state {e['state']} after {e['attempts']} attempt(s): {e['message']}" if e else ""
        about = logs.about(iid, record["machine"], state or (e["state"] if e else None))
        if info.quiet:
            if status != records.SUCCEEDED:
                err.print(f"instance {iid} {status}{where}" + (f": {error}" if error else ""), markup=False,
                          fields=about)
            return
        colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(status, "white")
        info.print(f"[{colour}]instance {iid} {status}{where}[/{colour}] "
                   f"({record['transitions']} transitions, {took:.2f}s)", fields=about)
        if error:
            info.print("[red]error[/red]: " + escape(error), fields=about, level="ERROR")
        info.print("payload: " + json.dumps(record["payload"], ensure_ascii=False), markup=False, fields=about)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.buffered:
            self.buffered = False
            self.flush()
            _line_buffer(sys.stderr)


def _buffer(stream: Any) -> bool:
    """Make a line-buffered text stream block-buffered; whether it was."""
    if not isinstance(stream, io.TextIOWrapper) or not stream.line_buffering:
        return False
    stream.reconfigure(line_buffering=False)
    return True


def _line_buffer(stream: Any) -> None:
    try:
        stream.reconfigure(line_buffering=True)  # (flushes)
    except BrokenPipeError:
        info.on_broken_pipe()
