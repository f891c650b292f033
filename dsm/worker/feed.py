"""The work feed: learns of runnable tokens from the store and feeds the candidate queue.

Push, not poll: one watch on the work prefix and the workers' entries beside it
(`Keys.watch_range`), one stream in revision order. A work marker put without an owner is new
work, a marker deleted is work that went away (cancelled, or failed elsewhere). A marker that
names an owner and its lease is claimed while that owner's entry lives under that lease
(`keys.py`): the feed keeps an index of such markers by owner, and when an owner's entry is
deleted or put under another lease, the markers it held are work orphaned by a dead or departing
worker, offered ahead of new work. A marker met naming an owner not live under its lease is an
orphan at once; the claim compares the owner's entry, so a wrong guess costs one refused claim,
never a wrong one, and a refused claim drops the candidate (no retry loop): the owner's death, if
it comes, is an event of its own.

A resync (at start, after a compaction) reads the workers' entries, then pages through every
marker with its owner, and then watches from the revision of the entries' read, so whatever
changed while it read is replayed in order on top (each event says what a key is now, so the
replay ends where the store is). When more work waits than the queue holds, the feed remembers
where it stopped and pages on once the queue drains; work that arrived while the queue was full
is found by the next pass over the whole prefix.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from ..errors import Compacted, StoreUnavailable
from ..keys import Keys, TokenRef, WorkInfo
from ..records import PARKED
from ..store import DELETE, Event, KeyValue, Store, Watch, prefix_end
from .queue import CandidateQueue

log = logging.getLogger(__name__)


class Seen(NamedTuple):
    """A work marker as the feed last heard of it: its mod revision (a claim is fenced by it) and
    its value (None when it could not be read)."""

    revision: int
    info: WorkInfo | None

    @property
    def claimant(self) -> tuple[str, int] | None:
        return self.info.claimant if self.info is not None else None


class WorkFeed:
    def __init__(self, store: Store, keys: Keys, queue: CandidateQueue[TokenRef], *, name: str,
                 admits: Callable[[TokenRef, WorkInfo | None], bool], held: Callable[[TokenRef, int, str], object],
                 wall: Callable[[], float] = time.time, page_size: int = 1000):
        """`admits(ref, info)`: whether this worker may run the work at all (`info`, the marker's value,
        is None when it cannot be read). `held(ref, revision, why)`: tells a job of ours that holds
        the token by a claim older than `revision` why its token changed under it (a replayed event
        older than its claim is not its business)."""
        self.store = store
        self.keys = keys
        self.queue = queue
        self.name = name
        self.admits = admits
        self.held = held
        self.wall = wall
        self.page_size = page_size
        self.cursor: str | None = None  # where paging stopped because the queue was full
        self._rescan = False  # work was dropped for lack of room: page through everything again
        self.changed = asyncio.Event()  # set when candidates were added
        self._watch: Watch | None = None  # the watch being read, so that closing can end it
        self._watching = False  # a watch is open: created, and neither broken nor closed since
        # The marker each candidate was offered on. A claim is fenced by its revision: along a
        # line a token keeps its id, so a candidate taken while due may meanwhile have been run by
        # another worker and moved on to a timer; claimed then, on what it was, the timer would not wait.
        self._seen: dict[TokenRef, Seen] = {}
        self._owned: dict[TokenRef, Seen] = {}  # markers naming an owner and its lease
        self._by_owner: dict[str, set[TokenRef]] = {}  # owner -> its refs in `_owned`
        self._live: dict[str, int] = {}  # worker id -> the lease its entry is under

    @property
    def behind(self) -> bool:
        """Work may wait in the store that the queue does not hold."""
        return self.cursor is not None or self._rescan

    def rescan(self) -> None:
        """Page through every marker again once the queue has room (a safety net, or work dropped)."""
        self._rescan = True

    def seen(self, ref: TokenRef) -> Seen | None:
        """The marker `ref` was offered on, if known: its claim is fenced by it."""
        return self._seen.get(ref)

    def claimed_by(self, owner: str, lease: int) -> dict[TokenRef, int]:
        """The markers that name `owner` under `lease`, as last heard of: ref -> mod revision."""
        out = {}
        for ref in self._by_owner.get(owner, ()):
            seen = self._owned[ref]
            if seen.claimant == (owner, lease):
                out[ref] = seen.revision
        return out

    def put_back(self, ref: TokenRef, kv: KeyValue) -> None:
        """A marker read outside the watch (a claim whose answer was lost turned out not to be
        ours): a candidate again, ahead of new work, unless a live worker holds it."""
        if self._marker(ref, _load_info(kv.value), kv.mod_revision, wall=self.wall(), fresh=False, first=True):
            self.changed.set()

    @property
    def watching(self) -> bool:
        """Whether the feed hears of work now: its watch was created and has neither broken nor
        been closed since (False while it resyncs or waits to resume)."""
        return self._watching

    async def run(self) -> None:
        """Watch for work until cancelled, resyncing whenever the watch cannot resume."""
        revision = await self.resync()
        delay = 0.2
        while True:
            try:
                watch = self._watch = await self.store.watch(*self.keys.watch_range, start_revision=revision + 1)
                delay = 0.2
                self._watching = True
                try:
                    async for batch in watch:
                        if batch.events:
                            self.apply(batch.events, batch.revision)
                            revision = max(revision, batch.events[-1].kv.mod_revision)
                finally:
                    self._watching = False
                raise StoreUnavailable("watch ended")
            except Compacted as exc:
                log.info("worker %s: watch revision %d compacted (%s); resyncing", self.name, revision + 1, exc)
                revision = await self.resync()
            except StoreUnavailable as exc:
                log.warning("worker %s: watch interrupted (%s); resuming from revision %d", self.name, exc,
                            revision + 1)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        """End the watch: its stream is closed, so a task reading it returns instead of waiting on
        a cancellation that the gRPC read may not pass on."""
        watch, self._watch = self._watch, None
        self._watching = False
        if watch is not None:
            await watch.cancel()

    async def resync(self) -> int:
        """Rebuild the queue and the owners' index from the store; return the revision it reflects."""
        delay = 0.2
        while True:
            try:
                self.queue.clear()
                self._seen.clear()
                self._owned.clear()
                self._by_owner.clear()
                self._live.clear()
                self.cursor, self._rescan = None, False
                revision = await self._read_entries()
                await self._scan(self.keys.work_prefix)
                return revision
            except (StoreUnavailable, Compacted) as exc:
                log.warning("worker %s: cannot read work (%s); retrying", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def page(self) -> None:
        """Page on from where the queue filled up (or from the start, after work was dropped)."""
        start = self.cursor
        if start is None:
            start, self._rescan = self.keys.work_prefix, False
        await self._scan(start)

    async def _read_entries(self) -> int:
        """Read which workers live, under which lease; return the revision of the first page."""
        start, end = self.keys.workers, prefix_end(self.keys.workers)
        revision = 0
        while True:
            page = await self.store.range(start, end, limit=self.page_size, keys_only=True)
            revision = revision or page.revision
            for kv in page.kvs:
                worker = self.keys.parse_worker(kv.key)
                if worker is not None:
                    self._live[worker] = kv.lease
            if not page.more or not page.kvs:
                return revision
            start = page.kvs[-1].key + "\0"

    async def _scan(self, start: str) -> None:
        """Add unclaimed and orphaned markers from `start` until the queue is full, and index the
        owners of the claimed ones."""
        end = prefix_end(self.keys.work_prefix)
        cursor = start
        wall = self.wall()
        while True:
            page = await self.store.range(cursor, end, limit=self.page_size)
            for kv in page.kvs:
                parsed = self.keys.parse_work(kv.key)
                if parsed is None:
                    continue
                self._marker(parsed, _load_info(kv.value), kv.mod_revision, wall=wall, fresh=False)
                if self.queue.full:
                    self.cursor = kv.key + "\0"
                    self.changed.set()
                    return
            if not page.more or not page.kvs:
                break
            cursor = page.kvs[-1].key + "\0"
        self.cursor = None
        self.changed.set()

    def _marker(self, ref: TokenRef, info: WorkInfo | None, revision: int, *, wall: float, fresh: bool,
                first: bool = False) -> bool:
        """A marker as it is now: indexed by its owner, and a candidate unless its owner is live
        under the lease it names. True when it was offered."""
        seen = Seen(revision, info)
        self._unindex(ref)
        claimant = seen.claimant
        if claimant is not None:
            owner, lease = claimant
            self._owned[ref] = seen
            self._by_owner.setdefault(owner, set()).add(ref)
            if self._live.get(owner) == lease:  # claimed: nobody else's business
                self.discard(ref)
                return False
            first = True  # orphaned: ahead of new work
        return self._offer(ref, seen, wall=wall, fresh=fresh, first=first)

    def _unindex(self, ref: TokenRef) -> None:
        seen = self._owned.pop(ref, None)
        if seen is not None and seen.info is not None and seen.info.owner is not None:
            refs = self._by_owner.get(seen.info.owner)
            if refs is not None:
                refs.discard(ref)
                if not refs:
                    del self._by_owner[seen.info.owner]

    def _offer(self, ref: TokenRef, seen: Seen, *, wall: float, fresh: bool = False, first: bool = False) -> bool:
        """A candidate, due when its marker says. True when the queue took it."""
        info = seen.info
        if not self.admits(ref, info):
            return False
        if info is not None and info.not_before >= PARKED:  # waits for a signal or a child, not for time
            self.discard(ref)
            return False
        wait = info.delay(wall, fresh=fresh) if info is not None else 0.0
        if not self.queue.add(ref, wait, first=first):
            self._rescan = True
            return False
        self._seen[ref] = seen
        return True

    def discard(self, ref: TokenRef) -> None:
        self.queue.discard(ref)
        self._seen.pop(ref, None)

    def _entry(self, worker: str, lease: int | None, revision: int, wall: float) -> bool:
        """A worker's entry put under `lease`, or deleted (None): the markers it held under
        another lease are orphaned. True when candidates were added."""
        before = self._live.get(worker)
        if lease is None:
            self._live.pop(worker, None)
        else:
            self._live[worker] = lease
        if before == lease:
            return False
        added = False
        for ref in list(self._by_owner.get(worker, ())):
            seen = self._owned[ref]
            if seen.claimant is not None and seen.claimant[1] == lease:
                self.discard(ref)  # claimed under the lease now known live
                continue
            # A job of ours that held it is told (its lease went: expired, or revoked, or its entry
            # deleted), and the token is a candidate all the same: the queue keeps it while that job
            # runs and hands it back when the job ends (`requeue`), unless another worker claims it first.
            self.held(ref, revision, "the claim was lost (lease expired or revoked)")
            added = self._offer(ref, seen, wall=wall, first=True) or added
        return added

    def apply(self, events: list[Event], latest: int | None = None) -> None:
        """Events of one watch response; `latest` is the store's revision it was sent at. Events of
        that revision were just written: a marker's wait counts from now. Older ones (a watch resumed
        after etcd was away replays what it missed) count what is left of it by the clock."""
        wall = self.wall()
        added = False
        for event in events:
            kv = event.kv
            revision = kv.mod_revision
            parsed = self.keys.parse_work(kv.key)
            if parsed is None:
                worker = self.keys.parse_worker(kv.key)
                if worker is not None:
                    added = self._entry(worker, None if event.type == DELETE else kv.lease, revision, wall) or added
                continue
            ref = parsed
            if event.type == DELETE:
                self._unindex(ref)
                self.discard(ref)
                # Our own commit removes the token too, but by then its tick has returned and
                # telling it changes nothing; otherwise it was cancelled or failed elsewhere.
                self.held(ref, revision, "the token was removed (instance cancelled or failed elsewhere)")
                continue
            info = _load_info(kv.value)
            if info is None or info.claimant != (self.name, self._live.get(self.name)):
                # rewritten under a job of ours: claimed by another (ours had gone), given back, or
                # woken by a signal or a child
                self.held(ref, revision, "the token was rewritten (claimed elsewhere, or woken)")
            fresh = latest is None or revision >= latest
            added = self._marker(ref, info, revision, wall=wall, fresh=fresh) or added
        if added:
            self.changed.set()


def _load_info(raw: bytes) -> WorkInfo | None:
    try:
        return WorkInfo.load(raw)
    except (ValueError, KeyError, TypeError):
        return None
