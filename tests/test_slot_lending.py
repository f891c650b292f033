"""A tick's slot lent while its outcome commits: a token that goes on with no slot free waits for
one, its claim held. What happens to such a waiting token when the worker stops, when its
instance is cancelled, and how the worker's counters settle."""

from __future__ import annotations

import asyncio
import importlib
import time

from helpers import HeldCommits, markers_of, until_async

from dsm import compiler, handlers
from dsm.definitions import Registry
from dsm.keys import Keys, WorkInfo
from dsm.operations import Operations
from dsm.records import CANCELLED, SUCCEEDED
from dsm.store.memory import ManualClock, MemoryStore
from dsm.worker import Worker

MACHINE = """
machine: waits
start: a
states:
  a: {{tick: {module}:tick, next: b}}
  b: {{tick: {module}:tick, next: done}}
  done: {{terminal: true}}
"""

MODULE = """
import threading
calls = []
started = threading.Event()  # second's tick of `a` runs
gate = threading.Event()  # lets it end

def tick(payload, ctx):
    calls.append((ctx.instance_id, ctx.state))
    if ctx.instance_id == "second" and ctx.state == "a":
        started.set()
        gate.wait(10)
"""


class Scene:
    """One worker with one slot: instance `first` went on from `a` to `b` while `second`'s tick of
    `a` ran in the slot first's commit lent, so first's token waits for the slot, claimed."""

    def __init__(self, write, module: str, grace: float = 1.0):
        path = write("m.yaml", MACHINE.format(module=module), **{module: MODULE})
        self.graph = compiler.load(path)
        self.mod = importlib.import_module(module)
        self.grace = grace
        self.clock = ManualClock()
        self.store = HeldCommits(clock=self.clock)
        self.keys = Keys()
        self.client = Operations(self.store, self.keys)
        self.stop = asyncio.Event()

    async def start(self) -> Worker:
        registry = Registry(self.store, self.keys, allow=handlers.Allowlist(self.graph.modules()))
        registry.add(self.graph)
        self.worker = Worker(self.store, registry, worker_id="w", concurrency=1, lease_ttl=10.0)
        self.task = asyncio.get_running_loop().create_task(self.worker.run(self.stop, grace=self.grace))
        first = await self.client.submit(self.graph, {}, instance_id="first")
        self.store.key = self.keys.instance(first)
        await asyncio.wait_for(self.store.held.wait(), 10)  # first's commit of `a` waits
        await self.client.submit(self.graph, {}, instance_id="second")
        await asyncio.get_running_loop().run_in_executor(None, self.mod.started.wait, 10)
        self.store.through.set()  # first's commit goes through: its token goes on, no slot is free
        await until_async(lambda: self.worker.slots.waiting == 1, "first's token waits for a slot")
        return self.worker

    async def close(self) -> None:
        self.mod.gate.set()
        self.stop.set()
        await self.task


def test_a_worker_stopping_with_a_token_waiting_for_a_slot_does_not_wait_its_whole_grace(write):
    scene = Scene(write, "waitstopmod", grace=8.0)

    async def main():
        worker = await scene.start()
        began = time.monotonic()
        scene.stop.set()  # second's tick still runs: the worker waits for it, not for first
        await asyncio.sleep(0.2)
        scene.mod.gate.set()
        await asyncio.wait_for(scene.task, 20)
        took = time.monotonic() - began
        markers = [WorkInfo.load(kv.value) for kv in await markers_of(scene.store, scene.keys, "first")]
        return worker, took, markers

    worker, took, markers = asyncio.run(main())
    assert took < 4.0, f"the stop took {took:.1f}s of its 8s grace"
    # its claim was given back, not left to the lease's end
    assert [(m.owner, m.lease) for m in markers] == [(None, None)]
    assert worker.slots.busy == 0 and worker.slots.lent == 0 and not worker.slots.waiting
    assert ("first", "b") not in scene.mod.calls


def test_a_token_waiting_for_a_slot_whose_instance_is_cancelled_runs_no_tick(write):
    scene = Scene(write, "waitcancelmod")

    async def main():
        worker = await scene.start()
        cancelled = await scene.client.cancel("first")
        await asyncio.sleep(0.3)  # the worker hears of it
        scene.mod.gate.set()  # second's tick ends: its slot frees
        second = await scene.client.wait("second", timeout=10)
        await until_async(worker.slots.idle.is_set, "the worker settles")
        await asyncio.sleep(0.3)
        counters = (worker.slots.busy, worker.slots.lent, worker.slots.waiting, len(worker.jobs))
        await scene.close()
        return cancelled, second, counters

    cancelled, second, counters = asyncio.run(main())
    assert cancelled.status == CANCELLED and second.status == SUCCEEDED
    assert ("first", "b") not in scene.mod.calls, "a tick of a cancelled instance ran"
    assert counters == (0, 0, 0, 0)


FORK = """
machine: fan
start: s
states:
  s: {{tick: {module}:go, next: f}}
  f: {{fork: [b0, b1, b2, b3], join: j}}
  b0: {{tick: {module}:branch, next: j}}
  b1: {{tick: {module}:branch, next: j}}
  b2: {{tick: {module}:branch, next: j}}
  b3: {{tick: {module}:branch, next: j}}
  j: {{next: done}}
  done: {{terminal: true}}
"""

FORK_MODULE = """
import threading
started = threading.Event()
gate = threading.Event()

def go(payload, ctx):
    pass

def branch(payload, ctx):
    started.set()
    gate.wait(10)
"""


def test_a_fork_claims_no_more_branches_than_free_slots_and_the_waiting_room(write):
    """The forking tick's slot is lent while its commit runs, and counted free by then: it is not
    handed to a branch a second time. One slot, a waiting room of one: at most one branch runs and
    one waits, claimed; the others are left in the store for any worker."""
    graph = compiler.load(write("fan.yaml", FORK.format(module="fanwaitmod"), fanwaitmod=FORK_MODULE))
    mod = importlib.import_module("fanwaitmod")

    async def main():
        store = MemoryStore(clock=ManualClock())
        keys = Keys()
        client = Operations(store, keys)
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        worker = Worker(store, registry, worker_id="w", concurrency=1, prefetch=1, lease_ttl=10.0)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(worker.run(stop, grace=1))
        iid = await client.submit(graph, {})
        await asyncio.get_running_loop().run_in_executor(None, mod.started.wait, 10)
        await asyncio.sleep(0.3)  # the fork's commit has settled
        waiting = worker.slots.waiting
        work = await store.range(keys.work_prefix, keys.work_prefix + "\xff")
        claimed = sum(1 for kv in work.kvs if b'"w"' in kv.value)
        mod.gate.set()
        inst = await client.wait(iid, timeout=20)
        stop.set()
        await task
        return waiting, claimed, inst

    waiting, claimed, inst = asyncio.run(main())
    assert inst.status == SUCCEEDED
    assert waiting <= 1, f"{waiting} branches wait for the one slot, the waiting room holds 1"
    assert claimed <= 2, f"{claimed} branches claimed by a worker of one slot and a waiting room of 1"
