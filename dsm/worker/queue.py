"""The candidate queue: work this worker knows of and may claim, in the order it should run.

Pure: no store, no tasks, and the time comes from an injected clock (monotonic seconds), so a
test drives it by hand. Due times are local: a token's wait travels as a duration and is turned
into a due time by the worker that learns of it, so clocks that disagree between machines never
lengthen or cut a backoff.

Work orphaned by a dead worker goes ahead of new work (`first`), so a dead worker's instances do
not wait behind a backlog. The queue holds at most `cap` candidates; what does not fit is dropped
and `overflow` says so: the work feed then pages the store for it once the queue drains.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable, Container, Hashable
from typing import Generic, TypeVar

Ref = TypeVar("Ref", bound=Hashable)


class CandidateQueue(Generic[Ref]):
    def __init__(self, clock: Callable[[], float], cap: int = 10_000):
        self.clock = clock
        self.cap = cap
        self._due_at: dict[Ref, float] = {}  # every candidate and when it may run
        self._order: collections.deque[Ref] = collections.deque()  # due ones, oldest first
        self._delayed: list[tuple[float, int, Ref]] = []  # (due time, serial, ref), soonest first
        self._serial = 0
        self.overflow = False  # work was dropped for lack of room since the last full page-through

    def __len__(self) -> int:
        return len(self._due_at)

    def __contains__(self, ref: object) -> bool:
        return ref in self._due_at

    @property
    def full(self) -> bool:
        return len(self._due_at) >= self.cap

    def add(self, ref: Ref, wait: float = 0.0, *, first: bool = False) -> bool:
        """A candidate that may run `wait` seconds from now; False when there was no room for it."""
        known = ref in self._due_at
        if not known and self.full:
            self.overflow = True
            return False
        now = self.clock()
        due = now + wait if wait > 0 else now
        if known and self._due_at[ref] == due:
            return True
        self._due_at[ref] = due
        if wait > 0:
            self._serial += 1
            heapq.heappush(self._delayed, (due, self._serial, ref))
        elif first:
            self._order.appendleft(ref)
        else:
            # new, or known but waiting until later (a timer that a signal or a child's end made
            # due now): its place in the delay heap no longer counts, so it needs one here
            self._order.append(ref)
        return True

    def discard(self, ref: Ref) -> None:
        self._due_at.pop(ref, None)  # its places in _order and _delayed are skipped when met

    def clear(self) -> None:
        self._due_at.clear()
        self._order.clear()
        self._delayed.clear()
        self.overflow = False

    def take(self, limit: int, busy: Container[Ref] = ()) -> list[Ref]:
        """Up to `limit` due candidates, oldest first, removed from the queue; those `busy` (a job
        of ours still holds them) stay candidates and come back through `requeue`."""
        self._promote()
        picked: list[Ref] = []
        while self._order and len(picked) < limit:
            ref = self._order.popleft()
            due = self._due_at.get(ref)
            if due is None or ref in busy or due > self.clock():
                continue
            del self._due_at[ref]
            picked.append(ref)
        return picked

    def requeue(self, ref: Ref) -> None:
        """A job on `ref` ended: if it is still a candidate, it may be taken again."""
        due = self._due_at.get(ref)
        if due is None:
            return
        if due > self.clock():
            self._serial += 1
            heapq.heappush(self._delayed, (due, self._serial, ref))
        else:
            self._order.append(ref)

    def has_due(self) -> bool:
        self._promote()
        while self._order and self._order[0] not in self._due_at:
            self._order.popleft()
        return bool(self._order)

    def next_delay(self) -> float | None:
        """Seconds until the soonest delayed candidate is due, or None when none waits."""
        while self._delayed:
            due, _, ref = self._delayed[0]
            if self._due_at.get(ref) != due:
                heapq.heappop(self._delayed)
                continue
            return max(0.0, due - self.clock())
        return None

    def _promote(self) -> None:
        now = self.clock()
        while self._delayed and self._delayed[0][0] <= now:
            due, _, ref = heapq.heappop(self._delayed)
            if self._due_at.get(ref) == due:
                self._order.append(ref)
