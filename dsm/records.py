"""Instance records: frozen values the transition function maps to new values.

Payloads inside records are never mutated in place: a handler always works on its own deep copy,
and every change produces a new dict. That lets records share payload objects safely.
Serialization happens at the store boundary only (`dump_instance` / `load_instance`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from . import codec
from .frozen import evolver, fast_init

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})
DEFAULT_RETENTION = 7 * 86400.0  # seconds a finished instance is kept, unless its machine says (`retention:`)
# `not_before` of a token that waits for something other than time (a signal without a timeout, a
# child): never due by the clock; whatever it waits for makes it due (`transition.signal`, a child's end).
PARKED = 1e15

Frame = tuple[str, str]  # (activation id, branch name)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What failed an attempt for good: recorded as `error` and offered to `catch` as payload.error."""

    type: str
    message: str
    state: str
    attempts: int
    traceback: str | None = None  # the last attempt's traceback (its last 4 KiB), when it raised

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "state": self.state, "attempts": self.attempts}

    def as_record(self) -> dict[str, Any]:
        """The record's `error`: what `catch` offers, and the traceback."""
        return {**self.as_dict(), "traceback": self.traceback}


@fast_init
@dataclass(frozen=True, slots=True)
class Token:
    """A unit of pending work: one line of execution, at one state, possibly inside fork branches.

    A token keeps its id while it moves along a line (so its work marker and its claim stay put);
    forks and joins make new ones. `visit` numbers each entry into a state, uniquely within the
    instance, and stays the same across retries: with the instance id it is the idempotency key.
    `payload` is None on the main line, where the instance's own payload is the token's; branch
    tokens carry their own copy.
    """

    id: str
    state: str
    frames: tuple[Frame, ...] = ()
    payload: dict[str, Any] | None = None
    attempt: int = 1
    not_before: float = 0.0
    visit: int = 1
    failures: tuple[FailedAttempt, ...] = ()  # this visit's failed attempts, until the visit commits
    deadline: float | None = None  # a signal or call state's timeout, as a time
    child: str | None = None  # the child instance a call state waits for
    waits: str | None = None  # what its state waits for: "timer", "child" or "signal:NAME"

    @property
    def branch(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.frames) if self.frames else ()

    @property
    def parked(self) -> bool:
        return self.not_before >= PARKED


@dataclass(frozen=True, slots=True)
class Activation:
    """One pass through a fork: its own join counter (arrived branches) and the fork-time payload."""

    id: str
    fork: str
    frames: tuple[Frame, ...]
    base: dict[str, Any]
    arrived: Mapping[str, dict[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    # a map's pass: its items (arrived is keyed by item index) and how many were started so far
    items: tuple[Any, ...] | None = None
    started: int = 0


@fast_init
@dataclass(frozen=True, slots=True)
class HistoryEntry:
    seq: int
    state: str
    next: tuple[str, ...]
    branch: tuple[str, ...]
    attempt: int
    outcome: str | None
    worker: str
    at: float
    started_at: float | None = None  # when the attempt that made this transition began
    duration_ms: int | None = None
    failures: tuple[FailedAttempt, ...] = ()  # the attempts of this visit that failed before it
    signal: Signal | None = None  # the signal a signal state consumed
    child: str | None = None  # the child instance a call state ran

    def as_dict(self) -> dict[str, Any]:
        out = {"seq": self.seq, "state": self.state, "next": list(self.next), "branch": list(self.branch),
               "attempt": self.attempt, "outcome": self.outcome, "worker": self.worker, "at": timestamp(self.at),
               "started_at": timestamp(self.started_at if self.started_at is not None else self.at),
               "duration_ms": self.duration_ms if self.duration_ms is not None else 0,
               "failures": [f.as_dict() for f in self.failures]}
        if self.signal is not None:
            out["signal"] = {"name": self.signal.name, "outcome": self.signal.outcome, "at": timestamp(self.signal.at)}
        if self.child is not None:
            out["child"] = self.child
        return out


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal sent to an instance: kept in its record until a signal state consumes it."""

    name: str
    payload: dict[str, Any]
    outcome: str | None
    at: float

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, "payload": self.payload, "outcome": self.outcome, "at": self.at}

    @staticmethod
    def load(d: dict[str, Any]) -> Signal:
        return Signal(d["name"], d["payload"], d.get("outcome"), d["at"])

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "payload": self.payload, "outcome": self.outcome, "at": timestamp(self.at)}


@dataclass(frozen=True, slots=True)
class Parent:
    """The instance and state that started a child instance (`call`), and the token that waits."""

    id: str
    state: str
    token: str
    machine: str
    digest: str
    created: int = 0  # ms: with `machine` and `id`, where the parent's work markers lie (`keys.place`)

    def dump(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "token": self.token, "machine": self.machine,
                "digest": self.digest, "created": self.created}

    @staticmethod
    def load(d: dict[str, Any]) -> Parent:
        # `created` is absent from records written before key layout 3; upgrading adds it (`layout.py`)
        return Parent(d["id"], d["state"], d["token"], d["machine"], d["digest"], d.get("created", 0))


NO_SEARCH: Mapping[str, str] = MappingProxyType({})  # an instance without search attribute values


@fast_init
@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    machine: str
    digest: str
    version: int | str | None = None
    status: str = RUNNING
    created_at: float = 0.0
    finished_at: float | None = None
    # seconds kept after finishing, pinned from the definition at start (None: records from before
    # retention existed, kept for the default)
    retention: float | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None
    state: str | None = None
    transitions: int = 0
    seq: int = 0  # id counter for tokens and activations
    tokens: Mapping[str, Token] = field(default_factory=lambda: MappingProxyType({}))
    activations: Mapping[str, Activation] = field(default_factory=lambda: MappingProxyType({}))
    input: dict[str, Any] | None = None  # the payload the instance started with
    redrives: int = 0
    cancel: CancelInfo | None = None
    stopped: Stopped | None = None  # what was pending when it failed or was cancelled, for redrive
    input_digest: str | None = None  # set when `input` was too large to keep (dsm.idempotency)
    signals: tuple[Signal, ...] = ()  # received and not yet consumed, in the order sent
    parent: Parent | None = None  # set on a child instance (`call`)
    # child instances its call states started: retention deletes them with it (None of them: no
    # need to look for any). 0 in records written before it was counted
    children: int = 0
    # the newest history entries, kept in the record in their stored form (`history_to_row`) until
    # a commit spills them into a history chunk (`commits.py`); the older ones are under hist/
    recent: tuple[list[Any], ...] = ()
    # its search attributes' values, as the texts the index holds them by (`search.py`): name -> text
    search: Mapping[str, str] = field(default_factory=lambda: NO_SEARCH)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def expires_at(self) -> float | None:
        """When retention deletes this instance: `retention` after it finished; None while it runs."""
        if self.finished_at is None or not self.finished:
            return None
        return self.finished_at + (DEFAULT_RETENTION if self.retention is None else self.retention)

    @property
    def active(self) -> list[str]:
        return sorted({t.state for t in self.tokens.values()})

    def payload_of(self, token: Token) -> dict[str, Any]:
        return self.payload if token.payload is None else token.payload


def evolve(inst: Instance, **changes: Any) -> Instance:
    """A copy of `inst` with some fields changed (`dsm.frozen.evolver`: a step of an instance makes
    one new record; this is that cost)."""
    return _evolve_instance(inst, **changes)


_evolve_instance = evolver(Instance)


def millis(at: float) -> int:
    """A time in whole milliseconds, as creation times are in keys (`keys.sort_key`)."""
    return int(at * 1000)


def new_id() -> str:
    """A UUIDv7: time-ordered, so listings sort by creation without an index."""
    ms = time.time_ns() // 1_000_000
    rand = uuid.uuid4().int
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand & ((1 << 12) - 1)) << 64
    value |= 0b10 << 62 | (rand >> 12) & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def timestamp(at: float | None) -> str | None:
    if at is None:
        return None
    # isoformat truncates to milliseconds as the format wants, in a third less time than strftime
    # (a record's history has two per entry)
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


# -- serialization at the store boundary ---------------------------------------------------------

def _frames(raw: list) -> tuple[Frame, ...]:
    return tuple((a, b) for a, b in raw)


def instance_to_dict(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id, "machine": inst.machine, "digest": inst.digest, "version": inst.version,
        "status": inst.status, "created_at": inst.created_at, "finished_at": inst.finished_at,
        "payload": inst.payload, "error": inst.error.as_record() if inst.error else None, "state": inst.state,
        "transitions": inst.transitions, "seq": inst.seq,
        "retention": inst.retention,
        "tokens": _tokens_to_dict(inst.tokens),
        "activations": _activations_to_dict(inst.activations),
        "input": inst.input, "redrives": inst.redrives,
        "cancel": inst.cancel.as_dict() if inst.cancel else None,
        "stopped": {"tokens": _tokens_to_dict(inst.stopped.tokens),
                    "activations": _activations_to_dict(inst.stopped.activations)} if inst.stopped else None,
        "input_digest": inst.input_digest,
        **({"signals": [sig.dump() for sig in inst.signals]} if inst.signals else {}),
        **({"parent": inst.parent.dump()} if inst.parent is not None else {}),
        **({"children": inst.children} if inst.children else {}),
        **({"history": inst.recent} if inst.recent else {}),
        **({"search": dict(inst.search)} if inst.search else {}),
    }


def instance_from_dict(raw: dict[str, Any]) -> Instance:
    error = raw.get("error")
    return Instance(
        id=raw["id"], machine=raw["machine"], digest=raw["digest"], version=raw.get("version"),
        status=raw["status"], created_at=raw["created_at"], finished_at=raw.get("finished_at"),
        payload=raw["payload"], error=ErrorInfo(**error) if error else None, state=raw.get("state"),
        transitions=raw["transitions"], seq=raw["seq"],
        retention=raw.get("retention"),
        tokens=_tokens_from_dict(raw["tokens"]),
        activations=_activations_from_dict(raw["activations"]),
        input=raw.get("input"), redrives=raw.get("redrives", 0),
        cancel=CancelInfo(**raw["cancel"]) if raw.get("cancel") else None,
        stopped=Stopped(_tokens_from_dict(raw["stopped"]["tokens"]),
                        _activations_from_dict(raw["stopped"]["activations"])) if raw.get("stopped") else None,
        input_digest=raw.get("input_digest"),
        signals=tuple(Signal.load(d) for d in raw.get("signals", ())),
        parent=Parent.load(raw["parent"]) if raw.get("parent") else None,
        children=raw.get("children", 0),
        recent=tuple(raw.get("history", ())),
        search=MappingProxyType(raw["search"]) if raw.get("search") else NO_SEARCH,
    )


def dump_instance(inst: Instance) -> bytes:
    return codec.dumps(instance_to_dict(inst))


def load_instance(raw: bytes) -> Instance:
    return instance_from_dict(codec.loads(raw))


def history_to_row(entry: HistoryEntry) -> list[Any]:
    """A history entry in its stored form (in a record's `history`, or in a chunk under hist/): a
    row by position, `[seq, state, next, branch, attempt, outcome, worker, at, started_at,
    duration_ms, failures, signal, child]` without the empty ones at its end. A record holds a few
    and writes them again with every commit until they are spilled: a third of the bytes of the
    same entry with its keys named."""
    row = [entry.seq, entry.state, entry.next, entry.branch, entry.attempt, entry.outcome, entry.worker, entry.at,
           entry.started_at, entry.duration_ms, [f.dump() for f in entry.failures] if entry.failures else None,
           entry.signal.dump() if entry.signal is not None else None, entry.child]
    while row[-1] is None:
        row.pop()
    return row


def row_seq(row: list[Any]) -> int:
    return int(row[0])


def row_failures(row: list[Any]) -> int:
    """How many failed attempts a stored entry carries (each with up to 4 KiB of traceback)."""
    return len(row[10]) if len(row) > 10 and row[10] else 0


def history_from_stored(value: list[Any] | dict[str, Any]) -> HistoryEntry:
    """A history entry from its stored form: a row, or (as the first key layout wrote it) an object."""
    if isinstance(value, dict):
        d = value
        return HistoryEntry(seq=d["seq"], state=d["state"], next=tuple(d["next"]), branch=tuple(d["branch"]),
                            attempt=d["attempt"], outcome=d["outcome"], worker=d["worker"], at=d["at"],
                            started_at=d.get("started_at"), duration_ms=d.get("duration_ms"),
                            failures=tuple(FailedAttempt.load(f) for f in d.get("failures", ())),
                            signal=Signal.load(d["signal"]) if d.get("signal") else None, child=d.get("child"))
    row = value + [None] * (13 - len(value))
    return HistoryEntry(row[0], row[1], tuple(row[2]), tuple(row[3]), row[4], row[5], row[6], row[7], row[8], row[9],
                        tuple(FailedAttempt.load(f) for f in row[10]) if row[10] else (),
                        Signal.load(row[11]) if row[11] else None, row[12])


def load_history(raw: bytes) -> list[HistoryEntry]:
    """The entries of a key under hist/: a chunk (a list of rows, as commits spill them), or one
    entry (an object, as the first key layout wrote one key a transition)."""
    value = codec.loads(raw)
    return [history_from_stored(v) for v in (value if isinstance(value, list) else [value])]


def public_record(inst: Instance, history: list[HistoryEntry] | None = None) -> dict[str, Any]:
    """The instance record as the CLI prints it (`--json`); history only when given."""
    record: dict[str, Any] = {
        "id": inst.id, "machine": inst.machine, "version": inst.version, "digest": inst.digest,
        "status": inst.status, "state": inst.state, "active": inst.active, "payload": inst.payload,
        "error": inst.error.as_record() if inst.error else None,
        "created_at": timestamp(inst.created_at), "finished_at": timestamp(inst.finished_at),
        "transitions": inst.transitions,
    }
    if history is not None:
        record["history"] = [h.as_dict() for h in history]
    record.update({"input": inst.input, "waiting": waiting(inst), "redrives": inst.redrives,
                   "cancel": inst.cancel.public() if inst.cancel else None})
    record["expires_at"] = timestamp(inst.expires_at)  # later fields follow the contract's first ones
    record["signals"] = [sig.public() for sig in inst.signals]
    record["parent"] = {"id": inst.parent.id, "state": inst.parent.state} if inst.parent else None
    return record


# -- failed attempts, cancel and redrive (later record fields) --------------------------------------

MAX_FAILURES = 10  # failed attempts kept per visit: the last ones
MAX_ERROR_TEXT = 4096  # characters of a failed attempt's message, and of its traceback, that are kept


def _tail(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_ERROR_TEXT else text[-MAX_ERROR_TEXT:]


@dataclass(frozen=True, slots=True)
class FailedAttempt:
    """One failed attempt of a visit: kept on its token until the visit commits, then on the
    visit's history entry (`failures`), so retries leave a trace."""

    attempt: int
    type: str
    message: str
    traceback: str | None
    worker: str
    started_at: float
    duration_ms: int

    def error(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}

    def as_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "error": self.error(), "worker": self.worker,
                "started_at": timestamp(self.started_at), "duration_ms": self.duration_ms}

    def dump(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "type": self.type, "message": self.message, "traceback": self.traceback,
                "worker": self.worker, "started_at": self.started_at, "duration_ms": self.duration_ms}

    @staticmethod
    def load(d: dict[str, Any]) -> FailedAttempt:
        return FailedAttempt(attempt=d["attempt"], type=d["type"], message=d["message"], traceback=d.get("traceback"),
                             worker=d["worker"], started_at=d["started_at"], duration_ms=d["duration_ms"])

    @staticmethod
    def of(attempt: int, type: str, message: str, traceback: str | None, *, worker: str, started_at: float,
           duration_ms: int) -> FailedAttempt:
        """A failed attempt with its message cut to its first MAX_ERROR_TEXT characters, its traceback
        to its last."""
        return FailedAttempt(attempt, type, message[:MAX_ERROR_TEXT], _tail(traceback), worker, started_at,
                             duration_ms)


def kept_failures(failures: tuple[FailedAttempt, ...]) -> tuple[FailedAttempt, ...]:
    return failures[-MAX_FAILURES:]


MAX_REASON = 4096  # characters of a cancel reason that the client and the HTTP API accept


@dataclass(frozen=True, slots=True)
class CancelInfo:
    """Who cancelled an instance (`user@host`), when and why."""

    reason: str | None
    by: str | None
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "by": self.by, "at": self.at}

    def public(self) -> dict[str, Any]:
        return {"reason": self.reason, "by": self.by, "at": timestamp(self.at)}


@dataclass(frozen=True, slots=True)
class Stopped:
    """The work that was pending when an instance failed or was cancelled: `dsm redrive` puts it back.
    Workers never see it: a finished record lists no tokens and has no work markers."""

    tokens: Mapping[str, Token]
    activations: Mapping[str, Activation]


def waiting(inst: Instance) -> list[dict[str, Any]]:
    """What the instance waits for now, derived from its tokens: a timer, a signal, a child, or a
    retry with its attempt and last error; `until` is when it may run (in the past when it is due
    or running; null when only what it waits for can wake it)."""
    out: list[dict[str, Any]] = []
    for token in sorted(inst.tokens.values(), key=lambda t: (t.branch, t.state, t.id)):
        kind, _, name = (token.waits or "").partition(":")
        if token.attempt > 1 and (kind != "child" or token.child is None):
            kind = "retry"
        if not kind:
            continue
        if kind == "signal" and token.not_before == 0.0:
            continue  # a signal has arrived: it runs now
        last = token.failures[-1].error() if token.failures else None
        until = token.deadline if token.parked else token.not_before
        out.append({"state": token.state, "branch": list(token.branch), "kind": kind,
                    "until": timestamp(until), "signal": name or None,
                    "child": token.child, "attempt": token.attempt, "last_error": last})
    return out


def _tokens_to_dict(tokens: Mapping[str, Token]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tid, t in tokens.items():
        raw: dict[str, Any] = {"state": t.state, "frames": [list(f) for f in t.frames], "payload": t.payload,
                               "attempt": t.attempt, "not_before": t.not_before, "visit": t.visit}
        if t.failures:
            raw["failures"] = [f.dump() for f in t.failures]
        if t.deadline is not None:
            raw["deadline"] = t.deadline
        if t.child is not None:
            raw["child"] = t.child
        if t.waits is not None:
            raw["waits"] = t.waits
        out[tid] = raw
    return out


def _tokens_from_dict(raw: dict[str, Any]) -> Mapping[str, Token]:
    return MappingProxyType({
        tid: Token(id=tid, state=t["state"], frames=_frames(t["frames"]), payload=t["payload"],
                   attempt=t["attempt"], not_before=t["not_before"], visit=t.get("visit", 1),
                   failures=tuple(FailedAttempt.load(f) for f in t.get("failures", ())),
                   deadline=t.get("deadline"), child=t.get("child"), waits=t.get("waits"))
        for tid, t in raw.items()})


def _activations_to_dict(activations: Mapping[str, Activation]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for aid, a in activations.items():
        raw: dict[str, Any] = {"fork": a.fork, "frames": [list(f) for f in a.frames], "base": a.base,
                               "arrived": dict(a.arrived)}
        if a.items is not None:
            raw["items"] = list(a.items)
            raw["started"] = a.started
        out[aid] = raw
    return out


def _activations_from_dict(raw: dict[str, Any]) -> Mapping[str, Activation]:
    return MappingProxyType({
        aid: Activation(id=aid, fork=a["fork"], frames=_frames(a["frames"]), base=a["base"],
                        arrived=MappingProxyType(a["arrived"]),
                        items=tuple(a["items"]) if "items" in a else None, started=a.get("started", 0))
        for aid, a in raw.items()})


__all__ = [
    "Activation", "CancelInfo", "ErrorInfo", "FailedAttempt", "HistoryEntry", "Instance", "Parent", "Signal",
    "Stopped", "Token", "PARKED",
    "replace", "waiting", "MAX_FAILURES",
    "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "FINISHED", "STATUSES",
]
