"""The worker's recovery paths, driven by a store that fails on purpose (around a faithful model)."""

from __future__ import annotations

import asyncio

from helpers import run_instances

from dsm import compiler
from dsm.audit import audit
from dsm.errors import StoreUnavailable
from dsm.records import SUCCEEDED
from dsm.store import Put, Txn
from dsm.store.memory import MemoryStore
from dsm.worker import Worker

ORDER = compiler.load("definitions/order.yaml")


def _writes_records(ops) -> bool:
    return any((isinstance(op, Put) and "/inst/" in op.key) or (isinstance(op, Txn) and _writes_records(op.success))
               for op in ops)


class AmbiguousCommits(MemoryStore):
    """Applies every third commit (or batch of commits) and then reports a timeout: the worker
    cannot know whether it applied."""

    def __init__(self) -> None:
        super().__init__()
        self.commits = 0
        self.lied = 0

    async def txn(self, compare, success=(), failure=()):
        result = await super().txn(compare, success, failure)
        if _writes_records(success) and (compare or any(isinstance(op, Txn) for op in success)):
            self.commits += 1
            if self.commits % 3 == 0:
                self.lied += 1
                raise StoreUnavailable("deadline exceeded (applied anyway)")
        return result


class BrokenWatches(MemoryStore):
    """Breaks each work watch after a few batches; compacts history while it is down."""

    def __init__(self) -> None:
        super().__init__()
        self.breaks = 0

    async def watch(self, start, end=None, *, start_revision=0):
        inner = await super().watch(start, end, start_revision=start_revision)
        if "/work/" not in start:
            return inner
        store = self

        class Flaky:
            async def cancel(self):
                await inner.cancel()

            def __aiter__(self):
                return self.iterate()

            async def iterate(self):
                count = 0
                async for batch in inner:
                    yield batch
                    count += 1
                    if count == 3 and store.breaks < 5:
                        store.breaks += 1
                        await inner.cancel()
                        await store.put("/filler", b"x")
                        await store.compact(await store.revision())  # the revision it resumes from is gone
                        raise StoreUnavailable("watch stream reset")

        return Flaky()


async def run_many(store: MemoryStore, count: int = 30) -> tuple[list, Worker]:
    payloads = [{"total": 50 + i, "pick_seconds": 0.001, "bill_seconds": 0.001} for i in range(count)]
    done, histories, worker = await run_instances(store, ORDER, payloads, concurrency=6)
    return list(zip(done, histories)), worker


def test_a_commit_in_doubt_is_re_read_not_repeated():
    store = AmbiguousCommits()
    results, worker = asyncio.run(run_many(store))
    assert store.lied >= 3
    for inst, history in results:
        assert inst.status == SUCCEEDED and inst.state == "done"
        assert audit(ORDER, inst, history) == []
        assert [h.seq for h in history] == list(range(1, 7))


def test_a_watch_resumed_from_a_compacted_revision_resyncs():
    store = BrokenWatches()
    results, worker = asyncio.run(run_many(store))
    assert store.breaks >= 1
    for inst, history in results:
        assert inst.status == SUCCEEDED and audit(ORDER, inst, history) == []
