"""Redrive and cancel through the client and a worker, on both stores: a failed instance goes on
from where it stopped, finished fork branches do not run again and the join fires once; while it
is failed no worker can see its pending work; cancel records who, when and why."""

from __future__ import annotations

import asyncio

import pytest
from helpers import markers_of

from dsm import compiler
from dsm.audit import audit
from dsm.errors import InputError
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import CANCELLED, FAILED, SUCCEEDED
from dsm.service import serving

FORKED = """
machine: forked
start: prepare
states:
  prepare:
    tick: redrivemod:count
    next: split
  split:
    fork: [fast, slow]
    join: merge
  fast:
    tick: redrivemod:fast
    next: merge
  slow:
    tick: redrivemod:slow
    next: slow_done
  slow_done:
    tick: redrivemod:count
    next: merge
  merge:
    tick: redrivemod:count
    next: done
  done:
    terminal: true
"""

FORKED_PY = """
import threading
from collections import Counter

calls = Counter()
release = threading.Event()  # set by the test once the fast branch's arrival is committed
broken = [True]

def count(payload, ctx):
    calls[ctx.state] += 1

def fast(payload, ctx):
    calls["fast"] += 1
    payload["fast"] = "done"

def slow(payload, ctx):
    calls["slow"] += 1
    release.wait(10)  # the other branch has finished before this one fails
    if broken[0]:
        raise RuntimeError("the slow service is down")
    payload["slow"] = "done"
"""


class Env:
    def __init__(self, store, graph, namespace):
        self.store = store
        self.keys = Keys(namespace)
        self.graph = graph
        self.client = Operations(store, self.keys)

    def worker(self, **kw):
        return serving(self.store, self.keys, [self.graph], concurrency=4, grace=1, **kw)

    async def markers(self, iid):
        return [kv.key for kv in await markers_of(self.store, self.keys, iid)]


def on_both(store_factory, graph, namespace, body):
    async def main():
        store = await store_factory()
        try:
            return await body(Env(store, graph, namespace))
        finally:
            await store.close()

    return asyncio.run(main())


def test_a_branch_that_failed_is_redriven_and_the_join_fires_once(store_factory, write, namespace):
    graph = compiler.load(write("forked.yaml", FORKED, redrivemod=FORKED_PY))
    import redrivemod

    async def body(env):
        async with env.worker():
            iid = await env.client.submit(graph, {"order": 7})
            await watch_until(env.client, iid, lambda inst: any(a.arrived for a in inst.activations.values()))
            redrivemod.release.set()
            failed = await env.client.wait(iid, timeout=30)
        assert failed.status == FAILED and failed.error.state == "slow"
        assert failed.active == [] and await env.markers(iid) == []  # no worker can pick anything up
        history = await env.client.history(iid)
        redrivemod.broken[0] = False
        again = await env.client.redrive(iid)
        assert again.status == "running" and again.redrives == 1 and again.active == ["slow"]
        async with env.worker():
            done = await env.client.wait(iid, timeout=30)
        return failed, history, done, await env.client.history(iid)

    failed, before, done, history = on_both(store_factory, graph, namespace, body)
    assert done.status == SUCCEEDED and done.redrives == 1 and done.error is None
    assert done.payload == {"order": 7, "fast": "done", "slow": "done"} and done.input == {"order": 7}
    assert dict(redrivemod.calls) == {"prepare": 1, "fast": 1, "slow": 2, "slow_done": 1, "merge": 1}
    assert history[:len(before)] == before  # the history goes on; nothing is rewritten
    assert [h.state for h in history].count("merge") == 1
    assert audit(graph, done, history) == []


LINE = """
machine: line
start: a
states:
  a:
    tick: linemod:step
    next: b
  b:
    tick: linemod:step
    retry: {max_attempts: 2, backoff: 0}
    next: c
  c:
    tick: linemod:step
    on: {ok: done, bad: rejected}
  done:
    terminal: true
  rejected:
    terminal: true
    status: failed
"""

LINE_PY = """
from collections import Counter

calls = Counter()
broken = [True]

def step(payload, ctx):
    calls[ctx.state] += 1
    payload.setdefault("seen", []).append(ctx.state)
    if ctx.state == "b" and broken[0]:
        raise ConnectionError("b is down")
    if ctx.state == "c":
        return payload.get("verdict", "ok")
"""


def test_redrive_continues_with_the_payload_of_the_failed_state_and_fresh_attempts(store_factory, write,
                                                                                   namespace):
    graph = compiler.load(write("line.yaml", LINE, linemod=LINE_PY))
    import linemod

    async def body(env):
        async with env.worker():
            iid = await env.client.submit(graph, {})
            failed = await env.client.wait(iid, timeout=30)
            linemod.broken[0] = False
            await env.client.redrive(iid)
            done = await env.client.wait(iid, timeout=30)
        with pytest.raises(InputError, match="succeeded"):
            await env.client.redrive(iid)
        return failed, done, await env.client.history(iid)

    failed, done, history = on_both(store_factory, graph, namespace, body)
    assert failed.status == FAILED and failed.error.attempts == 2 and failed.payload == {"seen": ["a"]}
    assert done.status == SUCCEEDED and done.payload == {"seen": ["a", "b", "c"]}
    assert dict(linemod.calls) == {"a": 1, "b": 3, "c": 1}
    entry_b = next(h for h in history if h.state == "b")
    assert entry_b.attempt == 1 and [f.attempt for f in entry_b.failures] == [1, 2]  # before the redrive


def test_an_instance_that_ended_in_a_failure_terminal_or_is_running_is_refused(store_factory, write, namespace):
    graph = compiler.load(write("line.yaml", LINE, linemod=LINE_PY))
    import linemod

    linemod.broken[0] = False

    async def body(env):
        iid = await env.client.submit(graph, {})
        with pytest.raises(InputError, match="running"):
            await env.client.redrive(iid)
        async with env.worker():
            rejected = await env.client.submit(graph, {"verdict": "bad"})
            inst = await env.client.wait(rejected, timeout=30)
            assert inst.status == FAILED and inst.state == "rejected"
            with pytest.raises(InputError, match="failure terminal state 'rejected'"):
                await env.client.redrive(rejected)
            return (await env.client.instance(rejected)).redrives

    assert on_both(store_factory, graph, namespace, body) == 0


def test_cancel_records_reason_author_and_time_and_a_cancelled_instance_can_be_redriven(store_factory, write,
                                                                                         namespace):
    graph = compiler.load(write("line.yaml", LINE.replace("backoff: 0", "backoff: 1h"), linemod=LINE_PY))
    import linemod

    linemod.broken[0] = True

    async def body(env):
        async with env.worker():
            iid = await env.client.submit(graph, {})
            await until_retry_waits(env.client, iid)
        cancelled = await env.client.cancel(iid, reason="customer called", by="ann@desk")
        record = await env.client.record(iid)
        assert await env.markers(iid) == []
        linemod.broken[0] = False
        async with env.worker():
            await env.client.redrive(iid)
            done = await env.client.wait(iid, timeout=30)
        return cancelled, record, done

    cancelled, record, done = on_both(store_factory, graph, namespace, body)
    assert cancelled.status == CANCELLED
    assert record["cancel"]["reason"] == "customer called" and record["cancel"]["by"] == "ann@desk"
    assert record["cancel"]["at"] == record["finished_at"]
    assert done.status == SUCCEEDED and done.redrives == 1 and done.cancel is None


def test_cancel_by_default_names_the_user_and_host(store_factory, write, namespace):
    import getpass
    import socket

    graph = compiler.load(write("line.yaml", LINE, linemod=LINE_PY))

    async def body(env):
        iid = await env.client.submit(graph, {})
        await env.client.cancel(iid)
        return (await env.client.record(iid))["cancel"]

    cancel = on_both(store_factory, graph, namespace, body)
    assert cancel["by"] == f"{getpass.getuser()}@{socket.gethostname()}" and cancel["reason"] is None


class _Waiting(Exception):
    pass


async def watch_until(client, iid, predicate):
    """Wait, watching the record, until `predicate(instance)` holds."""

    def check(inst):
        if predicate(inst):
            raise _Waiting

    try:
        await client.wait(iid, timeout=30, on_update=check)
    except _Waiting:
        return
    raise AssertionError("the instance finished before the condition held")


async def until_retry_waits(client, iid):
    await watch_until(client, iid, lambda inst: any(t.attempt > 1 for t in inst.tokens.values()))


WIDE = """
machine: wide
start: split
states:
  split:
    fork: [b1, b2, b3, b4]
    join: end
  b1: {tick: widemod:tick, next: end}
  b2: {tick: widemod:tick, next: end}
  b3: {tick: widemod:tick, next: end}
  b4: {tick: widemod:tick, next: end}
  end:
    terminal: true
"""


WIDE_PY = """
import threading
release = threading.Event()

def tick(payload, ctx):
    release.wait(10)
"""


def test_a_redrive_wider_than_one_transaction_writes_every_marker(store_factory, write, namespace):
    from dsm.markers import SYNC
    from dsm.redrive import redrive

    graph = compiler.load(write("wide.yaml", WIDE, widemod=WIDE_PY))
    import widemod

    async def body(env):
        iid = await env.client.submit(graph, {})
        async with env.worker():  # split runs; every branch is pending when the instance is cancelled
            await watch_until(env.client, iid, lambda inst: len(inst.tokens) == 4)
            await env.client.cancel(iid)
            widemod.release.set()
        again = await redrive(env.store, env.keys, iid, now=0.0, max_ops=3)  # room for one marker at a time
        markers = await env.markers(iid)
        async with env.worker():
            done = await env.client.wait(iid, timeout=30)
        return again, markers, done

    again, markers, done = on_both(store_factory, graph, namespace, body)
    assert len(again.tokens) == 4
    assert sorted(m.rpartition("#")[2] for m in markers) == sorted(again.tokens) and SYNC not in markers
    assert done.status == SUCCEEDED
