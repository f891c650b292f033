"""History kept in the record and spilled in chunks: complete, in order, once each, whatever the reads cross."""

from __future__ import annotations

import asyncio

from helpers import run_instances

from dsm import codec, compiler
from dsm.commits import RECENT, RECENT_FAILURES, commit_txn, plan_commit
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import dump_instance, evolve, history_to_row, load_history, row_failures
from dsm.step import Arrival
from dsm.store import Put, prefix_end
from dsm.store.memory import MemoryStore
from dsm.transition import Failure, Outcome, start

LOOP = """
machine: loop
max_transitions: 1000
start: count
states:
  count:
    tick: {module}:count
    choose:
      - when: "payload.n < {turns}"
        next: count
      - next: done
  done:
    terminal: true
"""
TICKS = "def count(payload, ctx):\n    payload['n'] = payload.get('n', 0) + 1\n"


def loop(write, turns: int):
    return compiler.load(write("loop.yaml", LOOP.format(module="loopticks", turns=turns), loopticks=TICKS))


async def stored(store: MemoryStore, keys: Keys, iid: str) -> tuple[list[str], list[list[int]], list[int]]:
    """(history keys, the seqs each holds, the seqs the record holds)."""
    prefix = keys.history_prefix(iid)
    found = await store.range(prefix, prefix_end(prefix))
    record = await Operations(store, keys).instance(iid)
    return ([kv.key[len(prefix):] for kv in found.kvs], [[h.seq for h in load_history(kv.value)] for kv in found.kvs],
            [row[0] for row in record.recent])


def test_a_long_instance_keeps_its_newest_entries_in_the_record_and_the_rest_in_chunks(write):
    graph = loop(write, 40)
    store, keys = MemoryStore(), Keys()
    (inst,), (history,), _ = asyncio.run(run_instances(store, graph, [{}], concurrency=1))
    assert inst.status == "succeeded" and inst.transitions == 40
    assert [h.seq for h in history] == list(range(1, 41)) and {h.state for h in history} == {"count"}
    names, chunks, recent = asyncio.run(stored(store, keys, inst.id))
    assert all(len(chunk) == RECENT for chunk in chunks) and len(chunks) == 40 // RECENT
    assert names == [f"{chunk[-1]:010d}" for chunk in chunks]  # named by their last entry
    assert [s for chunk in chunks for s in chunk] + recent == list(range(1, 41))
    # every read from a seq on finds the same entries, whichever chunk it starts in
    client = Operations(store, keys)
    for after in (0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 39, 40):
        assert [h.seq for h in asyncio.run(client.history(inst.id, after=after))] == list(range(after + 1, 41))


def test_a_commit_writes_no_history_key_until_the_record_holds_too_many():
    graph = compiler.compile_text(LOOP.format(module="m", turns=100), "loop.yaml", import_handlers=False)
    inst = start(graph, "i", {}, 1.0)
    keys = Keys()
    written = []
    for turn in range(1, 40):
        token = next(iter(inst.tokens.values()))
        plan = plan_commit(graph, inst, [Arrival(token, 1, Outcome(payload={"n": turn}))], now=1.0 + turn,
                           worker="w", slots=1, max_record_bytes=10**6)
        txn = commit_txn(keys, plan, 1, {token.id: 1}, worker="w", lease=1, now=1.0 + turn)
        written += [op.key for op in txn.success if isinstance(op, Put) and "/hist/" in op.key]
        inst = plan.after
        assert len(inst.recent) < RECENT
    assert written == [keys.history("i", n) for n in range(RECENT, 40, RECENT)]


def test_failed_attempts_spill_the_entries_early():
    """Each failure carries a traceback of up to 4 KiB: a record holds the entries of at most
    RECENT_FAILURES of them."""
    graph = compiler.compile_text("""
machine: retries
max_transitions: 1000
start: s
states:
  s:
    tick: m:f
    retry: {max_attempts: 3, backoff: 1ms}
    next: s2
  s2:
    tick: m:f
    retry: {max_attempts: 3, backoff: 1ms}
    choose:
      - when: "payload.get('stop')"
        next: done
      - next: s
  done:
    terminal: true
""", "retries.yaml", import_handlers=False)
    inst = start(graph, "i", {}, 1.0)
    now, spilled = 1.0, []
    for _ in range(12):
        for attempt in (1, 2, 3):
            token = next(iter(inst.tokens.values()))
            now += 1
            outcome = Outcome(payload={}) if attempt == 3 else Outcome(failure=Failure("Boom", "x" * 100,
                                                                                         traceback="t" * 4000))
            plan = plan_commit(graph, inst, [Arrival(token, 1, outcome)], now=now, worker="w", slots=1,
                               max_record_bytes=10**6)
            inst = plan.after
            if plan.spill is not None:
                spilled.append(plan.spill[0])
            assert sum(row_failures(row) for row in inst.recent) <= RECENT_FAILURES
    assert spilled and spilled[0] < RECENT
    assert len(dump_instance(inst)) < 60_000


def test_entries_spill_rather_than_fail_a_record_near_the_size_limit():
    graph = compiler.compile_text(LOOP.format(module="m", turns=100), "loop.yaml", import_handlers=False)
    inst = start(graph, "i", {"big": "x" * 5000}, 1.0)
    for turn in range(1, 6):
        token = next(iter(inst.tokens.values()))
        inst = plan_commit(graph, inst, [Arrival(token, 1, Outcome(payload={"big": "x" * 5000, "n": turn}))],
                           now=1.0 + turn, worker="w", slots=1, max_record_bytes=10**6).after
    assert len(inst.recent) == 5
    token = next(iter(inst.tokens.values()))
    limit = len(dump_instance(evolve(inst, recent=()))) + 200  # room for the payload, not for the entries
    plan = plan_commit(graph, inst, [Arrival(token, 1, Outcome(payload={"big": "x" * 5000, "n": 6}))], now=9.0,
                       worker="w", slots=1, max_record_bytes=limit)
    assert plan.after.status == "running" and plan.after.recent == ()
    assert plan.spill is not None and [row[0] for row in codec.loads(plan.spill[1])] == [1, 2, 3, 4, 5, 6]


def test_a_record_read_before_a_spill_still_gets_its_whole_history(write):
    """`dsm status` reads the record, then the chunks: a commit that spills in between moves the
    entries it read in the record into a chunk. They are found once each, and end with the record."""
    graph = loop(write, 40)
    store, keys = MemoryStore(), Keys()
    (inst,), _, _ = asyncio.run(run_instances(store, graph, [{}], concurrency=1))
    client = Operations(store, keys)

    async def as_it_was(transitions: int):
        """The record as it stood after `transitions`, with the chunks of now (one spill later)."""
        history = await client.history(inst.id)
        recent = tuple(row for row in (codec.loads(codec.dumps(history_to_row(h))) for h in history)
                       if transitions // RECENT * RECENT < row[0] <= transitions)
        return evolve(inst, transitions=transitions, recent=recent)

    for transitions in (10, 15, 20, 31):
        old = asyncio.run(as_it_was(transitions))
        got = asyncio.run(client.history(inst.id, record=old))
        assert [h.seq for h in got] == list(range(1, transitions + 1)), transitions

