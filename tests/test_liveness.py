"""No instance stuck while a worker lives: claims whose outcome was lost, errors inside a job,
a lease refused on commit, handlers that ignore their timeout, transactions over etcd's limits.

Each test is a bug that once left an instance `running` for ever with a live worker. They wait
for the instance with a generous bound: a stuck instance never finishes, a healthy one does in
well under a second, so the bound only decides how long a failure takes to show.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from faults import LateStore, is_claim, is_commit, is_fork_commit, ops_of
from helpers import markers_of, until_async

from dsm import compiler, handlers
from dsm.definitions import Registry
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import CANCELLED, FAILED, SUCCEEDED
from dsm.store import Put
from dsm.store.memory import MemoryStore
from dsm.worker import running

FORK = """
machine: forky
start: a
states:
  a: {tick: lv:step, fork: [b, c], join: d}
  b: {tick: lv:step, next: d}
  c: {tick: lv:step, next: d}
  d: {tick: lv:step, next: done}
  done: {terminal: true}
"""

LV = """
def step(payload, ctx):
    payload[ctx.state] = True
"""

BOUND = 20.0


async def drive(store, graph, *, payloads=({},), registry_has_graph=True, keys=None, **options):
    keys = keys or Keys()
    registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
    if registry_has_graph:
        registry.add(graph)
    client = Operations(store, keys)
    await client.register(graph)
    options.setdefault("audit_interval", 0.1)
    async with running(store, registry, grace=1, **options) as worker:
        ids = [await client.submit(graph, dict(p)) for p in payloads]
        done = await asyncio.gather(*(client.wait(i, timeout=BOUND) for i in ids))
    return done, worker


def test_an_ambiguous_fork_commit_leaves_no_branch_claimed(write):
    graph = compiler.load(write("f.yaml", FORK, lv=LV))
    store = LateStore(MemoryStore())
    store.lose_answer(is_fork_commit, when="before_write")  # applies just before the worker's retry
    (inst,), worker = asyncio.run(drive(store, graph, concurrency=4))
    assert store.injected == 1
    assert inst.status == SUCCEEDED
    assert sorted(inst.payload) == ["a", "b", "c", "d"]
    assert worker.stats.given_back >= 1  # the branches claimed by the late commit, with no job


def test_an_ambiguous_claim_is_given_back(write):
    graph = compiler.load(write("f.yaml", FORK, lv=LV))
    store = LateStore(MemoryStore())
    store.lose_answer(is_claim)
    (inst,), worker = asyncio.run(drive(store, graph, concurrency=1))
    assert store.injected == 1
    assert inst.status == SUCCEEDED
    assert worker.stats.given_back == 1


def test_an_error_while_working_on_a_token_gives_its_claim_back(write):
    graph = compiler.load(write("f.yaml", FORK, lv=LV))
    store = LateStore(MemoryStore())
    store.fail_get(lambda key: "/def/" in key)  # the definition cannot be fetched, once
    (inst,), _ = asyncio.run(drive(store, graph, registry_has_graph=False, concurrency=2))
    assert store.injected == 1
    assert inst.status == SUCCEEDED and inst.transitions == 4


def test_a_commit_refused_for_its_lease_is_re_read_not_dropped(write):
    graph = compiler.load(write("f.yaml", FORK, lv=LV))
    store = LateStore(MemoryStore())
    store.refuse_lease(is_commit)
    (inst,), _ = asyncio.run(drive(store, graph, concurrency=2))
    assert store.injected == 1
    assert inst.status == SUCCEEDED and sorted(inst.payload) == ["a", "b", "c", "d"]


HOG = """
machine: hog
start: sleep
states:
  sleep:
    tick: hogmod:forever
    timeout: 200ms
    retry: {max_attempts: 8, backoff: 10ms}
    catch: caught
    next: done
  caught: {next: done}
  done: {terminal: true}
"""

QUICK = """
machine: quick
start: s
states:
  s: {tick: hogmod:quick, next: done}
  done: {terminal: true}
"""

HOGMOD = """
import threading
never = threading.Event()

def forever(payload, ctx):
    never.wait()  # ignores its timeout and its heartbeat

def quick(payload, ctx):
    payload["quick"] = True
"""


async def hog_and_quick(store, hog, quick, keys):
    registry = Registry(store, keys, allow=handlers.Allowlist(hog.modules()))
    registry.add(hog)
    registry.add(quick)
    client = Operations(store, keys)
    async with running(store, registry, concurrency=1, grace=0.5):
        h = await client.submit(hog, {})
        hog_done = await client.wait(h, timeout=BOUND)  # eight attempts, each abandoned at its timeout
        q = await client.submit(quick, {})
        return hog_done, await client.wait(q, timeout=BOUND)


@pytest.mark.etcd
def test_handlers_that_ignore_their_timeout_do_not_use_up_the_worker(write, etcd_url, namespace):
    from dsm.store.etcd import EtcdOptions, EtcdStore

    hog = compiler.load(write("hog.yaml", HOG, hogmod=HOGMOD))
    quick = compiler.load(write("quick.yaml", QUICK))

    async def main():
        store = await EtcdStore.connect(EtcdOptions.build(etcd_url))
        try:
            return await hog_and_quick(store, hog, quick, Keys(namespace))
        finally:
            await store.close()

    hog_done, quick_done = asyncio.run(main())
    assert hog_done.status == SUCCEEDED and hog_done.payload["error"]["type"] == "TimeoutError"
    assert hog_done.payload["error"]["attempts"] == 8
    assert quick_done.status == SUCCEEDED and quick_done.payload == {"quick": True}


def wide(n: int, *, tick_branches: bool = True, fail_one: bool = False) -> str:
    branch = "{tick: widemod:ok, next: j}" if tick_branches else "{next: j}"
    lines = [f"  b{i}: {branch}" for i in range(n)]
    if fail_one:
        lines[0] = "  b0: {tick: widemod:boom, next: j}"
    return ("machine: wide\nstart: s\nstates:\n"
            f"  s: {{fork: [{', '.join(f'b{i}' for i in range(n))}], join: j}}\n"
            + "\n".join(lines) + "\n  j: {next: done}\n  done: {terminal: true}\n")


WIDEMOD = """
import time

def ok(payload, ctx):
    payload[ctx.state] = True

def boom(payload, ctx):
    raise RuntimeError("branch b0 breaks")

def slow(payload, ctx):
    while True:
        time.sleep(0.02)
        ctx.heartbeat()
"""


def etcd_run(etcd_url, namespace, graph, payloads=({},), **options):
    from dsm.store.etcd import EtcdOptions, EtcdStore

    async def main():
        store = await EtcdStore.connect(EtcdOptions.build(etcd_url))
        try:
            return await drive(store, graph, payloads=payloads, keys=Keys(namespace), **options)
        finally:
            await store.close()

    return asyncio.run(main())


@pytest.mark.etcd
def test_a_fork_of_130_branches_runs_on_a_stock_etcd(write, etcd_url, namespace):
    graph = compiler.load(write("wide.yaml", wide(130), widemod=WIDEMOD))
    (inst,), _ = etcd_run(etcd_url, namespace, graph, concurrency=8)
    assert inst.status == SUCCEEDED
    assert sum(1 for k in inst.payload if k.startswith("b")) == 130


@pytest.mark.etcd
def test_a_chain_of_130_tickless_states_runs(write, etcd_url, namespace):
    states = "\n".join(f"  s{i}: {{next: s{i + 1}}}" for i in range(130))
    graph = compiler.load(write("chain.yaml", f"machine: chain\nstart: s0\nstates:\n{states}\n"
                                              "  s130: {terminal: true}\n"))
    (inst,), _ = etcd_run(etcd_url, namespace, graph)
    assert inst.status == SUCCEEDED and inst.transitions == 130
    embedded = asyncio.run(drive(MemoryStore(), graph))[0][0]
    assert embedded.status == SUCCEEDED and embedded.transitions == 130


@pytest.mark.etcd
def test_one_failing_branch_of_a_70_branch_fork_fails_the_instance_at_once(write, etcd_url, namespace):
    text = wide(70, fail_one=True).replace("widemod:ok", "widemod:slow")
    graph = compiler.load(write("wide.yaml", text, widemod=WIDEMOD))
    (inst,), _ = etcd_run(etcd_url, namespace, graph, concurrency=8)
    assert inst.status == FAILED and inst.error.type == "RuntimeError" and inst.error.state == "b0"


@pytest.mark.etcd
def test_an_instance_with_70_live_branches_can_be_cancelled(write, etcd_url, namespace):
    from dsm.store.etcd import EtcdOptions, EtcdStore

    text = wide(70).replace("widemod:ok", "widemod:slow")
    graph = compiler.load(write("wide.yaml", text, widemod=WIDEMOD))
    keys = Keys(namespace)

    async def main():
        store = await EtcdStore.connect(EtcdOptions.build(etcd_url))
        try:
            client = Operations(store, keys)
            iid = await client.submit(graph, {})
            registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
            registry.add(graph)
            async with running(store, registry, concurrency=4, grace=1):
                async def forked() -> bool:
                    return len((await client.instance(iid)).tokens) >= 70

                async def swept() -> bool:
                    return not await markers_of(store, keys, iid)

                await until_async(forked, "70 live branches", timeout=BOUND)
                cancelled = await client.cancel(iid)
                final = await client.wait(iid, timeout=BOUND)
                # every marker of the instance goes, deferred ones included
                await until_async(swept, "every marker of the instance gone", timeout=BOUND)
            return cancelled, final
        finally:
            await store.close()

    cancelled, final = asyncio.run(main())
    assert cancelled.status == CANCELLED and final.status == CANCELLED


SKEW = """
machine: skew
start: s
states:
  s:
    tick: skewmod:flaky
    retry: {max_attempts: 2, backoff: 200ms, jitter: false}
    next: done
  done: {terminal: true}
"""

SKEWMOD = """
def flaky(payload, ctx):
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    payload["attempt"] = ctx.attempt
"""


@pytest.mark.etcd
def test_a_worker_an_hour_fast_does_not_park_a_retry_for_an_hour(write, etcd_url, namespace):
    """Worker A, its clock an hour fast, fails the first attempt and schedules the retry; A never
    runs it (its own queue's clock is frozen). Worker B, on a true clock, waits the 200 ms backoff,
    not the hour A's clock implies."""
    from dsm.store.etcd import EtcdOptions, EtcdStore

    graph = compiler.load(write("skew.yaml", SKEW, skewmod=SKEWMOD))
    keys = Keys(namespace)

    async def main():
        store = await EtcdStore.connect(EtcdOptions.build(etcd_url))
        try:
            registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
            registry.add(graph)
            client = Operations(store, keys)
            fast = lambda: time.time() + 3600  # noqa: E731
            async with running(store, registry, worker_id="fast", wall=fast, clock=lambda: 0.0, grace=1):
                iid = await client.submit(graph, {})
                async def retried() -> bool:
                    return (await client.instance(iid)).tokens["t1"].attempt >= 2

                await until_async(retried, "the fast worker's second attempt", timeout=BOUND)
                async with running(store, registry, worker_id="true", grace=1):
                    return await client.wait(iid, timeout=BOUND), await client.history(iid)
        finally:
            await store.close()

    inst, history = asyncio.run(main())
    assert inst.status == SUCCEEDED and inst.payload == {"attempt": 2}
    assert history[0].worker == "true"


GIL = """
machine: gil
start: s
states:
  s: {tick: gilmod:hog, timeout: 1s, catch: caught, next: done}
  caught: {next: done}
  done: {terminal: true}
"""

STEADY = """
machine: steady
start: a
states:
  a: {tick: gilmod:note, next: b}
  b: {tick: gilmod:note, next: c}
  c: {tick: gilmod:note, next: done}
  done: {terminal: true}
"""

GILMOD = """
import os, re

def hog(payload, ctx):
    re.match(r"(a+)+$", "a" * 40 + "b")  # holds the GIL for far longer than any test runs

def note(payload, ctx):
    with open(os.environ["DSM_TEST_TICKS"], "a") as f:
        f.write(f"{ctx.instance_id} {ctx.state}\\n")
"""


@pytest.mark.etcd
def test_a_handler_holding_the_gil_cannot_make_other_ticks_run_twice(write, etcd_url, namespace, tmp_path,
                                                                     monkeypatch):
    """A catastrophic regex (it holds the GIL) on a worker with a 2 s lease: run in a child process,
    it is killed at its 1 s timeout, the worker's lease lives on, and the other instances' ticks
    each run exactly once."""
    from dsm.store.etcd import EtcdOptions, EtcdStore
    from dsm.worker.isolation import ProcessExecutor

    ticks = tmp_path / "ticks.log"
    monkeypatch.setenv("DSM_TEST_TICKS", str(ticks))
    gil = compiler.load(write("gil.yaml", GIL, gilmod=GILMOD))
    steady = compiler.load(write("steady.yaml", STEADY))
    keys = Keys(namespace)

    async def main():
        store = await EtcdStore.connect(EtcdOptions.build(etcd_url))
        executor = ProcessExecutor(4, search_path=[str(tmp_path)], preload=["gilmod"])
        try:
            registry = Registry(store, keys, allow=handlers.Allowlist(gil.modules()))
            registry.add(gil)
            registry.add(steady)
            client = Operations(store, keys)
            async with running(store, registry, concurrency=4, lease_ttl=2.0, executor=executor, grace=1) as w:
                hog = await client.submit(gil, {})
                others = [await client.submit(steady, {}) for _ in range(6)]
                done = await asyncio.gather(*(client.wait(i, timeout=BOUND) for i in [hog, *others]))
                return done, others, w.lease.id
        finally:
            await store.close()

    done, others, _ = asyncio.run(main())
    assert done[0].status == SUCCEEDED and done[0].payload["error"]["type"] == "TimeoutError"
    assert all(d.status == SUCCEEDED for d in done[1:])
    lines = ticks.read_text().splitlines()
    assert sorted(lines) == sorted(f"{i} {s}" for i in others for s in "abc")  # each tick once


@pytest.mark.long  # real seconds: run by the long step
def test_a_worker_stopped_right_after_it_started_always_stops(etcd_url, namespace):
    """Regression: a worker stopped while its work feed was just opening its etcd watch could
    wait for ever on a feed task that never saw its cancellation (1 to 2 times in 150 starts and
    stops), holding up `dsm run` of an instance that had already finished. The feed's watch is now
    closed first, and no part of a stopping worker can hold it up for more than a few seconds."""
    from dsm.store.etcd import EtcdOptions, EtcdStore

    graph = compiler.load(Path(__file__).resolve().parent.parent / "definitions" / "order.yaml")

    async def main():
        store = await EtcdStore.connect(EtcdOptions.build(etcd_url, namespace=namespace))
        slow = []
        try:
            for i in range(300):
                registry = Registry(store, Keys(namespace), allow=handlers.Allowlist(graph.modules()))
                registry.add(graph)
                started = time.monotonic()

                async def once(registry=registry, pause=0.001 * (i % 20)):
                    async with running(store, registry, concurrency=4, grace=5, serves="none".__eq__):
                        await asyncio.sleep(pause)  # pacing: each stop lands at another point of the start-up

                await asyncio.wait_for(once(), 30)
                if time.monotonic() - started > 8:
                    slow.append(i)
        finally:
            await store.close()
        return slow

    assert asyncio.run(main()) == []


NAPPER = """
machine: napper
start: begin
states:
  begin: {tick: nap:begin, next: nap}
  nap: {wait: 2s, next: done}
  done: {terminal: true}
"""

NAP = """
import time

def begin(payload, ctx):
    time.sleep(0.1)
"""


def _adopt_read(compare, success) -> bool:
    """The read after an ambiguous claim: is the claim ours?"""
    from dsm.store import Get

    return (not compare and len(success) == 2 and all(isinstance(op, Get) for op in success)
            and "/inst/" in success[0].key and "/work/" in success[1].key)


def test_a_claim_lost_in_doubt_does_not_make_the_token_due_when_it_has_moved_on_to_a_timer(write):
    """Worker A's claim of `begin` is lost before etcd saw it (as when etcd dies); A cannot read
    for a while (etcd is down), and meanwhile worker B claims the token, runs `begin` and commits
    the token, under the same id, on to a 2 s timer. When A can read again the claim is not its
    own: the token is a candidate again when its marker says, not at once (that ran the timer
    seconds early)."""
    graph = compiler.load(write("napper.yaml", NAPPER, nap=NAP))
    memory = MemoryStore()
    late = LateStore(memory)
    late.lose_answer(is_claim, when="never")  # A's claim: lost on its way, never applied
    late.lose_answer(_adopt_read, times=3)  # then A cannot read for 1.5 s (three tries, 0.5 s apart)

    async def main():
        keys = Keys()
        registry = Registry(memory, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        client = Operations(memory, keys)
        async with running(late, registry, grace=1, worker_id="a", audit_interval=0.1):
            iid = await client.submit(graph, {})
            await until_async(lambda: late.injected >= 1, "worker A's claim lost", timeout=BOUND)
            async with running(memory, registry, grace=1, worker_id="b", audit_interval=0.1):
                done = await client.wait(iid, timeout=BOUND)
                return done, await client.history(iid)

    inst, history = asyncio.run(main())
    assert late.injected == 4
    assert inst.status == SUCCEEDED
    begin, nap = history
    assert begin.worker == "b"
    assert nap.at - begin.at >= 1.99, (begin, nap)


CALLS = """
machine: calls
start: sub
states:
  sub: {call: quickkid.yaml, next: done}
  done: {terminal: true}
"""

QUICKKID = """
machine: quickkid
start: s
states:
  s: {next: done}
  done: {terminal: true}
"""


def test_a_child_started_by_a_commit_in_doubt_is_started_once_and_wakes_its_parent(write):
    """The parent's commit that starts its child loses its answer and applies just after the
    worker re-read the parent (so it plans again, to start the child again, and is refused). The
    child, created once, finishes at once and wakes the parent, which ends with that child."""
    write("quickkid.yaml", QUICKKID)
    graph = compiler.load(write("calls.yaml", CALLS))
    memory = MemoryStore()
    late = LateStore(memory)
    starts_child = lambda compare, success: any(  # noqa: E731
        isinstance(op, Put) and op.key.endswith("/inst/par.c1.1") for op in ops_of(success))
    late.lose_answer(starts_child, when="after_read")

    async def main():
        keys = Keys()
        registry = Registry(memory, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        client = Operations(memory, keys)
        async with running(late, registry, grace=1, worker_id="p", serves=lambda iid: iid == "par"), \
                running(memory, registry, grace=1, worker_id="c", serves=lambda iid: iid != "par"):
            iid = await client.submit(graph, {}, instance_id="par")
            done = await client.wait(iid, timeout=BOUND)
            return done, await client.history(iid), await client.list()

    inst, history, instances = asyncio.run(main())
    assert late.injected == 1
    assert inst.status == SUCCEEDED
    assert [h.child for h in history] == ["par.c1.1"]
    assert sorted(i.id for i in instances) == ["par", "par.c1.1"]


TWO_STEP = """
machine: twostep
start: begin
states:
  begin: {next: nap}
  nap: {wait: 2s, next: done}
  done: {terminal: true}
"""


class _LateClaims:
    """Sends this worker's claims only once the instance has moved on (another worker claimed the
    token, ran it and committed it on to its timer), as a slow claim does."""

    def __init__(self, store, memory, iid):
        self.store, self.memory, self.iid = store, memory, iid
        self.delayed = 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def txn(self, compare, success=(), failure=()):
        from dsm.records import load_instance

        if is_claim(compare, success) and any(isinstance(op, Put) and op.key.endswith(f"/{self.iid}#t1")
                                              for op in ops_of(success)):
            self.delayed += 1
            async def moved_on() -> bool:
                kv = await self.memory.get(Keys().instance(self.iid))
                return kv is not None and load_instance(kv.value).transitions >= 1

            await until_async(moved_on, "the other worker committed the token on", timeout=BOUND)
        return await self.store.txn(compare, success, failure)


def test_a_candidate_that_moved_on_to_a_timer_before_its_claim_is_not_run_early(write):
    """Worker B takes the token while it is due, but its claim goes out only after worker A has
    claimed it, run it and committed it on (under the same id) to a 2 s timer, giving its claim
    back. B's claim must not win the token now: it was due when B took it, it is not any more."""
    graph = compiler.load(write("twostep.yaml", TWO_STEP))
    memory = MemoryStore()
    late = _LateClaims(memory, memory, "two")

    async def main():
        keys = Keys()
        registry = Registry(memory, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        client = Operations(memory, keys)
        async with running(late, registry, grace=1, worker_id="b"), running(memory, registry, grace=1, worker_id="a"):
            iid = await client.submit(graph, {}, instance_id="two")
            return await client.wait(iid, timeout=BOUND), await client.history(iid)

    inst, history = asyncio.run(main())
    assert late.delayed >= 1
    assert inst.status == SUCCEEDED
    begin, nap = history
    assert nap.at - begin.at >= 1.99, (begin, nap)
