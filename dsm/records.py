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

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})
DEFAULT_RETENTION = 7 * 86400.0  # seconds a finished instance is kept, unless its machine says (`retention:`)

Frame = tuple[str, str]  # (activation id, branch name)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What failed an attempt for good: recorded as `error` and offered to `catch` as payload.error."""

    type: str
    message: str
    state: str
    attempts: int

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "state": self.state, "attempts": self.attempts}


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

    @property
    def branch(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.frames) if self.frames else ()


@dataclass(frozen=True, slots=True)
class Activation:
    """One pass through a fork: its own join counter (arrived branches) and the fork-time payload."""

    id: str
    fork: str
    frames: tuple[Frame, ...]
    base: dict[str, Any]
    arrived: Mapping[str, dict[str, Any]] = field(default_factory=lambda: MappingProxyType({}))


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

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "state": self.state, "next": list(self.next), "branch": list(self.branch),
                "attempt": self.attempt, "outcome": self.outcome, "worker": self.worker, "at": timestamp(self.at)}


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
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- serialization at the store boundary ---------------------------------------------------------

def _frames(raw: list) -> tuple[Frame, ...]:
    return tuple((a, b) for a, b in raw)


def instance_to_dict(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id, "machine": inst.machine, "digest": inst.digest, "version": inst.version,
        "status": inst.status, "created_at": inst.created_at, "finished_at": inst.finished_at,
        "payload": inst.payload, "error": inst.error.as_dict() if inst.error else None, "state": inst.state,
        "transitions": inst.transitions, "seq": inst.seq,
        "retention": inst.retention,
        "tokens": {tid: {"state": t.state, "frames": [list(f) for f in t.frames], "payload": t.payload,
                         "attempt": t.attempt, "not_before": t.not_before, "visit": t.visit}
                   for tid, t in inst.tokens.items()},
        "activations": {aid: {"fork": a.fork, "frames": [list(f) for f in a.frames], "base": a.base,
                              "arrived": dict(a.arrived)} for aid, a in inst.activations.items()},
    }


def instance_from_dict(raw: dict[str, Any]) -> Instance:
    error = raw.get("error")
    return Instance(
        id=raw["id"], machine=raw["machine"], digest=raw["digest"], version=raw.get("version"),
        status=raw["status"], created_at=raw["created_at"], finished_at=raw.get("finished_at"),
        payload=raw["payload"], error=ErrorInfo(**error) if error else None, state=raw.get("state"),
        transitions=raw["transitions"], seq=raw["seq"],
        retention=raw.get("retention"),
        tokens=MappingProxyType({
            tid: Token(id=tid, state=t["state"], frames=_frames(t["frames"]), payload=t["payload"],
                       attempt=t["attempt"], not_before=t["not_before"], visit=t.get("visit", 1))
            for tid, t in raw["tokens"].items()}),
        activations=MappingProxyType({
            aid: Activation(id=aid, fork=a["fork"], frames=_frames(a["frames"]), base=a["base"],
                            arrived=MappingProxyType(a["arrived"]))
            for aid, a in raw["activations"].items()}),
    )


def dump_instance(inst: Instance) -> bytes:
    return codec.dumps(instance_to_dict(inst))


def load_instance(raw: bytes) -> Instance:
    return instance_from_dict(codec.loads(raw))


def dump_history(entry: HistoryEntry) -> bytes:
    return codec.dumps({"seq": entry.seq, "state": entry.state, "next": entry.next, "branch": entry.branch,
                        "attempt": entry.attempt, "outcome": entry.outcome, "worker": entry.worker, "at": entry.at})


def load_history(raw: bytes) -> HistoryEntry:
    d = codec.loads(raw)
    return HistoryEntry(seq=d["seq"], state=d["state"], next=tuple(d["next"]), branch=tuple(d["branch"]),
                        attempt=d["attempt"], outcome=d["outcome"], worker=d["worker"], at=d["at"])


def public_record(inst: Instance, history: list[HistoryEntry] | None = None) -> dict[str, Any]:
    """The instance record as the CLI prints it (`--json`); history only when given."""
    record: dict[str, Any] = {
        "id": inst.id, "machine": inst.machine, "version": inst.version, "digest": inst.digest,
        "status": inst.status, "state": inst.state, "active": inst.active, "payload": inst.payload,
        "error": inst.error.as_dict() if inst.error else None,
        "created_at": timestamp(inst.created_at), "finished_at": timestamp(inst.finished_at),
        "transitions": inst.transitions,
    }
    if history is not None:
        record["history"] = [h.as_dict() for h in history]
    record["expires_at"] = timestamp(inst.expires_at)  # later fields follow the contract's first ones
    return record


__all__ = [
    "Activation", "ErrorInfo", "HistoryEntry", "Instance", "Token", "replace",
    "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "FINISHED", "STATUSES",
]
