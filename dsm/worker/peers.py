"""Peers: every worker watches the others' heartbeats, and takes back the work of one that stopped.

On an etcd shared with other users a lease proves no life: etcd's permissions cover keys, not
leases, so any user of the cluster can keep any lease alive, and a dead worker's claims would
hold its instances for as long as that user likes. So life is judged from keys that only the
namespace's own users can write: each worker's entry among live workers, which it rewrites at
least every third of its lease's TTL and which says how long it may go unwritten before it is
taken for dead (`stale_after`; `presence.py`).

Every worker, not only an elected one (a dead worker's lease holds its election key too, and can
be kept alive as well), reads the entries every `interval` seconds and notes, on its own
monotonic clock, when it first saw each entry at its current revision. An entry still at that
revision `stale_after` seconds later, counted only over a span in which this worker's own
heartbeat went through without a gap (an etcd that is slow, unreachable or out of space delays
everyone's writes, and a pause of this process or its machine stops this worker's own eyes: both
condemn nobody), belongs to a worker that died or hangs: its lease is released (revoked, or
where etcd refuses, its keys in the namespace deleted: `lease.release`). Its entry goes with it,
and so do its claims, which hold only while its entry lives under the lease they name
(`dsm.keys`): the work feed of every worker hears the entry deleted and offers the markers that
named it, as orphaned work, to the living; any housekeeping election it held goes too. A worker
wrongly taken for dead (one that hung past `stale_after`) finds its lease gone, as if it had
expired, and carries on under a new one (or, where only its keys were deleted, puts its entry
back): its commits compare each marker's revision as it claimed it, so none whose token
another worker claimed meanwhile can land.

Clocks of different machines are never compared: revisions are etcd's, durations are ours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .. import codec
from ..errors import StoreError
from ..keys import Keys
from ..membership import prefix
from ..store import KeyValue, Store, prefix_end
from .lease import release

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    """A worker's entry as an observer needs it."""

    key: str
    revision: int  # its mod revision: changes with every heartbeat
    lease: int
    stale_after: float | None  # None: the worker promises no heartbeat (written before there was one)

    @staticmethod
    def of(kv: KeyValue) -> Entry:
        try:
            stale_after = codec.loads(kv.value).get("stale_after")
        except (ValueError, AttributeError):
            stale_after = None
        if not isinstance(stale_after, (int, float)) or isinstance(stale_after, bool) or stale_after <= 0:
            stale_after = None
        return Entry(kv.key, kv.mod_revision, kv.lease, stale_after)


class Judge:
    """Which peers are dead, from successive readings of their entries and the observer's clock.

    Pure: it is fed what was read, when (`now`), and the span of the observer's clock over which
    its own heartbeat went through (`healthy`: since, until; None while it fails)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (revision, when first seen at it)

    def observe(self, entries: Iterable[Entry], now: float, healthy: tuple[float, float] | None) -> list[Entry]:
        """The entries unchanged for `stale_after` seconds of the observer's healthy span: not
        written between when it was first seen at its revision (or the span began, if later) and
        the last heartbeat of the observer's that went through."""
        seen: dict[str, tuple[int, float]] = {}
        dead = []
        for entry in entries:
            revision, since = self._seen.get(entry.key, (entry.revision, now))
            if revision != entry.revision:
                since = now
            seen[entry.key] = (entry.revision, since)
            if entry.stale_after is None or not entry.lease or healthy is None:
                continue
            if healthy[1] - max(since, healthy[0]) >= entry.stale_after:
                dead.append(entry)
        self._seen = seen  # entries gone are forgotten
        return dead


class Peers:
    """Reads the namespace's entries every `interval` seconds and releases the leases of the dead.

    `own_lease()`: this worker's lease (never released here); `healthy()`: the span of `clock` over
    which this worker's own heartbeat went through (`Presence.healthy`)."""

    def __init__(self, store: Store, keys: Keys, *, name: str, own_key: str, own_lease: Callable[[], int | None],
                 healthy: Callable[[], tuple[float, float] | None], interval: float,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.keys = keys
        self.name = name
        self.own_key = own_key
        self.own_lease = own_lease
        self.healthy = healthy
        self.interval = interval
        self.clock = clock
        self.judge = Judge()
        self.taken = 0  # workers taken for dead and released by this one

    async def run(self) -> None:
        """Look every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except StoreError as exc:
                log.debug("worker %s: could not look at the other workers (%s)", self.name, exc)

    async def check(self) -> list[Entry]:
        """One look: release the leases of the workers found dead; return their entries."""
        entries = await self._entries()
        own = self.own_lease()
        dead = self.judge.observe((e for e in entries if e.key != self.own_key and e.lease != own), self.clock(),
                                  self.healthy())
        for entry in dead:
            log.warning("worker %s: worker %s has not written its heartbeat for %gs though its lease %x lives; "
                        "taken for dead: releasing its lease, its work goes to the living", self.name,
                        entry.key[len(prefix(self.keys)):], entry.stale_after, entry.lease)
            deleted = await release(self.store, self.keys, entry.lease)
            if deleted:
                log.warning("worker %s: etcd refused to revoke lease %x (another etcd user attached a key to it); "
                            "deleted its %d key(s) in this namespace instead", self.name, entry.lease, deleted)
            self.taken += 1
        return dead

    async def _entries(self) -> list[Entry]:
        start, end = prefix(self.keys), prefix_end(prefix(self.keys))
        out: list[Entry] = []
        while True:
            page = await self.store.range(start, end, limit=500)
            out.extend(Entry.of(kv) for kv in page.kvs)
            if not page.more or not page.kvs:
                return out
            start = page.kvs[-1].key + "\0"
