"""How `dsm run` shows an instance going: its transitions as they commit, and how it ended."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.markup import escape

from dsm import logs, records

from .output import err, info


class Progress:
    """Transitions as they commit, one line each on stderr; on a terminal, coloured, with a live
    status line of the states still active. With -q, only the end of an instance that did not
    succeed, in one line."""

    def __init__(self, machine: str | None = None) -> None:
        self.started = time.monotonic()
        self.machine = machine
        self.instance: str | None = None  # once started
        self.live = info.status("starting", spinner="dots") if info.is_terminal and not info.quiet else None
        if self.live is not None:
            self.live.start()

    def note(self, instance_id: str, text: str) -> None:
        """A note about the instance (the first names it: it is the one this progress follows)."""
        self.instance = self.instance or instance_id
        info.print(text, markup=False, fields=logs.about(instance_id, self.machine))

    def history(self, entry: dict[str, Any]) -> None:
        """A committed transition: a history entry of the record."""
        branch = f" [dim]\\[{'/'.join(entry['branch'])}][/dim]" if entry["branch"] else ""
        outcome = f" [cyan]({entry['outcome']})[/cyan]" if entry["outcome"] else ""
        attempt = f" [yellow]attempt {entry['attempt']}[/yellow]" if entry["attempt"] > 1 else ""
        targets = ", ".join(entry["next"])
        about = logs.about(self.instance or "?", self.machine, entry["state"], entry["attempt"], entry["worker"])
        info.print(f"[dim]{entry['seq']:>4}[/dim]  [bold]{entry['state']}[/bold]{outcome} -> {targets}{branch}"
                   f"{attempt}", fields=about)
        for failed in entry.get("failures", ()):  # the attempts of this visit that failed before it
            info.print(f"[dim]      attempt {failed['attempt']} failed:[/dim] "
                       + escape(f"{failed['error']['type']}: {failed['error']['message']}"),
                       fields=logs.about(about["instance"], self.machine, entry["state"], failed["attempt"],
                                         failed["worker"]))

    def update(self, transitions: int, active: list[str]) -> None:
        if self.live is not None:
            took = time.monotonic() - self.started
            self.live.update(f"{transitions} transitions, {took:.1f}s; active: {', '.join(active) or '-'}")

    def finished(self, record: dict[str, Any]) -> None:
        self.stop()
        took = time.monotonic() - self.started
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
