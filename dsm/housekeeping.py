"""Housekeeping: deleting instances past their retention, and compacting the store's history.

Without it nothing is ever deleted and etcd's revision history grows without bound, so its
database fills its quota and etcd refuses every write (the NOSPACE alarm). One worker at a time
does it, chosen by an election on `/<ns>/housekeeper`: the key is put if absent, bound to the
worker's lease, so it lives exactly as long as that worker does; when the worker dies or stops
the key goes with its lease, and the next worker to look takes over.

Deletion reads the expiry index (`/<ns>/exp/<expires>/<id>`, oldest first, up to now) and deletes
each instance whole in one transaction, after the children its call states started (its expiry
entry says whether it started any; they go whatever their own retention): record, listing and
expiry entries, history and any leftover work markers (range deletes are one operation each).
That transaction compares the record's mod revision with the expiry entry's, which the same
transaction wrote: a record that changed since it finished (a redrive) is never deleted by an
entry that no longer describes it.
Batches are bounded (entries per round, history keys per request), idempotent (a batch whose
answer was lost is read again next round) and safe with several housekeepers at once, though the
election makes that rare.

Compaction: the housekeeper notes the store's revision every tenth of `compaction_retention` and
compacts to the newest revision noted at least that long ago, so watches that are up to that far
behind resume where they were; one further behind resyncs (the work feed and `Operations.wait` do).
Compactions are physical and one at a time, in a task beside deletion: etcd 3.5 reads every
revision a compaction keeps, seconds on a large database, and compactions sent faster than it
finishes them queue up while the database grows.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from . import layout
from .errors import Compacted, ConflictError, LeaseLost, NoSpace, NotFound, StoreError, StoreUnavailable
from .histogram import Histogram
from .index import Expiry, created_ms, created_ops, expires_ms, listing_key, removal_ops, search_deletes
from .keys import Keys
from .records import Instance, load_instance, timestamp
from .store import PUT, Compare, Delete, Get, Put, Store, Txn, prefix_end
from .transition import child_prefix

log = logging.getLogger(__name__)

# Expiry entries read per round. etcd 3.5 walks every key of a range to answer it (to count them),
# so a backlog of due entries costs its size per round: rounds take many at once, and delete them
# in requests of at most NESTED nested transactions.
BATCH = 256
NESTED = 64
MAX_HISTORY = 20_000  # history keys one request may delete (an instance counts at least one)
PAGE = 500  # records read per request when looking for an instance's children
CHILD_PASSES = 20  # reads of an instance's children, while some keep changing under their deletion
LATENESS_BOUNDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds a schedule's start was late


def deletion_txn(keys: Keys, inst: Instance, revision: int) -> Txn:
    """Delete a finished instance whole, provided its record is still at `revision`."""
    key = keys.instance(inst.id)
    return Txn([Compare.mod(key, "==", revision)], removal_ops(keys, inst.id, Expiry.of(inst), expires_ms(inst)))


async def descendants(store: Store, keys: Keys, root: str) -> list[tuple[Instance, int]]:
    """Every instance the call states of `root` started, and theirs, with their records'
    revisions; each after its parent. Children are found by their ids (`transition.child_prefix`)
    and known by their records naming the parent (an instance of a user's whose id merely looks
    like a child's is none)."""
    found: list[tuple[Instance, int]] = []
    parents = [root]
    while parents:
        parent = parents.pop()
        prefix = keys.instance(child_prefix(parent))
        start, end = prefix, prefix_end(prefix)
        while True:
            page = await store.range(start, end, limit=PAGE)
            for kv in page.kvs:
                inst = load_instance(kv.value)
                if inst.parent is not None and inst.parent.id == parent:
                    found.append((inst, kv.mod_revision))
                    parents.append(inst.id)
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + "\0"
    return found


async def delete_children(store: Store, keys: Keys, parent: str, *, max_history: int = MAX_HISTORY) -> int:
    """Delete every instance the call states of `parent` started, and theirs, whatever their
    status: a child never outlives its parent (one still running, whose cancel has not come yet,
    goes too; its worker's next commit finds no record). The deepest go first, each whole in one
    transaction fenced by its revision, so a crash leaves no child without its parent; one that
    changed in between is read and deleted again. Returns how many were deleted."""
    deleted = 0
    for _ in range(CHILD_PASSES):
        found = await descendants(store, keys, parent)
        if not found:
            return deleted
        txns = [(deletion_txn(keys, inst, rev), inst.transitions) for inst, rev in reversed(found)]
        for chunk in _chunks(txns, max_history):
            result = await store.txn([], chunk)
            deleted += sum(1 for i in range(len(chunk)) if result.nested(i).succeeded)
    raise ConflictError(f"the children of instance {parent} kept changing while they were deleted "
                        f"({CHILD_PASSES} passes); try again")


def _expired_txn(keys: Keys, instance_id: str, expires: int, entry_revision: int, expiry: Expiry) -> Txn:
    key = keys.instance(instance_id)
    return Txn([Compare.mod(key, "==", entry_revision)], removal_ops(keys, instance_id, expiry, expires), [Get(key)])


def _repair_txn(keys: Keys, instance_id: str, expires: int, expiry: Expiry, record: Instance | None,
                revision: int) -> Txn:
    """For an expiry entry whose record moved on since it was written: delete the instance if it
    is still finished with this expiry, else only the entry that no longer describes it. An entry
    whose record is gone (nothing writes that, but a store restored from a backup might hold one)
    takes its leftovers with it, fenced on the record's absence."""
    key = keys.instance(instance_id)
    entry = keys.expiry(expires, instance_id)
    if record is None:
        history = keys.history_prefix(instance_id)
        work = keys.work_of_instance(keys.place(expiry.machine, expiry.created, instance_id))
        return Txn([Compare.version(key, "==", 0)],
                   [Delete(entry), Delete(history, prefix_end(history)), Delete(work, prefix_end(work)),
                    *search_deletes(keys, instance_id, expiry)])
    if record.finished and expires_ms(record) == expires:
        return Txn([Compare.mod(key, "==", revision)], removal_ops(keys, instance_id, Expiry.of(record), expires))
    return Txn([Compare.mod(key, "==", revision)], [Delete(entry)])


def _chunks(txns: list[tuple[Txn, int]], max_history: int) -> list[list[Txn]]:
    chunks: list[list[Txn]] = []
    current: list[Txn] = []
    weight = 0
    for txn, history in txns:
        history = max(history, 1)
        if current and (weight + history > max_history or len(current) >= NESTED):
            chunks.append(current)
            current, weight = [], 0
        current.append(txn)
        weight += history
    if current:
        chunks.append(current)
    return chunks


async def delete_expired(store: Store, keys: Keys, *, now: float, batch: int = BATCH,
                         max_history: int = MAX_HISTORY) -> tuple[int, bool]:
    """One round: delete up to `batch` instances whose expiry is at or before `now`.
    Returns (how many were deleted, whether more expiry entries are due)."""
    prefix = keys.expiry_prefix
    found = await store.range(prefix, keys.expiry(int(now * 1000) + 1, ""), limit=batch)
    due: list[tuple[Txn, int]] = []
    names: list[tuple[str, int, Expiry]] = []
    for kv in found.kvs:
        digits, _, instance_id = kv.key[len(prefix):].partition("/")
        expiry = Expiry.load(kv.value)
        if expiry.children:  # they go first: deleting a parent deletes its children
            await delete_children(store, keys, instance_id, max_history=max_history)
        names.append((instance_id, int(digits), expiry))
        due.append((_expired_txn(keys, instance_id, int(digits), kv.mod_revision, expiry), expiry.transitions))
    deleted = 0
    repairs: list[tuple[Txn, int]] = []
    removals: set[int] = set()  # ids of the repairs that delete an instance (not only a stale entry)
    done = 0
    for chunk in _chunks(due, max_history):
        result = await store.txn([], chunk)
        for i in range(len(chunk)):
            answer = result.nested(i)
            instance_id, expires, expiry = names[done + i]
            if answer.succeeded:
                deleted += 1
                continue
            record = answer.get(0).first
            inst = load_instance(record.value) if record is not None else None
            repair = _repair_txn(keys, instance_id, expires, expiry, inst, record.mod_revision if record else 0)
            if inst is not None and inst.finished and expires_ms(inst) == expires:
                removals.add(id(repair))
            repairs.append((repair, inst.transitions if inst is not None else 1))
        done += len(chunk)
    for chunk in _chunks(repairs, max_history):
        result = await store.txn([], chunk)
        deleted += sum(1 for i, txn in enumerate(chunk) if result.nested(i).succeeded and id(txn) in removals)
    return deleted, found.more


async def backfill(store: Store, keys: Keys, *, page: int = 100) -> int:
    """Give the records written before the index existed their entries, once per namespace (the
    `meta/indexed` key says it is done). Each record's entries are written in a transaction fenced
    by its revision and by the absence of its entries, so records indexed already, or indexed
    meanwhile, are left as they are. Returns how many records it indexed."""
    if await store.get(keys.indexed) is not None:
        return 0
    start, end = keys.instances, prefix_end(keys.instances)
    added = 0
    while True:
        found = await store.range(start, end, limit=page)
        pending = [inst for inst in map(load_instance, (kv.value for kv in found.kvs)) if inst.finished]
        revisions = {kv.key: kv.mod_revision for kv in found.kvs}
        while pending:
            txns = []
            for inst in pending:
                listed = listing_key(keys, inst.id, inst.status, inst.machine, created_ms(inst))
                name = keys.instance(inst.id)
                txns.append(Txn([Compare.mod(name, "==", revisions[name]), Compare.version(listed, "==", 0)],
                                created_ops(keys, inst), [Get(name), Get(listed)]))
            result = await store.txn([], txns)
            moved = []
            for i in range(len(pending)):
                answer = result.nested(i)
                if answer.succeeded:
                    added += 1
                    continue
                record, entry = answer.get(0).first, answer.get(1).first
                if record is not None and entry is None:  # it changed while we read: index what it is now
                    revisions[record.key] = record.mod_revision
                    moved.append(load_instance(record.value))
            pending = moved
        if not found.more or not found.kvs:
            break
        start = found.kvs[-1].key + "\0"
    await store.put(keys.indexed, b"1")
    if added:
        log.info("indexed %d instance record(s) written before the index existed", added)
    return added


@dataclass(frozen=True, slots=True)
class HousekeepingOptions:
    """`compaction_retention`: seconds of revision history kept (0: dsm does not compact).
    `interval`: seconds between rounds when nothing is due."""

    compaction_retention: float = 300.0
    interval: float = 1.0
    batch: int = BATCH


@dataclass
class HousekeepingStats:
    deleted: int = 0
    compacted_to: int = 0
    elected: int = 0  # times this housekeeper took the election
    # what schedules did while this housekeeper fired them, by schedule: started, skipped (by
    # overlap), buffered, missed (beyond the catch-up window); and how late the starts were
    schedules: collections.defaultdict[tuple[str, str], int] = field(
        default_factory=lambda: collections.defaultdict(int))
    lateness: Histogram = field(default_factory=lambda: Histogram(LATENESS_BOUNDS))


class LeaseHolder(Protocol):
    """What the housekeeper needs of a lease keeper (the worker's `LeaseKeeper`): an event set
    while the lease is believed alive, and the lease."""

    ready: asyncio.Event
    id: int | None


class Housekeeper:
    """Deletes expired instances and compacts the store, while it holds the housekeeping election.

    `lease` is the worker's LeaseKeeper: the election key is bound to the worker's lease, so
    housekeeping passes on when the worker does."""

    def __init__(self, store: Store, keys: Keys, lease: LeaseHolder, *, name: str,
                 options: HousekeepingOptions | None = None, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.keys = keys
        self.lease = lease
        self.name = name
        self.options = options or HousekeepingOptions()
        self.wall = wall
        self.clock = clock
        self.stats = HousekeepingStats()
        self.leader = False
        self._samples: collections.deque[tuple[float, int]] = collections.deque()  # (clock, revision)
        self._trouble: str | None = None  # the last error logged, so an outage is logged once
        self._backfilled = False

    async def run(self) -> None:
        """Campaign and keep house until cancelled: deletion here, compaction beside it (a
        compaction takes seconds on a large database, and must not hold deletion up)."""
        loop = asyncio.get_running_loop()
        compacting = loop.create_task(self._compacting(), name=f"dsm-compaction-{self.name}")
        scheduling = loop.create_task(self._scheduling(), name=f"dsm-schedules-{self.name}")
        try:
            while True:
                busy = False
                try:
                    if await self._elected():
                        busy = await self.round()
                    self._trouble = None
                except (StoreUnavailable, LeaseLost, StoreError) as exc:
                    self._complain(exc)
                await asyncio.sleep(0 if busy else self.options.interval)
        finally:
            compacting.cancel()
            scheduling.cancel()
            await asyncio.gather(compacting, scheduling, return_exceptions=True)

    async def _scheduling(self) -> None:
        """Fire the schedules that are due, while this housekeeper holds the election: a round when
        the next due entry says (`Schedules.round`), or when one is written (a schedule created,
        changed, unpaused: a watch on the due entries says so), and at least every IDLE seconds.
        Idle schedules cost no read."""
        from .operations import Operations  # it imports this module
        from .schedules import IDLE, POLL, Schedules

        schedules = Schedules(Operations(self.store, self.keys, wall=self.wall), wall=self.wall)
        written = asyncio.Event()
        watching = asyncio.get_running_loop().create_task(self._watch_due(written),
                                                          name=f"dsm-schedule-watch-{self.name}")
        try:
            while True:
                wait = self.options.interval
                written.clear()
                if self.leader:
                    try:
                        events, wait = await schedules.round(idle=IDLE)
                        self._count(events)
                    except (StoreError, NotFound) as exc:
                        self._complain(exc)
                        wait = max(POLL, self.options.interval)
                try:
                    await asyncio.wait_for(written.wait(), wait)
                except asyncio.TimeoutError:
                    pass
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

    async def _watch_due(self, written: asyncio.Event) -> None:
        """Set `written` whenever a due entry is put; while the watch is down, every POLL seconds."""
        from .schedules import POLL

        prefix = self.keys.schedules_due
        while True:
            try:
                watch = await self.store.watch(prefix, prefix_end(prefix))
                try:
                    async for batch in watch:
                        if any(event.type == PUT for event in batch.events):
                            written.set()
                finally:
                    await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception:  # etcd away, a compaction, a lost stream: look again soon
                written.set()
                await asyncio.sleep(POLL)

    def _count(self, events: list[dict]) -> None:
        for event in events:
            self.stats.schedules[(event["schedule"], event["action"])] += event.get("count", 1)
            if event["action"] == "started":
                self.stats.lateness.observe(max(0.0, event["late"]))
            log.log(logging.WARNING if event["action"] == "missed" else logging.INFO,
                    "housekeeping %s: schedule %s, due %s: %s%s", self.name, event["schedule"],
                    timestamp(event["due"]), event["action"],
                    f" ({event['count']} due times beyond the catch-up window)" if event["action"] == "missed"
                    else f" {event['id']}" if event["action"] == "started" else f" (overlap {event.get('overlap')})")

    async def _compacting(self) -> None:
        keep = self.options.compaction_retention
        if keep <= 0:
            return
        while True:
            await asyncio.sleep(min(max(keep / 10, 0.1), 30.0))  # as etcd's own: every tenth of the period
            if not self.leader:
                continue
            try:
                await self.compact()
            except StoreError as exc:
                self._complain(exc)

    def _complain(self, exc: Exception) -> None:
        kind = type(exc).__name__
        if self._trouble != kind:
            self._trouble = kind
            level = logging.INFO if isinstance(exc, NoSpace) else logging.WARNING
            log.log(level, "housekeeping %s: paused (%s); trying again every %gs", self.name, exc,
                    self.options.interval)

    async def _elected(self) -> bool:
        """Take the election if nobody holds it; True while it is ours (our lease holds the key)."""
        await self.lease.ready.wait()
        lease = self.lease.id
        if lease is None:
            return False
        key = self.keys.housekeeper
        result = await self.store.txn([Compare.create(key, "==", 0)], [Put(key, self.name.encode(), lease)],
                                      [Get(key)])
        holder = None if result.succeeded else result.get(0).first
        ours = result.succeeded or (holder is not None and holder.lease == lease)
        if ours and not self.leader:
            self.stats.elected += 1
            log.info("housekeeping %s: elected; deleting expired instances%s", self.name,
                     f" and compacting history older than {self.options.compaction_retention:g}s"
                     if self.options.compaction_retention else "")
        elif not ours and self.leader:
            log.info("housekeeping %s: %s holds the election now", self.name,
                     holder.value.decode(errors="replace") if holder else "nobody")
        if not ours:
            self._samples.clear()  # a new term samples afresh
        self.leader = ours
        return ours

    async def round(self) -> bool:
        """One round of deletion; True when more is due at once."""
        if not self._backfilled:  # once, before anything relies on the index
            await backfill(self.store, self.keys)
            await layout.upgrade(self.store, self.keys)
            self._backfilled = True
        deleted, more = await delete_expired(self.store, self.keys, now=self.wall(), batch=self.options.batch)
        self.stats.deleted += deleted
        if deleted:
            log.debug("housekeeping %s: deleted %d expired instance(s)", self.name, deleted)
        return more

    async def compact(self) -> None:
        """Note the store's revision now, and compact to the newest one noted at least
        `compaction_retention` ago. The compaction is physical: this returns once etcd has done it,
        so compactions never queue up in etcd (each one reads every revision it keeps, which takes
        seconds on a large database)."""
        now = self.clock()
        self._samples.append((now, await self.store.revision()))
        target = 0
        while self._samples and now - self._samples[0][0] >= self.options.compaction_retention:
            target = self._samples.popleft()[1]
        if target <= self.stats.compacted_to:
            return
        try:
            await self.store.compact(target, physical=True)
        except Compacted:
            pass  # compacted that far already (by etcd's own auto-compaction, or another housekeeper)
        self.stats.compacted_to = target
        log.debug("housekeeping %s: compacted history below revision %d", self.name, target)
