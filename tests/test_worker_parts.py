"""The worker's pure parts on their own: the candidate queue and the commit planner (no store,
no clock, no threads); and its options, taken without running it."""

from __future__ import annotations

import pytest

from dsm import compiler
from dsm.commits import commit_txn, plan_commit
from dsm.keys import Keys, WorkInfo
from dsm.markers import MAX_TXN_OPS, SYNC, reconcile_txns
from dsm.records import Token
from dsm.step import Arrival
from dsm.store import Delete, Put
from dsm.store.memory import ManualClock
from dsm.transition import Failure, Outcome, start
from dsm.worker.queue import CandidateQueue

KEYS = Keys()


# -- the candidate queue ---------------------------------------------------------------------------

def test_queue_takes_due_candidates_oldest_first_and_orphans_first():
    clock = ManualClock()
    q = CandidateQueue(clock)
    for name in "abc":
        q.add(name)
    q.add("orphan", first=True)
    assert q.take(2) == ["orphan", "a"]
    assert q.take(10) == ["b", "c"]
    assert len(q) == 0


def test_queue_delays_by_a_local_duration():
    clock = ManualClock()
    q = CandidateQueue(clock)
    q.add("later", 5.0)
    q.add("now")
    assert q.take(10) == ["now"]
    assert q.next_delay() == pytest.approx(5.0)
    clock.advance(4.9)
    assert q.take(10) == []
    clock.advance(0.2)
    assert q.take(10) == ["later"]
    assert q.next_delay() is None


def test_a_waiting_candidate_offered_again_as_due_now_is_taken_now():
    """Regression: a signal state's token waits for its timeout (in the delay heap); the signal
    makes it due at once. Offered again with no wait, it was marked due but left out of the order
    of due candidates, and its heap entry no longer matched: taken neither now nor later."""
    clock = ManualClock()
    q = CandidateQueue(clock)
    q.add("t1", 0.3)
    q.add("t1")
    assert q.take(10) == ["t1"]
    clock.advance(1.0)
    assert q.take(10) == [] and q.next_delay() is None


def test_a_token_given_back_while_its_job_finishes_is_not_lost():
    """Regression: the watch may report a retry's token (given back, due later) before the job that
    gave it back has ended; the queue skips tokens with a running job, so the job's end must
    queue it again."""
    clock = ManualClock()
    q = CandidateQueue(clock)
    q.add("t6", 0.05)
    clock.advance(0.06)
    assert q.take(10, busy={"t6"}) == []  # its job still runs: not taken
    q.requeue("t6")  # the job ends
    assert q.take(10) == ["t6"]


def test_queue_overflow_is_reported_not_silent():
    q = CandidateQueue(ManualClock(), cap=2)
    assert q.add("a") and q.add("b")
    assert not q.add("c")
    assert q.overflow
    assert q.add("a")  # known ones still update


def test_discarded_candidates_are_never_taken():
    clock = ManualClock()
    q = CandidateQueue(clock)
    q.add("a")
    q.add("b", 1.0)
    q.discard("a")
    q.discard("b")
    clock.advance(2)
    assert q.take(10) == [] and q.next_delay() is None


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
def test_a_wait_is_counted_on_the_reader_clock(skew):
    """A marker written by a worker whose clock is an hour off: a reader that learns of it as it
    is written waits the marker's own duration, never an hour more or the backoff less."""
    writer_now = 1_000_000.0 + skew
    info = WorkInfo("m", "d", "s", not_before=writer_now + 2.0, wait=2.0)
    reader_now = 1_000_000.0
    assert info.delay(reader_now, fresh=True) == 2.0
    assert info.delay(reader_now, fresh=False) == (2.0 if skew > 0 else 0.0)  # read later: never longer


# -- the commit planner --------------------------------------------------------------------------

def fan(n: int):
    branches = "\n".join(f"  b{i}: {{tick: h:f, next: j}}" for i in range(n))
    text = f"""
machine: fan
start: s
states:
  s: {{fork: [{', '.join(f'b{i}' for i in range(n))}], join: j}}
{branches}
  j: {{next: done}}
  done: {{terminal: true}}
"""
    return compiler.compile_text(text, "fan.yaml", import_handlers=False)


def chain(n: int):
    states = "\n".join(f"  s{i}: {{next: s{i + 1}}}" for i in range(n))
    return compiler.compile_text(f"machine: chain\nstart: s0\nstates:\n{states}\n  s{n}: {{terminal: true}}\n",
                                 "chain.yaml")


def ops_of(txn):
    return len(txn.success), len(txn.compare)


def test_a_fork_wider_than_a_transaction_defers_markers_to_sync():
    graph = fan(130)
    inst = start(graph, "i1", {}, 0.0)
    plan = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], 5, Outcome())], now=1.0, worker="w", slots=4,
                       max_record_bytes=10**7)
    assert len(plan.after.tokens) == 130
    txn = commit_txn(KEYS, plan, 7, {"t1": 5}, worker="w", lease=9, now=1.0)
    n_ops, n_compares = ops_of(txn)
    assert n_ops <= MAX_TXN_OPS and n_compares <= MAX_TXN_OPS
    assert plan.sync and any(isinstance(op, Put) and op.key == KEYS.work(KEYS.place_of(inst), SYNC)
                             for op in txn.success)
    written = {KEYS.parse_work(op.key).token for op in txn.success if isinstance(op, Put) and "/work/" in op.key}
    assert written | plan.deferred == set(plan.after.tokens) | {SYNC}


def test_a_chain_of_tickless_states_is_folded_in_bounded_steps():
    graph = chain(130)
    inst = start(graph, "i1", {}, 0.0)
    arrivals = [Arrival(inst.tokens["t1"], 5, Outcome())]
    plan = plan_commit(graph, inst, arrivals, now=1.0, worker="w", slots=1, max_record_bytes=10**7)
    assert not plan.after.finished and plan.keep  # it continues, still ours
    assert len(commit_txn(KEYS, plan, 1, {"t1": 5}, worker="w", lease=9, now=1.0).success) <= MAX_TXN_OPS


def test_failing_a_wide_fork_fits_and_defers_sibling_cleanup():
    # wider than a transaction: a marker deletion a sibling (a claim is no key of its own)
    branches = "\n".join(f"  b{i}: {{tick: x:y, next: j}}" for i in range(140))
    names = ", ".join(f"b{i}" for i in range(140))
    text = f"machine: wide\nstart: s\nstates:\n  s: {{fork: [{names}], join: j}}\n{branches}\n"
    graph = compiler.compile_text(text + "  j: {next: done}\n  done: {terminal: true}\n", "wide.yaml",
                                  import_handlers=False)
    inst = start(graph, "i1", {}, 0.0)
    forked = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], 5, Outcome())], now=1.0, worker="w", slots=0,
                         max_record_bytes=10**7).after
    first = next(t for t in forked.tokens.values() if t.state == "b0")
    plan = plan_commit(graph, forked, [Arrival(first, 6, Outcome(failure=Failure("Boom", "x", retryable=False)))],
                       now=2.0, worker="w", slots=0, max_record_bytes=10**7)
    assert plan.after.status == "failed"
    txn = commit_txn(KEYS, plan, 8, {first.id: 6}, worker="w", lease=9, now=2.0)
    assert len(txn.success) <= MAX_TXN_OPS and plan.sync


def test_reconcile_creates_missing_markers_and_deletes_stale_ones_in_bounded_txns():
    graph = fan(300)
    inst = start(graph, "i1", {}, 0.0)
    forked = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], 5, Outcome())], now=1.0, worker="w", slots=0,
                         max_record_bytes=10**7).after
    markers = {"t1", SYNC, "gone1", "gone2"}
    place = KEYS.place_of(forked)
    txns = reconcile_txns(KEYS, "i1", place, forked, 42, markers, now=1.0)
    assert all(len(t.success) <= MAX_TXN_OPS for t in txns) and len(txns) >= 3
    puts = {op.key for t in txns for op in t.success if isinstance(op, Put)}
    deletes = {op.key for t in txns for op in t.success if isinstance(op, Delete)}
    assert puts == {KEYS.work(place, tid) for tid in forked.tokens}
    assert {KEYS.work(place, "gone1"), KEYS.work(place, "gone2"), KEYS.work(place, SYNC),
            KEYS.work(place, "t1")} <= deletes
    assert all(t.compare[0].key == KEYS.instance("i1") and t.compare[0].value == 42 for t in txns)
    assert any(op.key == KEYS.work(place, SYNC) for op in txns[-1].success)  # SYNC goes last


def test_keep_never_exceeds_the_free_slots():
    graph = fan(10)
    inst = start(graph, "i1", {}, 0.0)
    plan = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], 5, Outcome())], now=1.0, worker="w", slots=3,
                       max_record_bytes=10**7)
    # the fork's own slot passes to a branch, plus three free slots
    assert len(plan.keep) == 4
    assert all(isinstance(t, Token) for t in plan.keep)


def test_a_handler_stopped_by_its_own_deadline_timed_out():
    """Regression: `ctx.heartbeat()` raises AttemptAbandoned once the attempt's deadline passed,
    which can reach the executor before its own timer fires: the attempt failed as
    AttemptAbandoned instead of TimeoutError (so `non_retryable: [TimeoutError]` and catch saw the
    wrong error). Unless the worker itself abandoned it, that is a timeout."""
    from dsm.graph import Handler
    from dsm.ticks import TickCall, past_deadline

    call = TickCall(handler=Handler("m:f", "m", "f"), payload={}, instance_id="i", machine="m", state="s",
                    attempt=1, branch=(), visit=1, timeout=0.1, deadline=0.0, payload_limit=1 << 20)
    stopped = Outcome(failure=Failure("AttemptAbandoned", "attempt 1 of state 's' passed its deadline"))
    assert past_deadline(call, stopped, abandoned=False).failure.type == "TimeoutError"
    assert "timed out after 0.1s" in past_deadline(call, stopped, abandoned=False).failure.message
    assert past_deadline(call, stopped, abandoned=True) is stopped  # the worker said stop: not a timeout
    ok = Outcome(payload={})
    assert past_deadline(call, ok, abandoned=False) is ok


def test_the_count_of_index_operations_matches_the_operations():
    from dataclasses import replace

    from dsm import index

    running = start(chain(2), "i1", {}, 0.0)
    done = replace(running, status="succeeded", finished_at=5.0, retention=60.0)
    cases = [(running, running), (running, done), (done, replace(running, status="running")),
             (done, replace(done, finished_at=6.0)), (done, replace(done, status="failed")),
             (running, replace(running, status="cancelled", finished_at=1.0, retention=0.0))]
    for before, after in cases:
        assert index.status_op_count(before, after) == len(index.status_ops(KEYS, before, after))


def test_arrivals_that_need_more_than_a_transaction_are_applied_in_turns():
    """150 map items finish while a commit is in flight: each needs its marker deleted (the claim
    in it goes with it), 150 operations in all (their history entries go in the record). The plan
    applies the first ones that fit; the rest wait."""
    graph = compiler.compile_text("""
machine: m
max_transitions: 1000
start: s
states:
  s: {map: {items: payload.xs, branch: b}, join: done}
  b: {tick: h:f, next: done}
  done: {terminal: true}
""", "m.yaml", import_handlers=False)
    inst = start(graph, "i1", {"xs": list(range(300))}, 0.0)
    for _ in range(5):  # five rounds of 32 starts: 160 items in flight
        arrivals = [Arrival(t, 5, Outcome()) for t in inst.tokens.values()][:1]
        inst = plan_commit(graph, inst, arrivals, now=1.0, worker="w", slots=0, max_record_bytes=10**7).after
    items = [t for t in inst.tokens.values() if t.state == "b"]
    arrivals = [Arrival(t, 5, Outcome(payload={"y": 1})) for t in items[:150]]
    plan = plan_commit(graph, inst, arrivals, now=2.0, worker="w", slots=8, max_record_bytes=10**7)
    assert 1 <= plan.applied < 150 and plan.required < MAX_TXN_OPS
    assert len(plan.history) == plan.applied
    txn = commit_txn(KEYS, plan, 7, {a.token.id: 5 for a in arrivals}, worker="w", lease=9, now=2.0)
    assert max(ops_of(txn)) <= MAX_TXN_OPS
    rest = plan_commit(graph, plan.after, arrivals[plan.applied:], now=2.0, worker="w", slots=8,
                       max_record_bytes=10**7)
    assert rest.applied + plan.applied <= 150 and len(rest.history) == rest.applied


def test_call_states_fold_only_as_many_children_as_half_a_transaction_holds():
    """A map whose items start with a call state, and a worker with many free slots: the children
    the commit would start by folding those states are bounded; the other items run as jobs."""
    kid = compiler.compile_text("machine: kid\nstart: s\nstates:\n  s: {next: done}\n  done: {terminal: true}\n",
                                "kid.yaml")
    graph = compiler.compile_text("""
machine: m
start: s
states:
  s: {map: {items: payload.xs, branch: c}, join: done}
  c: {call: kid.yaml, next: done}
  done: {terminal: true}
""", "m.yaml", import_handlers=False, calls={"kid.yaml": kid})
    inst = start(graph, "i1", {"xs": list(range(40))}, 0.0)
    plan = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], 5, Outcome())], now=1.0, worker="w", slots=64,
                       max_record_bytes=10**7)
    assert 1 <= len(plan.started) < 32 and plan.required < MAX_TXN_OPS
    waiting = [t for t in plan.after.tokens.values() if t.state == "c" and t.child is None]
    assert len(waiting) == 32 - len(plan.started) and {t.id for t in waiting} <= {t.id for t in plan.keep}
    txn = commit_txn(KEYS, plan, 7, {"t1": 5}, worker="w", lease=9, now=1.0)
    assert max(ops_of(txn)) <= MAX_TXN_OPS


def test_a_child_wakes_its_parent_only_while_the_parent_record_exists():
    """The wake-up is nested in the child's commit and fenced by the parent's record: a parent
    deleted meanwhile gets no marker back (and the child's own commit is not held up by it)."""
    from dsm.commits import wake_parent_ops
    from dsm.records import SUCCEEDED, Parent, evolve
    from dsm.store import Compare, Txn

    keys = Keys("ns")
    graph = compiler.compile_text("machine: kid\nstart: done\nstates:\n  done:\n    terminal: true\n", "kid.yaml")
    running = evolve(start(graph, "p.c1.1", {}, 0.0), status="running",
                     parent=Parent("p", "sub", "t1", "parent", "sha256:p", 1_700_000_000_123))
    done = evolve(running, status=SUCCEEDED, finished_at=1.0)
    (wake,) = wake_parent_ops(keys, running, done)
    assert isinstance(wake, Txn) and wake.compare == [Compare.version(keys.instance("p"), ">", 0)]
    (marker,) = wake.success
    assert isinstance(marker, Put) and marker.key == keys.work(keys.place("parent", 1_700_000_000_123, "p"), "t1")
    assert marker.key == "/ns/work/parent/8299999999876/p#t1"
    assert WorkInfo.load(marker.value).not_before == 0.0
    assert wake_parent_ops(keys, done, done) == [] and wake_parent_ops(keys, running, running) == []


# -- the worker's options and the keys it reads ------------------------------------------------------

def test_a_workers_options_are_one_config_and_keywords_override_it():
    from dsm.definitions import Registry
    from dsm.store.memory import MemoryStore
    from dsm.worker import Worker, WorkerConfig

    store = MemoryStore()
    registry = Registry(store, KEYS)
    worker = Worker(store, registry, WorkerConfig(concurrency=2, lease_ttl=4.0), lease_ttl=6.0, worker_id="w")
    assert (worker.config.concurrency, worker.config.lease_ttl, worker.id) == (2, 6.0, "w")
    assert worker.config.stale_after == 12.0 and worker.config.audit_every == 6.0
    assert WorkerConfig(dead_after=0).stale_after is None
    with pytest.raises(TypeError):
        Worker(store, registry, concurrenc=2)


def test_work_keys_read_as_named_fields():
    place = KEYS.place("m-1", 1_700_000_000_000, "i1")
    marker = KEYS.parse_work(KEYS.work(place, "t1"))
    assert marker is not None
    assert (marker.instance, marker.token, marker.place) == ("i1", "t1", place)
    assert marker.key == KEYS.work(place, "t1")
    assert KEYS.parse_work(KEYS.instance("i1")) is None
    # markers of earlier layouts, and a claim key left by release 0.1, are none of this layout's
    legacy = f"{KEYS.work_prefix}i1/t1"
    assert KEYS.parse_work(legacy) is None and KEYS.parse_work(legacy + "/claim") is None
    assert KEYS.parse_legacy_work(legacy) == ("i1", "t1") and KEYS.parse_legacy_work(legacy + "/claim") is None
    assert KEYS.parse_legacy_work(KEYS.work(place, "t1")) is None
    assert KEYS.parse_worker(KEYS.worker("w1")) == "w1" and KEYS.parse_worker(KEYS.work(place, "t1")) is None


def test_an_instances_markers_lie_in_the_order_of_its_listing_whatever_its_id():
    """Ids that are prefixes of one another, or differ by a character below '/', keep the same
    order as markers (id, MARK, token) as they have as listing entries (id alone)."""
    from dsm.index import listing_key

    ids = ["a", "a-", "a.", "a.b", "a0", "a:", "a_", "aa", "A", "0", "a-b", "a--"]
    markers = sorted(KEYS.work(KEYS.place("m", 5, iid), "tok") for iid in ids)
    entries = sorted(listing_key(KEYS, iid, "succeeded", "m", 5) for iid in ids)
    assert [KEYS.parse_work(k).instance for k in markers] == [e.rsplit("/", 1)[1] for e in entries]
