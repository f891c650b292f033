"""Slots: how many ticks a worker has in flight at once, and claimed tokens waiting for one.

A slot is taken before a claim is sent and given back when its job ends, so a worker never
holds more running claims than its concurrency. A commit may also claim tokens it created (fork
branches) for this worker; those wait (`park`), up to `prefetch` of them, and go first when a
slot frees (`next_ready`).
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
        if self.busy == 0 and not self._ready:
            self.idle.set()

    def park(self, ref: Ref, claim_rev: int, lease: int | None = None) -> None:
        """A claimed token that found no free slot: it waits for one."""
        self._ready.append(Waiting(ref, claim_rev, lease))

    def next_ready(self) -> Waiting[Ref] | None:
        """A waiting claimed token to start, its slot taken; None when none waits or none is free."""
        if self._ready and self.busy < self.capacity:
            self.take()
            return self._ready.popleft()
        return None

    def drop_waiting(self) -> list[Waiting[Ref]]:
        """Every waiting token, no longer waiting (their claims went with the lease)."""
        dropped = list(self._ready)
        self._ready.clear()
        return dropped
