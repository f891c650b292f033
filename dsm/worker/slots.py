"""Slots: how many ticks a worker runs at once, and claimed tokens waiting for one.

A slot is taken before a claim is sent and given back when its job ends, so a worker never
holds more running claims than its concurrency. A commit may also claim tokens it created (fork
branches) for this worker; those wait in `ready`, up to `prefetch` of them, and go first when
a slot frees.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable
from typing import Generic, TypeVar

Ref = TypeVar("Ref", bound=Hashable)


class Slots(Generic[Ref]):
    def __init__(self, capacity: int, prefetch: int):
        if capacity < 1:
            raise ValueError("concurrency must be at least 1")
        self.capacity = capacity
        self.prefetch = prefetch
        self.busy = 0
        self.ready: collections.deque[tuple[Ref, int]] = collections.deque()  # (token, claim revision)
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def free(self) -> int:
        """Slots to fill with new claims now (none while claimed tokens wait for one)."""
        return 0 if self.ready else max(0, self.capacity - self.busy)

    @property
    def spare(self) -> int:
        """New tokens a commit may claim for this worker: free slots and room in `ready`."""
        return max(0, self.capacity - self.busy) + max(0, self.prefetch - len(self.ready))

    def take(self, n: int = 1) -> None:
        self.busy += n
        self.idle.clear()

    def give(self, n: int = 1) -> None:
        self.busy = max(0, self.busy - n)
        if self.busy == 0 and not self.ready:
            self.idle.set()

    def next_ready(self) -> tuple[Ref, int] | None:
        """A waiting claimed token to start, its slot taken; None when none waits or none is free."""
        if self.ready and self.busy < self.capacity:
            self.take()
            return self.ready.popleft()
        return None
