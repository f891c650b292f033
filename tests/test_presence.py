"""Workers register themselves with what they serve, and skip work they cannot run quietly, on
both stores: one warning per definition, no claim taken again and again, and the work left for a
worker that can run it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from helpers import until_async

from dsm import compiler, handlers
from dsm.definitions import Registry
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import SUCCEEDED
from dsm.worker import running

SERVED = """
machine: served
start: a
states:
  a:
    tick: servedmod:tick
    next: done
  done:
    terminal: true
"""
SERVED_PY = """
import threading
release = threading.Event()

def tick(payload, ctx):
    if payload.get("hold"):
        release.wait(10)
"""
ELSEWHERE = SERVED.replace("served", "elsewhere")
ELSEWHERE_PY = "def tick(payload, ctx):\n    pass\n"


def on_store(store_factory, namespace, body):
    async def main():
        store = await store_factory()
        try:
            return await body(store, Keys(namespace))
        finally:
            await store.close()

    return asyncio.run(main())


def test_a_worker_lists_itself_with_what_it_serves_while_it_lives(store_factory, namespace, write):
    graph = compiler.load(write("served.yaml", SERVED, servedmod=SERVED_PY))
    import servedmod

    async def body(store, keys):
        client = Operations(store, keys)
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        async with running(store, registry, concurrency=3, worker_id="w-1", presence_interval=0.05):
            await until_async(lambda: _count(client, 1))
            (idle,) = await client.workers()
            await client.submit(graph, {"hold": True})
            await until_async(lambda: _in_flight(client, 1))
            (busy,) = await client.workers()
            servedmod.release.set()
            await until_async(lambda: _in_flight(client, 0))
        return idle, busy, await client.workers()

    idle, busy, after = on_store(store_factory, namespace, body)
    shown = idle.as_dict()
    assert (shown["id"], shown["host"], shown["pid"], shown["concurrency"], shown["in_flight"]) == (
        "w-1", socket.gethostname(), os.getpid(), 3, 0)
    assert shown["definitions"] == [{"machine": "served", "version": None, "digest": graph.digest}]
    assert shown["allow"] == ["servedmod"] and shown["refused"] == []
    assert busy.in_flight == 1
    assert after == []  # a worker that stopped is gone from the list at once


async def _count(client, n):
    return len(await client.workers()) == n


async def _in_flight(client, n):
    workers = await client.workers()
    return bool(workers) and workers[0].in_flight == n


def test_work_no_worker_can_run_is_skipped_quietly_and_left_for_one_that_can(store_factory, namespace, write,
                                                                             caplog):
    served = compiler.load(write("served.yaml", SERVED, servedmod=SERVED_PY))
    elsewhere = compiler.load(write("elsewhere.yaml", ELSEWHERE, elsewheremod=ELSEWHERE_PY))
    caplog.set_level(logging.DEBUG, logger="dsm")

    async def body(store, keys):
        client = Operations(store, keys)
        ids = await client.submit_many(elsewhere, [{"n": i} for i in range(20)])
        workers = []
        for name in ("a", "b"):  # each serves `served` only: `elsewheremod` is not in its allowlist
            registry = Registry(store, keys, allow=handlers.Allowlist(served.modules()))
            registry.add(served)
            workers.append(running(store, registry, concurrency=4, worker_id=name, presence_interval=0.05,
                                   lease_ttl=1.5))  # a heartbeat every half second
        async with workers[0] as a, workers[1] as b:
            await until_async(lambda: _refused_by(client, elsewhere.digest, 2))
            beats = {w.id: w.updated_at for w in await client.workers()}
            # each worker beats again after it refused: one in a busy loop would have claimed, refused
            # and given back, again and again, meanwhile
            await until_async(lambda: _beaten_since(client, beats))
            claims = a.stats.claimed + b.stats.claimed
            live, serving = await client.serving(elsewhere.digest)
            registry = Registry(store, keys, allow=handlers.Allowlist(elsewhere.modules()))
            async with running(store, registry, concurrency=4, worker_id="c"):
                done = await asyncio.gather(*(client.wait(i, timeout=30) for i in ids))
                live_after, serving_after = await client.serving(elsewhere.digest)
        return claims, live, serving, done, [w.id for w in serving_after]

    claims, live, serving, done, serving_after = on_store(store_factory, namespace, body)
    # about once per instance by each worker that cannot run it (a busy loop would claim hundreds of
    # times between two beats); an instance claimed while its definition is still being refused, or whose
    # give-back crosses the refusal, may be claimed once more
    assert claims <= 3 * 20
    assert sorted(w.id for w in live) == ["a", "b"] and serving == []
    assert all(w.refused[0].machine == "elsewhere" for w in live)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("dsm")]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per worker, for the definition
    assert all("cannot run definition" in r.getMessage() and "elsewhere" in r.getMessage() for r in warnings)
    assert all(inst.status == SUCCEEDED for inst in done)
    assert "c" in serving_after


async def _beaten_since(client, beats):
    return all(w.updated_at > beats[w.id] for w in await client.workers())


async def _refused_by(client, digest, n):
    return sum(any(d.digest == digest for d in w.refused) for w in await client.workers()) == n
