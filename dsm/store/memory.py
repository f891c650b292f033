"""MemoryStore: a faithful in-process model of etcd v3 with an injectable clock.

It keeps real revisions (one per write transaction), create/mod revisions and versions per key,
an event log for watches from a revision (with compaction), and leases of whole seconds, as on
etcd (`whole_seconds`), that delete their keys when the clock passes their deadline: at that
moment, with no call to the store (a timer on the event loop, or the clock's own word when it is
a `ManualClock`). It also refuses what etcd refuses: a key written twice in one transaction, more
operations than `max_txn_ops`, requests over `max_request_bytes`, and puts bound to a lease that
does not exist. Tests expire a lease by advancing the clock, not sleeping.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

from ..errors import Compacted, LeaseLost, NoSpace, StoreUnavailable
from . import (
    DELETE,
    PUT,
    PUT_RESULT,
    Compare,
    Delete,
    DeleteResult,
    Event,
    Get,
    GetResult,
    KeyValue,
    Op,
    Put,
    RangeResult,
    Response,
    Txn,
    TxnRejected,
    TxnResult,
    WatchBatch,
)

_FIELDS = {"version": "version", "create": "create_revision", "mod": "mod_revision", "value": "value",
           "lease": "lease"}  # a compare's target -> the KeyValue field it reads
_OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}


class ManualClock:
    """A clock for tests: time moves only when told to, and tells who subscribed when it does."""

    def __init__(self, start: float = 1_000.0):
        self.now = start
        self._subscribers: list[Callable[[], None]] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for subscriber in list(self._subscribers):
            subscriber()

    def subscribe(self, subscriber: Callable[[], None]) -> Callable[[], None]:
        """Call `subscriber` after each advance; return what unsubscribes it."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber) if subscriber in self._subscribers else None


def whole_seconds(ttl: float) -> int:
    """The TTL a lease gets: etcd's are whole seconds, and `EtcdStore.lease_grant` asks for
    `max(1, round(ttl))`; etcd answers that TTL to a keep-alive and truncates the remaining time
    it reports (`lease_ttl`)."""
    return max(1, round(ttl))


@dataclass
class _Lease:
    id: int
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


class _MemoryWatch:
    def __init__(self, store: MemoryStore, start: str, end: str | None, loop: asyncio.AbstractEventLoop,
                 start_revision: int = 0):
        self.store = store
        self.start = start
        self.end = end
        self.loop = loop
        self.start_revision = start_revision  # as etcd: nothing below it, even when it is ahead of the store
        self.queue: asyncio.Queue[WatchBatch | None] = asyncio.Queue()
        self.closed = False

    def matches(self, key: str) -> bool:
        if self.end is None:
            return key == self.start
        return self.start <= key and (self.end == "\0" or key < self.end)

    def deliver(self, batch: WatchBatch | None) -> None:
        if self.closed:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.queue.put_nowait(batch)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, batch)

    async def cancel(self) -> None:
        if not self.closed:
            self.closed = True
            self.store._unwatch(self)
            self.queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[WatchBatch]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[WatchBatch]:
        while True:
            batch = await self.queue.get()
            if batch is None:
                if self.store._closed and not self.closed:
                    raise StoreUnavailable("memory store closed")
                return
            yield batch


class MemoryStore:
    """In-process store for embedded runs and tests; see the module docstring for its fidelity."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_txn_ops: int = 128,
                 max_request_bytes: int = 1536 * 1024, history_limit: int = 100_000):
        self.clock = clock
        self.max_txn_ops = max_txn_ops
        self.max_request_bytes = max_request_bytes
        self.history_limit = history_limit
        self._data: dict[str, KeyValue] = {}
        self._keys: list[str] = []
        self._rev = 1
        self._compacted = 0
        self._log: list[tuple[int, list[Event]]] = []
        self._leases: dict[int, _Lease] = {}
        self._watches: list[_MemoryWatch] = []
        self._lock = threading.RLock()
        self._lease_ids = itertools.count(random.randrange(1 << 40, 1 << 50))
        self._closed = False
        self._alarms: set[str] = set()
        self._wake: tuple[float, asyncio.AbstractEventLoop] | None = None  # the timer armed for the next expiry
        subscribe: Callable[[Callable[[], None]], Callable[[], None]] | None = getattr(clock, "subscribe", None)
        self._unsubscribe = subscribe(self.expire) if subscribe is not None else None

    # -- reads ------------------------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        with self._lock:
            self._check()
            return self._data.get(key)

    async def range(self, start: str, end: str | None = None, *, limit: int = 0, revision: int = 0,
                    keys_only: bool = False) -> RangeResult:
        with self._lock:
            self._check()
            if revision and revision != self._rev:
                raise TxnRejected("the memory store serves ranges at the current revision only")
            kvs, more = self._range(start, end, limit)
            if keys_only:
                kvs = [replace(kv, value=b"") for kv in kvs]
            return RangeResult(kvs=kvs, more=more, revision=self._rev)

    def _range(self, start: str, end: str | None, limit: int = 0) -> tuple[list[KeyValue], bool]:
        if end is None:
            kv = self._data.get(start)
            return ([kv] if kv else []), False
        lo = bisect.bisect_left(self._keys, start)
        hi = len(self._keys) if end == "\0" else bisect.bisect_left(self._keys, end)
        keys = self._keys[lo:hi]
        more = bool(limit) and len(keys) > limit
        if limit:
            keys = keys[:limit]
        return [self._data[k] for k in keys], more

    async def count(self, start: str, end: str | None = None) -> int:
        with self._lock:
            self._check()
            if end is None:
                return int(start in self._data)
            lo = bisect.bisect_left(self._keys, start)
            hi = len(self._keys) if end == "\0" else bisect.bisect_left(self._keys, end)
            return max(0, hi - lo)

    async def revision(self) -> int:
        with self._lock:
            self._check()
            return self._rev

    # -- writes -----------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        result = await self.txn([], [Put(key, value, lease)])
        return result.revision

    async def delete(self, key: str, end: str | None = None) -> int:
        result = self._txn([], [Delete(key, end)], (), quota=False)  # as etcd, deletes pass a NOSPACE alarm
        return result.deleted(0)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op] = (),
                  failure: Sequence[Op] = ()) -> TxnResult:
        return self._txn(compare, success, failure)

    def _txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op], *,
             quota: bool = True) -> TxnResult:
        with self._lock:
            self._check()
            if quota and "NOSPACE" in self._alarms and _writes(itertools.chain(success, failure)):
                raise NoSpace("txn: etcdserver: mvcc: database space exceeded")
            _validate(compare, success, failure, max_ops=self.max_txn_ops, max_bytes=self.max_request_bytes)
            changes: dict[str, KeyValue | None] = {}
            events: list[Event] = []
            ok, responses = self._apply(compare, success, failure, changes, events)
            if events:
                self._commit(changes, events)
            return TxnResult(succeeded=ok, revision=self._rev, responses=responses)

    def _current(self, key: str, changes: dict[str, KeyValue | None]) -> KeyValue | None:
        return changes[key] if key in changes else self._data.get(key)

    def _compare(self, c: Compare, changes: dict[str, KeyValue | None]) -> bool:
        if c.end is None:
            kvs = [kv] if (kv := self._current(c.key, changes)) else []
        else:
            kvs, _ = self._range(c.key, c.end)
        if not kvs:
            if c.target == "value":
                return False
            kvs = [KeyValue(c.key, b"", 0, 0, 0, 0)]
        fn = _OPS[c.op]
        field = _FIELDS[c.target]
        for kv in kvs:
            if not fn(getattr(kv, field), c.value):
                return False
        return True

    def _apply(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op],
               changes: dict[str, KeyValue | None], events: list[Event]) -> tuple[bool, list[Response]]:
        ok = all(self._compare(c, changes) for c in compare)
        responses: list[Response] = []
        rev = self._rev + 1
        for op in success if ok else failure:
            if isinstance(op, Put):
                if op.lease and op.lease not in self._leases:
                    raise LeaseLost(f"requested lease not found: {op.lease:x}")
                old = self._current(op.key, changes)
                kv = KeyValue(op.key, op.value, old.create_revision if old else rev, rev,
                              (old.version if old else 0) + 1, op.lease)
                changes[op.key] = kv
                events.append(Event(PUT, kv))
                responses.append(PUT_RESULT)
            elif isinstance(op, Delete):
                if op.end is None:
                    targets = [op.key] if self._current(op.key, changes) else []
                else:
                    targets = [kv.key for kv in self._range(op.key, op.end)[0]]
                    targets += [k for k, v in changes.items() if v is not None and k not in targets
                                and op.key <= k and (op.end == "\0" or k < op.end)]
                count = 0
                for key in targets:
                    if self._current(key, changes) is not None:
                        changes[key] = None
                        events.append(Event(DELETE, KeyValue(key, b"", 0, rev, 0, 0)))
                        count += 1
                responses.append(DeleteResult(count))
            elif isinstance(op, Get):  # reads see this transaction's earlier writes, as in etcd
                found = self._read_own(op, changes)
                responses.append(GetResult([replace(kv, value=b"") for kv in found] if op.keys_only else found))
            elif isinstance(op, Txn):
                sub_ok, sub_responses = self._apply(op.compare, op.success, op.failure, changes, events)
                responses.append(TxnResult(sub_ok, rev, sub_responses))
            else:
                raise TypeError(f"unknown operation {op!r}")
        return ok, responses

    def _read_own(self, op: Get, changes: dict[str, KeyValue | None]) -> list[KeyValue]:
        if not changes:
            return self._range(op.key, op.end, op.limit)[0]
        if op.end is None:
            found = self._current(op.key, changes)
            return [found] if found is not None else []
        keys = {kv.key for kv in self._range(op.key, op.end)[0]}
        keys.update(k for k in changes if op.key <= k and (op.end == "\0" or k < op.end))
        out = [kv for kv in (self._current(k, changes) for k in sorted(keys)) if kv is not None]
        return out[:op.limit] if op.limit else out

    def _commit(self, changes: dict[str, KeyValue | None], events: list[Event]) -> None:
        self._rev += 1
        for key, kv in changes.items():
            old = self._data.get(key)
            if old is not None and old.lease and old.lease in self._leases:
                self._leases[old.lease].keys.discard(key)
            if kv is None:
                if old is not None:
                    del self._data[key]
                    i = bisect.bisect_left(self._keys, key)
                    del self._keys[i]
            else:
                if old is None:
                    bisect.insort(self._keys, key)
                self._data[key] = kv
                if kv.lease:
                    self._leases[kv.lease].keys.add(key)
        self._publish(events)

    def _publish(self, events: list[Event]) -> None:
        self._log.append((self._rev, events))
        if len(self._log) > self.history_limit:
            drop = len(self._log) - self.history_limit
            self._compacted = self._log[drop][0] - 1
            del self._log[:drop]
        for watch in list(self._watches):
            if self._rev < watch.start_revision:
                continue
            mine = [e for e in events if watch.matches(e.kv.key)]
            if mine:
                watch.deliver(WatchBatch(self._rev, mine))

    # -- leases -----------------------------------------------------------------------------
    def _expire(self) -> None:
        now = self.clock()
        for lease in [lease for lease in self._leases.values() if lease.deadline <= now]:
            self._drop_lease(lease)

    def _drop_lease(self, lease: _Lease) -> None:
        del self._leases[lease.id]
        if lease.keys:
            rev = self._rev + 1
            events = []
            for key in sorted(lease.keys):
                if key in self._data:
                    events.append(Event(DELETE, KeyValue(key, b"", 0, rev, 0, 0)))
            if events:
                self._commit({e.kv.key: None for e in events}, events)

    def expire(self) -> None:
        """Apply lease expiry now (the timer, the clock's advance and every operation do this)."""
        with self._lock:
            if not self._closed:
                self._expire()

    def _arm(self) -> None:
        """Wake on the running loop when the next lease runs out (a clock that tells of its own
        advances needs no timer). A wake armed earlier, on a loop still open, is kept."""
        if self._unsubscribe is not None or not self._leases:
            return
        due = min(lease.deadline for lease in self._leases.values())
        if self._wake is not None and self._wake[0] <= due and not self._wake[1].is_closed():
            return
        loop = asyncio.get_running_loop()
        self._wake = (due, loop)
        loop.call_later(max(0.0, due - self.clock()), self._woken, due)

    def _woken(self, due: float) -> None:
        with self._lock:
            if self._wake is not None and self._wake[0] == due:
                self._wake = None
            if not self._closed:
                self._expire()
                self._arm()

    async def lease_grant(self, ttl: float) -> int:
        with self._lock:
            self._check()
            if "NOSPACE" in self._alarms:
                raise NoSpace("lease grant: etcdserver: mvcc: database space exceeded")
            seconds = whole_seconds(ttl)
            lease = _Lease(next(self._lease_ids), seconds, self.clock() + seconds)
            self._leases[lease.id] = lease
            self._arm()
            return lease.id

    async def lease_keepalive(self, lease: int) -> float:
        with self._lock:
            self._check()
            found = self._leases.get(lease)
            if found is None:
                raise LeaseLost(f"lease {lease:x} expired or was revoked")
            found.deadline = self.clock() + found.ttl
            self._arm()
            return float(found.ttl)

    async def lease_revoke(self, lease: int) -> None:
        with self._lock:
            self._check()
            found = self._leases.get(lease)
            if found is not None:
                self._drop_lease(found)

    async def lease_ttl(self, lease: int) -> float:
        """Remaining whole seconds of a lease (truncated), -1 when it no longer exists (as etcd's TimeToLive)."""
        with self._lock:
            self._check()
            found = self._leases.get(lease)
            return -1 if found is None else float(max(0, int(found.deadline - self.clock())))

    async def lease_keys(self, lease: int) -> list[str]:
        """The keys attached to a lease (as etcd's TimeToLive with keys); LeaseLost when it is gone."""
        with self._lock:
            self._check()
            found = self._leases.get(lease)
            if found is None:
                raise LeaseLost(f"lease {lease:x} expired or was revoked")
            return sorted(k for k in found.keys if k in self._data)

    # -- watches ----------------------------------------------------------------------------
    async def watch(self, start: str, end: str | None = None, *, start_revision: int = 0) -> _MemoryWatch:
        with self._lock:
            self._check()
            if start_revision and start_revision <= self._compacted:
                raise Compacted(self._compacted + 1 if self._compacted else self._compacted)
            watch = _MemoryWatch(self, start, end, asyncio.get_running_loop(), start_revision)
            if start_revision:
                for rev, events in self._log:
                    if rev >= start_revision:
                        mine = [e for e in events if watch.matches(e.kv.key)]
                        if mine:
                            watch.queue.put_nowait(WatchBatch(self._rev, mine))  # sent now, as etcd does
            self._watches.append(watch)
            return watch

    def _unwatch(self, watch: _MemoryWatch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)

    async def compact(self, revision: int, *, physical: bool = False) -> None:
        """Forget history below `revision` (`physical` changes nothing here: there is no backend)."""
        with self._lock:
            self._check()
            if revision > self._rev:
                raise TxnRejected(f"cannot compact to future revision {revision} (current {self._rev})")
            self._compacted = max(self._compacted, revision - 1)
            self._log = [(r, e) for r, e in self._log if r >= revision]

    # -- alarms -----------------------------------------------------------------------------
    async def alarms(self) -> list[str]:
        with self._lock:
            self._check()
            return sorted(self._alarms)

    def raise_alarm(self, alarm: str = "NOSPACE") -> None:
        """As etcd over its quota: with NOSPACE, transactions that write and lease grants are
        refused (NoSpace) until `disarm`; reads, plain deletes and keep-alives pass."""
        with self._lock:
            self._alarms.add(alarm)

    def disarm(self, alarm: str = "NOSPACE") -> None:
        with self._lock:
            self._alarms.discard(alarm)

    # -- lifecycle --------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise StoreUnavailable("memory store closed")
        self._expire()

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            watches, self._watches = self._watches, []
            if self._unsubscribe is not None:
                self._unsubscribe()
        for watch in watches:
            watch.deliver(None)


def _writes(ops: itertools.chain[Op] | Sequence[Op]) -> bool:
    """Whether any operation, nested ones included, puts or deletes."""
    for op in ops:
        if isinstance(op, (Put, Delete)) or (isinstance(op, Txn) and _writes(itertools.chain(op.success,
                                                                                              op.failure))):
            return True
    return False


def _validate(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op], *, max_ops: int,
              max_bytes: int) -> None:
    """Refuse what etcd refuses: too many operations, a request too large, a key written twice."""
    size = 0
    _count_ops(compare, success, failure, max_ops)
    for op in itertools.chain(success, failure):
        size += _size(op)
    for c in compare:
        size += len(c.key) + (len(c.value) if isinstance(c.value, bytes) else 8)
    if size > max_bytes:
        raise TxnRejected(f"request is too large ({size} bytes > {max_bytes})")
    _intervals(success)
    _intervals(failure)


def _count_ops(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op], max_ops: int) -> None:
    count = max(len(compare), len(success), len(failure))
    if count > max_ops:
        raise TxnRejected(f"too many operations in txn request ({count} > {max_ops})")
    for op in itertools.chain(success, failure):
        if isinstance(op, Txn):
            _count_ops(op.compare, op.success, op.failure, max_ops)


def _size(op: Op) -> int:
    if isinstance(op, Put):
        return len(op.key) + len(op.value) + 8
    if isinstance(op, Txn):
        return sum(_size(o) for o in itertools.chain(op.success, op.failure)) + 16 * len(op.compare)
    return len(op.key) + 8


def _intervals(ops: Sequence[Op]) -> tuple[set[str], list[tuple[str, str | None]]]:
    """etcd's checkIntervals: a key may be written once per transaction, nested ones included
    (the two branches of one nested transaction exclude each other, so they may share keys)."""
    puts: set[str] = set()
    points: set[str] = set()
    for op in ops:  # the common case first, in one pass: puts and deletes of single keys
        if type(op) is Put:
            if op.key in puts:
                raise TxnRejected("duplicate key given in txn request")
            puts.add(op.key)
        elif type(op) is Delete and op.end is None:
            points.add(op.key)
        elif type(op) is not Get:
            return _nested_intervals(ops)
    if not puts.isdisjoint(points):
        raise TxnRejected("duplicate key given in txn request")
    return puts, [(k, None) for k in points]


def _nested_intervals(ops: Sequence[Op]) -> tuple[set[str], list[tuple[str, str | None]]]:
    """`_intervals` of transactions with nested transactions or range deletes."""
    dels = [(op.key, op.end) for op in ops if type(op) is Delete]
    points = {k for k, e in dels if e is None}
    ranges = [(k, e) for k, e in dels if e is not None]
    puts: set[str] = set()

    def deleted(key: str) -> bool:
        if key in points:
            return True
        return bool(ranges) and any(s <= key and (e == "\0" or key < e) for s, e in ranges)

    def duplicate() -> TxnRejected:
        return TxnRejected("duplicate key given in txn request")

    for op in ops:
        if type(op) is not Txn:
            continue
        puts_then, dels_then = _intervals(op.success)
        puts_else, dels_else = _intervals(op.failure)
        for k in puts_then:
            if k in puts or deleted(k):
                raise duplicate()
            puts.add(k)
        for k in puts_else:
            if (k in puts and k not in puts_then) or deleted(k):
                raise duplicate()
            puts.add(k)
        for k, e in (*dels_then, *dels_else):
            if e is None:
                points.add(k)
            else:
                ranges.append((k, e))
    for op in ops:
        if type(op) is Put:
            if op.key in puts or deleted(op.key):
                raise duplicate()
            puts.add(op.key)
    intervals: list[tuple[str, str | None]] = [(k, None) for k in points]
    return puts, intervals + ranges
