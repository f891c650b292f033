"""The work feed on both stores: nothing that changes while it pages is missed, and work dropped
while the queue was full comes back without waiting for the idle sweep."""

from __future__ import annotations

import asyncio
import time
import uuid

from helpers import until_async

from dsm.keys import Keys, TokenRef, WorkInfo
from dsm.store import prefix_end
from dsm.worker.feed import WorkFeed
from dsm.worker.queue import CandidateQueue

INFO = WorkInfo("m", "sha256:x", "s").dump()


def token(keys, iid):
    """Token t1 of instance `iid` of machine m, created at 0."""
    return TokenRef(iid, "t1", keys.place("m", 0, iid))


def marker(keys, iid):
    return token(keys, iid).key


def claimed(owner, lease):
    """A marker claimed by worker `owner` under `lease` (the claim is the marker's value)."""
    return WorkInfo("m", "sha256:x", "s", owner=owner, lease=lease).dump()


async def live_worker(store, keys, name):
    """A worker's entry under a lease of its own: its claims hold while it lives."""
    lease = await store.lease_grant(30)
    await store.put(keys.worker(name), b"{}", lease)
    return lease


def feed_on(store, keys, cap, page_size=1000):
    queue = CandidateQueue(time.monotonic, cap)
    feed = WorkFeed(store, keys, queue, name="test", admits=lambda ref, info: True, held=lambda *a: None,
                    page_size=page_size)
    return feed, queue


def run(store_factory, body):
    async def main():
        store = await store_factory()
        try:
            return await body(store, Keys("f" + uuid.uuid4().hex[:10]))
        finally:
            await store.close()

    return asyncio.run(main())


def test_work_dropped_while_the_queue_is_full_comes_back(store_factory):
    async def body(store, keys):
        lease = await live_worker(store, keys, "other")
        await store.put(marker(keys, "i0"), claimed("other", lease))  # held elsewhere while we resync
        for i in range(1, 6):
            await store.put(marker(keys, f"i{i}"), INFO)
        feed, queue = feed_on(store, keys, cap=2)
        revision = await feed.resync()
        taken = queue.take(10)
        # the other worker dies: its entry goes while our queue is full again
        assert queue.add(("x", "1")) and queue.add(("x", "2"))
        watch = await store.watch(*keys.watch_range, start_revision=revision + 1)
        await store.lease_revoke(lease)
        async for batch in watch:
            feed.apply(batch.events)
            break
        await watch.cancel()
        queue.discard(("x", "1"))
        queue.discard(("x", "2"))
        for _ in range(10):  # drain as the dispatcher does: take, page when behind
            taken += queue.take(10)
            if not feed.behind:
                break
            await feed.page()
        return sorted({ref[0] for ref in taken})  # unclaimed here, so a later pass may offer some again

    assert run(store_factory, body) == [f"i{i}" for i in range(6)]


class _ChangeBetweenPages:
    """A store whose first page of work markers is followed, before the next page, by another write."""

    def __init__(self, store, keys, change):
        self.store = store
        self.keys = keys
        self.change = change
        self.pages = 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def range(self, start, *args, **kwargs):
        result = await self.store.range(start, *args, **kwargs)
        if start.startswith(self.keys.work_prefix):
            self.pages += 1
            if self.pages == 1:
                await self.change()
        return result


def test_a_change_between_pages_of_a_resync_is_not_missed(store_factory):
    async def body(store, keys):
        lease = await live_worker(store, keys, "other")
        await store.put(marker(keys, "a"), claimed("other", lease))  # page 1 sees it claimed
        for i in range(6):
            await store.put(marker(keys, f"z{i}"), INFO)

        async def release():
            await store.lease_revoke(lease)  # ... and then its owner's entry goes, before page 2

        wrapped = _ChangeBetweenPages(store, keys, release)
        feed, queue = feed_on(wrapped, keys, cap=100, page_size=2)
        task = asyncio.get_running_loop().create_task(feed.run())
        try:
            return await until_async(lambda: token(keys, "a") in queue, "the token freed between pages queued")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert run(store_factory, body)


def test_a_claim_lost_under_a_running_job_comes_back_when_the_job_ends(store_factory):
    """Regression: a worker whose lease was revoked (by a peer that took it for dead, or by another
    etcd user) saw its claims go while its jobs still ran; the token was left to the job, which
    could no longer commit it, and waited for the idle sweep."""

    async def body(store, keys):
        ref = token(keys, "i1")
        lease = await live_worker(store, keys, "test")
        await store.put(ref.key, claimed("test", lease))
        told = []
        queue = CandidateQueue(time.monotonic)
        feed = WorkFeed(store, keys, queue, name="test", admits=lambda ref, info: True,
                        held=lambda ref, revision, why: told.append(why))
        revision = await feed.resync()
        watch = await store.watch(*keys.watch_range, start_revision=revision + 1)
        await store.lease_revoke(lease)
        async for batch in watch:
            feed.apply(batch.events)
            break
        await watch.cancel()
        while_running = queue.take(10, busy={ref})
        queue.requeue(ref)  # the job ends
        return told, while_running, [r[:2] for r in queue.take(10)]

    told, while_running, after = run(store_factory, body)
    assert len(told) == 1 and "claim was lost" in told[0]
    assert while_running == [] and after == [("i1", "t1")]


def test_a_wait_replayed_by_a_resumed_watch_counts_from_when_it_was_written(store_factory):
    """A marker's wait counts from when a worker learns of it: at once, by a live watch event. A
    watch resumed after etcd was away replays events written long before (the response carries
    the store's later revision): their wait is what is left of it by the clock, or every timer
    armed just before an etcd restart fires as late as the restart took."""
    async def body(store, keys):
        feed, queue = feed_on(store, keys, cap=100)
        feed.wall = lambda: 1003.0  # three seconds after the markers below were written
        armed = WorkInfo("m", "sha256:x", "nap", not_before=1005.0, wait=5.0).dump()
        start = await store.revision()
        await store.put(marker(keys, "old"), armed)
        await store.put(keys.instance("other"), b"{}")  # the store moves on while the worker is away
        replay = await store.watch(keys.work_prefix, prefix_end(keys.work_prefix), start_revision=start + 1)
        async for batch in replay:
            feed.apply(batch.events, batch.revision)
            break
        await replay.cancel()
        replayed = queue.next_delay()
        queue.discard(token(keys, "old"))
        live = await store.watch(keys.work_prefix, prefix_end(keys.work_prefix))
        await store.put(marker(keys, "new"), armed)
        async for batch in live:
            feed.apply(batch.events, batch.revision)
            break
        await live.cancel()
        return replayed, queue.next_delay()

    replayed, live = run(store_factory, body)
    assert 1.5 < replayed <= 2.0  # what is left of it: 1005 - 1003
    assert 4.5 < live <= 5.0  # the whole wait: a live event was written just now, whatever the clocks say
