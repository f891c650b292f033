"""Claims live in the work markers: a claim is the marker's `owner` and `lease`, held while that
worker's entry among live workers lives under that lease (`dsm/keys.py`). On both stores: a claim
is one put of the marker, a fork's branches kept by the committing worker one put each, a dead
worker's markers go to the living, and a worker whose claims ended never commits on them."""

from __future__ import annotations

import asyncio
import time

from faults import is_claim, ops_of
from helpers import WAIT, on_store, token_ref, until_async

from dsm import compiler, handlers
from dsm.commits import commit_txn, plan_commit
from dsm.definitions import Registry
from dsm.errors import StoreUnavailable
from dsm.keys import Keys, TokenRef, WorkInfo
from dsm.operations import Operations
from dsm.records import SUCCEEDED, load_instance
from dsm.step import Arrival
from dsm.store import Compare, Delete, Put, prefix_end
from dsm.transition import Outcome
from dsm.worker import running
from dsm.worker.cache import RecordCache
from dsm.worker.claims import Claims
from dsm.worker.feed import Seen, WorkFeed
from dsm.worker.jobs import JobTable
from dsm.worker.queue import CandidateQueue

LINE = """
machine: line
start: a
states:
  a: {tick: linemod:tick, next: b}
  b: {tick: linemod:tick, next: done}
  done: {terminal: true}
"""
LINE_PY = """
import threading
gate = threading.Event()
gate.set()
ticks = []

def tick(payload, ctx):
    ticks.append(ctx.state)
    gate.wait(30)
"""
FORK = """
machine: forky
start: s
states:
  s: {fork: [b0, b1, b2], join: j}
  b0: {tick: h:f, next: j}
  b1: {tick: h:f, next: j}
  b2: {tick: h:f, next: j}
  j: {next: done}
  done: {terminal: true}
"""


class Recording:
    """A store that keeps every transaction it was sent."""

    def __init__(self, store):
        self.store = store
        self.txns: list[tuple[list, list]] = []

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def txn(self, compare, success=(), failure=()):
        self.txns.append((list(compare), list(success)))
        return await self.store.txn(compare, success, failure)


def test_a_claim_is_one_marker_put_naming_the_worker_and_its_lease(store_factory, namespace, write):
    graph = compiler.load(write("line.yaml", LINE, linemod=LINE_PY))
    keys = Keys(namespace)

    async def body(store):
        recording = Recording(store)
        client = Operations(store, keys)
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        start = await store.revision()
        async with running(recording, registry, worker_id="w1") as worker:
            iid = await client.submit(graph, {})
            done = await client.wait(iid, timeout=20)
            lease = worker.lease_id
        events = []
        watch = await store.watch(keys.root, prefix_end(keys.root), start_revision=start + 1)
        end = await store.revision()
        async for batch in watch:
            events += batch.events
            if batch.events and batch.events[-1].kv.mod_revision >= end:
                break
        await watch.cancel()
        claims = [ops_of(success) for compare, success in recording.txns if is_claim(compare, success)]
        return done, lease, await token_ref(store, keys, iid), claims, events

    done, lease, ref, claims, events = on_store(store_factory, body)
    assert done.status == SUCCEEDED
    assert len(claims) == 1  # the line moves on under that one claim
    (puts,) = [[op for op in ops if isinstance(op, Put)] for ops in claims]
    assert [op.key for op in puts] == [ref.key]
    claimed = WorkInfo.load(puts[0].value)
    assert (claimed.owner, claimed.lease) == ("w1", lease)
    assert not [e.kv.key for e in events if e.kv.key.endswith("/claim")]  # no claim keys at all


def test_a_forks_branches_kept_by_the_committing_worker_cost_one_put_each():
    keys = Keys("ns")
    graph = compiler.compile_text(FORK, "forky.yaml", import_handlers=False)
    from dsm.transition import start

    inst = start(graph, "i1", {}, 0.0)
    place = keys.place_of(inst)
    plan = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], 5, Outcome())], now=1.0, worker="w", slots=1,
                       max_record_bytes=10**7)
    txn = commit_txn(keys, plan, 7, {"t1": 5}, worker="w", lease=9, now=1.0)
    kept = {t.id for t in plan.keep}
    assert len(kept) == 2  # the fork's own slot passes to a branch, plus one free slot
    for tid in plan.after.tokens:
        ops = [op for op in txn.success if getattr(op, "key", None) == keys.work(place, tid)]
        assert len(ops) == 1 and isinstance(ops[0], Put)
        info = WorkInfo.load(ops[0].value)
        assert (info.owner, info.lease) == (("w", 9) if tid in kept else (None, None))
    assert [op.key for op in txn.success if isinstance(op, Delete)] == [keys.work(place, "t1")]
    assert not [op for op in txn.success if getattr(op, "key", "").endswith("/claim")]
    # fenced by the forking token's marker as claimed, and by the worker's entry under its lease
    assert Compare.mod(keys.work(place, "t1"), "==", 5) in txn.compare
    assert Compare.lease_of(keys.worker("w"), "==", 9) in txn.compare


async def _claimed_by(store, keys, client, graph, owner, lease):
    """An instance whose token worker `owner` claimed under `lease` (its entry lives under it)."""
    iid = await client.submit(graph, {})
    await store.put(keys.worker(owner), b"{}", lease)
    kv = await store.get((await token_ref(store, keys, iid)).key)
    claimed = WorkInfo.load(kv.value).claimed(owner, lease)
    assert (await store.txn([Compare.mod(kv.key, "==", kv.mod_revision)], [Put(kv.key, claimed.dump())])).succeeded
    return iid


async def _claim(store, claims, ref, lease, *, seen=None):
    """Claim `ref` through `claims` under `lease`, its marker as `seen` (a key-value read before),
    else as it is now."""
    kv = seen if seen is not None else await store.get(ref.key)
    return await store.txn(*txn_of(claims.txn(ref, lease, Seen(kv.mod_revision, WorkInfo.load(kv.value)))))


def test_a_dead_workers_markers_are_taken_by_another_worker(store_factory, namespace, write):
    """One dead worker's lease ends (expired, or revoked); another's entry is deleted, as a peer
    that takes it for dead does where etcd will not revoke its lease."""
    graph = compiler.load(write("line.yaml", LINE, linemod=LINE_PY))
    keys = Keys(namespace)

    async def body(store):
        client = Operations(store, keys)
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        revoked, deleted = await store.lease_grant(30), await store.lease_grant(30)
        first = await _claimed_by(store, keys, client, graph, "ghost1", revoked)
        second = await _claimed_by(store, keys, client, graph, "ghost2", deleted)
        async with running(store, registry, worker_id="living") as worker:
            await until_async(lambda: worker.feed.watching, "the worker watching")
            # claimed by live workers: no candidates
            queued = [await token_ref(store, keys, iid) in worker.queue for iid in (first, second)]
            await store.lease_revoke(revoked)
            await store.delete(keys.worker("ghost2"))
            done = [await client.wait(iid, timeout=20) for iid in (first, second)]
            workers = [{h.worker for h in await client.history(iid)} for iid in (first, second)]
        return queued, [d.status for d in done], workers

    queued, statuses, workers = on_store(store_factory, body)
    assert queued == [False, False]
    assert statuses == [SUCCEEDED, SUCCEEDED] and workers == [{"living"}, {"living"}]


def test_a_paused_workers_commit_is_refused_once_its_work_was_taken(store_factory, namespace):
    """Worker a claims a token, then stops answering (SIGSTOP) past its lease; worker b takes the
    token. a's commit, sent when it wakes, must not land, whichever lease it names."""
    graph = compiler.compile_text(LINE, "line.yaml", import_handlers=False)
    keys = Keys(namespace)

    async def body(store):
        client = Operations(store, keys)
        iid = await client.submit(graph, {})
        ref = await token_ref(store, keys, iid)
        la, lb = await store.lease_grant(30), await store.lease_grant(30)
        await store.put(keys.worker("a"), b"{}", la)
        await store.put(keys.worker("b"), b"{}", lb)
        a, b = claims_of(store, keys, "a"), claims_of(store, keys, "b")
        won = await _claim(store, a, ref, la)
        assert won.succeeded
        early = await _claim(store, b, ref, lb, seen=won.get(2).first)  # a lives: its claim holds
        await store.lease_revoke(la)  # a's lease ends while it is paused
        taken = await _claim(store, b, ref, lb, seen=won.get(2).first)
        record = await store.get(keys.instance(iid))
        inst = load_instance(record.value)
        plan = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], won.revision, Outcome())], now=time.time(),
                           worker="a", slots=1, max_record_bytes=10**7)
        stale = await store.txn(*txn_of(commit_txn(keys, plan, record.mod_revision, {"t1": won.revision},
                                                   worker="a", lease=la, now=time.time())))
        # back under a new lease, a still cannot commit on the claim b took
        la2 = await store.lease_grant(30)
        await store.put(keys.worker("a"), b"{}", la2)
        again = await store.txn(*txn_of(commit_txn(keys, plan, record.mod_revision, {"t1": won.revision},
                                                   worker="a", lease=la2, now=time.time())))
        plan_b = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], taken.revision, Outcome())], now=time.time(),
                             worker="b", slots=1, max_record_bytes=10**7)
        fresh = await store.txn(*txn_of(commit_txn(keys, plan_b, record.mod_revision, {"t1": taken.revision},
                                                   worker="b", lease=lb, now=time.time())))
        return early.succeeded, taken.succeeded, stale.succeeded, again.succeeded, fresh.succeeded

    assert on_store(store_factory, body) == (False, True, False, False, True)


def test_a_worker_back_under_a_new_lease_cannot_commit_with_its_old_claims(store_factory, namespace):
    """Its entry is under the new lease: a commit fenced by the lease the claim names fails, and
    the token, claimed by nobody now, is claimed again (by anyone: here by the same worker)."""
    graph = compiler.compile_text(LINE, "line.yaml", import_handlers=False)
    keys = Keys(namespace)

    async def body(store):
        client = Operations(store, keys)
        iid = await client.submit(graph, {})
        ref = await token_ref(store, keys, iid)
        old = await store.lease_grant(30)
        await store.put(keys.worker("a"), b"{}", old)
        a = claims_of(store, keys, "a")
        won = await _claim(store, a, ref, old)
        await store.lease_revoke(old)
        new = await store.lease_grant(30)
        await store.put(keys.worker("a"), b"{}", new)
        record = await store.get(keys.instance(iid))
        inst = load_instance(record.value)
        plan = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], won.revision, Outcome())], now=time.time(),
                           worker="a", slots=1, max_record_bytes=10**7)
        stale = await store.txn(*txn_of(commit_txn(keys, plan, record.mod_revision, {"t1": won.revision},
                                                   worker="a", lease=old, now=time.time())))
        again = await _claim(store, a, ref, new, seen=won.get(2).first)
        return won.succeeded, stale.succeeded, again.succeeded

    assert on_store(store_factory, body) == (True, False, True)


def test_a_job_claimed_under_a_lease_since_lost_never_commits(namespace, write):
    """A worker whose lease is revoked under a running tick takes a new one at once; the tick's
    outcome, claimed under the old lease, is not committed under the new one: the token is run
    again, and its transition is committed once."""
    from dsm.store.memory import MemoryStore

    graph = compiler.load(write("line.yaml", LINE, linemod=LINE_PY))
    import linemod

    keys = Keys(namespace)

    async def main():
        store = MemoryStore()
        client = Operations(store, keys)
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        linemod.gate.clear()
        async with running(store, registry, worker_id="w", lease_ttl=0.6) as worker:
            iid = await client.submit(graph, {})
            await until_async(lambda: linemod.ticks == ["a"], "the first tick running")
            first = worker.lease_id
            await store.lease_revoke(first)
            await until_async(lambda: worker.lease_id not in (None, first) and worker.lease.ready.is_set(),
                              "a new lease")
            linemod.gate.set()
            done = await client.wait(iid, timeout=20)
            history = await client.history(iid)
        return done, history, list(linemod.ticks)

    done, history, ticks = asyncio.run(main())
    assert done.status == SUCCEEDED
    ran_a = [h for h in history if h.state == "a"]
    assert len(ran_a) == 1 and ran_a[0].attempt == 1  # committed once, and no failed attempt recorded
    assert ticks == ["a", "a", "b"]  # the first attempt's outcome was not committed


class _Breakable:
    """A store whose watches a test breaks (as a lost connection does) and lets resume when it says;
    it counts the feed's resyncs (each reads the workers' entries first)."""

    def __init__(self, store, keys):
        self.store, self.keys = store, keys
        self.resyncs = 0
        self.broken = asyncio.Event()
        self.may_watch = asyncio.Event()
        self.may_watch.set()

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def range(self, start, *args, **kwargs):
        if start == self.keys.workers:
            self.resyncs += 1
        return await self.store.range(start, *args, **kwargs)

    async def watch(self, *args, **kwargs):
        await self.may_watch.wait()
        inner = await self.store.watch(*args, **kwargs)
        return _BreakableWatch(inner, self.broken)


class _BreakableWatch:
    def __init__(self, inner, broken):
        self.inner, self.broken = inner, broken

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        events = self.inner.__aiter__()
        while True:
            batch = asyncio.ensure_future(events.__anext__())
            broken = asyncio.ensure_future(self.broken.wait())
            done, _ = await asyncio.wait({batch, broken}, return_when=asyncio.FIRST_COMPLETED)
            if broken in done:
                batch.cancel()
                await asyncio.gather(batch, return_exceptions=True)
                await self.inner.cancel()
                self.broken.clear()
                raise StoreUnavailable("connection lost")
            broken.cancel()
            yield batch.result()

    async def cancel(self):
        await self.inner.cancel()


def test_an_orphan_is_found_after_a_resync(store_factory, namespace):
    """The owner's entry goes while the feed's watch is away, and the store compacts past it: the
    watch cannot resume, the feed resyncs, and the marker read again with its owner is an orphan."""
    keys = Keys(namespace)

    async def body(store):
        lease = await store.lease_grant(30)
        await store.put(keys.worker("ghost"), b"{}", lease)
        info = WorkInfo("m", "sha256:x", "s", owner="ghost", lease=lease)
        ref = TokenRef("i1", "t1", keys.place("m", 0, "i1"))
        await store.put(ref.key, info.dump())
        wrapped = _Breakable(store, keys)
        queue = CandidateQueue(time.monotonic)
        feed = WorkFeed(wrapped, keys, queue, name="me", admits=lambda ref, info: True, held=lambda *a: None)
        task = asyncio.get_running_loop().create_task(feed.run())
        try:
            await until_async(lambda: feed.watching, "the feed watching")
            claimed_then = ref in queue
            wrapped.may_watch.clear()
            wrapped.broken.set()  # the watch breaks; it resumes from where it was, once it may
            await until_async(lambda: not feed.watching, "the watch broken")
            await store.lease_revoke(lease)
            await store.put(keys.root + "filler", b"x")
            await store.compact(await store.revision())
            wrapped.may_watch.set()
            await until_async(lambda: ref in queue, "the orphan queued")
            return claimed_then, wrapped.resyncs
        finally:
            await feed.close()  # a gRPC read may not pass a cancellation on: its stream is closed first
            task.cancel()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), WAIT)

    claimed_then, resyncs = on_store(store_factory, body)
    assert not claimed_then and resyncs >= 2


def claims_of(store, keys, name):
    """The store's side of worker `name`'s claims, outside a worker."""
    queue = CandidateQueue(time.monotonic)
    feed = WorkFeed(store, keys, queue, name=name, admits=lambda ref, info: True, held=lambda *a: None)
    return Claims(store, keys, name=name, records=RecordCache(), queue=queue, feed=feed, jobs=JobTable())


def txn_of(txn):
    return txn.compare, txn.success, txn.failure

