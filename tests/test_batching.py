"""The batcher under a store that stops answering (as etcd does while it elects a leader)."""

from __future__ import annotations

import asyncio

from helpers import until_async

from dsm.batching import Batcher
from dsm.store import Compare, Get, Put, Txn
from dsm.store.memory import MemoryStore


class StuckStore(MemoryStore):
    """Transactions that write a key under /stuck/ wait until `release` is set; others answer."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.waiting = 0

    async def txn(self, compare, success=(), failure=()):
        if any(key.startswith("/stuck/") for key in _keys(success)):
            self.waiting += 1
            await self.release.wait()
        return await super().txn(compare, success, failure)


def _keys(ops):
    for op in ops:
        if isinstance(op, Txn):
            yield from _keys(op.success)
        else:
            yield op.key


def put(key: str) -> Txn:
    return Txn([Compare.version(key, "==", 0)], [Put(key, b"v"), Get(key)])


def test_stuck_batches_do_not_hold_up_later_ones():
    async def go() -> tuple[list[bool], bool]:
        store = StuckStore()
        batcher = Batcher(store, inflight=2, slow=0.05, max_inflight=4)
        first = []
        for i in range(2):  # one at a time, so that both runners are stuck, each on its own batch
            first.append(asyncio.ensure_future(batcher.submit(put(f"/stuck/{i}"))))
            await until_async(lambda i=i: store.waiting > i, f"batch {i} stuck in the store")
        later = [await asyncio.wait_for(batcher.submit(put(f"/later/{i}")), 30) for i in range(3)]
        held = not any(f.done() for f in first)
        store.release.set()
        early = await asyncio.gather(*first)
        return [r.succeeded for r in later + early], held

    results, held = asyncio.run(go())
    assert results == [True] * 5
    assert held  # the later ones went through while the first two were still stuck


def test_an_answering_store_gets_full_batches_from_at_most_two_runners():
    async def go() -> tuple[int, int]:
        store = MemoryStore()
        batcher = Batcher(store, max_ops=16, inflight=2, slow=10.0)
        results = await asyncio.gather(*(batcher.submit(put(f"/k{i}")) for i in range(64)))
        assert all(r.succeeded for r in results)
        return batcher.batches, batcher.sent

    batches, sent = asyncio.run(go())
    assert sent == 64 and batches <= 5  # 1 + 1 sent at once, then full batches of 16
