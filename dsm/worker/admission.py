"""Which work a worker takes: what it serves, minus instances whose definition it cannot run.

A marker whose value cannot be read says nothing of the definition, so instances met with one
this worker cannot run (`unservable`) are remembered, the oldest forgotten first, and such markers
of theirs are not taken here.
"""

from __future__ import annotations

from collections.abc import Callable

from ..definitions import Registry
from ..keys import TokenRef, WorkInfo

UNSERVABLE_KEPT = 100_000  # instances remembered as unservable here, so their unreadable markers are not retaken


class Admission:
    def __init__(self, registry: Registry, serves: Callable[[str], bool] | None = None, *,
                 kept: int = UNSERVABLE_KEPT):
        """`serves(instance id)`: which instances this worker may run (None: every one of the namespace)."""
        self.registry = registry
        self.serves = serves
        self.kept = kept
        self._unservable: dict[str, str] = {}  # instance -> digest this worker cannot run (oldest first)

    def admits(self, ref: TokenRef, info: WorkInfo | None) -> bool:
        """Whether to take this work: not an instance this worker does not serve (`serves`), nor one
        whose definition it cannot run."""
        if self.serves is not None and not self.serves(ref.instance):
            return False
        digest = info.digest if info is not None else self._unservable.get(ref.instance)
        if digest is None or not self.registry.refusal(digest):
            if info is None and digest is not None:
                del self._unservable[ref.instance]  # the definition may run now (its content was repaired)
            return True
        return False

    def unservable(self, iid: str, digest: str) -> None:
        """Instance `iid` needs definition `digest`, which this worker cannot run."""
        self._unservable[iid] = digest
        while len(self._unservable) > self.kept:
            del self._unservable[next(iter(self._unservable))]
