"""Whether a worker is working: the judgement behind `dsm worker --health-port` (`dsm.healthz`).

A worker works while three things hold, each owned by one part and read here, never poked at:
- its lease is current: granted, marked as ours (`LeaseKeeper.ready`), and renewed within its TTL,
  so its claims are still alive in etcd;
- its watch on the work prefix is open (`WorkFeed.watching`): created, and not broken since, so it
  hears of new work;
- its heartbeat is current (`Presence.written_at`): written within the time after which the other
  workers would take it for dead (`dead_after`, or the lease's TTL when it promises nothing), so
  they leave its work alone.

`judge` is pure: the parts' readings and the clock's time in, a verdict with its reasons out.
Times are of the worker's monotonic clock, so a wall clock that jumps changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Signs:
    """What the worker's parts say of themselves, read at one moment."""

    lease_ready: bool  # a lease is granted and marked as ours
    lease_renewed_at: float | None  # when the last grant or keep-alive that went through was sent
    lease_ttl: float
    watching: bool  # the work feed's watch is open
    heartbeat_at: float | None  # when the last write of the worker's entry that went through was sent
    heartbeat_window: float  # how long the entry may go unwritten before others take the worker for dead
    stopping: bool = False


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reasons: tuple[str, ...] = ()  # why not, one short phrase a part; empty when healthy

    def as_dict(self) -> dict[str, Any]:
        if self.healthy:
            return {"status": "ok"}
        return {"status": "unhealthy", "reasons": list(self.reasons)}


def judge(signs: Signs, now: float) -> Health:
    """The worker is healthy when its lease, its watch and its heartbeat are all current at `now`."""
    reasons: list[str] = []
    if signs.stopping:
        reasons.append("the worker is stopping")
    if not signs.lease_ready:
        reasons.append("no lease: not granted yet, or lost and being replaced")
    elif _late(signs.lease_renewed_at, signs.lease_ttl, now):
        reasons.append(f"lease {_since(signs.lease_renewed_at, now, 'renewed')} (TTL {signs.lease_ttl:g}s)")
    if not signs.watching:
        reasons.append("the watch for work is not open")
    if _late(signs.heartbeat_at, signs.heartbeat_window, now):
        reasons.append(f"heartbeat {_since(signs.heartbeat_at, now, 'written')} (limit {signs.heartbeat_window:g}s)")
    return Health(not reasons, tuple(reasons))


def _late(at: float | None, window: float, now: float) -> bool:
    return at is None or now - at > window


def _since(at: float | None, now: float, done: str) -> str:
    return f"never {done}" if at is None else f"not {done} for {now - at:.1f}s"


__all__ = ["Health", "Signs", "judge"]
