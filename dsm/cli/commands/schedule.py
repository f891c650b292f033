"""`dsm schedule ...`: schedules on etcd (create, apply, list, describe, pause, unpause, trigger,
backfill, delete). Each calls `dsm.schedules.Schedules` over dsm's client and formats its answer;
the housekeeping leader of the workers fires them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dsm.errors import DefinitionError, InputError

from .. import inputs
from ..app import command, group
from ..etcd import EtcdArgs
from ..exits import ExitCode, Fail
from ..output import emit, info, print_json, table

if TYPE_CHECKING:
    from dsm.client import AsyncClient
    from dsm.schedules import Schedules

schedule = group("schedule", "Start instances of a machine at given times (cron or an interval), exactly once "
                             "per due time; the workers' housekeeping leader fires them.")

Name = Annotated[str, typer.Argument(metavar="NAME", show_default=False, help="The schedule's name.")]
AsJson = Annotated[bool, typer.Option("--json", metavar="", help="Print JSON.")]
TIME_HELP = "an ISO 8601 time (2026-12-01T00:00:00Z, UTC unless an offset is given) or a duration back from now"


def _schedules(client: AsyncClient) -> Schedules:
    from dsm.schedules import Schedules

    return Schedules(client.operations)


def _invalid(exc: InputError) -> Fail:
    return Fail(ExitCode.INVALID, str(exc))


@command("create", etcd=True, on=schedule)
def create(name: Name,
           machine: Annotated[str | None, typer.Option("--machine", metavar="M", help=(
               "The machine to start: its newest definition registered in the namespace, at each fire."))] = None,
           file: Annotated[Path | None, typer.Option("--file", metavar="PATH", help=(
               "Register this definition file first (its handlers are not imported) and schedule its machine."))]
           = None,
           cron: Annotated[str | None, typer.Option("--cron", metavar="EXPR", help=(
               "Five cron fields (minute hour day-of-month month day-of-week) or @hourly, @daily, @weekly, "
               "@monthly, @yearly, in --timezone."))] = None,
           every: Annotated[str | None, typer.Option("--every", metavar="DURATION", help=(
               "An interval (at least 1s): due at --start-at (or the epoch) plus whole intervals."))] = None,
           timezone_: Annotated[str, typer.Option("--timezone", metavar="TZ", help=(
               "The IANA time zone --cron is read in; daylight-saving changes as cron handles them."))] = "UTC",
           payload: Annotated[str | None, typer.Option("--payload", metavar="JSON",
                                                       help="The payload each run starts with.")] = None,
           overlap: Annotated[str, typer.Option("--overlap", metavar="skip|buffer_one|allow_all|cancel_other", help=(
               "When a run still goes as the next is due: start nothing, start it once the running one "
               "ends, start it anyway, or cancel the running one first."))] = "skip",
           catchup_window: Annotated[str, typer.Option("--catchup-window", metavar="DURATION", help=(
               "Due times missed while no worker ran are started when one returns if within this; older "
               "ones are skipped and counted."))] = "1m",
           jitter: Annotated[str, typer.Option("--jitter", metavar="DURATION", help=(
               "Fire up to this long after each due time (the same delay on every leader)."))] = "0s",
           start_at: Annotated[str | None, typer.Option("--start-at", metavar="T", help="No run before T: "
                                                        + TIME_HELP + ".")] = None,
           end_at: Annotated[str | None, typer.Option("--end-at", metavar="T", help="No run after T.")] = None,
           paused: Annotated[bool, typer.Option("--paused", metavar="", help="Create it paused.")] = False,
           as_json: AsJson = False, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Create a schedule."""
    from dsm.schedules import Spec

    if (machine is None) == (file is None):
        raise Fail(ExitCode.INVALID, "give --machine M or --file PATH")
    etcd.options()
    graph = inputs.load(file, no_import=True) if file is not None else None
    body = inputs.payload(payload, None) if payload is not None else {}
    fields = {"machine": graph.machine if graph is not None else machine, "cron": cron, "every": every,
              "timezone": timezone_, "payload": body, "overlap": overlap, "catchup_window": catchup_window,
              "jitter": jitter, "start_at": start_at, "end_at": end_at, "paused": paused}
    try:
        spec = Spec.of(name, fields)
    except InputError as exc:
        raise _invalid(exc) from None

    async def go(client: AsyncClient) -> dict[str, Any]:
        if graph is not None:
            await client.operations.register(graph)
        schedules = _schedules(client)
        await schedules.create(spec)
        return await schedules.describe(spec.name)

    described = etcd.call(go)
    if as_json:
        print_json(described)
        return
    nxt = described["next"][0] if described["next"] else "none"
    info.print(f"schedule {name} created: {_when(described)}; next run {nxt}"
               + (" (paused)" if described["paused"] else ""), markup=False)


@command("apply", etcd=True, on=schedule)
def apply(path: Annotated[Path, typer.Argument(metavar="FILE", show_default=False, help=(
              "A YAML list of schedules, each its name and the fields create takes (cron, every, timezone, "
              "payload, overlap, catchup_window, jitter, start_at, end_at, paused, note)."))],
          prune: Annotated[bool, typer.Option("--prune", metavar="", help=(
              "Delete the namespace's schedules the file does not name."))] = False,
          etcd: EtcdArgs = EtcdArgs()) -> None:
    """Create or update schedules to match a file (its errors at file:line:col)."""
    from dsm.schedules import read_file

    try:
        specs = read_file(str(path))
    except DefinitionError as exc:
        inputs.print_problems(exc)
        raise Fail(ExitCode.INVALID) from None
    done = etcd.call(lambda client: _schedules(client).apply(specs, prune=prune))
    for what in ("created", "updated", "unchanged", "deleted"):
        for name in done[what]:
            info.print(f"schedule {name} {what}", markup=False)


@command("list", etcd=True, on=schedule)
def list_schedules(as_json: AsJson = False, etcd: EtcdArgs = EtcdArgs()) -> None:
    """List schedules: when they run, what they start, their next due time and counts."""
    async def go(client: AsyncClient) -> list[dict[str, Any]]:
        now = time.time()
        return [s.public(now, upcoming=1) for s in await _schedules(client).all()]

    found = etcd.call(go)
    if as_json:
        print_json(found)
        return
    if not found:
        info.print(f"no schedules in namespace {etcd.namespace!r}", markup=False)
        return
    rows = [["NAME", "MACHINE", "WHEN", "OVERLAP", "NEXT", "FIRES", "SKIPS", "MISSES"]]
    for s in found:
        nxt = "paused" if s["paused"] else (s["next"][0] if s["next"] else "-")
        rows.append([s["name"], s["machine"], _when(s), s["overlap"], nxt, str(s["fires"]), str(s["skips"]),
                     str(s["misses"])])
    emit(table(rows, right=frozenset({5, 6, 7})))


@command("describe", etcd=True, on=schedule)
def describe(name: Name, as_json: AsJson = False, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Show a schedule: its next 5 due times and its last 10 runs, with their instances' statuses."""
    s = etcd.call(lambda client: _schedules(client).describe(name))
    if as_json:
        print_json(s)
        return
    lines = [f"schedule:   {s['name']}", f"machine:    {s['machine']}", f"when:       {_when(s)}",
             f"overlap:    {s['overlap']}, catch-up window {_seconds(s['catchup_window'])}"
             + (f", jitter {_seconds(s['jitter'])}" if s["jitter"] else "")]
    if s["start_at"] or s["end_at"]:
        lines.append(f"between:    {s['start_at'] or '-'} and {s['end_at'] or '-'}")
    if s["paused"]:
        lines.append("paused:     yes" + (f": {s['note']}" if s["note"] else ""))
    lines.append(f"counts:     {s['fires']} started, {s['skips']} skipped by overlap, {s['misses']} missed")
    if s["buffered"]:
        lines.append(f"buffered:   the run due {s['buffered']}, once the running one ends")
    lines.append("next:       " + (", ".join(s["next"]) if s["next"] and not s["paused"] else "none"))
    lines.append("runs:" if s["runs"] else "runs:       none yet")
    for run in reversed(s["runs"]):
        what = run["action"] + (f" x{run['count']}" if run.get("count") else "")
        lines.append(f"  {run['due']}  {what:<10} {run.get('id') or '-'}"
                     + (f"  {run['status']}" if run.get("status") else ""))
    emit("".join(line + "\n" for line in lines))


@command("pause", etcd=True, on=schedule)
def pause(name: Name, note: Annotated[str | None, typer.Option("--note", metavar="TEXT",
                                                               help="Why, shown by describe.")] = None,
          etcd: EtcdArgs = EtcdArgs()) -> None:
    """Pause a schedule: nothing fires until it is unpaused (the due times between are not run)."""
    etcd.call(lambda client: _schedules(client).pause(name, note))
    info.print(f"schedule {name} paused", markup=False)


@command("unpause", etcd=True, on=schedule)
def unpause(name: Name, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Unpause a schedule: it goes on from its next due time after now."""
    etcd.call(lambda client: _schedules(client).unpause(name))
    info.print(f"schedule {name} unpaused", markup=False)


@command("delete", etcd=True, on=schedule)
def delete(name: Name, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Delete a schedule (the instances it started are left as they are)."""
    etcd.call(lambda client: _schedules(client).delete(name))
    info.print(f"schedule {name} deleted", markup=False)


@command("trigger", etcd=True, on=schedule)
def trigger(name: Name, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Start one run now, whatever runs already; print its instance id."""
    emit(etcd.call(lambda client: _schedules(client).trigger(name)) + "\n")


@command("backfill", etcd=True, on=schedule)
def backfill(name: Name,
             from_: Annotated[str, typer.Option("--from", metavar="T", help="The first due time: " + TIME_HELP + ".")],
             to: Annotated[str, typer.Option("--to", metavar="T", help="The last due time (included).")],
             etcd: EtcdArgs = EtcdArgs()) -> None:
    """Start now a run for every due time from --from to --to (one whose run exists starts nothing);
    print their instance ids."""
    from dsm.index import parse_since

    now = time.time()
    try:
        start, end = parse_since(from_, now), parse_since(to, now)
    except InputError as exc:
        raise _invalid(exc) from None
    for iid in etcd.call(lambda client: _schedules(client).backfill(name, start, end)):
        emit(iid + "\n")


def _when(s: dict[str, Any]) -> str:
    if s["cron"] is not None:
        return f"cron {s['cron']!r}" + (f" ({s['timezone']})" if s["timezone"] != "UTC" else " (UTC)")
    return f"every {_seconds(s['every'])}"


def _seconds(value: float) -> str:
    from dsm.durations import format_duration

    return format_duration(value)
