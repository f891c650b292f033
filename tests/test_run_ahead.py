"""A worker runs a token's ticks along a line ahead of their commit: several go in one
transaction, applied in order, each still a transition of its own (its history entry, its
metrics), and nothing is lost or applied twice when the commit meets a change of the record, a
lost answer, a cancel or a record too large."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
from types import MappingProxyType

import pytest
from faults import LateStore, ops_of
from helpers import HeldCommits, run_instances, until_async
from test_commits_line import MACHINES, outcome_for

from dsm import compiler, handlers
from dsm.commits import plan_commit, step_on_line
from dsm.definitions import Registry
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import CANCELLED, SUCCEEDED, Token, evolve
from dsm.step import Arrival, apply
from dsm.store import Put
from dsm.store.memory import MemoryStore
from dsm.transition import Failure, Outcome, start
from dsm.worker import Worker, jobrunner
from dsm.worker.defaults import DEFAULT_RUN_AHEAD

LINE = """
machine: line
start: a
states:
  a: {tick: linemod:step, next: b}
  b: {tick: linemod:step, next: c}
  c: {tick: linemod:step, next: d}
  d: {tick: linemod:step, next: done}
  done: {terminal: true}
"""
LINEMOD = """
calls = []

def step(payload, ctx):
    calls.append((ctx.state, ctx.attempt))
    payload["path"] = payload.get("path", []) + [ctx.state]
    return payload
"""


@pytest.fixture
def untimed(monkeypatch):
    """Runs along a line bounded by their length alone, however slow the machine is today."""
    monkeypatch.setattr(jobrunner, "RUN_AHEAD_TIME", 3600.0)


def line(write, text=LINE, module="linemod", source=LINEMOD):
    return compiler.load(write("line.yaml", text.replace("linemod", module), **{module: source}))


# -- planning, without I/O ---------------------------------------------------------------------------

def run_along(graph, inst, rng, now, limit=8):
    """Outcomes for the instance's one token along its line, as a worker runs ahead: the arrivals,
    with the steps the worker computed."""
    token = next(iter(inst.tokens.values()))
    arrivals = []
    while True:
        outcome = outcome_for(rng, graph, inst, token, now)
        step, ahead = step_on_line(graph, inst, token, outcome, now=now, worker="w")
        arrivals.append(Arrival(token, 5, outcome, inst, step))
        if ahead is None or len(arrivals) == limit:
            return arrivals
        inst, token = step.instance, ahead


def ahead(graph, inst, token, outcome, now=2.0):
    step, moved = step_on_line(graph, inst, token, outcome, now=now, worker="w")
    return (step.instance, moved) if moved is not None else None


@pytest.mark.parametrize("path", MACHINES, ids=[p.stem for p in MACHINES])
def test_a_run_along_a_line_commits_what_its_steps_committed_one_by_one_would(path):
    graph = compiler.load(path, import_handlers=False)
    rng = random.Random(path.stem)
    now, runs = 1_000.0, 0
    for n in range(20):
        inst = start(graph, f"i{n}", {"n": 0, "items": [1, 2, 3], "until": 25, "at": now}, now)
        for _ in range(30):
            if inst.finished or len(inst.tokens) != 1:
                break
            now += rng.choice([0.001, 1.0])
            arrivals = run_along(graph, inst, rng, now)
            kw = dict(now=now, worker="w", slots=8, max_record_bytes=10**6)
            plan = plan_commit(graph, inst, arrivals, **kw)
            assert plan == plan_commit(graph, inst, arrivals, **kw, shortcut=False)
            # the steps computed where the ticks ran are the steps the commit would compute
            recomputed = [Arrival(a.token, a.claim_rev, a.outcome) for a in arrivals]
            assert plan == plan_commit(graph, inst, recomputed, **kw)
            one_by_one, history = inst, []
            for a in recomputed:
                single = plan_commit(graph, one_by_one, [a], **kw)
                one_by_one, history = single.after, history + list(single.history)
            assert plan.applied == len(arrivals) and list(plan.history) == history
            # the same instance, but for when its newest history entries were spilled
            assert evolve(plan.after, recent=()) == evolve(one_by_one, recent=())
            runs += len(arrivals) > 1
            inst = plan.after
    if path.stem in ("linear", "loop"):
        assert runs >= 10


def test_a_token_runs_ahead_only_along_a_line_to_a_tick_due_now(write):
    graph = line(write)
    inst = start(graph, "i", {}, 1.0)
    token = inst.tokens["t1"]
    after, moved = ahead(graph, inst, token, Outcome(payload={"x": 1}))
    assert moved.state == "b" and moved.visit > token.visit and after.payload_of(moved) == {"x": 1}
    failed = Outcome(failure=Failure("Boom", "no", retryable=True))
    assert step_on_line(graph, inst, token, failed, now=2.0, worker="w") == (None, None)
    # the last tick: its state goes to the end, which no tick follows
    for _ in range(3):
        inst, token = ahead(graph, inst, token, Outcome())
    step, moved = step_on_line(graph, inst, token, Outcome(), now=2.0, worker="w")
    assert token.state == "d" and moved is None and step.instance.finished
    timer = compiler.compile_text("""
        machine: t
        start: a
        states:
          a: {tick: linemod:step, next: nap}
          nap: {wait: 5s, next: b}
          b: {tick: linemod:step, next: done}
          done: {terminal: true}
        """.replace("\n        ", "\n"), "t.yaml", import_handlers=False)
    inst = start(timer, "i", {}, 1.0)
    assert ahead(timer, inst, inst.tokens["t1"], Outcome()) is None
    forked = compiler.load(MACHINES[0].parent.parent / "bench" / "forkjoin.yaml", import_handlers=False)
    inst = start(forked, "i", {}, 1.0)
    assert ahead(forked, inst, inst.tokens["t1"], Outcome()) is None


def test_an_outcome_for_a_token_at_another_state_than_its_attempt_saw_changes_nothing(write):
    """Two plannings of one visit need not agree on where a step went (a guard reading the time):
    an outcome run ahead for the state one of them chose is not applied to the other's."""
    graph = line(write)
    inst = start(graph, "i", {}, 1.0)
    token = inst.tokens["t1"]
    after, moved = ahead(graph, inst, token, Outcome())
    elsewhere = evolve(after, tokens=MappingProxyType({moved.id: Token(id=moved.id, state="c", visit=moved.visit)}))
    applied, history = apply(graph, elsewhere, [Arrival(moved, 5, Outcome(payload={"b": 1}))], now=3.0, worker="w")
    assert applied == elsewhere and history == []


def test_a_run_whose_record_outgrows_the_store_commits_its_steps_until_the_one_that_does(write):
    graph = line(write)
    inst = start(graph, "i", {}, 1.0)
    token, arrivals = inst.tokens["t1"], []
    for size in (10, 10, 5000):  # the third step's payload makes the record too large
        outcome = Outcome(payload={"blob": "x" * size})
        arrivals.append(Arrival(token, 5, outcome))
        inst, token = ahead(graph, inst, token, outcome)
    before = start(graph, "i", {}, 1.0)
    kw = dict(now=2.0, worker="w", slots=8, max_record_bytes=3000)
    plan = plan_commit(graph, before, arrivals, **kw)  # the steps before it, then it alone
    assert plan.applied == 2 and [e.state for e in plan.history] == ["a", "b"] and not plan.after.finished
    last = plan_commit(graph, plan.after, arrivals[2:], **kw)
    assert last.after.finished and last.after.error.type == "PayloadTooLarge" and last.after.error.state == "c"


def test_a_run_whose_record_outgrows_the_store_only_midway_fails_at_the_step_that_did(write):
    """A step that makes the record too large fails the instance at its state, even when a later
    step of the run would shrink it again (the record after the run alone would fit), as it does
    with a commit a tick."""
    graph = line(write)
    inst = start(graph, "i", {}, 1.0)
    token, arrivals = inst.tokens["t1"], []
    for payload in ({"p": 1}, {"p": 1, "blob": "x" * 5000}, {"p": 1}):  # b's makes it too large, c's not
        outcome = Outcome(payload=payload)
        step, moved = step_on_line(graph, inst, token, outcome, now=2.0, worker="w")
        arrivals.append(Arrival(token, 5, outcome, inst, step))
        inst, token = step.instance, moved
    kw = dict(now=2.0, worker="w", slots=8, max_record_bytes=3000)
    before, plans = start(graph, "i", {}, 1.0), []
    while arrivals and not before.finished:
        plan = plan_commit(graph, before, arrivals, **kw)
        plans.append([e.state for e in plan.history])
        before, arrivals = plan.after, arrivals[plan.applied:]
    assert plans == [["a"], []] and before.error.type == "PayloadTooLarge" and before.error.state == "b"


# -- a worker over the memory store ------------------------------------------------------------------

def test_a_line_of_quick_ticks_commits_once_and_keeps_every_transition(write, untimed):
    graph = line(write)
    import linemod

    done, histories, worker = asyncio.run(run_instances(MemoryStore(), graph, [{}] * 3))
    assert all(inst.status == SUCCEEDED and inst.payload["path"] == ["a", "b", "c", "d"] for inst in done)
    assert all([(e.seq, e.state) for e in h] == [(1, "a"), (2, "b"), (3, "c"), (4, "d")] for h in histories)
    for h in histories:  # each entry its own tick's: when it began, how long it ran, when it ended
        assert all(e.duration_ms is not None and e.started_at <= e.at for e in h)
        assert all(a.at <= b.started_at for a, b in zip(h, h[1:]))
    assert worker.stats.transitions == 12 and worker.stats.committed == 3
    assert sorted(linemod.calls) == sorted([(s, 1) for s in "abcd"] * 3)


@pytest.mark.parametrize("run_ahead,commits", [(1, 4), (2, 2), (3, 2), (DEFAULT_RUN_AHEAD, 1)])
def test_a_run_holds_at_most_run_ahead_ticks(write, untimed, run_ahead, commits):
    graph = line(write, module=f"linemod_{run_ahead}")
    done, histories, worker = asyncio.run(run_instances(MemoryStore(), graph, [{}], run_ahead=run_ahead))
    assert done[0].status == SUCCEEDED and [e.state for e in histories[0]] == ["a", "b", "c", "d"]
    assert worker.stats.committed == commits


def test_a_run_commits_once_its_ticks_took_run_ahead_time(write, monkeypatch):
    monkeypatch.setattr(jobrunner, "RUN_AHEAD_TIME", 0.0)
    graph = line(write, module="linemod_t")
    done, _, worker = asyncio.run(run_instances(MemoryStore(), graph, [{}] * 2))
    assert all(inst.status == SUCCEEDED for inst in done) and worker.stats.committed == 8


SIGNALLED = """
machine: signalled
start: a
states:
  a: {tick: sigmod:quick, next: b}
  b: {tick: sigmod:held, next: approval}
  approval: {signal: approve, next: c}
  c: {tick: sigmod:quick, next: done}
  done: {terminal: true}
"""
SIGMOD = """
import threading
calls = []
started = threading.Event()
release = threading.Event()
ended = threading.Event()

def quick(payload, ctx):
    calls.append(ctx.state)

def held(payload, ctx):
    calls.append(ctx.state)
    started.set()
    release.wait(10)
    payload["held"] = True
    ended.set()
"""


QUICK_SLOW_QUICK = """
machine: quickslow
start: a
states:
  a: {tick: slowmod:quick, next: b}
  b: {tick: slowmod:held, next: c}
  c: {tick: slowmod:quick, next: done}
  done: {terminal: true}
"""


@contextlib.asynccontextmanager
async def serving(store, graph, module):
    """A worker on `store` for the block, and an instance of `graph` submitted, whose held tick
    (`module`'s, SIGMOD) has started: (client, worker, instance id)."""
    keys = Keys()
    registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
    registry.add(graph)
    worker = Worker(store, registry, worker_id="w")
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(worker.run(stop, grace=1))
    client = Operations(store, keys)
    try:
        iid = await client.submit(graph, {})
        if isinstance(store, HeldCommits):
            store.key = keys.instance(iid)  # its next commit waits
        await asyncio.get_running_loop().run_in_executor(None, module.started.wait, 10)
        yield client, worker, iid
    finally:
        stop.set()
        await task


def test_a_run_whose_record_changed_meanwhile_is_applied_again_on_the_record_as_it_is(write, untimed):
    """A signal stored while the run is out (a and b ran, uncommitted) changes the record: the
    commit is refused, re-read, and the whole run applied on the new record, each tick once."""
    graph = compiler.load(write("s.yaml", SIGNALLED, sigmod=SIGMOD))
    import sigmod

    async def main():
        async with serving(MemoryStore(), graph, sigmod) as (client, worker, iid):
            await client.signal(iid, "approve", {"by": "ann"})
            sigmod.release.set()
            return await client.wait(iid, timeout=10), await client.history(iid), worker

    inst, history, worker = asyncio.run(main())
    assert inst.status == SUCCEEDED and inst.payload == {"held": True, "by": "ann"}
    assert [e.state for e in history] == ["a", "b", "approval", "c"]
    assert sigmod.calls == ["a", "b", "c"]
    assert worker.stats.conflicts >= 1


def test_a_run_stops_at_the_tick_running_when_its_claim_ends(write, untimed):
    """A cancel while the run is out ends the claim: the tick running finishes, no tick runs after
    it, and nothing of the run is committed."""
    graph = compiler.load(write("c.yaml", QUICK_SLOW_QUICK.replace("slowmod", "cancelmod"), cancelmod=SIGMOD))
    import cancelmod

    async def main():
        async with serving(MemoryStore(), graph, cancelmod) as (client, worker, iid):
            await client.cancel(iid, reason="enough")
            job = next(iter(worker.jobs))
            await until_async(lambda: job.abandoned)  # the worker saw its marker go
            cancelmod.release.set()
            await until_async(lambda: len(worker.jobs) == 0)
            return await client.instance(iid), await client.history(iid), worker

    inst, history, worker = asyncio.run(main())
    assert inst.status == CANCELLED and history == []
    assert cancelmod.calls == ["a", "b"]
    assert worker.stats.lost == 1  # one claim lost, however many outcomes its run held


def ends_a_run(compare, success):
    """A commit that writes a record and puts no work marker: a run to the end of the line (a
    submit and a claim put one)."""
    ops = ops_of(success)
    return any(isinstance(op, Put) and "/inst/" in op.key for op in ops) and not any(
        isinstance(op, Put) and "/work/" in op.key for op in ops)


@pytest.mark.parametrize("when", ["after_read", "before_write", "never"])
def test_a_run_whose_commit_answer_was_lost_is_committed_once(write, untimed, when):
    """Its answer lost, a run's commit is re-read: found applied (late, before or after the
    re-read), or not applied at all, when the whole run goes in the next commit (not its first
    step alone, whose later ticks would run again)."""
    graph = line(write, module=f"lostmod_{when}")
    store = LateStore(MemoryStore())
    store.lose_answer(ends_a_run, times=2, when=when)
    done, histories, _ = asyncio.run(run_instances(store, graph, [{}] * 2))
    assert store.injected == 2
    calls = importlib.import_module(f"lostmod_{when}").calls
    assert sorted(calls) == sorted([(s, 1) for s in "abcd"] * 2)  # no tick runs twice
    for inst, history in zip(done, histories, strict=True):
        assert inst.status == SUCCEEDED and inst.payload["path"] == ["a", "b", "c", "d"]
        assert [(e.seq, e.state) for e in history] == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]


def test_a_quick_ticks_transition_is_committed_while_a_slow_tick_after_it_runs(write, monkeypatch):
    monkeypatch.setattr(jobrunner, "RUN_AHEAD_TIME", 0.01)
    graph = compiler.load(write("q.yaml", QUICK_SLOW_QUICK.replace("slowmod", "slowmod1"), slowmod1=SIGMOD))
    import slowmod1

    async def main():
        async with serving(MemoryStore(), graph, slowmod1) as (client, worker, iid):
            await until_async(lambda: worker.stats.transitions == 1)  # a, while b runs
            while_b_runs = [e.state for e in await client.history(iid)]
            slowmod1.release.set()
            return while_b_runs, await client.wait(iid, timeout=10), await client.history(iid)

    while_b_runs, inst, history = asyncio.run(main())
    assert while_b_runs == ["a"]
    assert inst.status == SUCCEEDED and [e.state for e in history] == ["a", "b", "c"]


def test_a_run_whose_commit_made_meanwhile_finds_the_token_gone_runs_no_more(write, monkeypatch):
    """The quick tick's commit, made while the slow one runs, is refused (the instance was
    cancelled first): the slow tick is abandoned and nothing after it runs."""
    monkeypatch.setattr(jobrunner, "RUN_AHEAD_TIME", 0.01)
    graph = compiler.load(write("q.yaml", QUICK_SLOW_QUICK.replace("slowmod", "slowmod2"), slowmod2=SIGMOD))
    import slowmod2

    async def main():
        store = HeldCommits()
        async with serving(store, graph, slowmod2) as (client, worker, iid):
            await store.held.wait()  # a's commit, made while b runs
            b_running = not slowmod2.ended.is_set()
            store.key = None
            await client.cancel(iid, reason="enough")
            store.through.set()
            await until_async(lambda: worker.stats.lost == 1)
            abandoned = all(job.abandoned for job in worker.jobs)
            slowmod2.release.set()
            await until_async(lambda: len(worker.jobs) == 0)
            return b_running, abandoned, await client.instance(iid), await client.history(iid)

    b_running, abandoned, inst, history = asyncio.run(main())
    assert b_running and abandoned and inst.status == CANCELLED and history == []
    assert slowmod2.calls == ["a", "b"]
