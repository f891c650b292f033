"""Slots: how many ticks a worker runs at once, and claimed tokens waiting for one.

A slot is taken before a claim is sent and held while the job's tick runs, so a worker never
runs more ticks than its concurrency. While the job commits the tick's outcome, the slot is lent
(`lend`) to the next tick: a commit waits for etcd, not for a handler, and a worker whose slots
waited for commits ran a handful of ticks at a time with its handler processes idle. When the
commit moves the token on, the job takes a slot back (`take_back`) or, with none free, its token
waits for one. A commit may also claim tokens it created (fork branches) for this worker; those
wait too (`park`), up to `prefetch` of them, and go first when a slot frees (`next_ready`).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Ref = TypeVar("Ref", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Waiting(Generic[Ref]):
    """A token claimed for this worker, waiting for a slot."""

    ref: Ref
    claim_rev: int  # the claim's revision (its marker's): what releasing or committing it is fenced by
    lease: int | None = None  # the lease it was claimed under


class Slots(Generic[Ref]):
    def __init__(self, capacity: int, prefetch: int):
        if capacity < 1:
            raise ValueError("concurrency must be at least 1")
        self.capacity = capacity
        self.prefetch = prefetch
        self.busy = 0
        self.lent = 0  # jobs committing, their slots lent to other ticks
        self._ready: collections.deque[Waiting[Ref]] = collections.deque()
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def free(self) -> int:
        """Slots to fill with new claims now (none while claimed tokens wait for one)."""
        return 0 if self._ready else max(0, self.capacity - self.busy)

    @property
    def spare(self) -> int:
        """New tokens a commit may claim for this worker: free slots and room among those waiting."""
        return max(0, self.capacity - self.busy) + max(0, self.prefetch - len(self._ready))

    @property
    def waiting(self) -> int:
        """Claimed tokens waiting for a slot."""
        return len(self._ready)

    def holds(self, ref: Ref) -> bool:
        """Whether `ref` waits here for a slot."""
        return any(w.ref == ref for w in self._ready)

    def take(self, n: int = 1) -> None:
        self.busy += n
        self.idle.clear()

    def give(self, n: int = 1) -> None:
        self.busy = max(0, self.busy - n)
        self._maybe_idle()

    def lend(self) -> None:
        """A job's tick ended and its commit begins: its slot is free for another tick meanwhile."""
        self.busy = max(0, self.busy - 1)
        self.lent += 1

    def take_back(self, go_on: bool) -> bool:
        """A job's commit ended. `go_on`: its token moved on and is ours to run; True when a slot is
        free for it now (taken; claimed tokens waiting for one go first), False when it is not
        (the token waits, `park`) or it does not go on."""
        self.lent = max(0, self.lent - 1)
        if go_on and not self._ready and self.busy < self.capacity:
            self.take()
            return True
        self._maybe_idle()
        return False

    def _maybe_idle(self) -> None:
        if self.busy == 0 and self.lent == 0 and not self._ready:
            self.idle.set()

    def park(self, ref: Ref, claim_rev: int, lease: int | None = None) -> None:
        """A claimed token that found no free slot: it waits for one."""
        self._ready.append(Waiting(ref, claim_rev, lease))

    def forget(self, ref: Ref, revision: int) -> Waiting[Ref] | None:
        """`ref`'s marker changed at `revision` (deleted, or rewritten by someone else): if it waits
        here under an older claim, that claim is gone and so is its wait."""
        for waiting in self._ready:
            if waiting.ref == ref and waiting.claim_rev < revision:
                self._ready.remove(waiting)
                self._maybe_idle()
                return waiting
        return None

    def next_ready(self) -> Waiting[Ref] | None:
        """A waiting claimed token to start, its slot taken; None when none waits or none is free."""
        if self._ready and self.busy < self.capacity:
            self.take()
            return self._ready.popleft()
        return None

    def drop_waiting(self) -> list[Waiting[Ref]]:
        """Every waiting token, no longer waiting (their claims went with the lease, or the worker
        stops and gives them back)."""
        dropped = list(self._ready)
        self._ready.clear()
        self._maybe_idle()
        return dropped
