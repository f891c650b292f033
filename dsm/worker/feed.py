"""The work feed: learns of runnable tokens from the store and feeds the candidate queue.

Push, not poll: one watch on the work prefix. A work marker put without its claim is new work,
a claim deleted without its marker is work orphaned by a dead or departing worker, a marker
deleted is work that went away (cancelled, or failed elsewhere). Markers and claims of one token
change in the same revision, so one watch stream tells these apart.

A resync (at start, after a compaction) pages through every marker and then watches from the
revision of its FIRST page, so whatever changed while it paged is replayed in order on top (each
event says what a key is now, so the replay ends where the store is). When more work waits than the
queue holds, the feed remembers where it stopped and pages on once the queue drains; work that
arrived while the queue was full is found by the next pass over the whole prefix.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from ..errors import Compacted, StoreUnavailable
from ..keys import Keys, TokenRef, WorkInfo
from ..records import PARKED
from ..store import DELETE, Event, Store, Watch, prefix_end
from .queue import CandidateQueue

log = logging.getLogger(__name__)

class WorkFeed:
    def __init__(self, store: Store, keys: Keys, queue: CandidateQueue[TokenRef], *, name: str,
                 admits: Callable[[TokenRef, WorkInfo | None], bool], held: Callable[[TokenRef, int, str], object],
                 wall: Callable[[], float] = time.time, page_size: int = 1000):
        """`admits(ref, info)`: whether this worker may run the work at all (`info`, the marker's value,
        is None when only the claim changed: a claim given back). `held(ref, revision, why)`: tells
        a job of ours that holds the token by a claim older than `revision` why its token changed
        under it (a replayed event older than its claim is not its business)."""
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
        # The revision of the marker each candidate was offered on. A claim is fenced by it: along a
        # line a token keeps its id, so a candidate taken while due may meanwhile have been run by
        # another worker and moved on to a timer; claimed then, on what it was, the timer would not wait.
        self._revisions: dict[TokenRef, int] = {}

    @property
    def behind(self) -> bool:
        """Work may wait in the store that the queue does not hold."""
        return self.cursor is not None or self._rescan

    def rescan(self) -> None:
        """Page through every marker again once the queue has room (a safety net, or work dropped)."""
        self._rescan = True

    def revision_of(self, ref: TokenRef) -> int | None:
        """The revision of the marker `ref` was offered on, if known: its claim is fenced by it."""
        return self._revisions.get(ref)

    def put_back(self, ref: TokenRef, wait: float, revision: int) -> None:
        """A candidate again, ahead of new work, as its marker is at `revision` (a claim whose answer
        was lost turned out not to be ours)."""
        if self.queue.add(ref, wait, first=True):
            self._revisions[ref] = revision

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
                watch = self._watch = await self.store.watch(self.keys.work_prefix, prefix_end(self.keys.work_prefix),
                                                             start_revision=revision + 1)
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
        """Rebuild the queue from the store; return the revision it reflects."""
        delay = 0.2
        while True:
            try:
                self.queue.clear()
                self._revisions.clear()
                self.cursor, self._rescan = None, False
                return await self._scan(self.keys.work_prefix)
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

    async def _scan(self, start: str) -> int:
        """Add unclaimed markers from `start` until the queue is full; return the revision of the
        first page (a watch from there misses nothing that changed while later pages were read)."""
        end = prefix_end(self.keys.work_prefix)
        cursor = start
        pending: _Marker | None = None  # a marker seen, offered once the next key shows it unclaimed
        wall = self.wall()
        revision = 0
        while True:
            page = await self.store.range(cursor, end, limit=self.page_size)
            revision = revision or page.revision
            for kv in page.kvs:
                parsed = self.keys.parse_work(kv.key)
                if parsed is None:
                    continue
                if parsed.is_claim:
                    if pending is not None and pending.ref == parsed.ref:
                        pending = None
                    continue
                if pending is not None:
                    self._offer(*pending, wall=wall)
                pending = _Marker(parsed.ref, _load_info(kv.value), kv.mod_revision)
                if self.queue.full:
                    self.cursor = kv.key
                    self.changed.set()
                    return revision
            if not page.more or not page.kvs:
                break
            cursor = page.kvs[-1].key + "\0"
        if pending is not None:
            self._offer(*pending, wall=wall)
        self.cursor = None
        self.changed.set()
        return revision

    def _offer(self, ref: TokenRef, info: WorkInfo | None, revision: int | None = None, *, wall: float,
               fresh: bool = False, first: bool = False) -> None:
        """A candidate, due when its marker (`info`, at `revision`) says; None: only its claim
        went, so it is due now and its marker unknown."""
        if not self.admits(ref, info):
            return
        if info is not None and info.not_before >= PARKED:  # waits for a signal or a child, not for time
            self.discard(ref)
            return
        wait = info.delay(wall, fresh=fresh) if info is not None else 0.0
        if not self.queue.add(ref, wait, first=first):
            self._rescan = True
        elif revision is not None:
            self._revisions[ref] = revision
        elif info is None:
            self._revisions.pop(ref, None)

    def discard(self, ref: TokenRef) -> None:
        self.queue.discard(ref)
        self._revisions.pop(ref, None)

    def apply(self, events: list[Event], latest: int | None = None) -> None:
        """Events of one watch response; `latest` is the store's revision it was sent at. Events of
        that revision were just written: a marker's wait counts from now. Older ones (a watch resumed
        after etcd was away replays what it missed) count what is left of it by the clock."""
        wall = self.wall()
        added = False
        for revision, group in itertools.groupby(events, key=lambda e: e.kv.mod_revision):
            fresh = latest is None or revision >= latest
            works: dict[TokenRef, WorkInfo | None] = {}  # markers put in this revision
            gone: set[TokenRef] = set()
            claimed: set[TokenRef] = set()
            released: set[TokenRef] = set()
            for event in group:
                parsed = self.keys.parse_work(event.kv.key)
                if parsed is None:
                    continue
                ref = parsed.ref
                if parsed.is_claim:
                    (released if event.type == DELETE else claimed).add(ref)
                elif event.type == DELETE:
                    gone.add(ref)
                else:
                    works[ref] = _load_info(event.kv.value)
            for ref in gone:
                self.discard(ref)
                # Our own commit removes the token too, but by then its tick has returned and
                # telling it changes nothing; otherwise it was cancelled or failed elsewhere.
                self.held(ref, revision, "the token was removed (instance cancelled or failed elsewhere)")
            for ref in claimed:
                self.discard(ref)
            for ref, info in works.items():
                if ref in claimed or ref in gone or (info is not None and info.owner is not None):
                    self.discard(ref)
                else:
                    self._offer(ref, info, revision, wall=wall, fresh=fresh)
                    added = True
            for ref in released - gone - claimed:
                # A job of ours that held it is told (its lease went: expired, or revoked), and the
                # token is a candidate all the same: the queue keeps it while that job runs and
                # hands it back when the job ends (`requeue`), unless another worker claims it first.
                self.held(ref, revision, "the claim was lost (lease expired or revoked)")
                self._offer(ref, works.get(ref), revision if ref in works else None, wall=wall, fresh=fresh,
                            first=ref not in works)
                added = True
        if added:
            self.changed.set()


class _Marker(NamedTuple):
    ref: TokenRef
    info: WorkInfo | None
    revision: int


def _load_info(raw: bytes) -> WorkInfo | None:
    try:
        return WorkInfo.load(raw)
    except (ValueError, KeyError, TypeError):
        return None
