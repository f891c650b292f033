"""The worker loop over the memory store: fencing, retries, timeouts, cancel, handler results."""

from __future__ import annotations

import asyncio

import pytest
from helpers import HeldCommits, run_instances, until, until_async

from dsm import compiler, handlers
from dsm.definitions import Registry
from dsm.embedded import run_graph
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import CANCELLED, FAILED, SUCCEEDED
from dsm.store.memory import ManualClock, MemoryStore
from dsm.worker import Worker


def load(write, text, **modules):
    return compiler.load(write("m.yaml", text, **modules))


def run(graph, payload=None, **kw):
    return asyncio.run(run_graph(graph, payload or {}, timeout=kw.pop("timeout", 20), **kw))


class Harness:
    """A memory store with a manual lease clock, a client, and workers started on demand."""

    def __init__(self, graph, clock=None):
        self.clock = clock or ManualClock()
        self.store = MemoryStore(clock=self.clock)
        self.keys = Keys()
        self.graph = graph
        self.client = Operations(self.store, self.keys)
        self.running: list[tuple[Worker, asyncio.Event, asyncio.Task]] = []

    def worker(self, name: str, **kw) -> Worker:
        registry = Registry(self.store, self.keys, allow=handlers.Allowlist(self.graph.modules()))
        registry.add(self.graph)
        w = Worker(self.store, registry, worker_id=name, lease_ttl=kw.pop("lease_ttl", 10.0), **kw)
        stop = asyncio.Event()
        self.running.append((w, stop, asyncio.get_running_loop().create_task(w.run(stop, grace=1))))
        return w

    async def stop(self, worker: Worker) -> None:
        for w, stop, task in self.running:
            if w is worker:
                stop.set()
                await task

    async def close(self) -> None:
        for _, stop, _ in self.running:
            stop.set()
        await asyncio.gather(*(t for _, _, t in self.running), return_exceptions=True)


BLOCKING = """
import threading
release = threading.Event()
started = threading.Event()
calls = []

def slow(payload, ctx):
    calls.append((ctx.attempt, ctx.idempotency_key))
    if len(calls) == 1:
        started.set()
        release.wait(10)
    payload["done_by_call"] = len(calls)

def fast(payload, ctx):
    payload["fast"] = True
"""

FENCED = """
machine: fenced
start: s
states:
  s:
    tick: blockmod:slow
    next: t
  t:
    tick: blockmod:fast
    next: done
  done:
    terminal: true
"""


def test_a_worker_that_lost_its_lease_cannot_commit(write):
    graph = load(write, FENCED, blockmod=BLOCKING)
    import blockmod

    async def main():
        h = Harness(graph)
        first = h.worker("first")
        iid = await h.client.submit(graph, {})
        await asyncio.get_running_loop().run_in_executor(None, blockmod.started.wait, 5)
        # The first worker stalls past its lease (as if SIGSTOPped): its entry, and so its claim, expires.
        h.clock.advance(11)
        second = h.worker("second")
        inst = await h.client.wait(iid, timeout=10)
        blockmod.release.set()  # the stalled tick finishes now; its commit must be refused
        await until_async(lambda: first.stats.lost >= 1)
        history = await h.client.history(iid)
        await h.close()
        return inst, history, first, second

    inst, history, first, second = asyncio.run(main())
    assert inst.status == SUCCEEDED and inst.payload["done_by_call"] == 2
    assert [(e.state, e.worker) for e in history] == [("s", "second"), ("t", "second")]
    assert first.stats.committed == 0 and first.stats.lost == 1
    # the tick ran twice (at least once), with one idempotency key for that visit
    assert len(blockmod.calls) == 2 and blockmod.calls[0][1] == blockmod.calls[1][1]


def test_graceful_stop_hands_claims_to_another_worker(write):
    graph = load(write, FENCED.replace("blockmod", "blockmod2"), blockmod2=BLOCKING)
    import blockmod2

    async def main():
        h = Harness(graph)
        first = h.worker("first")
        iid = await h.client.submit(graph, {})
        await asyncio.get_running_loop().run_in_executor(None, blockmod2.started.wait, 5)
        stopping = asyncio.get_running_loop().create_task(h.stop(first))  # grace 1s, then revoke
        await stopping
        h.worker("second")
        inst = await h.client.wait(iid, timeout=10)
        blockmod2.release.set()
        history = await h.client.history(iid)
        await h.close()
        return inst, history

    inst, history = asyncio.run(main())
    assert inst.status == SUCCEEDED
    assert [e.worker for e in history] == ["second", "second"]


def test_retries_wait_durably_and_keep_the_idempotency_key(write):
    graph = load(write, """
        machine: retry
        start: s
        states:
          s:
            tick: flaky:call
            retry: {max_attempts: 3, backoff: 100ms, jitter: false}
            next: again
          again:
            tick: flaky:call
            next: done
          done:
            terminal: true
        """, flaky="""
        import time
        seen = []

        def call(payload, ctx):
            seen.append((ctx.state, ctx.attempt, ctx.idempotency_key, time.monotonic()))
            if ctx.state == "s" and ctx.attempt < 3:
                raise ConnectionError("try again")
        """)
    import flaky

    result = run(graph)
    assert result.instance.status == SUCCEEDED
    s_calls = [c for c in flaky.seen if c[0] == "s"]
    assert [c[1] for c in s_calls] == [1, 2, 3]
    assert len({c[2] for c in s_calls}) == 1  # one visit, one key
    again_key = [c[2] for c in flaky.seen if c[0] == "again"][0]
    assert again_key != s_calls[0][2]  # the next visit gets a new key
    assert s_calls[1][3] - s_calls[0][3] >= 0.09 and s_calls[2][3] - s_calls[1][3] >= 0.18
    assert [e.attempt for e in result.history] == [3, 1]


def test_timeout_fails_the_attempt_then_catch(write):
    graph = load(write, """
        machine: slow
        start: s
        states:
          s:
            tick: sleepy:nap
            timeout: 100ms
            retry: {max_attempts: 2, backoff: 10ms}
            catch: rescue
            next: done
          rescue:
            next: done
          done:
            terminal: true
        """, sleepy="""
        import time
        from dsm import AttemptAbandoned

        beats = []

        def nap(payload, ctx):
            deadline = time.monotonic() + 30  # until told it was abandoned, however loaded the machine
            while time.monotonic() < deadline:
                time.sleep(0.01)
                try:
                    ctx.heartbeat()
                except AttemptAbandoned as exc:
                    beats.append(str(exc))
                    raise
        """)
    import sleepy

    result = run(graph)
    assert result.instance.status == SUCCEEDED
    error = result.instance.payload["error"]
    assert error["type"] == "TimeoutError" and error["attempts"] == 2 and error["state"] == "s"
    assert "timed out after 0.1s" in error["message"]
    # the abandoned attempts learn it through heartbeat(), on their own threads
    until(lambda: sleepy.beats, "an abandoned attempt told so by heartbeat()")


@pytest.mark.parametrize("body,kind,words", [
    ("return {'x': {1, 2}}", "InvalidPayload", "payload.x is a set"),
    ("return {'x': float('nan')}", "InvalidPayload", "payload.x is nan"),
    ("return {1: 'a'}", "InvalidPayload", "key 1 of type int"),
    ("return ['not', 'a', 'dict']", "InvalidResult", "returned list"),
    ("return {'big': 'x' * (2 * 1024 * 1024)}", "PayloadTooLarge", "the limit is 1048576 bytes"),
    ("return {'s': 'a\\ud800b'}", "InvalidPayload", "payload.s holds a lone surrogate '\\ud800'"),
    ("return {'a': [{'\\udc80': 1}]}", "InvalidPayload", "payload.a[0] has a key holding a lone surrogate"),
    ("return {'n': -10 ** 5000}", "InvalidPayload", "payload.n is an integer of more than 4300 digits"),
    ("return 'label'", "InvalidOutcome", "returned outcome label 'label'"),
    ("raise KeyError('missing')", "KeyError", "missing"),
])
def test_bad_handler_results_fail_with_clear_errors(write, body, kind, words):
    graph = load(write, """
        machine: bad
        start: s
        states:
          s:
            tick: badmod:h
            retry: {max_attempts: 2, backoff: 0, non_retryable: [LookupError]}
            next: done
          done:
            terminal: true
        """, badmod=f"def h(payload, ctx):\n    {body}\n")
    result = run(graph)
    inst = result.instance
    assert inst.status == FAILED and inst.error.type == kind and inst.error.state == "s"
    assert inst.error.attempts == 1  # none of these is retried
    assert words in inst.error.message
    if kind != "KeyError":
        assert "'s'" in inst.error.message


def test_integers_of_up_to_4300_digits_keep_their_exact_value(write):
    graph = load(write, """
        machine: big
        start: s
        states:
          s:
            tick: bigmod:h
            next: done
          done:
            terminal: true
        """, bigmod="def h(payload, ctx):\n    return {'n': payload['n'] * 10 - 1, 'm': -(10 ** 4300 - 1)}\n")
    result = run(graph, {"n": 10 ** 4299})  # 4300 digits in, 4300 nines out
    assert result.instance.status == SUCCEEDED, result.instance.error
    assert result.instance.payload == {"n": 10 ** 4300 - 1, "m": -(10 ** 4300 - 1)}


def test_async_handlers_are_awaited_and_ticks_overlap(write):
    graph = load(write, """
        machine: par
        start: f
        states:
          f:
            fork: [a, b, c]
            join: j
          a: {tick: par_h:blocking, next: j}
          b: {tick: par_h:blocking, next: j}
          c: {tick: par_h:coroutine, next: j}
          j: {next: done}
          done: {terminal: true}
        """, par_h="""
        import asyncio, threading, time
        active = []
        peak = []

        def blocking(payload, ctx):
            active.append(1); peak.append(len(active)); time.sleep(0.3); active.pop()
            return {ctx.state: threading.current_thread().name}

        async def coroutine(payload, ctx):
            active.append(1); peak.append(len(active)); await asyncio.sleep(0.3); active.pop()
            return {"c": ctx.branch}
        """)
    import par_h

    result = run(graph, workers=4)
    assert result.instance.status == SUCCEEDED
    assert result.instance.payload["c"] == ["c"]
    assert result.instance.payload["a"] != result.instance.payload["b"]  # two threads
    assert max(par_h.peak) == 3  # the three ticks overlapped


def test_cancel_stops_an_instance_and_abandons_its_tick(write):
    graph = load(write, FENCED.replace("blockmod", "cancelmod"), cancelmod="""
        import threading
        from dsm import AttemptAbandoned
        started = threading.Event()
        outcome = []

        def slow(payload, ctx):
            started.set()
            for _ in range(500):
                try:
                    ctx.heartbeat()
                except AttemptAbandoned as exc:
                    outcome.append(str(exc))
                    raise
                threading.Event().wait(0.01)

        def fast(payload, ctx):
            pass
        """)
    import cancelmod

    async def main():
        h = Harness(graph)
        worker = h.worker("w")
        iid = await h.client.submit(graph, {})
        await asyncio.get_running_loop().run_in_executor(None, cancelmod.started.wait, 5)
        cancelled = await h.client.cancel(iid)
        await until_async(lambda: bool(cancelmod.outcome), "the tick told it was abandoned")
        await until_async(worker.slots.idle.is_set, "the worker settled the abandoned tick")
        inst = await h.client.instance(iid)
        history = await h.client.history(iid)
        work = await h.store.range(h.keys.work_prefix, h.keys.work_prefix + "\xff")
        await h.close()
        return cancelled, inst, history, work

    cancelled, inst, history, work = asyncio.run(main())
    assert cancelled.status == CANCELLED and inst.status == CANCELLED
    assert history == [] and work.kvs == []
    assert "removed" in cancelmod.outcome[0]


def test_context_fields(write):
    graph = load(write, """
        machine: ctxm
        start: f
        states:
          f: {fork: [a, b], join: j}
          a: {tick: ctxmod:record, next: j}
          b: {tick: ctxmod:record, next: j}
          j: {tick: ctxmod:record, timeout: 5s, next: done}
          done: {terminal: true}
        """, ctxmod="""
        import time
        seen = {}

        def record(payload, ctx):
            seen[ctx.state] = dict(instance=ctx.instance_id, machine=ctx.machine, attempt=ctx.attempt,
                                   branch=ctx.branch, key=ctx.idempotency_key,
                                   deadline=None if ctx.deadline is None else ctx.deadline - time.time())
        """)
    import ctxmod

    result = run(graph)
    iid = result.instance.id
    assert ctxmod.seen["a"]["branch"] == ("a",) and ctxmod.seen["j"]["branch"] == ()
    assert {v["instance"] for v in ctxmod.seen.values()} == {iid}
    assert {v["machine"] for v in ctxmod.seen.values()} == {"ctxm"}
    assert len({v["key"] for v in ctxmod.seen.values()}) == 3
    # the 5s timeout, counted from the claim
    assert ctxmod.seen["a"]["deadline"] is None and 0 < ctxmod.seen["j"]["deadline"] <= 5


def test_many_instances_in_one_store(write):
    graph = compiler.load("definitions/order.yaml")
    bodies = [{"total": i, "address": "a", "pick_seconds": 0, "bill_seconds": 0} for i in range(60)]
    done, _, _ = asyncio.run(run_instances(MemoryStore(), graph, bodies, concurrency=16))
    statuses = [(i.status, i.state) for i in done]
    assert statuses.count(("failed", "cancelled")) == 1  # total 0 is rejected
    assert statuses.count(("succeeded", "done")) == 59
    assert sorted({i.transitions for i in done}) == [2, 6]  # rejected; shipped (all totals <= 100)


def test_integers_beyond_64_bits_survive_the_store_exactly(write):
    graph = load(write, """
        machine: bigint
        start: s
        states:
          s: {tick: bigmod:make, fork: [a, b], join: j}
          a: {tick: bigmod:grow, next: j}
          b: {next: j}
          j: {next: done}
          done: {terminal: true}
        """, bigmod="""
        def make(payload, ctx):
            payload["big"] = 2 ** 70 + 1
            payload["small"] = -(2 ** 70)
            payload["list"] = [2 ** 64, 1.5]

        def grow(payload, ctx):
            payload["grown"] = payload["big"] * 2
        """)
    result = run(graph)
    assert result.instance.status == SUCCEEDED
    assert result.instance.payload == {"big": 2 ** 70 + 1, "small": -(2 ** 70), "list": [2 ** 64, 1.5],
                                       "grown": 2 ** 71 + 2}
    assert type(result.instance.payload["grown"]) is int


FANNED = """
machine: fan
start: s
states:
  s: {tick: fanmod:go, next: f}
  f: {fork: [b0, b1, b2, b3], join: j}
  b0: {tick: fanmod:branch, next: j}
  b1: {tick: fanmod:branch, next: j}
  b2: {tick: fanmod:branch, next: j}
  b3: {tick: fanmod:branch, next: j}
  j: {next: done}
  done: {terminal: true}
"""

FANNED_PY = """
import threading
started = threading.Event()
gate = threading.Event()

def go(payload, ctx):
    pass

def branch(payload, ctx):
    started.set()
    gate.wait(10)
"""


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "guarded"])
def test_forks_committing_together_claim_no_more_branches_than_the_slots_and_waiting_room(write, guarded):
    """Commits in flight are planned before any of them is answered: each fork would count the
    same free slots and waiting room, and claim that many branches. Four forks of four branches
    on a worker of 4 slots and a waiting room of 4 claim at most 8 branches between them; the
    others wait in the store for any worker. A machine with guards has its commits planned on a
    thread: those plans are made side by side too."""
    text = FANNED.replace("{tick: fanmod:go, next: f}", '{tick: fanmod:go, choose: [{when: "true", next: f}]}')
    graph = compiler.load(write("fan.yaml", text if guarded else FANNED, fanmod=FANNED_PY))
    assert graph.has_guards() is guarded
    import fanmod

    async def main():
        store = HeldCommits(clock=ManualClock())
        keys = Keys()
        client = Operations(store, keys)
        ids = [f"f{n}" for n in range(4)]
        for iid in ids:
            await client.submit(graph, {}, instance_id=iid)
        store.keys = {keys.instance(iid) for iid in ids}  # their commits wait until let through
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        worker = Worker(store, registry, worker_id="w", concurrency=4, prefetch=4, lease_ttl=10.0)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(worker.run(stop, grace=1))
        await asyncio.wait_for(store.held.wait(), 10)
        await asyncio.sleep(0.3)  # the four forks' ticks end and their commits are planned, in flight together
        store.through.set()
        await asyncio.get_running_loop().run_in_executor(None, fanmod.started.wait, 10)
        await asyncio.sleep(0.3)  # the forks' commits have settled
        work = await store.range(keys.work_prefix, keys.work_prefix + "\xff")
        claimed = sum(1 for kv in work.kvs if b'"w"' in kv.value)
        waiting = worker.slots.waiting
        fanmod.gate.set()
        done = [await client.wait(iid, timeout=20) for iid in ids]
        stop.set()
        await task
        return claimed, waiting, done

    claimed, waiting, done = asyncio.run(main())
    assert [inst.status for inst in done] == [SUCCEEDED] * 4
    assert claimed <= 8, f"{claimed} branches claimed by a worker of 4 slots and a waiting room of 4"
    assert waiting <= 4, waiting
