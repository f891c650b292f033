"""Schedules: instances of a machine started at given times, exactly once per due time.

A schedule is one key, `/<ns>/sched/<name>`: what it is (`Spec`: the machine, a cron expression in
a time zone or an interval, the payload, the overlap policy, the catch-up window, jitter, start and
end, paused with a note) and where it stands (`State`: the next due time not yet handled, a run
buffered behind a running one, the last run it started, its last runs and its counters). When it
has a due time ahead, a due entry `/<ns>/sched-due/<when, ms>/<name>` says so, written in the
transactions that move it, so the housekeeping leader reads only the schedules that are due, as
retention reads the expiry index.

The leader fires them (`Firing.round`): for each due entry up to now it reads the schedule, decides
for every due time passed (started, skipped by overlap, buffered, missed beyond the catch-up
window) and writes, in one transaction fenced by the schedule's revision, the instances it starts
(each nested, created only if its id is free), the schedule's new state and its due entry. A run's
id is the schedule's name and the due time in UTC, `NAME-YYYYMMDDTHHMMSSZ`: a leader that dies
after its transaction leaves nothing to redo, one that dies before it leaves its successor the same
decision, and a start retried under the same id creates nothing twice. Jitter delays a fire by an
amount derived from the name and the due time, the same on every leader, and never changes its id.
A run started by hand (`trigger`) is named by the time and numbered, `NAME-YYYYMMDDTHHMMSSZ-manual-N`
(`trigger_id`), so it never takes a due time's id, and two in one second are two runs.

Cron expressions are the five fields of cron (and `@hourly`, `@daily`, `@weekly`, `@monthly`,
`@yearly`), evaluated by cronsim in the schedule's time zone, with daylight-saving changes as
Debian's cron handles them: a time that a spring change skips runs at the change, a fixed time
that an autumn change repeats runs once, and a wildcard hour runs in both.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim

from . import codec, payloads
from .durations import format_duration, parse_duration
from .errors import InputError, NotFound, ScheduleExists
from .keys import Keys, check_machine_name
from .records import timestamp
from .store import Compare, Delete, Get, Op, Put, Store, Txn, prefix_end

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # with `-YYYYMMDDTHHMMSSZ`, an instance id
OVERLAPS = ("skip", "buffer_one", "allow_all", "cancel_other")
ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
           "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
CATCHUP_WINDOW = 60.0  # seconds: a due time missed by longer (no worker ran) is skipped, and counted
RUNS_KEPT = 10  # runs a schedule remembers (`describe`)
MAX_STARTS = 16  # instances one fire transaction starts at most (each takes a few operations)
FIRING = 64  # schedules a leader fires together (their reads, and their fires nested in one transaction)
BATCHES = 4  # such batches in flight at once
MAX_COUNTED = 100_000  # due times a catch-up counts one by one; beyond, the count says "at least"
MAX_BACKFILL = 1000  # due times one backfill starts
LATEST = 253402300799.0  # 9999-12-31T23:59:59Z: times beyond are refused (and no due time passes it)
MAX_EVERY = 10 * 366 * 86400.0  # the longest interval
MAX_WAIT = 366 * 86400.0  # the longest catch-up window, and the longest jitter
MAX_NOTE = 4096  # characters of a pause's note
SPEC_FIELDS = ("machine", "cron", "every", "timezone", "payload", "overlap", "catchup_window", "jitter",
               "start_at", "end_at", "paused", "note")


def check_name(value: object) -> str:
    if not isinstance(value, str) or NAME.fullmatch(value) is None:
        raise InputError(f"invalid schedule name {value!r}: a name is 1 to 64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


def run_id(name: str, due: float) -> str:
    """The id of the run a schedule starts for a due time: its name and the due time in UTC."""
    return f"{name}-{datetime.fromtimestamp(due, timezone.utc):%Y%m%dT%H%M%SZ}"


def trigger_id(name: str, now: float, n: int) -> str:
    """The id of a schedule's `n`th triggered run, started at `now`: named by now to the second, as
    a due time's run is, and numbered, so that two triggers in one second start two runs and none
    takes a due time's id (those end in `Z`)."""
    return f"{run_id(name, now)}-manual-{n}"


@dataclass(frozen=True, slots=True)
class Spec:
    """What a schedule is: everything `create` and `apply` set."""

    name: str
    machine: str
    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    payload: dict[str, Any] = field(default_factory=dict)
    overlap: str = "skip"
    catchup_window: float = CATCHUP_WINDOW
    jitter: float = 0.0
    start_at: float | None = None
    end_at: float | None = None
    paused: bool = False
    note: str | None = None

    @staticmethod
    def of(name: object, fields: dict[str, Any]) -> Spec:
        """A spec from user input (the CLI's options, a YAML entry, a JSON body): FieldError, an
        InputError that names each field wrong (`problems`). Durations and times as the CLI takes them."""
        with _field("name", []):
            name = check_name(name)
        problems: list[tuple[str, str]] = []
        unknown = sorted(set(fields) - set(SPEC_FIELDS))
        if unknown:
            problems.append((unknown[0], f"unknown field(s) {', '.join(unknown)}; a schedule takes "
                                         f"{', '.join(SPEC_FIELDS)}"))

        def field_of(key: str, check: Callable[[Any], Any], default: Any = None) -> Any:
            try:
                value = fields.get(key)
                return check(default if value is None else value)
            except InputError as exc:
                problems.append((key, f"{key}: {exc}"))
                return default

        machine = field_of("machine", _required(check_machine_name))
        cron, every = fields.get("cron"), fields.get("every")
        if (cron is None) == (every is None):
            problems.append(("every" if every is not None else "cron", "give one of cron or every"))
        cron = field_of("cron", lambda v: v if v is None else check_cron(v, what=""))
        every = field_of("every", lambda v: v if v is None else _every(v))
        zone = field_of("timezone", lambda v: check_timezone(v, what=""), "UTC")
        payload = field_of("payload", _payload, {})
        overlap = field_of("overlap", _overlap, "skip")
        window = field_of("catchup_window", _bounded, CATCHUP_WINDOW)
        jitter = field_of("jitter", _bounded, 0.0)
        now = time.time()
        start_at = field_of("start_at", lambda v: _time(v, now))
        end_at = field_of("end_at", lambda v: _time(v, now))
        if start_at is not None and end_at is not None and end_at <= start_at:
            problems.append(("end_at", "end_at must be after start_at"))
        paused = field_of("paused", _flag, False)
        note = field_of("note", _note)
        if problems:
            raise FieldError([(key, f"schedule {name!r}: {message}") for key, message in problems])
        return Spec(name, machine, cron, every, zone, payload, overlap, window, jitter, start_at, end_at, paused, note)

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, "machine": self.machine, "cron": self.cron, "every": self.every,
                "timezone": self.timezone, "payload": self.payload, "overlap": self.overlap,
                "catchup_window": self.catchup_window, "jitter": self.jitter, "start_at": self.start_at,
                "end_at": self.end_at, "paused": self.paused, "note": self.note}

    @staticmethod
    def load(d: dict[str, Any]) -> Spec:
        return Spec(**{k: d[k] for k in ("name", *SPEC_FIELDS) if k in d})

    def public(self) -> dict[str, Any]:
        out = self.dump()
        out["start_at"], out["end_at"] = timestamp(self.start_at), timestamp(self.end_at)
        return out

    def timing(self) -> tuple[Any, ...]:
        """What decides the due times: a change of any of these starts them afresh from now."""
        return (self.cron, self.every, self.timezone, self.start_at, self.end_at)

    def due_after(self, after: float) -> float | None:
        """The first due time strictly after `after` (None: none, the schedule has ended)."""
        return next(self.dues(after), None)

    def dues(self, after: float) -> Iterator[float]:
        """The due times strictly after `after`, in order, within start_at and end_at."""
        start = after if self.start_at is None else max(after, self.start_at - 1e-6)
        if self.every is not None:
            anchor = self.start_at if self.start_at is not None else 0.0
            k = math.floor((start - anchor) / self.every) + 1
            while True:
                due = anchor + k * self.every
                if due > LATEST or (self.end_at is not None and due > self.end_at):
                    return
                yield due
                k += 1
        assert self.cron is not None
        if start >= LATEST:
            return
        zone = ZoneInfo(self.timezone)
        # cronsim yields times after the one it starts from, to the second: start from the whole second
        moment = datetime.fromtimestamp(math.floor(start), zone)
        times = iter(CronSim(ALIASES.get(self.cron, self.cron), moment))
        while True:
            try:
                due = next(times).timestamp()
            except (OverflowError, ValueError, StopIteration):  # past the year 9999
                return
            if due <= start:
                continue
            if due > LATEST or (self.end_at is not None and due > self.end_at):
                return
            yield due

    def delay(self, due: float) -> float:
        """Jitter: how long after `due` it fires, the same on every leader."""
        if not self.jitter:
            return 0.0
        digest = hashlib.sha256(f"{self.name}\0{due!r}".encode()).digest()
        return self.jitter * int.from_bytes(digest[:8], "big") / 2**64


class FieldError(InputError):
    """Fields of a schedule are wrong: `problems` names each, with what is wrong with it (a
    schedule file's errors point at them); `field` is the first."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        self.field = problems[0][0]
        super().__init__("; ".join(message for _, message in problems))


@contextmanager
def _field(name: str, problems: list[tuple[str, str]]) -> Iterator[None]:
    try:
        yield
    except InputError as exc:
        raise FieldError([*problems, (name, str(exc))]) from None


def _refuse(message: str) -> Any:
    raise InputError(message)


def _required(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: _refuse("is required") if v is None else check(v)


def _duration(value: object) -> float:
    if isinstance(value, timedelta):  # from Python (dsm's client)
        value = value.total_seconds()
    try:
        return parse_duration(value, what="")
    except InputError as exc:
        raise InputError(str(exc).removeprefix(": ")) from None


def _bounded(value: object) -> float:
    seconds = _duration(value)
    if seconds > MAX_WAIT:
        raise InputError(f"must be at most 366d, got {format_duration(seconds)}")
    return seconds


def _every(value: object) -> float:
    every = _duration(value)
    if every < 1:
        raise InputError(f"must be at least 1s (runs are named by the second), got {format_duration(every)}")
    if every > MAX_EVERY:
        raise InputError(f"must be at most 3660d, got {format_duration(every)}")
    return every


def _note(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"must be text, got {value!r}")
    if value is not None and len(value) > MAX_NOTE:
        raise InputError(f"is {len(value)} characters; at most {MAX_NOTE} are kept")
    return value


def check_note(value: object) -> str | None:
    """A pause's note: text of at most MAX_NOTE characters, or None."""
    try:
        return _note(value)
    except InputError as exc:
        raise InputError(f"note: {exc}") from None


def specs_of(entries: object) -> list[Spec]:
    """The schedules of a list of mappings, each a schedule's `name` and its fields as `create`
    takes them (what `apply` is given by dsm's client and by PUT /api/schedules; a file's entries
    are read by `read_file`, which says where each problem is)."""
    if not isinstance(entries, (list, tuple)):
        raise InputError(f"schedules: a list of schedules (each a mapping of name, machine, cron or every, ...), "
                         f"not {type(entries).__name__}")
    specs: list[Spec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"schedules[{i}]: a schedule is a mapping of name, machine, cron or every, ..., "
                             f"not {type(entry).__name__}")
        spec = Spec.of(entry.get("name"), {k: v for k, v in entry.items() if k != "name"})
        if spec.name in seen:
            raise InputError(f"schedules[{i}]: schedule {spec.name!r} is given twice (first as "
                             f"schedules[{seen[spec.name]}])")
        seen[spec.name] = i
        specs.append(spec)
    return specs


def _payload(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"must be a JSON object, got {type(value).__name__}")
    payloads.check(value)
    return value


def _overlap(value: object) -> str:
    if value not in OVERLAPS:
        raise InputError(f"must be one of {', '.join(OVERLAPS)}, got {value!r}")
    return str(value)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"must be true or false, got {value!r}")
    return value


def check_cron(value: object, *, what: str = "cron") -> str:
    what = f"{what}: " if what else ""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what}expected a cron expression such as '*/5 * * * *' or '@hourly', got {value!r}")
    text = " ".join(value.split())
    try:
        CronSim(ALIASES.get(text, text), datetime(2000, 1, 1, tzinfo=timezone.utc))
    except Exception as exc:  # CronSimError, and whatever else odd text makes the parser raise
        raise InputError(f"{what}{text!r} is not a cron expression ({exc}); five fields: minute hour "
                         f"day-of-month month day-of-week, or @hourly, @daily, @weekly, @monthly, @yearly") from None
    return text


def check_timezone(value: object, *, what: str = "timezone") -> str:
    what = f"{what}: " if what else ""
    if not isinstance(value, str):
        raise InputError(f"{what}expected an IANA time zone such as Europe/Berlin, got {value!r}")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError, TypeError, UnicodeError):
        raise InputError(f"{what}unknown time zone {value!r} (an IANA name such as UTC or Europe/Berlin)") from None
    return value


def _time(value: object, now: float) -> float | None:
    from .index import parse_since

    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        at = float(value)
    elif isinstance(value, datetime):  # YAML reads an unquoted timestamp as one
        at = (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    elif isinstance(value, str):
        at = parse_since(value, now)
    else:
        raise InputError(f"expected a time such as 2026-12-01T00:00:00Z, got {value!r}")
    if not 0 <= at <= LATEST:  # NaN included
        raise InputError("must be a time between 1970-01-01 and 9999-12-31")
    return at


@dataclass(frozen=True, slots=True)
class State:
    """Where a schedule stands."""

    next_due: float | None  # the first due time not yet handled (None: no more)
    buffered: float | None = None  # a due time waiting for the run before it to end (buffer_one)
    last_id: str | None = None  # the last run the schedule started on its own
    runs: tuple[dict[str, Any], ...] = ()  # the newest last: {due, id, action, at[, count]}
    fires: int = 0
    skips: int = 0
    misses: int = 0
    entry: float | None = None  # the time of its due entry, as written (None: it has none)
    triggers: int = 0  # runs started by `trigger` (the last one's number is in its id)

    def dump(self) -> dict[str, Any]:
        return {"next_due": self.next_due, "buffered": self.buffered, "last_id": self.last_id,
                "runs": list(self.runs), "fires": self.fires, "skips": self.skips, "misses": self.misses,
                "entry": self.entry, "triggers": self.triggers}

    @staticmethod
    def load(d: dict[str, Any]) -> State:
        return State(d.get("next_due"), d.get("buffered"), d.get("last_id"), tuple(d.get("runs") or ()),
                     d.get("fires", 0), d.get("skips", 0), d.get("misses", 0), d.get("entry"), d.get("triggers", 0))

    def ran(self, *runs: dict[str, Any]) -> State:
        return replace(self, runs=(*self.runs, *runs)[-RUNS_KEPT:])


@dataclass(frozen=True, slots=True)
class Schedule:
    spec: Spec
    state: State
    created_at: float
    updated_at: float

    def dump(self) -> bytes:
        return codec.dumps({"spec": self.spec.dump(), "state": self.state.dump(), "created_at": self.created_at,
                            "updated_at": self.updated_at})

    @staticmethod
    def load(raw: bytes) -> Schedule:
        d = codec.loads(raw)
        return Schedule(Spec.load(d["spec"]), State.load(d["state"]), d["created_at"], d["updated_at"])

    def wakes(self, now: float) -> float | None:
        """When the leader should look at it next: its next due time (with jitter); while a run
        is buffered, every POLL seconds too. None while paused or ended."""
        if self.spec.paused:
            return None
        due = self.state.next_due
        at = None if due is None else due + self.spec.delay(due)
        if self.state.buffered is not None:
            at = min(at, now + POLL) if at is not None else now + POLL
        return at

    def public(self, now: float, *, upcoming: int = 5) -> dict[str, Any]:
        out = self.spec.public()
        nxt: list[float] = []
        if not self.spec.paused and self.state.next_due is not None:
            nxt = [self.state.next_due]
            for due in self.spec.dues(self.state.next_due):
                if len(nxt) >= upcoming:
                    break
                nxt.append(due)
        out.update({"next": [timestamp(d) for d in nxt[:upcoming]],
                    "runs": [{**r, "due": timestamp(r["due"]), "at": timestamp(r["at"])} for r in self.state.runs],
                    "buffered": timestamp(self.state.buffered), "fires": self.state.fires,
                    "skips": self.state.skips, "misses": self.state.misses, "triggers": self.state.triggers,
                    "created_at": timestamp(self.created_at), "updated_at": timestamp(self.updated_at)})
        return out


POLL = 1.0  # seconds between looks at a schedule whose buffered run waits for the one before it
IDLE = 30.0  # seconds between the leader's looks when nothing is due and no due entry is written


def due_key(keys: Keys, at: float, name: str) -> str:
    return f"{keys.schedules_due}{math.ceil(at * 1000):013d}/{name}"


def schedule_key(keys: Keys, name: str) -> str:
    return keys.schedule(name)


def write_ops(keys: Keys, name: str, before: Schedule | None, after: Schedule | None, now: float) -> list[Op]:
    """The schedule's key and its due entry, as `after` has them at `now` (None: deleted)."""
    ops: list[Op] = []
    old = before.state.entry if before is not None else None
    new = after.wakes(now) if after is not None else None
    if old is not None and (new is None or due_key(keys, old, name) != due_key(keys, new, name)):
        ops.append(Delete(due_key(keys, old, name)))
    if after is None:
        return [*ops, Delete(schedule_key(keys, name))]
    if new is not None:
        ops.append(Put(due_key(keys, new, name), b""))
    after = replace(after, state=replace(after.state, entry=new))
    return [*ops, Put(schedule_key(keys, name), after.dump())]


async def read(store: Store, keys: Keys, name: str) -> tuple[Schedule, int]:
    kv = await store.get(schedule_key(keys, check_name(name)))
    if kv is None:
        raise NotFound(f"no schedule {name!r} in namespace {keys.namespace!r}")
    return Schedule.load(kv.value), kv.mod_revision


async def all_schedules(store: Store, keys: Keys) -> list[Schedule]:
    prefix = keys.schedules
    start, end = prefix, prefix_end(prefix)
    out: list[Schedule] = []
    while True:
        page = await store.range(start, end, limit=500)
        out += [Schedule.load(kv.value) for kv in page.kvs]
        if not page.more or not page.kvs:
            return out
        start = page.kvs[-1].key + "\0"


def fresh_state(spec: Spec, now: float, state: State | None = None) -> State:
    """The state of a schedule whose due times start now (created, its timing changed, unpaused)."""
    base = state or State(None)
    return replace(base, next_due=spec.due_after(now), buffered=None)


async def swap(store: Store, keys: Keys, name: str, revision: int, before: Schedule | None,
               after: Schedule | None, now: float, extra: Sequence[Op] = (),
               require: Sequence[Compare] = ()) -> bool:
    """Write `after` in place of `before`, read at `revision` (0: absent), with `extra`, if
    `require` holds too; False when the schedule changed meanwhile (or `require` failed)."""
    key = schedule_key(keys, name)
    compare = [Compare.mod(key, "==", revision)] if revision else [Compare.version(key, "==", 0)]
    return (await store.txn([*compare, *require], [*extra, *write_ops(keys, name, before, after, now)])).succeeded


def _nested(txn: Txn) -> Txn:
    return Txn(txn.compare, txn.success)


class Schedules:
    """The schedules of one namespace: what `dsm schedule` and `/api/schedules` do, and the
    leader's firing (`round`). Instances start as `Operations` starts them, from the machine's
    newest definition registered in the namespace."""

    def __init__(self, operations: Any, *, wall: Any = time.time):
        self.ops = operations  # dsm.operations.Operations (not imported: it imports the housekeeping)
        self.store: Store = operations.store
        self.keys: Keys = operations.keys
        self.wall = wall
        self._newest: dict[str, tuple[float, Any]] = {}  # machine -> (when read, its newest graph)

    # -- what users do -----------------------------------------------------------------------------

    async def create(self, spec: Spec) -> Schedule:
        """Create a schedule; InputError when one of that name exists, NotFound when its machine is
        not registered."""
        await self._graph(spec.machine)
        now = self.wall()
        sched = Schedule(spec, fresh_state(spec, now), now, now)
        if not await self._swap(spec.name, 0, None, sched):
            raise ScheduleExists(f"schedule {spec.name!r} exists in namespace {self.keys.namespace!r}: apply it to "
                                 f"change it, or delete it first")
        return sched

    async def apply(self, specs: list[Spec], *, prune: bool = False) -> dict[str, list[str]]:
        """Make the namespace's schedules match `specs`: created, updated (their runs and counters
        kept; their due times start afresh when their timing changed) or left as they are; with
        `prune`, the others deleted. Returns the names by what was done."""
        done: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": [], "deleted": []}
        for spec in specs:
            await self._graph(spec.machine)
        for spec in specs:
            while True:
                kv = await self.store.get(schedule_key(self.keys, spec.name))
                now = self.wall()
                if kv is None:
                    if await self._swap(spec.name, 0, None, Schedule(spec, fresh_state(spec, now),
                                                                                      now, now)):
                        done["created"].append(spec.name)
                        break
                    continue
                before = Schedule.load(kv.value)
                if before.spec == spec:
                    done["unchanged"].append(spec.name)
                    break
                state = before.state
                if before.spec.timing() != spec.timing() or (before.spec.paused and not spec.paused):
                    state = fresh_state(spec, now, state)
                after = Schedule(spec, state, before.created_at, now)
                if await self._swap(spec.name, kv.mod_revision, before, after):
                    done["updated"].append(spec.name)
                    break
        if prune:
            wanted = {s.name for s in specs}
            for sched in await all_schedules(self.store, self.keys):
                if sched.spec.name not in wanted:
                    await self.delete(sched.spec.name)
                    done["deleted"].append(sched.spec.name)
        return done

    async def all(self) -> list[Schedule]:
        return await all_schedules(self.store, self.keys)

    async def get(self, name: str) -> Schedule:
        return (await read(self.store, self.keys, name))[0]

    async def describe(self, name: str) -> dict[str, Any]:
        """The schedule as users read it, its runs with their instances' statuses."""
        sched = await self.get(name)
        out = sched.public(self.wall())
        statuses = await self._statuses([r["id"] for r in out["runs"] if r.get("id")])
        for run in out["runs"]:
            if run.get("id"):
                run["status"] = statuses.get(run["id"])
        return out

    async def pause(self, name: str, note: str | None = None) -> Schedule:
        return await self._change(name, lambda s, now: Schedule(replace(s.spec, paused=True, note=note), s.state,
                                                                  s.created_at, now))

    async def unpause(self, name: str) -> Schedule:
        """Due times passed while paused are not run: the schedule goes on from now."""
        return await self._change(name, lambda s, now: Schedule(replace(s.spec, paused=False, note=None),
                                                                  fresh_state(s.spec, now, s.state), s.created_at, now)
                                  if s.spec.paused else s)

    async def _swap(self, name: str, revision: int, before: Schedule | None, after: Schedule | None,
                    extra: Sequence[Op] = (), require: Sequence[Compare] = ()) -> bool:
        return await swap(self.store, self.keys, name, revision, before, after, self.wall(), extra, require)

    async def _change(self, name: str, change: Callable[[Schedule, float], Schedule]) -> Schedule:
        while True:
            sched, revision = await read(self.store, self.keys, name)
            after = change(sched, self.wall())
            if after is sched or await self._swap(name, revision, sched, after):
                return after

    async def delete(self, name: str) -> Schedule:
        """Delete a schedule (the instances it started are left as they are)."""
        while True:
            sched, revision = await read(self.store, self.keys, name)
            if await self._swap(name, revision, sched, None):
                return sched

    async def trigger(self, name: str) -> str:
        """Start one run now, whatever runs already (as allow_all); return its id, named by now and
        numbered (`trigger_id`): every trigger starts a run of its own, and never under the id of
        a due time, which stays its fire's."""
        taken = 0  # numbers found taken: by the runs of a schedule of this name deleted and created again
        while True:
            sched, revision = await read(self.store, self.keys, name)
            now = self.wall()
            graph = await self._graph(sched.spec.machine)
            n = sched.state.triggers + 1 + taken
            iid = trigger_id(name, now, n)
            start = self.ops._create_txn(graph, dict(sched.spec.payload), iid)
            ran = sched.state.ran({"due": now, "id": iid, "action": "triggered", "at": now})
            after = replace(sched, state=replace(ran, triggers=n))
            # the run is started only with the schedule's count, and the count moves only with the run
            if await self._swap(name, revision, sched, after, start.success, require=start.compare):
                return iid
            if (await read(self.store, self.keys, name))[1] == revision:
                taken += 1

    async def backfill(self, name: str, start: float, end: float) -> list[str]:
        """Start a run for every due time from `start` to `end` (both included), now, whatever runs
        already; a due time whose run exists (started before, or by an earlier backfill) starts
        nothing. Returns the ids of the runs, started now or before."""
        sched = await self.get(name)
        if end < start:
            raise InputError(f"backfill of {name!r}: --to is before --from")
        dues = []
        for due in sched.spec.dues(start - 1e-6):
            if due > end:
                break
            dues.append(due)
            if len(dues) > MAX_BACKFILL:
                raise InputError(f"backfill of {name!r}: more than {MAX_BACKFILL} due times between "
                                 f"{timestamp(start)} and {timestamp(end)}; backfill a shorter span at a time")
        graph = await self._graph(sched.spec.machine)
        for i in range(0, len(dues), MAX_STARTS):
            chunk = dues[i:i + MAX_STARTS]
            while True:
                sched, revision = await read(self.store, self.keys, name)
                now = self.wall()
                starts = [_nested(self.ops._create_txn(graph, dict(sched.spec.payload), run_id(name, d)))
                          for d in chunk]
                runs = [{"due": d, "id": run_id(name, d), "action": "backfilled", "at": now} for d in chunk]
                after = replace(sched, state=sched.state.ran(*runs))
                if await self._swap(name, revision, sched, after, starts):
                    break
        return [run_id(name, d) for d in dues]

    # -- the leader --------------------------------------------------------------------------------

    async def round(self, *, batch: int = 256, idle: float = POLL) -> tuple[list[dict[str, Any]], float]:
        """Fire what is due now. Returns what was done (one event per due time handled: started,
        skipped, buffered, missed, with the schedule's name and the lateness) and how long until
        the next due entry, at most `idle` (without a watch on the due entries, POLL: a schedule
        created meanwhile is seen within it)."""
        prefix = self.keys.schedules_due
        now = self.wall()
        upto = f"{prefix}{math.floor(now * 1000) + 1:013d}"  # every entry due at or before now
        found = await self.store.range(prefix, upto, limit=batch, keys_only=True)
        entries = [kv.key for kv in found.kvs]
        events: list[dict[str, Any]] = []
        alone: list[str] = []  # what a batch left: a stale entry, a cancel_other, a schedule changed meanwhile
        batches = asyncio.Semaphore(BATCHES)

        async def together(chunk: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
            async with batches:
                return await self._fire_together(chunk)

        for fired, left in await asyncio.gather(*(together(entries[start:start + FIRING])
                                                  for start in range(0, len(entries), FIRING))):
            events += fired
            alone += left
        room = asyncio.Semaphore(FIRING)

        async def fire(entry: str) -> list[dict[str, Any]]:
            async with room:
                return await self._fire(entry[len(prefix):].partition("/")[2], entry)

        events += [event for fired in await asyncio.gather(*(fire(entry) for entry in alone)) for event in fired]
        if found.more:
            return events, 0.0
        following = await self.store.range(upto, prefix_end(prefix), limit=1, keys_only=True)
        if not following.kvs:
            return events, idle
        at = int(following.kvs[0].key[len(prefix):].partition("/")[0]) / 1000
        return events, min(idle, max(0.0, at - self.wall()))

    async def _fire_together(self, entries: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """Fire the schedules of due entries in three round trips whatever their number: their
        schedules read in one transaction, their last runs' records in another, and their fires
        nested in a third (each fenced by its schedule's revision). Returns the events, and the
        entries left to `_fire` one by one."""
        prefix = self.keys.schedules_due
        names = [entry[len(prefix):].partition("/")[2] for entry in entries]
        read = await self.store.txn([], [Get(schedule_key(self.keys, name)) for name in names])
        pending: list[tuple[str, str, int, Schedule]] = []
        left: list[str] = []
        for entry, name, got in zip(entries, names, read.gets()):
            kv = got.first
            sched = Schedule.load(kv.value) if kv is not None else None
            if sched is None or sched.state.entry is None or due_key(self.keys, sched.state.entry, name) != entry:
                left.append(entry)
            else:
                pending.append((entry, name, kv.mod_revision, sched))  # type: ignore[union-attr]
        statuses = await self._statuses([s.state.last_id for *_, s in pending if s.state.last_id is not None])
        running = {iid for iid, status in statuses.items() if status == "running"}
        fires: list[tuple[str, list[dict[str, Any]], Txn]] = []
        now = self.wall()
        for entry, name, revision, before in pending:
            events, after, starts, cancel = await self._decide(before, running=before.state.last_id in running)
            if cancel is not None or len(starts) > 1:
                left.append(entry)  # it cancels first, or catches up: alone (a request stays small)
                continue
            key = schedule_key(self.keys, name)
            fires.append((entry, events, Txn([Compare.mod(key, "==", revision)],
                                             [*(_nested(t) for t in starts), *write_ops(self.keys, name, before,
                                                                                      after, now)])))
        if not fires:
            return [], left
        result = await self.store.txn([], [txn for *_, txn in fires])
        events_out: list[dict[str, Any]] = []
        for i, (entry, events, _) in enumerate(fires):
            if result.nested(i).succeeded:
                events_out += events
            else:
                left.append(entry)
        return events_out, left

    async def _fire(self, name: str, entry: str) -> list[dict[str, Any]]:
        key = schedule_key(self.keys, name)
        while True:
            kv = await self.store.get(key)
            before = Schedule.load(kv.value) if kv is not None else None
            if before is None or before.state.entry is None or due_key(self.keys, before.state.entry, name) != entry:
                # not the schedule's own entry (it went, or paused, or moved on with an answer lost)
                await self.store.txn([Compare.mod(key, "==", kv.mod_revision if kv else 0)], [Delete(entry)])
                return []
            events, after, starts, cancel = await self._decide(before)
            if cancel is not None:
                await self._cancel_other(cancel, name)
            if await self._swap(name, kv.mod_revision, before, after, [_nested(t) for t in starts]):  # type: ignore[union-attr]
                return events

    async def _decide(self, sched: Schedule, *, running: bool | None = None) -> tuple[
            list[dict[str, Any]], Schedule, list[Txn], str | None]:
        """What the due times passed ask: the events, the schedule after, the starts, and the run
        to cancel first (cancel_other). `running`: whether its last run runs (None: read it)."""
        spec, state = sched.spec, sched.state
        now = self.wall()
        events: list[dict[str, Any]] = []
        starts: list[Txn] = []
        cancel: str | None = None
        if running is None:
            running = await self._running(state.last_id)
        graph = None
        if state.buffered is not None and not running:  # the run it waited for ended: start it now
            graph = graph or await self._graph(spec.machine)
            iid = run_id(spec.name, state.buffered)
            starts.append(self.ops._create_txn(graph, dict(spec.payload), iid))
            events.append({"schedule": spec.name, "due": state.buffered, "id": iid, "action": "started",
                           "late": now - state.buffered})
            state = replace(state.ran({"due": state.buffered, "id": iid, "action": "started", "at": now}),
                            buffered=None, last_id=iid, fires=state.fires + 1)
            running = True
        due = state.next_due
        dues = spec.dues(due) if due is not None else iter(())
        while due is not None and due + spec.delay(due) <= now and len(starts) < MAX_STARTS:
            if now - due > spec.catchup_window:
                missed, due = _count_missed(spec, due, now - spec.catchup_window)
                events.append({"schedule": spec.name, "due": due, "action": "missed", "count": missed})
                state = state.ran({"due": due, "id": None, "action": "missed", "count": missed, "at": now})
                state = replace(state, misses=state.misses + missed)
                dues = spec.dues(due)
                due = next(dues, None)
                continue
            iid = run_id(spec.name, due)
            action = "started"
            if running and spec.overlap == "skip":
                action = "skipped"
            elif running and spec.overlap == "buffer_one":
                action = "buffered" if state.buffered is None else "skipped"
            elif running and spec.overlap == "cancel_other" and state.last_id is not None:
                cancel = state.last_id
            if action == "started":
                graph = graph or await self._graph(spec.machine)
                starts.append(self.ops._create_txn(graph, dict(spec.payload), iid))
                state = replace(state, last_id=iid, fires=state.fires + 1)
                running = True
            elif action == "buffered":
                state = replace(state, buffered=due)
            else:
                state = replace(state, skips=state.skips + 1)
            events.append({"schedule": spec.name, "due": due, "id": iid, "action": action, "late": now - due,
                           "overlap": spec.overlap})
            state = state.ran({"due": due, "id": iid if action == "started" else None, "action": action, "at": now})
            due = next(dues, None)
        return events, Schedule(spec, replace(state, next_due=due), sched.created_at, sched.updated_at), starts, cancel

    async def _running(self, iid: str | None) -> bool:
        return iid is not None and (await self._statuses([iid]))[iid] == "running"

    async def _statuses(self, ids: list[str]) -> dict[str, str | None]:
        """The statuses of instances (None: gone), their records read in one transaction."""
        unique = sorted(set(ids))
        if not unique:
            return {}
        read = await self.store.txn([], [Get(self.keys.instance(iid)) for iid in unique])
        return {iid: _status(got.first.value) if got.first is not None else None
                for iid, got in zip(unique, read.gets())}

    async def _cancel_other(self, iid: str, name: str) -> None:
        try:
            await self.ops.cancel(iid, reason=f"schedule {name}: the next run is due (overlap cancel_other)",
                                  by=f"schedule:{name}")
        except NotFound:
            pass

    async def _graph(self, machine: str) -> Any:
        """The machine's newest definition, compiled; read again at most every POLL seconds (a
        leader firing a thousand runs of one machine reads its pointer once)."""
        known = self._newest.get(machine)
        if known is not None and self.wall() - known[0] < POLL:
            return known[1]
        graph = await self._read_graph(machine)
        self._newest[machine] = (self.wall(), graph)
        return graph

    async def _read_graph(self, machine: str) -> Any:
        from .definitions import newest

        info = await newest(self.store, self.keys, machine)
        if info is None:
            raise NotFound(f"no machine {machine!r} is registered in namespace {self.keys.namespace!r} (a worker "
                           f"given its file registers it, as 'dsm submit FILE' and 'dsm schedule create --file' do)")
        return await self.ops.definitions.get(info.digest)


def _status(raw: bytes) -> str | None:
    from .records import load_instance

    return load_instance(raw).status


def _count_missed(spec: Spec, due: float, before: float) -> tuple[int, float]:
    """The due times from `due` up to `before` (missed: older than the catch-up window), counted
    (up to MAX_COUNTED: more count as that many), and the last of them."""
    if spec.every is not None:  # arithmetic: a month of seconds costs nothing
        extra = max(0, math.ceil((before - due) / spec.every) - 1)
        if spec.end_at is not None:
            extra = min(extra, max(0, math.floor((spec.end_at - due) / spec.every)))
        return 1 + extra, due + extra * spec.every
    count, last = 1, due
    for nxt in spec.dues(due):
        if nxt >= before or count >= MAX_COUNTED:
            break
        count, last = count + 1, nxt
    return count, last


def read_file(path: str) -> list[Spec]:
    """The schedules of a schedule file (`dsm schedule apply`): a YAML list of mappings, each a
    schedule's `name` and its fields as `create` takes them (durations as 90s or 1h, times as
    2026-12-01T00:00:00Z). DefinitionError with every problem at its file:line:col."""
    from .errors import DefinitionError
    from .loader import read

    doc = read(path, what="schedule file")
    if not isinstance(doc.data, list):
        raise DefinitionError(doc.problem((), "a schedule file is a YAML list of schedules (each a mapping with "
                                              "name, machine and cron or every)"))
    specs: list[Spec] = []
    problems = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(doc.data):
        if not isinstance(entry, dict):
            problems.append(doc.problem((i,), "a schedule is a mapping with name, machine and cron or every"))
            continue
        fields = {k: v for k, v in entry.items() if k != "name"}
        try:
            spec = Spec.of(entry.get("name"), fields)
        except FieldError as exc:
            for field_name, message in exc.problems:
                there = field_name in entry
                problems.append(doc.problem((i, field_name) if there else (i,), message,
                                            key=there and field_name not in SPEC_FIELDS))
            continue
        if spec.name in seen:
            problems.append(doc.problem((i, "name"), f"schedule {spec.name!r} is defined twice (first as entry "
                                                     f"{seen[spec.name] + 1})"))
            continue
        seen[spec.name] = i
        specs.append(spec)
    if problems:
        raise DefinitionError(problems)
    return specs
