"""Liveness from heartbeats, not leases: a worker whose entry among live workers goes unwritten is
taken for dead by the others even while its lease lives, and its work comes back; a live worker
is never taken so, stopping or not; a lease that is not ours to use is never used.

The judge is pure and tested with numbers; the rest runs on both stores (etcd with auth, where
another user keeps leases alive and attaches keys to them, is `tests/test_tenant_leases.py`)."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import markers_of, on_store, until_async

from dsm import compiler, handlers
from dsm.definitions import Registry
from dsm.errors import AccessDenied, LeaseLost
from dsm.keys import Keys, WorkInfo
from dsm.membership import WorkerInfo, key
from dsm.operations import Operations
from dsm.records import SUCCEEDED
from dsm.store import Compare, Put, prefix_end
from dsm.worker import running
from dsm.worker.lease import LeaseKeeper, release
from dsm.worker.peers import Entry, Judge

LONG = """
machine: long
start: a
states:
  a:
    tick: longmod:tick
    next: done
  done:
    terminal: true
"""
LONG_PY = """
import threading, time
started = threading.Event()

def tick(payload, ctx):
    started.set()
    time.sleep(payload.get("nap", 0))
"""


def entry(rev: int, stale_after: float | None = 2.0, key: str = "/ns/workers/w", lease: int = 7) -> Entry:
    return Entry(key, rev, lease, stale_after)


def test_an_entry_unchanged_for_its_stale_after_is_dead_and_a_new_revision_starts_over():
    judge = Judge()

    def at(now, *entries):
        return judge.observe(entries, now=now, healthy=(0.0, now))

    assert at(100.0, entry(5)) == []
    assert at(101.9, entry(5)) == []
    assert at(102.0, entry(5)) == [entry(5)]
    assert at(103.0, entry(6)) == []  # it wrote: alive after all
    assert at(104.9, entry(6)) == []
    assert at(105.0, entry(6)) == [entry(6)]


def test_silence_counts_only_over_the_span_the_observers_own_heartbeat_went_through():
    judge = Judge()
    assert judge.observe([entry(5)], now=100.0, healthy=(0.0, 100.0)) == []
    assert judge.observe([entry(5)], now=103.0, healthy=None) == []  # our own writes fail: judge nobody
    assert judge.observe([entry(5)], now=104.0, healthy=(103.5, 104.0)) == []  # counted from 103.5 only
    assert judge.observe([entry(5)], now=105.5, healthy=(103.5, 105.5)) == [entry(5)]
    judge = Judge()
    assert judge.observe([entry(5)], now=100.0, healthy=(0.0, 100.0)) == []
    # we were stalled ourselves: our last beat that went through was at 101, whatever the time now
    assert judge.observe([entry(5)], now=130.0, healthy=(0.0, 101.0)) == []


def test_entries_without_a_heartbeat_or_a_lease_are_never_judged_and_gone_ones_are_forgotten():
    judge = Judge()
    old, unleased, other = entry(5, None, "/ns/workers/old"), entry(5, lease=0, key="/ns/workers/u"), entry(9)
    assert judge.observe([old, unleased, other], now=0.0, healthy=(0.0, 0.0)) == []
    assert judge.observe([old, unleased], now=60.0, healthy=(0.0, 60.0)) == []
    assert judge.observe([other], now=61.0, healthy=(0.0, 61.0)) == []  # seen anew: counted from now


def test_entry_reads_its_stale_after_and_ignores_what_is_not_one():
    info = WorkerInfo(id="w", host="h", pid=1, definitions=(), allow=None, functions=(), refused=(), concurrency=1,
                      in_flight=0, started_at=0.0, updated_at=0.0, stale_after=4.0)
    from dsm.store import KeyValue

    assert Entry.of(KeyValue("k", info.dump(), 1, 3, 1, 9)) == Entry("k", 3, 9, 4.0)
    for raw in (b"not json", b"[1]", b'{"stale_after": "soon"}', b'{"stale_after": true}', b'{"stale_after": -1}'):
        assert Entry.of(KeyValue("k", raw, 1, 3, 1, 9)).stale_after is None


class Refusing:
    """A store on which etcd refuses what another user's key on a lease makes it refuse."""

    def __init__(self, store, *, keys_too: bool):
        self.store = store
        self.keys_too = keys_too

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def lease_revoke(self, lease):
        raise AccessDenied("lease revoke: etcdserver: permission denied")

    async def lease_keys(self, lease):
        if self.keys_too:
            raise AccessDenied("lease keys: etcdserver: permission denied")
        return [*await self.store.lease_keys(lease), "/b/theirs"]


@pytest.mark.parametrize("refused", [None, "revoke", "revoke and keys"])
def test_release_revokes_or_deletes_the_namespaces_keys_of_the_lease_each_while_still_bound(store_factory, namespace,
                                                                                             refused):
    keys = Keys(namespace)

    async def body(store):
        lease, other = await store.lease_grant(30), await store.lease_grant(30)
        mine = [key(keys, "w"), key(keys, "w2"), keys.housekeeper]
        for name in mine:
            await store.put(name, b"x", lease)
        await store.put(keys.work(keys.place("m", 0, "i1"), "t1"), b"marker")  # no lease: not the lease's
        await store.put(key(keys, "w3"), b"y", other)
        target = store if refused is None else Refusing(store, keys_too=refused == "revoke and keys")
        deleted = await release(target, keys, lease)
        left = {kv.key for kv in (await store.range(keys.root, prefix_end(keys.root))).kvs}
        return deleted, left

    deleted, left = on_store(store_factory, body)
    assert deleted == (0 if refused is None else 3)
    assert left == {keys.work(keys.place("m", 0, "i1"), "t1"), key(keys, "w3")}


def test_a_new_lease_revoked_or_taken_before_it_is_ours_is_dropped_for_another(store_factory):
    async def body(store):
        refusals = [LeaseLost("revoked by someone"), AccessDenied("put: etcdserver: permission denied")]
        attached = []

        async def attach(lease):
            attached.append(lease)
            if refusals:
                raise refusals.pop(0)

        keeper = LeaseKeeper(store, 5, name="w", attach=attach)
        lease = await keeper.grant()
        first = attached[0]
        keeper.lost(first)  # an old lease said lost: not news, the keeper keeps its current one
        return lease, attached, keeper.ready.is_set()

    lease, attached, ready = on_store(store_factory, body)
    assert len(set(attached)) == 3 and lease == attached[-1] and ready


def test_a_dead_workers_work_comes_back_while_its_lease_is_kept_alive(store_factory, namespace, write):
    graph = compiler.load(write("long.yaml", LONG, longmod=LONG_PY))
    keys = Keys(namespace)

    async def body(store):
        client = Operations(store, keys)
        iid = await client.submit(graph, {})
        # a worker claimed the instance's token, said it would beat every so often, and died; its
        # lease lives on: someone keeps it alive (on the memory store, its clock never moves)
        lease = await store.lease_grant(2)
        (marker,) = await markers_of(store, keys, iid)
        ghost = WorkerInfo(id="ghost", host="h", pid=1, definitions=(), allow=None, functions=(), refused=(),
                           concurrency=1, in_flight=1, started_at=time.time(), updated_at=time.time(), stale_after=0.5)
        await store.put(key(keys, "ghost"), ghost.dump(), lease)
        claimed = WorkInfo.load(marker.value).claimed("ghost", lease)  # its claim: the marker names it
        await store.txn([Compare.mod(marker.key, "==", marker.mod_revision)], [Put(marker.key, claimed.dump())])

        async def keep_alive():
            while True:
                await store.lease_keepalive(lease)
                await asyncio.sleep(0.3)  # pacing: the ghost's lease renewed as a live keeper would

        keeper = asyncio.get_running_loop().create_task(keep_alive())
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        try:
            async with running(store, registry, worker_id="living", lease_ttl=1, grace=1) as worker:
                done = await client.wait(iid, timeout=20)
                alive = [w.id for w in await client.workers()]
                history = await client.history(iid)
        finally:
            keeper.cancel()
        return done, worker.peers.taken, alive, history, await store.lease_ttl(lease)

    done, taken, alive, history, ttl = on_store(store_factory, body)
    assert done.status == SUCCEEDED and [h.worker for h in history] == ["living"]
    # its lease was revoked, and its entry (what held its claim) with it
    assert taken == 1 and alive == ["living"] and ttl == -1


def test_a_stopping_worker_beats_on_while_it_finishes_its_ticks(clock, namespace, write):
    """Its peers must not take it for dead while it finishes within its grace, however long."""
    from dsm.store.memory import MemoryStore

    graph = compiler.load(write("long.yaml", LONG, longmod=LONG_PY))
    import longmod

    keys = Keys(namespace)

    async def main():
        store = MemoryStore(clock=clock)  # leases never expire: only heartbeats can tell
        client = Operations(store, keys)
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        stop_a = asyncio.Event()
        options = {"lease_ttl": 0.3, "presence_interval": 0.05}  # beats every 0.1s, dead after 0.6s
        async with running(store, registry, worker_id="a", stop=stop_a, grace=10, **options):
            iid = await client.submit(graph, {"nap": 1.5})
            await asyncio.to_thread(longmod.started.wait, 10)
            async with running(store, registry, worker_id="b", **options) as b:
                stop_a.set()  # a stops: it finishes its tick first, for 1.5s
                done = await client.wait(iid, timeout=20)
                history = await client.history(iid)
        return done, history, b.peers.taken

    done, history, taken = asyncio.run(main())
    assert done.status == SUCCEEDED and [h.worker for h in history] == ["a"]
    assert taken == 0


def test_the_heartbeat_rewrites_the_entry_when_nothing_changed(clock, namespace, write):
    from dsm.store.memory import MemoryStore

    graph = compiler.load(write("long.yaml", LONG, longmod=LONG_PY))
    keys = Keys(namespace)

    async def main():
        store = MemoryStore(clock=clock)
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        revisions = set()
        async with running(store, registry, worker_id="w", lease_ttl=0.3, presence_interval=0.05):
            async def rewritten() -> bool:
                kv = await store.get(key(keys, "w"))
                if kv is not None:
                    revisions.add(kv.mod_revision)
                    assert WorkerInfo.load(kv.value).stale_after == pytest.approx(0.6)
                return len(revisions) >= 4

            await until_async(rewritten, "the worker's entry written four times", timeout=10)
        return revisions

    assert len(asyncio.run(main())) >= 4
