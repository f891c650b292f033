"""The instance operations on etcd: `dsm status` (and --follow), `dsm workers`, `dsm list`,
`dsm cancel`, `dsm signal`, `dsm redrive`, `dsm delete`. Each calls dsm's client
(`EtcdArgs.call`) and formats what it answers."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dsm import logs, payloads, records
from dsm.errors import InputError

from ..app import command
from ..etcd import EtcdArgs
from ..exits import ExitCode, Fail, exit_for
from ..options import InstanceId
from ..output import drop, emit, err, info, print_json, table

if TYPE_CHECKING:
    from dsm.client import AsyncClient


@command(etcd=True)
def status(instance_id: InstanceId,
           as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the whole record as JSON.")] = False,
           follow: Annotated[bool, typer.Option("--follow", "-f", metavar="", help=(
               "Print transitions as they commit until the instance ends; exit as 'dsm run' does "
               "(0 succeeded, 1 failed or cancelled). With --json, one history entry per line."))] = False,
           etcd: EtcdArgs = EtcdArgs()) -> None:
    """Show one instance (the whole record with --json), or follow it (--follow)."""
    if follow:
        _follow(instance_id, as_json, etcd)

    async def look(client: AsyncClient) -> tuple[dict, list, list, list, list[str]]:
        ops = client.operations  # what an operator sees besides the record: workers, alarms, earlier failures
        inst = await ops.instance(instance_id)
        record = records.public_record(inst, await ops.history(instance_id, record=inst))
        alarms = await ops.alarms()
        if record["status"] != records.RUNNING:
            return record, [], [], earlier_failures(inst), alarms
        return (record, *await ops.serving(record["digest"]), [], alarms)

    from dsm.describe import describe, earlier_failures, serving_line

    record, workers, serving, earlier, alarms = etcd.call(look)
    line, alone = serving_line(record, workers, serving, etcd.namespace) if record["status"] == records.RUNNING \
        else (None, False)
    if "NOSPACE" in alarms:
        nospace = ("etcd's NOSPACE alarm is raised: it refuses writes, so no instance moves until an operator "
                   "makes room and disarms it (docs/operations.md)")
        if as_json:
            err.print(f"dsm: warning: {nospace}", markup=False)
        else:
            emit(f"alarm:       {nospace}\n")
    if as_json:
        print_json(record)
        if alone:
            info.print(f"dsm: note: workers: {line}", markup=False)
        return
    emit("".join(text + "\n" for text in describe(record, workers=line, earlier=earlier)))


def _follow(instance_id: str, as_json: bool, etcd: EtcdArgs) -> None:
    """`dsm status ID --follow`: the history so far, then each transition as it commits (the
    client watches the record), and retries as they are scheduled; ends with the instance."""
    from dsm.describe import history_lines, waiting_line

    shown: set[str] = set()

    def out(text: str) -> None:
        emit(text)
        try:
            sys.stdout.flush()  # as it happens, also into a pipe
        except BrokenPipeError:
            drop(sys.stdout)

    def on_history(entry: dict[str, Any]) -> None:
        if as_json:
            out(json.dumps(entry, ensure_ascii=False) + "\n")
        else:
            out("".join(line + "\n" for line in history_lines(entry)))

    def on_update(record: dict[str, Any]) -> None:
        if as_json:
            return
        for wait in record["waiting"]:
            line = waiting_line(wait)
            if line not in shown:
                shown.add(line)
                out(f"       waiting: {line}\n")

    record = etcd.call(lambda client: client.wait(instance_id, on_history=on_history, on_update=on_update))
    state, status = record["state"], record["status"]
    where = f" at {state}" if state else ""
    e = record["error"]
    error = f": {e['type']} in state {e['state']} after {e['attempts']} attempt(s): {e['message']}" if e else ""
    (info if status == records.SUCCEEDED else err).print(
        f"instance {record['id']} {status}{where} ({record['transitions']} transitions){error}", markup=False,
        fields=logs.about(record["id"], record["machine"], state or (e["state"] if e else None)))
    raise typer.Exit(exit_for(record))


@command("workers", etcd=True)
def workers_command(as_json: Annotated[bool, typer.Option("--json", metavar="",
                                                          help="Print a JSON array of workers.")] = False,
                    etcd: EtcdArgs = EtcdArgs()) -> None:
    """List live workers: id, host, pid, definitions served, concurrency, ticks in flight."""

    async def look(client: AsyncClient) -> tuple[list, list[str]]:
        return await client.operations.workers(), await client.operations.alarms()

    found, alarms = etcd.call(look)
    if "NOSPACE" in alarms:  # each worker waits; none can rewrite its entry to say so, etcd refuses writes
        err.print("dsm: warning: etcd's NOSPACE alarm is raised: every worker waits (no claim, no commit) until an "
                  "operator makes room and disarms it (docs/operations.md)", markup=False)
    if as_json:
        print_json([w.as_dict() for w in found])
        return
    if not found:
        info.print(f"no live workers in namespace {etcd.namespace!r}", markup=False)
        return
    rows = [["ID", "HOST", "PID", "CONCURRENCY", "IN FLIGHT", "DEFINITIONS"]]
    for w in found:
        served = ", ".join(f"{d.machine}" + (f" v{d.version}" if d.version is not None else "") for d in w.definitions)
        allow = "any module" if w.allow is None else ", ".join(w.allow + w.functions) or "no module"
        rows.append([w.id, w.host, str(w.pid), str(w.concurrency), str(w.in_flight),
                     (served or "-") + f" (allow: {allow})"])
    emit(table(rows, right=frozenset({2, 3, 4})))


@command("list", etcd=True)
def list_command(status_: Annotated[str | None, typer.Option("--status", metavar="|".join(records.STATUSES),
                                                             help="Only instances with this status.")] = None,
                 machine: Annotated[str | None, typer.Option("--machine", metavar="NAME",
                                                             help="Only instances of this machine.")] = None,
                 since: Annotated[str | None, typer.Option(
                     "--since", metavar="T", help="Only instances started at or after T: an ISO 8601 time "
                     "(2026-11-28T13:00:00Z) or a duration back from now (30m, 2h, 7d).")] = None,
                 where: Annotated[list[str] | None, typer.Option(
                     "--where", metavar="NAME=VALUE", help="Only instances whose search attribute NAME equals "
                     "VALUE (repeat: all must hold).")] = None,
                 limit: Annotated[int | None, typer.Option("--limit", min=1, metavar="N", show_default="all",
                                                           help="At most N instances; when more follow, "
                                                                "'next: CURSOR' on stderr.")] = None,
                 after: Annotated[str | None, typer.Option("--after", metavar="CURSOR",
                                                           help="Continue after CURSOR (from 'next:').")] = None,
                 as_json: Annotated[bool, typer.Option("--json", metavar="",
                                                       help="Print a JSON array of summaries.")] = False,
                 etcd: EtcdArgs = EtcdArgs()) -> None:
    """List instances, newest first, from the index (summaries: records without history and payload)."""
    from dsm import index, search

    if status_ is not None and status_ not in records.STATUSES:
        raise Fail(ExitCode.INVALID, f"--status must be one of {', '.join(records.STATUSES)}, got {status_!r}")
    try:
        start = index.parse_since(since, time.time()) if since is not None else None
        if after is not None:
            index.check_cursor(after)
        wanted = search.parse_where(where or [], "=", "--where")
    except InputError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None
    rows = [["ID", "MACHINE", "STATUS", "STATE", "TRANSITIONS", "CREATED"]]
    shown = 0

    def show(summary: dict[str, Any]) -> None:
        nonlocal shown
        if as_json:  # streamed: the same text json.dumps(list, indent=2) gives, an item at a time
            item = json.dumps(summary, indent=2, ensure_ascii=False).replace("\n", "\n  ")
            emit(("[\n  " if not shown else ",\n  ") + item)
        else:
            rows.append([summary["id"], summary["machine"], summary["status"],
                         summary["state"] or ",".join(summary["active"]) or "-", str(summary["transitions"]),
                         summary["created_at"] or "-"])
        shown += 1

    async def listing(client: AsyncClient) -> str | None:
        cursor = after
        while True:
            want = index.PAGE if limit is None else min(index.PAGE, limit - shown)
            page = await client.page(status=status_, machine=machine, since=start, where=wanted or None,
                                     after=cursor, limit=want)
            for summary in page["items"]:
                show(summary)
            cursor = page["next"]
            if cursor is None or (limit is not None and shown >= limit):
                return cursor

    following = etcd.call(listing)
    if as_json:
        emit("\n]\n" if shown else "[]\n")
    elif shown:
        emit(table(rows, right=frozenset({4})))
    else:
        scope = f"in namespace {etcd.namespace!r}" + (f" with status {status_}" if status_ else "")
        info.print(f"no instances {scope}" + (f" of machine {machine!r}" if machine else "")
                   + (f" started since {since}" if since else "")
                   + "".join(f" where {name}={text}" for name, text in wanted.items())
                   + (" after the cursor" if after else ""),
                   markup=False)
    if following is not None:
        err.print(f"next: {following}", markup=False)  # data for the next call, so -q keeps it


@command(etcd=True)
def cancel(instance_id: InstanceId,
           reason: Annotated[str | None, typer.Option("--reason", metavar="TEXT",
                                                      help="Why, kept in the record with who and when.")] = None,
           etcd: EtcdArgs = EtcdArgs()) -> None:
    """Cancel a running instance; the record keeps who (user@host), when and why."""
    record = etcd.call(lambda client: client.cancel(instance_id, reason=reason))
    about = logs.about(record["id"], record["machine"])
    if record["status"] == records.CANCELLED:
        info.print(f"instance {record['id']} cancelled", markup=False, fields=about)
    else:
        info.print(f"instance {record['id']} already {record['status']}; nothing to cancel", markup=False,
                   fields=about)


SignalName = Annotated[str, typer.Argument(metavar="NAME", show_default=False,
                                           help="The signal's name, as a signal state waits for it.")]
SignalPayload = Annotated[str | None, typer.Option("--payload", metavar="JSON",
                                                   help="A JSON object merged into the payload key by key.")]
SignalOutcome = Annotated[str | None, typer.Option("--outcome", metavar="LABEL",
                                                   help="An outcome label: routes a signal state with 'on'.")]


@command("signal", etcd=True)
def send_signal(instance_id: InstanceId, name: SignalName, payload: SignalPayload = None,
                outcome: SignalOutcome = None, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Send a signal to a running instance; prints nothing and exits 0 once it is stored.

    Signals are durable and buffered: one sent before the instance reaches the state that waits
    for it is kept, and consumed there (in the order sent, one per visit). An unknown or finished
    instance, a NAME no state of the instance's machine waits for, or an --outcome that no state
    waiting for NAME routes on, is refused (exit 2, saying what the machine takes) and nothing is
    written.
    """
    try:
        body = payloads.parse(payload, what="--payload") if payload is not None else {}
    except payloads.PayloadError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None
    etcd.call(lambda client: client.signal(instance_id, name, body, outcome))


@command(etcd=True)
def redrive(instance_id: InstanceId, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Continue a failed or cancelled instance from the states that did not finish.

    Each continues with the payload it had, its attempts counted afresh; finished fork branches
    keep their results. An instance that succeeded or ended in a failure terminal state is refused.
    """
    record = etcd.call(lambda client: client.redrive(instance_id))
    iid, active = record["id"], record["active"]
    info.print(f"instance {iid} redriven (redrive {record['redrives']}): continues at {', '.join(active)}; "
               f"'dsm status {iid} --follow' follows it", markup=False,
               fields=logs.about(iid, record["machine"], ",".join(active)))


@command(etcd=True)
def delete(instance_id: InstanceId, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Delete a finished instance now: its record, history and index entries (retention does this
    by itself once the machine's retention has passed). A running instance is refused."""
    summary = etcd.call(lambda client: client.delete(instance_id))
    info.print(f"instance {summary['id']} ({summary['status']}) deleted", markup=False,
               fields=logs.about(summary["id"], summary["machine"]))
