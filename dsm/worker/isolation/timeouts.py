"""Attempts' timeouts, watched with one timer for all of them.

A loop timer for each attempt (`loop.call_later`, cancelled when the attempt ends in time, as
nearly all do) costs a handle, a push on the loop's heap and, cancelled, a share of the loop's
clean-ups: as much of the worker's CPU as the rest of a trivial tick's bookkeeping. Here the
deadlines wait in one heap; the supervisor keeps a single loop timer, for the first of them, and
asks `due` when it fires. An attempt that ends is not looked for in the heap: it is skipped when its
deadline comes, and the heap is rebuilt without the ended ones whenever it has doubled.
"""

from __future__ import annotations

import heapq
from typing import Generic, Protocol, TypeVar


class _Ending(Protocol):
    ended: bool  # True once it ended: its deadline no longer matters


T = TypeVar("T", bound=_Ending)

_SLACK = 64  # entries the heap may grow by, beyond twice what it kept, before it is rebuilt


class Timeouts(Generic[T]):
    """Deadlines (clock times, as the loop's timers take them) of things that may end before them."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []  # (deadline, serial: ties in the order added, thing)
        self._serial = 0
        self._rebuild_at = _SLACK  # heap size at which the ended things are dropped from it

    def __len__(self) -> int:
        """Deadlines held, those of things that ended included until they are dropped."""
        return len(self._heap)

    def add(self, deadline: float, thing: T) -> bool:
        """Watch `thing` until `deadline`. True if that is now the first deadline: the timer must be
        set for it (`first` says which is first later)."""
        heap = self._heap
        self._serial += 1
        first = not heap or deadline < heap[0][0]
        heapq.heappush(heap, (deadline, self._serial, thing))
        if len(heap) >= self._rebuild_at:  # mostly ended things, as nearly everything ends in time
            self._heap = [entry for entry in heap if not entry[2].ended]
            heapq.heapify(self._heap)
            self._rebuild_at = 2 * len(self._heap) + _SLACK
        return first

    def due(self, now: float) -> list[T]:
        """The things whose deadline is `now` or earlier and that have not ended, first deadline first;
        they are watched no more."""
        heap = self._heap
        passed = []
        while heap and heap[0][0] <= now:
            thing = heapq.heappop(heap)[2]
            if not thing.ended:
                passed.append(thing)
        return passed

    def first(self) -> float | None:
        """The first deadline of a thing that has not ended (None: nothing to watch)."""
        heap = self._heap
        while heap and heap[0][2].ended:
            heapq.heappop(heap)
        return heap[0][0] if heap else None
