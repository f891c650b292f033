"""One contract, every store: the same tests on MemoryStore and on a real etcd (never a mock)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from dsm.errors import Compacted, LeaseLost
from dsm.store import DELETE, PUT, PUT_RESULT, Compare, Delete, Get, Put, Txn, TxnRejected, prefix_end
from dsm.store.memory import MemoryStore, whole_seconds

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run(store_factory, body, **kw):
    async def main():
        store = await store_factory()
        prefix = f"/contract-{uuid.uuid4().hex[:8]}/"
        try:
            return await body(store, prefix, **kw)
        finally:
            await store.close()

    return asyncio.run(main())


def test_revisions_versions_and_get(store_factory):
    async def body(store, p):
        r0 = await store.revision()
        r1 = await store.put(p + "a", b"1")
        r2 = await store.put(p + "a", b"2")
        assert r1 == r0 + 1 and r2 == r1 + 1
        kv = await store.get(p + "a")
        assert (kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (b"2", r1, r2, 2, 0)
        assert await store.get(p + "missing") is None
        assert await store.delete(p + "a") == 1
        assert await store.delete(p + "a") == 0
        again = await store.put(p + "a", b"3")
        kv = await store.get(p + "a")
        assert (kv.create_revision, kv.version) == (again, 1)

    run(store_factory, body)


def test_range_prefix_limit_and_paging(store_factory):
    async def body(store, p):
        for i in range(7):
            await store.put(f"{p}k/{i:02d}", str(i).encode())
        await store.put(p + "l", b"outside")
        page = await store.range(p + "k/", prefix_end(p + "k/"), limit=3)
        assert [kv.key for kv in page.kvs] == [f"{p}k/00", f"{p}k/01", f"{p}k/02"] and page.more
        seen = []
        start = p + "k/"
        while True:
            page = await store.range(start, prefix_end(p + "k/"), limit=3)
            seen += [kv.value for kv in page.kvs]
            if not page.more:
                break
            start = page.kvs[-1].key + "\0"
        assert seen == [str(i).encode() for i in range(7)]
        keys = await store.range(p, prefix_end(p), keys_only=True)
        assert len(keys.kvs) == 8 and all(kv.value == b"" for kv in keys.kvs)
        assert await store.count(p + "k/", prefix_end(p + "k/")) == 7
        assert await store.count(p + "l") == 1 and await store.count(p + "nope") == 0
        assert await store.delete(p + "k/", prefix_end(p + "k/")) == 7
        assert [kv.key for kv in (await store.range(p, prefix_end(p))).kvs] == [p + "l"]

    run(store_factory, body)


def test_compare_and_swap_success_and_failure(store_factory):
    async def body(store, p):
        rev = await store.put(p + "x", b"v1")
        ok = await store.txn([Compare.mod(p + "x", "==", rev)], [Put(p + "x", b"v2")], [Get(p + "x")])
        assert ok.succeeded and ok.responses == [PUT_RESULT]
        stale = await store.txn([Compare.mod(p + "x", "==", rev)], [Put(p + "x", b"v3")], [Get(p + "x")])
        assert not stale.succeeded
        (current,) = stale.get(0).kvs
        assert current.value == b"v2" and current.mod_revision == ok.revision
        assert (await store.get(p + "x")).value == b"v2"
        # create-if-absent, value compare, version compare
        created = await store.txn([Compare.create(p + "new", "==", 0)], [Put(p + "new", b"n")])
        assert created.succeeded
        assert not (await store.txn([Compare.create(p + "new", "==", 0)], [Put(p + "new", b"m")])).succeeded
        assert (await store.txn([Compare.value_of(p + "new", "==", b"n")], [])).succeeded
        assert (await store.txn([Compare.version(p + "new", ">", 0)], [])).succeeded
        assert (await store.txn([Compare.version(p + "nope", "==", 0)], [])).succeeded

    run(store_factory, body)


def test_value_compare_on_a_missing_key_is_false(store_factory):
    async def body(store, p):
        assert not (await store.txn([Compare.value_of(p + "missing", "==", b"")], [])).succeeded
        assert not (await store.txn([Compare.value_of(p + "missing", "!=", b"x")], [])).succeeded

    run(store_factory, body)


def test_multi_key_transactions_are_atomic(store_factory):
    async def body(store, p):
        await store.put(p + "guard", b"1")
        failed = await store.txn([Compare.value_of(p + "guard", "==", b"2")],
                                 [Put(p + "a", b"1"), Put(p + "b", b"1"), Delete(p + "guard")])
        assert not failed.succeeded
        assert await store.get(p + "a") is None and await store.get(p + "b") is None
        assert await store.get(p + "guard") is not None
        done = await store.txn([Compare.value_of(p + "guard", "==", b"1")],
                               [Put(p + "a", b"1"), Put(p + "b", b"1"), Delete(p + "guard")])
        a, b = await store.get(p + "a"), await store.get(p + "b")
        assert done.succeeded and a.mod_revision == b.mod_revision == done.revision
        assert await store.get(p + "guard") is None

    run(store_factory, body)


def test_nested_transactions_are_independent_in_one_revision(store_factory):
    async def body(store, p):
        await store.put(p + "taken", b"x")
        result = await store.txn([], [
            Txn([Compare.create(p + "free", "==", 0)], [Put(p + "free", b"mine"), Get(p + "free")]),
            Txn([Compare.create(p + "taken", "==", 0)], [Put(p + "taken", b"mine")], [Get(p + "taken")]),
        ])
        first, second = result.nested(0), result.nested(1)
        assert first.succeeded and not second.succeeded
        assert second.get(0).kvs[0].value == b"x"
        kv = await store.get(p + "free")
        assert kv.value == b"mine" and kv.mod_revision == result.revision

    run(store_factory, body)


def test_a_key_written_twice_in_one_transaction_is_refused(store_factory):
    async def body(store, p):
        with pytest.raises(TxnRejected):
            await store.txn([], [Put(p + "k", b"1"), Put(p + "k", b"2")])
        with pytest.raises(TxnRejected):
            await store.txn([], [Delete(p + "k"), Put(p + "k", b"2")])
        with pytest.raises(TxnRejected):
            await store.txn([], [Put(p + "k", b"1"), Delete(p + "k")])
        with pytest.raises(TxnRejected):
            await store.txn([], [Put(p + "r/a", b"1"), Delete(p + "r/", prefix_end(p + "r/"))])
        with pytest.raises(TxnRejected):
            await store.txn([], [Txn([], [Put(p + "k", b"1")]), Txn([], [Put(p + "k", b"2")])])
        with pytest.raises(TxnRejected):
            await store.txn([], [Put(p + "k", b"1"), Txn([], [Delete(p + "k")])])
        # deleting one key twice is not writing it twice: allowed, as are reads beside a write
        await store.txn([], [Delete(p + "k"), Delete(p + "k"), Get(p + "k"), Put(p + "j", b"1"), Get(p + "j")])
        # the two branches of one nested transaction exclude each other: allowed
        await store.txn([], [Txn([Compare.version(p + "k", "==", 0)], [Put(p + "k", b"1")], [Put(p + "k", b"2")])])
        assert (await store.get(p + "k")).value == b"1"

    run(store_factory, body)


def test_too_many_operations_are_refused(store_factory):
    async def body(store, p):
        with pytest.raises(TxnRejected):
            await store.txn([], [Put(f"{p}{i}", b"x") for i in range(129)])

    run(store_factory, body)


def test_leases_expire_and_take_their_keys(store_factory):
    async def body(store, p):
        lease = await store.lease_grant(1)
        await store.put(p + "claim", b"w", lease)
        kv = await store.get(p + "claim")
        assert kv.lease == lease
        assert await store.lease_keepalive(lease) >= 1
        await store_factory.expire_lease(store, lease)
        assert await store.get(p + "claim") is None
        with pytest.raises(LeaseLost):
            await store.lease_keepalive(lease)
        with pytest.raises(LeaseLost):
            await store.put(p + "claim", b"w", lease)
        with pytest.raises(LeaseLost):
            await store.txn([], [Put(p + "other", b"x"), Put(p + "claim", b"w", lease)])
        assert await store.get(p + "other") is None

    run(store_factory, body)


def test_revoke_deletes_keys_at_once(store_factory):
    async def body(store, p):
        lease = await store.lease_grant(30)
        await store.txn([], [Put(p + "a", b"1", lease), Put(p + "b", b"1", lease), Put(p + "c", b"1")])
        await store.lease_revoke(lease)
        assert await store.get(p + "a") is None and await store.get(p + "b") is None
        assert await store.get(p + "c") is not None

    run(store_factory, body)


def test_watch_from_a_revision_replays_then_follows(store_factory):
    async def body(store, p):
        first = await store.put(p + "w/a", b"1")
        await store.txn([], [Put(p + "w/b", b"2"), Delete(p + "w/a")])
        await store.put(p + "elsewhere", b"x")
        watch = await store.watch(p + "w/", prefix_end(p + "w/"), start_revision=first)
        events = []

        async def collect():
            async for batch in watch:
                events.extend(batch.events)
                if len(events) >= 4:
                    return

        task = asyncio.create_task(collect())
        await store.put(p + "w/c", b"3")  # after the replay, whenever it is read
        await asyncio.wait_for(task, 5)
        await watch.cancel()
        got = [(e.type, e.kv.key[len(p):], e.kv.value) for e in events]
        assert got == [(PUT, "w/a", b"1"), (PUT, "w/b", b"2"), (DELETE, "w/a", b""), (PUT, "w/c", b"3")]
        assert events[1].kv.mod_revision == events[2].kv.mod_revision  # one transaction, one revision
        assert events[0].kv.mod_revision == first

    run(store_factory, body)


def test_a_lease_expires_on_time_with_no_call_to_the_store(store_factory):
    """Its keys are deleted when its time comes, and watchers see the deletes, though nobody
    touched the store meanwhile (the memory store's clock moves; etcd's timer runs)."""
    async def body(store, p):
        lease = await store.lease_grant(1)
        await store.txn([], [Put(p + "l/a", b"w", lease), Put(p + "l/b", b"w", lease), Put(p + "l/c", b"kept")])
        watch = await store.watch(p + "l/", prefix_end(p + "l/"))
        await store_factory.advance(1)
        events = []

        async def deletes():
            async for batch in watch:
                events.extend(batch.events)
                if len(events) >= 2:
                    return

        await asyncio.wait_for(deletes(), 5)
        await watch.cancel()
        assert sorted((e.type, e.kv.key[len(p):]) for e in events) == [(DELETE, "l/a"), (DELETE, "l/b")]
        assert events[0].kv.mod_revision == events[1].kv.mod_revision  # one expiry, one revision
        assert [kv.key[len(p):] for kv in (await store.range(p, prefix_end(p))).kvs] == ["l/c"]
        assert await store.lease_ttl(lease) == -1

    run(store_factory, body)


def test_lease_ttls_are_whole_seconds(store_factory):
    """As etcd: a lease lives whole seconds, at least one; a keep-alive answers the TTL granted,
    the remaining time is truncated to whole seconds."""
    async def body(store, p):
        granted = {}
        for asked in (0.3, 1, 1.5, 2.5, 2.6, 5):
            lease = await store.lease_grant(asked)
            remaining = await store.lease_ttl(lease)
            granted[asked] = await store.lease_keepalive(lease)
            assert remaining == int(remaining) and granted[asked] - 1 <= remaining <= granted[asked]
            await store.lease_revoke(lease)
        return granted

    granted = run(store_factory, body)
    assert granted == {0.3: 1, 1: 1, 1.5: 2, 2.5: 2, 2.6: 3, 5: 5}
    assert all(whole_seconds(asked) == ttl for asked, ttl in granted.items())


def test_a_memory_store_on_the_real_clock_expires_leases_on_the_event_loop():
    """No test clock: the store's own timer expires the lease when its second is up."""
    async def main():
        store = MemoryStore()
        lease = await store.lease_grant(1)
        await store.put("/claim", b"w", lease)
        watch = await store.watch("/claim")
        started = time.monotonic()

        async def first():
            async for batch in watch:
                return batch.events[0], time.monotonic() - started

        event, after = await asyncio.wait_for(first(), 5)
        await watch.cancel()
        await store.close()
        return event, after

    event, after = asyncio.run(main())
    assert event.type == DELETE and event.kv.key == "/claim" and after < 3


def test_watch_from_a_compacted_revision_raises(store_factory):
    async def body(store, p):
        old = await store.put(p + "a", b"1")
        await store.put(p + "a", b"2")
        latest = await store.put(p + "a", b"3")
        await store.compact(latest)
        with pytest.raises(Compacted):
            watch = await store.watch(p + "a", start_revision=old)
            async for _ in watch:
                break
        watch = await store.watch(p + "a", start_revision=latest)

        async def first():
            async for batch in watch:
                return batch.events[0].kv.value

        assert await asyncio.wait_for(first(), 5) == b"3"
        await watch.cancel()

    run(store_factory, body)


def test_watch_from_a_future_revision_waits_for_it(store_factory):
    """etcd sends nothing below the revision asked for, even when it is ahead of the store's."""
    async def body(store, p):
        ahead = await store.revision() + 3
        watch = await store.watch(p + "f/", prefix_end(p + "f/"), start_revision=ahead)
        written = []
        while not written or written[-1][1] < ahead:  # other writers may move the revision too
            written.append((f"f/{len(written)}", await store.put(p + f"f/{len(written)}", b"x")))
        events = []

        async def collect():
            async for batch in watch:
                events.extend(batch.events)
                if events[-1].kv.key == p + written[-1][0]:
                    return

        await asyncio.wait_for(collect(), 5)
        await watch.cancel()
        assert [(e.kv.key[len(p):], e.kv.mod_revision) for e in events] == [w for w in written if w[1] >= ahead]

    run(store_factory, body)


def test_a_transaction_reads_its_own_writes(store_factory):
    async def body(store, p):
        await store.put(p + "old", b"1")
        result = await store.txn([], [Put(p + "new", b"2"), Delete(p + "old"), Get(p + "new"), Get(p + "old"),
                                      Get(p, prefix_end(p))])
        new, old, both = result.get(2).kvs, result.get(3).kvs, result.get(4).kvs
        return [kv.value for kv in new], old, [kv.key[len(p):] for kv in both]

    assert run(store_factory, body) == ([b"2"], [], ["new"])


def test_a_transaction_reads_ranges_with_a_limit_and_keys_only(store_factory):
    async def body(store, p):
        for name in ("a", "b", "c", "d"):
            await store.put(p + name, name.encode() * 3)
        result = await store.txn([], [Get(p + "b", prefix_end(p), limit=2, keys_only=True), Get(p, p + "b"),
                                      Get(p + "a", keys_only=True)])
        return [[(kv.key[len(p):], kv.value) for kv in result.get(i).kvs] for i in range(3)]

    assert run(store_factory, body) == [[("b", b""), ("c", b"")], [("a", b"aaa")], [("a", b"")]]


def test_the_keys_of_a_lease(store_factory):
    async def body(store, p):
        lease = await store.lease_grant(10)
        await store.put(p + "a", b"", lease)
        await store.put(p + "b", b"", lease)
        await store.put(p + "c", b"")
        keys = sorted(k[len(p):] for k in await store.lease_keys(lease))
        await store.lease_revoke(lease)
        try:
            await store.lease_keys(lease)
        except LeaseLost:
            return keys, "lost"
        return keys, "alive"

    assert run(store_factory, body) == (["a", "b"], "lost")
