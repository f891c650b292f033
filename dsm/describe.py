"""An instance record as text for people (`dsm status`, `dsm status --follow`): every field of the
`--json` record that says why an instance is where it is, laid out to be read, not parsed."""

from __future__ import annotations

import json
from typing import Any

from .membership import WorkerInfo
from .records import Instance

LABEL = 13  # width of the field names


def _field(name: str, value: str) -> str:
    return f"{name + ':':<{LABEL}}{value}"


def _indented(text: str, by: int) -> list[str]:
    pad = " " * by
    return [pad + line for line in text.rstrip("\n").splitlines()]


def error_line(error: dict[str, Any]) -> str:
    return f"{error['type']}: {error['message']}"


def describe(record: dict[str, Any], *, workers: str | None = None,
             earlier: list[dict[str, Any]] | None = None) -> list[str]:
    """The lines of `dsm status ID` for a record (history included); `workers` says which live
    workers serve it, `earlier` lists the failed attempts before the one in `error` (`stopped`)."""
    version = f"version {record['version']}, " if record["version"] is not None else ""
    lines = [_field("id", record["id"]),
             _field("machine", f"{record['machine']} ({version}{record['digest'][:19]})"),
             _field("status", record["status"] + (f" at {record['state']}" if record["state"] else ""))]
    if record.get("redrives"):
        lines.append(_field("redrives", str(record["redrives"])))
    cancel = record.get("cancel")
    if cancel:
        reason = f": {cancel['reason']}" if cancel.get("reason") else ""
        lines.append(_field("cancelled", f"by {cancel['by'] or 'unknown'} at {cancel['at']}{reason}"))
    if workers:
        lines.append(_field("workers", workers))
    if record["active"]:
        lines.append(_field("active", ", ".join(record["active"])))
    for wait in record.get("waiting") or []:
        lines.append(_field("waiting", waiting_line(wait)))
        if wait.get("last_error") and wait["last_error"].get("traceback"):
            lines += _indented(wait["last_error"]["traceback"], LABEL + 2)
    lines += [_field("transitions", str(record["transitions"])), _field("created", record["created_at"])]
    if record["finished_at"]:
        lines.append(_field("finished", record["finished_at"]))
    if record.get("expires_at"):
        lines.append(_field("expires", f"{record['expires_at']} (deleted then: the machine's retention)"))
    error = record["error"]
    if error:
        lines.append(_field("error", f"{error['type']} in {error['state']} after {error['attempts']} attempt(s): "
                                     f"{error['message']}"))
        if error.get("traceback"):
            lines += _indented(error["traceback"], LABEL + 2)
        for failure in earlier or []:
            lines += _failure_lines(failure, LABEL)
    if "input" in record:
        lines.append(_field("input", json.dumps(record["input"], ensure_ascii=False)))
    lines.append(_field("payload", json.dumps(record["payload"], ensure_ascii=False)))
    history = record.get("history") or []
    if history:
        lines.append("history:")
        for entry in history:
            lines += history_lines(entry)
    return lines


def waiting_line(wait: dict[str, Any]) -> str:
    where = wait["state"] + (f" [{'/'.join(wait['branch'])}]" if wait.get("branch") else "")
    if wait["kind"] == "retry":
        last = wait.get("last_error")
        after = f", after {error_line(last)}" if last else ""
        return f"{where}: retry, attempt {wait['attempt']} at {wait['until']}{after}"
    detail = wait.get("signal") or wait.get("child") or wait.get("until") or ""
    return f"{where}: {wait['kind']} {detail}".rstrip()


def history_lines(entry: dict[str, Any]) -> list[str]:
    """A committed transition, and the failed attempts of its visit with their tracebacks."""
    branch = f" [{'/'.join(entry['branch'])}]" if entry["branch"] else ""
    outcome = f" ({entry['outcome']})" if entry["outcome"] else ""
    took = f", {entry['duration_ms']} ms" if entry.get("duration_ms") else ""
    lines = [f"  {entry['seq']:>4} {entry['at']} {entry['state']}{outcome} -> {', '.join(entry['next'])}{branch} "
             f"attempt {entry['attempt']} by {entry['worker']}{took}"]
    for failure in entry.get("failures") or []:
        lines += _failure_lines(failure, 7)
    return lines


def _failure_lines(failure: dict[str, Any], indent: int) -> list[str]:
    where = f"{failure['state']}: " if failure.get("state") else ""
    lines = [" " * indent + f"{where}attempt {failure['attempt']} failed at {failure['started_at']} on "
             f"{failure['worker']} after {failure['duration_ms']} ms: {error_line(failure['error'])}"]
    if failure["error"].get("traceback"):
        lines += _indented(failure["error"]["traceback"], indent + 2)
    return lines


def earlier_failures(inst: Instance) -> list[dict[str, Any]]:
    """The failed attempts of a stopped instance's pending states other than the last one of the
    state that failed it (that one is its `error`), oldest first."""
    if inst.stopped is None:
        return []
    out = []
    for token in inst.stopped.tokens.values():
        failures = list(token.failures)
        if inst.error is not None and token.state == inst.error.state and failures:
            failures = failures[:-1]
        out += [{"state": token.state, **f.as_dict()} for f in failures]
    return sorted(out, key=lambda f: f["started_at"])


def serving_line(record: dict[str, Any], workers: list[WorkerInfo], serving: list[WorkerInfo],
                 namespace: str) -> tuple[str, bool]:
    """Which live workers run a running instance: (a line to show, whether none does)."""
    if not workers:
        return (f"none live in namespace {namespace!r}: nothing runs this instance until a worker that serves "
                f"{record['machine']} starts", True)
    if not serving:
        served = sorted({d.machine for w in workers for d in w.definitions}) or ["no definitions"]
        return (f"no live worker serves its definition ({record['machine']} {record['digest'][:19]}): "
                f"{len(workers)} live worker(s) serve {', '.join(served)}; start a worker with its file, or one "
                "whose --allow admits its handler modules", True)
    names = ", ".join(w.id for w in serving[:5]) + (f" and {len(serving) - 5} more" if len(serving) > 5 else "")
    return f"{len(serving)} live worker(s) serve it: {names}", False
