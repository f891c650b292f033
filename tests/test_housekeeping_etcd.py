"""Housekeeping on a real etcd: the election handed over when its holder dies, and an etcd restart
in the middle of deleting and compacting."""

from __future__ import annotations

import asyncio
import signal
import socket

import pytest
from cluster import Workers
from helpers import until, until_async
from indexes import inconsistencies

from dsm import compiler, handlers
from dsm.definitions import Registry
from dsm.errors import StoreError
from dsm.housekeeping import HousekeepingOptions
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.store.etcd import EtcdOptions, EtcdStore
from dsm.testing import make_cluster
from dsm.worker import running

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

ZERO = """
machine: zero
start: a
retention: 0
states:
  a:
    next: done
  done:
    terminal: true
"""
SLOW = """
machine: {name}
start: a
retention: {retention}
states:
  a:
    tick: hkticks:nap
    next: b
  b:
    tick: hkticks:nap
    next: done
  done:
    terminal: true
"""
TICKS = "import time\n\ndef nap(payload, ctx):\n    time.sleep(0.02)\n"


async def connect(endpoints: str, namespace: str) -> tuple[EtcdStore, Operations]:
    store = await EtcdStore.connect(EtcdOptions.build(endpoints, namespace=namespace))
    return store, Operations(store, Keys(namespace))


def poll(check, timeout: float, what: str):
    """`until`, on a store that may be restarting: a StoreError means "not yet"."""
    return until(check, what, timeout=timeout, interval=0.2, retry_on=(StoreError,))


@pytest.mark.long  # chaos: the election's holder killed
def test_the_election_passes_on_when_its_holder_dies(etcd, namespace, tmp_path, write):
    path = write("zero.yaml", ZERO)
    workers = Workers(etcd.endpoint, namespace, tmp_path / "ticks.jsonl", lease_ttl=2)
    procs = [workers.start(path), workers.start(path)]
    names = {f"{socket.gethostname()}:{p.pid}": p for p in procs}

    async def holder() -> str | None:
        store, _ = await connect(etcd.endpoint, namespace)
        try:
            kv = await store.get(Keys(namespace).housekeeper)
            return kv.value.decode() if kv is not None else None
        finally:
            await store.close()

    async def submit_and_count(n: int) -> int:
        store, client = await connect(etcd.endpoint, namespace)
        try:
            if n:
                await client.submit_many(compiler.load(path), [{}] * n)
            return len(await client.list())
        finally:
            await store.close()

    try:
        first = poll(lambda: asyncio.run(holder()), 30, "a worker elected")
        assert first in names
        asyncio.run(submit_and_count(5))
        poll(lambda: asyncio.run(submit_and_count(0)) == 0, 30, "expired instances deleted by the first holder")
        names[first].send_signal(signal.SIGKILL)  # its lease, and the election key, expire in 2s
        second = poll(lambda: (h := asyncio.run(holder())) not in (None, first) and h, 30, "the election taken over")
        assert second in names and second != first
        asyncio.run(submit_and_count(5))
        poll(lambda: asyncio.run(submit_and_count(0)) == 0, 30, "expired instances deleted by the second holder")
    finally:
        workers.stop_all()


def test_an_etcd_restart_during_housekeeping_loses_nothing(tmp_path, write):
    """Instances with no retention are deleted while others (an hour's retention) run and finish;
    etcd restarts in the middle. Afterwards every short-lived instance is gone, every other one
    has succeeded with its history and entries, and history was compacted."""
    cluster = make_cluster(1).start()
    zero = compiler.load(write("zero.yaml", SLOW.format(name="zero", retention="0"), hkticks=TICKS))
    hour = compiler.load(write("hour.yaml", SLOW.format(name="hour", retention="1h")))
    keys = Keys("restart")

    async def go():
        store = await EtcdStore.connect(EtcdOptions.build(cluster.endpoint, namespace=keys.namespace))
        registry = Registry(store, keys, allow=handlers.Allowlist(zero.modules()))
        registry.add(zero)
        registry.add(hour)
        client = Operations(store, keys)
        options = HousekeepingOptions(compaction_retention=1.0, interval=0.1, batch=8)
        try:
            async with running(store, registry, concurrency=8, lease_ttl=3.0, housekeeping=options) as worker:
                short = await client.submit_many(zero, [{}] * 60)
                kept = await client.submit_many(hour, [{}] * 30)
                await until_async(lambda: worker.housekeeper.stats.deleted >= 10, "ten instances deleted",
                                  interval=0.05)
                deleted_before = worker.housekeeper.stats.deleted
                await asyncio.to_thread(cluster.restart_member, cluster.members[0])
                # more to delete after the restart
                short += await until_async(lambda: client.submit_many(zero, [{}] * 20), "twenty more submitted",
                                           interval=0.2, retry_on=(StoreError,))

                async def only_kept() -> bool:
                    listed = await client.list()
                    return len(listed) == len(kept) and all(i.status == "succeeded" for i in listed)

                await until_async(only_kept, "only the kept instances left, succeeded", timeout=90, interval=0.2,
                                  retry_on=(StoreError,))
                compacted = worker.housekeeper.stats.compacted_to
            listed = await client.list()
            histories = {i.id: await client.history(i.id) for i in listed}
            return short, kept, deleted_before, listed, histories, compacted, await inconsistencies(store, keys)
        finally:
            await store.close()

    try:
        short, kept, deleted_before, listed, histories, compacted, problems = asyncio.run(go())
    finally:
        cluster.stop()
    assert deleted_before >= 10 and len(short) == 80  # deletions before the restart and after it
    assert sorted(i.id for i in listed) == sorted(kept)
    assert all(i.status == "succeeded" and len(histories[i.id]) == i.transitions == 2 for i in listed)
    assert problems == [] and compacted > 0
