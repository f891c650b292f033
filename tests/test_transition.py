"""The transition function on its own: no store, no worker, no clock."""

from __future__ import annotations

import itertools
import textwrap

import pytest

from dsm import codec, compile_text
from dsm.records import CANCELLED, FAILED, RUNNING, SUCCEEDED, Instance
from dsm.transition import Failure, MergeConflict, Outcome, advance, cancel, merge, start

NOW = 1_000_000.0


def machine(text: str):
    return compile_text(textwrap.dedent(text).lstrip("\n"), "m.yaml", import_handlers=False)


def ok(payload=None, label=None):
    return Outcome(payload=payload, label=label)


def token_at(inst: Instance, state: str, branch: tuple[str, ...] | None = None) -> str:
    found = [t.id for t in inst.tokens.values() if t.state == state and (branch is None or t.branch == branch)]
    assert len(found) == 1, f"{state}: {inst.tokens}"
    return found[0]


def step(graph, inst, state, outcome=None, branch=None, now=NOW):
    return advance(graph, inst, token_at(inst, state, branch), outcome or ok(), now=now, worker="w")


LINEAR = machine("""
    machine: lin
    start: a
    states:
      a: {tick: m:f, next: b}
      b: {next: c}
      c: {tick: m:f, on: {yes: done, no: failed}}
      done: {terminal: true}
      failed: {terminal: true, status: failed}
""")


def test_linear_path_payload_history_and_terminal():
    inst = start(LINEAR, "i1", {"n": 1}, NOW)
    assert [t.state for t in inst.tokens.values()] == ["a"] and inst.status == RUNNING
    s1 = step(LINEAR, inst, "a", ok({"n": 2}))
    assert s1.instance.payload == {"n": 2} and s1.instance.transitions == 1
    # along a line the token keeps its id (and its claim); each visit gets a new number
    assert s1.removed == () and [(t.id, t.state, t.visit) for t in s1.upserted] == [("t1", "b", 2)]
    (h,) = s1.history
    assert (h.seq, h.state, h.next, h.branch, h.attempt, h.outcome) == (1, "a", ("b",), (), 1, None)
    s2 = step(LINEAR, s1.instance, "b")
    s3 = step(LINEAR, s2.instance, "c", ok(label="yes"))
    done = s3.instance
    assert (done.status, done.state, done.transitions, done.tokens) == (SUCCEEDED, "done", 3, {})
    assert done.finished_at == NOW and s3.history[0].outcome == "yes" and s3.history[0].next == ("done",)


def test_failed_terminal_status():
    inst = step(LINEAR, step(LINEAR, start(LINEAR, "i", {}, NOW), "a").instance, "b").instance
    end = step(LINEAR, inst, "c", ok(label="no")).instance
    assert (end.status, end.state, end.error) == (FAILED, "failed", None)


def test_inputs_are_not_mutated():
    inst = start(LINEAR, "i", {"n": 1}, NOW)
    before = (dict(inst.tokens), inst.payload, inst.transitions)
    step(LINEAR, inst, "a", ok({"n": 5}))
    assert (dict(inst.tokens), inst.payload, inst.transitions) == before


def test_unknown_label_and_missing_label_fail_without_retry():
    graph = machine("""
        machine: m
        start: c
        states:
          c: {tick: m:f, on: {yes: done}, retry: {max_attempts: 5}}
          done: {terminal: true}
    """)
    inst = start(graph, "i", {}, NOW)
    bad = step(graph, inst, "c", ok(label="maybe")).instance
    assert bad.status == FAILED and bad.error.type == "InvalidOutcome" and bad.error.attempts == 1
    assert "unknown outcome label 'maybe'" in bad.error.message and "'yes'" in bad.error.message
    none = step(graph, inst, "c", ok()).instance
    assert none.error.type == "InvalidOutcome" and "must return an outcome label" in none.error.message


def test_label_on_a_state_without_on_is_an_error():
    end = step(LINEAR, start(LINEAR, "i", {}, NOW), "a", ok(label="yes")).instance
    assert end.status == FAILED and end.error.type == "InvalidOutcome" and end.error.state == "a"


CHOOSE = machine("""
    machine: m
    start: s
    states:
      s:
        tick: m:f
        choose:
          - when: "payload.total > 100"
            next: big
          - when: "payload.total > 10 and instance.machine == 'm' and state == 's'"
            next: medium
          - next: small
      big: {terminal: true}
      medium: {terminal: true}
      small: {terminal: true}
""")


@pytest.mark.parametrize("total,expected", [(500, "big"), (50, "medium"), (5, "small")])
def test_choose_first_true_guard_wins_after_the_tick(total, expected):
    inst = start(CHOOSE, "i", {"total": 0}, NOW)
    end = step(CHOOSE, inst, "s", ok({"total": total})).instance
    assert end.state == expected


def test_choose_guard_error_and_no_match():
    graph = machine("""
        machine: m
        start: s
        states:
          s:
            choose:
              - when: "payload.total > 100"
                next: done
          done: {terminal: true}
    """)
    missing = step(graph, start(graph, "i", {}, NOW), "s").instance
    assert missing.status == FAILED and missing.error.type == "GuardError"
    nomatch = step(graph, start(graph, "i", {"total": 1}, NOW), "s").instance
    assert nomatch.error.type == "NoGuardMatched"


FORK = machine("""
    machine: m
    start: f
    states:
      f:
        tick: m:f
        fork: [a, b, c]
        join: j
      a: {tick: m:f, next: j}
      b: {tick: m:f, next: b2}
      b2: {tick: m:f, next: j}
      c: {tick: m:f, next: j}
      j: {tick: m:f, next: done}
      done: {terminal: true}
""")


def run_fork(order, payloads=None, graph=FORK):
    payloads = payloads or {}
    inst = start(graph, "i", {"base": 1}, NOW)
    s = step(graph, inst, "f")
    inst = s.instance
    assert {t.state for t in s.upserted} == {"a", "b", "c"}
    assert all(t.payload == {"base": 1} for t in s.upserted)
    inst = step(graph, inst, "b", ok(payloads.get("b"))).instance  # b continues to b2 first
    joins = []
    for name in order:
        state = "b2" if name == "b" else name
        s = step(graph, inst, state, ok(payloads.get(name)), branch=(name,))
        inst = s.instance
        joins.append([t.state for t in s.upserted])
    return inst, joins


@pytest.mark.parametrize("order", list(itertools.permutations("abc")))
def test_join_fires_exactly_once_when_the_last_branch_arrives(order):
    inst, joins = run_fork(order)
    assert joins[:2] == [[], []]  # never earlier
    assert joins[2] == ["j"]  # exactly once
    assert [t.state for t in inst.tokens.values()] == ["j"] and not inst.activations


@pytest.mark.parametrize("order", list(itertools.permutations("abc")))
def test_merge_keys_is_independent_of_arrival_order(order):
    payloads = {"a": {"base": 1, "a": 1}, "b": {"base": 1, "b": 2}, "c": {"c": 3}}  # c deleted base
    inst, _ = run_fork(order, payloads)
    assert inst.payload == {"a": 1, "b": 2, "c": 3}
    assert list(inst.payload) == ["a", "b", "c"]


def test_merge_conflict_names_key_and_both_branches():
    payloads = {"a": {"base": 1, "x": 1}, "b": {"base": 1, "x": 2}, "c": {"base": 1}}
    inst, _ = run_fork("cab", payloads)
    assert inst.status == FAILED and inst.error.type == "MergeConflict"
    assert "'a'" in inst.error.message and "'b'" in inst.error.message and "'x'" in inst.error.message


def test_same_change_in_two_branches_is_not_a_conflict():
    assert merge("keys", {"k": 0}, {"a": {"k": 1}, "b": {"k": 1}}, ("a", "b"), "f") == {"k": 1}
    assert merge("keys", {"k": 0}, {"a": {}, "b": {}}, ("a", "b"), "f") == {}
    with pytest.raises(MergeConflict):
        merge("keys", {"k": 0}, {"a": {}, "b": {"k": 2}}, ("a", "b"), "f")


@pytest.mark.parametrize("one,other", [
    (1, True), (0, False), (1, 1.0), ([1], [True]), ({"n": [0]}, {"n": [False]}), ([1.0], [1]),
    ({"a": {"b": 1}}, {"a": {"b": True}}),
], ids=["1-true", "0-false", "1-1.0", "[1]-[true]", "nested-0-false", "[1.0]-[1]", "deep-1-true"])
def test_json_values_of_different_types_conflict(one, other):
    # Python's == takes these for equal; in JSON they differ, so branch b's value is not dropped
    with pytest.raises(MergeConflict):
        merge("keys", {"k": None}, {"a": {"k": one}, "b": {"k": other}}, ("a", "b"), "f")
    with pytest.raises(MergeConflict):
        merge("keys", {}, {"a": {"k": other}, "b": {"k": one}}, ("a", "b"), "f")
    # a branch that only changed a type inside a value did change it
    assert merge("keys", {"k": one}, {"a": {"k": other}, "b": {"k": one}}, ("a", "b"), "f") == {"k": other}
    assert type(merge("keys", {"k": one}, {"a": {"k": one}, "b": {"k": other}}, ("a", "b"), "f")["k"]) is type(other)


def test_merge_branches_mode():
    graph = machine("""
        machine: m
        start: f
        states:
          f: {fork: [a, b], join: j, merge: branches}
          a: {tick: m:f, next: j}
          b: {tick: m:f, next: j}
          j: {next: done}
          done: {terminal: true}
    """)
    inst = step(graph, start(graph, "i", {"x": 0}, NOW), "f").instance
    inst = step(graph, inst, "b", ok({"x": 2})).instance
    inst = step(graph, inst, "a", ok({"x": 1})).instance
    assert inst.payload == {"x": 0, "branches": {"a": {"x": 1}, "b": {"x": 2}}}
    assert list(inst.payload["branches"]) == ["a", "b"]


NESTED = machine("""
    machine: m
    start: f
    states:
      f: {fork: [a, b], join: j}
      a: {fork: [a1, a2], join: aj, merge: branches}
      a1: {tick: m:f, next: aj}
      a2: {tick: m:f, next: aj}
      aj: {tick: m:f, next: j}
      b: {tick: m:f, next: j}
      j: {next: done}
      done: {terminal: true}
""")


def test_nested_fork_frames_and_joins():
    inst = step(NESTED, start(NESTED, "i", {}, NOW), "f").instance
    inst = step(NESTED, inst, "a").instance
    a1 = inst.tokens[token_at(inst, "a1")]
    assert a1.branch == ("a", "a1") and len(a1.frames) == 2
    inst = step(NESTED, inst, "b", ok({"b": True})).instance
    inst = step(NESTED, inst, "a1", ok({"v": 1})).instance
    assert len(inst.activations) == 2
    s = step(NESTED, inst, "a2", ok({"v": 2}))
    (aj,) = s.upserted
    assert aj.state == "aj" and aj.branch == ("a",)
    assert aj.payload == {"branches": {"a1": {"v": 1}, "a2": {"v": 2}}}
    inst = step(NESTED, s.instance, "aj").instance
    end = step(NESTED, inst, "j").instance
    assert end.status == SUCCEEDED
    assert end.payload == {"branches": {"a1": {"v": 1}, "a2": {"v": 2}}, "b": True}


def test_fork_inside_a_loop_gets_a_new_activation_each_pass():
    graph = machine("""
        machine: m
        start: f
        states:
          f: {fork: [a, b], join: j}
          a: {tick: m:f, next: j}
          b: {tick: m:f, next: j}
          j: {tick: m:f, on: {again: f, stop: done}}
          done: {terminal: true}
    """)
    inst = start(graph, "i", {"n": 0}, NOW)
    seen = set()
    for n in range(3):
        inst = step(graph, inst, "f").instance
        (act,) = inst.activations
        seen.add(act)
        inst = step(graph, inst, "a").instance
        inst = step(graph, inst, "b").instance
        inst = step(graph, inst, "j", ok(label="again" if n < 2 else "stop")).instance
    assert inst.status == SUCCEEDED and len(seen) == 3 and inst.transitions == 12


RETRY = machine("""
    machine: m
    start: s
    states:
      s:
        tick: m:f
        retry: {max_attempts: 4, backoff: 2s, multiplier: 3, max_backoff: 10s, jitter: false,
                non_retryable: [LookupError]}
        next: done
      done: {terminal: true}
""")


def test_retry_schedule_is_durable_and_backs_off():
    inst = start(RETRY, "i", {}, NOW)
    waits = []
    for attempt in (1, 2, 3):
        s = step(RETRY, inst, "s", Outcome(failure=Failure("IOError", "down")), now=NOW)
        (again,) = s.upserted
        assert again.id == "t1" and again.attempt == attempt + 1 and not s.history and not s.removed
        waits.append(again.not_before - NOW)
        inst = s.instance
    assert waits == [2.0, 6.0, 10.0]
    end = step(RETRY, inst, "s", Outcome(failure=Failure("IOError", "down"))).instance
    assert end.status == FAILED
    assert end.error.as_dict() == {"type": "IOError", "message": "down", "state": "s", "attempts": 4}


def test_non_retryable_by_name_or_base_class_and_by_flag():
    inst = start(RETRY, "i", {}, NOW)
    by_base = step(RETRY, inst, "s", Outcome(failure=Failure("KeyError", "k", bases=("LookupError",)))).instance
    assert by_base.status == FAILED and by_base.error.attempts == 1
    flagged = step(RETRY, inst, "s", Outcome(failure=Failure("InvalidPayload", "x", retryable=False))).instance
    assert flagged.status == FAILED


def test_jitter_is_deterministic_and_within_half_to_full():
    from dsm.graph import RetryPolicy

    policy = RetryPolicy(max_attempts=10, backoff=4.0, multiplier=2.0, max_backoff=100.0, jitter=True)
    waits = [policy.delay(n, f"i/t1/{n}") for n in range(1, 6)]
    assert waits == [policy.delay(n, f"i/t1/{n}") for n in range(1, 6)]
    for n, wait in enumerate(waits, 1):
        full = min(4.0 * 2 ** (n - 1), 100.0)
        assert full / 2 <= wait <= full
    assert len({policy.delay(1, f"i/t{k}/1") for k in range(20)}) > 10


def test_catch_routes_with_payload_error():
    graph = machine("""
        machine: m
        start: s
        states:
          s: {tick: m:f, retry: {max_attempts: 2, backoff: 0}, catch: handle, next: done}
          handle: {tick: m:f, next: done}
          done: {terminal: true}
    """)
    inst = start(graph, "i", {"keep": 1}, NOW)
    inst = step(graph, inst, "s", Outcome(failure=Failure("ValueError", "bad"))).instance
    s = step(graph, inst, "s", Outcome(failure=Failure("ValueError", "bad")))
    (tok,) = s.upserted
    assert tok.state == "handle"
    assert s.instance.payload == {"keep": 1, "error": {"type": "ValueError", "message": "bad", "state": "s",
                                                       "attempts": 2}}
    assert s.history[0].next == ("handle",) and s.history[0].attempt == 2


def test_branch_failure_fails_the_instance_and_stops_siblings():
    inst = step(FORK, start(FORK, "i", {}, NOW), "f").instance
    s = step(FORK, inst, "c", Outcome(failure=Failure("RuntimeError", "boom")))
    assert s.instance.status == FAILED and s.instance.error.state == "c"
    assert set(s.removed) == set(inst.tokens) and not s.instance.tokens and not s.instance.activations


def test_catch_inside_a_branch_stays_in_the_branch():
    graph = machine("""
        machine: m
        start: f
        states:
          f: {fork: [a, b], join: j}
          a: {tick: m:f, catch: a_failed, next: j}
          a_failed: {next: j}
          b: {tick: m:f, next: j}
          j: {next: done}
          done: {terminal: true}
    """)
    inst = step(graph, start(graph, "i", {}, NOW), "f").instance
    inst = step(graph, inst, "a", Outcome(failure=Failure("E", "x"))).instance
    assert inst.tokens[token_at(inst, "a_failed")].branch == ("a",)
    inst = step(graph, inst, "a_failed").instance
    inst = step(graph, inst, "b").instance
    end = step(graph, inst, "j").instance
    assert end.status == SUCCEEDED and end.payload["error"]["state"] == "a"


def test_loop_guard():
    graph = machine("""
        machine: m
        start: s
        max_transitions: 5
        states:
          s: {tick: m:f, on: {again: s, stop: done}}
          done: {terminal: true}
    """)
    inst = start(graph, "i", {}, NOW)
    for _ in range(5):
        inst = step(graph, inst, "s", ok(label="again")).instance
    assert inst.status == RUNNING and inst.transitions == 5
    end = step(graph, inst, "s", ok(label="again")).instance
    assert end.status == FAILED and end.error.type == "LoopGuard" and "max_transitions=5" in end.error.message
    assert end.transitions == 5


def test_cancel_removes_every_token():
    inst = step(FORK, start(FORK, "i", {}, NOW), "f").instance
    s = cancel(inst, NOW + 1)
    assert s.instance.status == CANCELLED and not s.instance.tokens and set(s.removed) == set(inst.tokens)
    assert cancel(s.instance, NOW + 2).instance is s.instance


def test_stale_token_or_finished_instance_is_a_no_op():
    inst = start(LINEAR, "i", {}, NOW)
    assert advance(LINEAR, inst, "t999", ok(), now=NOW, worker="w").instance is inst
    done = cancel(inst, NOW).instance
    assert advance(LINEAR, done, "t1", ok(), now=NOW, worker="w").instance is done


def test_start_at_a_terminal_state_finishes_at_once():
    graph = machine("""
        machine: m
        start: done
        states:
          done: {terminal: true}
    """)
    inst = start(graph, "i", {"a": 1}, NOW)
    assert inst.status == SUCCEEDED and inst.state == "done" and inst.transitions == 0


# -- failed attempts, waiting, redrive ---------------------------------------------------------------

def failed(type_="IOError", message="down", traceback="Traceback ...\nIOError: down\n", started_at=NOW - 2,
           duration=0.25):
    return Outcome(failure=Failure(type_, message, traceback=traceback), started_at=started_at, duration=duration)


def test_retried_attempts_are_kept_and_land_on_the_history_entry_of_the_visit():
    from dsm.records import public_record

    inst = start(RETRY, "i", {}, NOW)
    inst = advance(RETRY, inst, "t1", failed(message="first"), now=NOW, worker="w1").instance
    inst = advance(RETRY, inst, "t1", failed(message="second", started_at=NOW + 1), now=NOW + 2,
                   worker="w2").instance
    (token,) = inst.tokens.values()
    assert [(f.attempt, f.message, f.worker) for f in token.failures] == [(1, "first", "w1"), (2, "second", "w2")]
    record = public_record(inst)
    assert record["status"] == RUNNING and record["error"] is None
    (wait,) = record["waiting"]
    assert wait == {"state": "s", "branch": [], "kind": "retry", "until": record_time(token.not_before),
                    "signal": None, "child": None, "attempt": 3,
                    "last_error": {"type": "IOError", "message": "second",
                                   "traceback": "Traceback ...\nIOError: down\n"}}
    s = advance(RETRY, inst, "t1", Outcome(payload={"ok": 1}, started_at=NOW + 20, duration=0.5), now=NOW + 21,
                worker="w3")
    (entry,) = s.history
    assert entry.attempt == 3 and entry.started_at == NOW + 20 and entry.duration_ms == 500
    shown = entry.as_dict()
    assert shown["failures"][0] == {"attempt": 1, "error": {"type": "IOError", "message": "first",
                                                            "traceback": "Traceback ...\nIOError: down\n"},
                                    "worker": "w1", "started_at": record_time(NOW - 2), "duration_ms": 250}
    assert [f["attempt"] for f in shown["failures"]] == [1, 2]
    assert public_record(s.instance)["waiting"] == []


def record_time(at):
    from dsm.records import timestamp

    return timestamp(at)


def test_failures_kept_per_visit_are_capped_and_long_texts_cut():
    from dsm.records import MAX_ERROR_TEXT, MAX_FAILURES

    graph = machine("""
        machine: m
        start: s
        states:
          s: {tick: m:f, retry: {max_attempts: 30, backoff: 0}, next: done}
          done: {terminal: true}
    """)
    inst = start(graph, "i", {}, NOW)
    for n in range(1, 16):
        inst = advance(graph, inst, "t1", failed(message=f"m{n}" + "x" * 10_000, traceback="y" * 10_000 + f"end{n}"),
                       now=NOW, worker="w").instance
    (token,) = inst.tokens.values()
    assert [f.attempt for f in token.failures] == list(range(16 - MAX_FAILURES, 16))
    last = token.failures[-1]
    assert len(last.message) == MAX_ERROR_TEXT and last.message.startswith("m15")
    assert len(last.traceback) == MAX_ERROR_TEXT and last.traceback.endswith("end15")


def test_a_final_failure_keeps_type_message_traceback_and_what_was_pending():
    inst = start(RETRY, "i", {"n": 1}, NOW)
    for _ in range(3):
        inst = step(RETRY, inst, "s", failed()).instance
    end = step(RETRY, inst, "s", failed(message="for good", traceback="tb4")).instance
    assert end.status == FAILED and not end.tokens
    assert end.error.as_record() == {"type": "IOError", "message": "for good", "state": "s", "attempts": 4,
                                     "traceback": "tb4"}
    (kept,) = end.stopped.tokens.values()
    assert kept.state == "s" and [f.attempt for f in kept.failures] == [1, 2, 3, 4]


def test_catch_lists_every_failed_attempt_and_offers_no_traceback_in_the_payload():
    graph = machine("""
        machine: m
        start: s
        states:
          s: {tick: m:f, retry: {max_attempts: 2, backoff: 0}, catch: handle, next: done}
          handle: {next: done}
          done: {terminal: true}
    """)
    inst = step(graph, start(graph, "i", {}, NOW), "s", failed()).instance
    s = step(graph, inst, "s", failed(message="again"))
    (entry,) = s.history
    assert [f.message for f in entry.failures] == ["down", "again"]
    assert "traceback" not in s.instance.payload["error"]


def test_redrive_continues_a_failed_instance_where_it_stopped_with_fresh_attempts():
    from dsm.transition import redrive

    inst = step(RETRY, start(RETRY, "i", {"n": 1}, NOW), "s", failed()).instance
    end = step(RETRY, inst, "s", Outcome(failure=Failure("Fatal", "no", retryable=False))).instance
    assert end.status == FAILED
    s = redrive(end)
    again = s.instance
    assert (again.status, again.error, again.finished_at, again.stopped, again.redrives) == (RUNNING, None, None,
                                                                                              None, 1)
    (token,) = again.tokens.values()
    assert (token.state, token.attempt, token.not_before) == ("s", 1, 0.0) and s.upserted == (token,)
    assert token.visit == inst.tokens[token.id].visit  # the same visit: the same idempotency key
    done = step(RETRY, again, "s", ok({"n": 2})).instance
    assert done.status == SUCCEEDED and done.payload == {"n": 2} and done.redrives == 1


def test_redrive_of_a_failed_branch_keeps_the_finished_branches():
    from dsm.transition import redrive

    inst = step(FORK, start(FORK, "i", {}, NOW), "f").instance
    inst = step(FORK, inst, "a", ok({"a": 1})).instance  # a arrived at the join
    inst = step(FORK, inst, "b", ok({"b": 1})).instance  # b moved on to b2
    end = step(FORK, inst, "c", Outcome(failure=Failure("RuntimeError", "boom"))).instance
    assert end.status == FAILED
    again = redrive(end).instance
    assert sorted(t.state for t in again.tokens.values()) == ["b2", "c"]
    (activation,) = again.activations.values()
    assert set(activation.arrived) == {"a"}
    inst = step(FORK, again, "b2", ok({"b": 2}), branch=("b",)).instance
    s = step(FORK, inst, "c", ok({"c": 1}), branch=("c",))
    assert [t.state for t in s.upserted] == ["j"]  # the join fires, once, with every branch's result
    assert s.instance.payload == {"a": 1, "b": 2, "c": 1}


def test_redrive_of_a_cancelled_instance_and_what_is_refused():
    from dsm.errors import InputError
    from dsm.transition import redrive

    inst = step(FORK, start(FORK, "i", {}, NOW), "f").instance
    cancelled = cancel(inst, NOW + 1, reason="wrong input", by="ann@box").instance
    assert cancelled.cancel.public() == {"reason": "wrong input", "by": "ann@box", "at": record_time(NOW + 1)}
    again = redrive(cancelled).instance
    assert again.status == RUNNING and again.cancel is None and set(again.tokens) == set(inst.tokens)
    with pytest.raises(InputError, match="running"):
        redrive(again)
    by_design = step(LINEAR, step(LINEAR, step(LINEAR, start(LINEAR, "i", {}, NOW), "a").instance, "b").instance,
                     "c", ok(label="no")).instance
    with pytest.raises(InputError, match="failure terminal state 'failed'"):
        redrive(by_design)
    succeeded = step(LINEAR, step(LINEAR, step(LINEAR, start(LINEAR, "i", {}, NOW), "a").instance, "b").instance,
                     "c", ok(label="yes")).instance
    with pytest.raises(InputError, match="succeeded"):
        redrive(succeeded)


def test_records_round_trip_the_later_fields():
    from dsm.records import dump_instance, history_from_stored, history_to_row, load_instance, public_record

    inst = step(RETRY, start(RETRY, "i", {"n": 1}, NOW), "s", failed()).instance
    assert load_instance(dump_instance(inst)) == inst
    cancelled = cancel(inst, NOW + 1, reason="r", by="u@h").instance
    assert load_instance(dump_instance(cancelled)) == cancelled
    assert public_record(inst)["input"] == {"n": 1}
    entry = step(RETRY, inst, "s", ok()).history[0]
    assert history_from_stored(codec.loads(codec.dumps(history_to_row(entry)))) == entry


def test_a_join_at_a_terminal_state_ends_the_instance():
    graph = machine("""
        machine: m
        start: split
        states:
          split: {fork: [a, b], join: end}
          a: {tick: m:f, next: end}
          b: {tick: m:f, next: end}
          end: {terminal: true}
    """)
    inst = step(graph, start(graph, "i", {}, NOW), "split").instance
    inst = step(graph, inst, "a", ok({"a": 1})).instance
    s = step(graph, inst, "b", ok({"b": 2}))
    end = s.instance
    assert (end.status, end.state, end.transitions, end.payload) == (SUCCEEDED, "end", 3, {"a": 1, "b": 2})
    assert not end.tokens and not end.activations and s.history[0].next == ("end",)


SIGNALLED = machine("""
    machine: sig
    start: ask
    states:
      ask: {signal: decision, on: {approve: note, reject: no}}
      note: {signal: decision, next: pick}
      pick:
        signal: ping
        choose:
          - {when: "payload.get('x')", next: done}
          - {next: done}
      done: {terminal: true}
      no: {terminal: true, status: failed}
""")


def test_what_a_machine_takes_of_each_signal_comes_from_its_own_signal_states():
    routes = SIGNALLED.signals()
    assert list(routes) == ["decision", "ping"]
    assert routes["decision"].states == ("ask", "note") and routes["decision"].outcomes == ("approve", "reject")
    assert routes["decision"].bare and routes["ping"].outcomes == () and routes["ping"].bare
    assert LINEAR.signals() == {}


@pytest.mark.parametrize("name, outcome, words", [
    ("decison", None, ["waits for no signal 'decison'", "'decision' (outcome 'approve' or 'reject', or without one)",
                       "'ping' (without an outcome)"]),
    ("decision", "maybe", ["takes no outcome 'maybe'", "'ask', 'note'", "'approve' or 'reject'"]),
    ("ping", "yes", ["takes no outcome label", "send it without an outcome, not 'yes'"]),
])
def test_a_signal_the_machine_does_not_take_is_refused_saying_what_it_takes(name, outcome, words):
    from dsm.errors import InvalidSignal
    from dsm.transition import check_signal

    inst = start(SIGNALLED, "s1", {}, NOW)
    with pytest.raises(InvalidSignal) as caught:
        check_signal(SIGNALLED, inst, name, outcome)
    message = str(caught.value)
    assert message.startswith("instance s1 (machine 'sig')") and all(w in message for w in words), message


def test_a_signal_that_some_state_takes_passes_and_a_finished_instance_takes_none():
    from dsm.errors import InputError, InvalidSignal
    from dsm.transition import check_signal

    inst = start(SIGNALLED, "s1", {}, NOW)
    for name, outcome in [("decision", "approve"), ("decision", "reject"), ("decision", None), ("ping", None)]:
        check_signal(SIGNALLED, inst, name, outcome)
    only_on = machine("""
        machine: only
        start: ask
        states:
          ask: {signal: decision, on: {approve: done}}
          done: {terminal: true}
    """)
    with pytest.raises(InvalidSignal, match="needs an outcome label, its state\\(s\\) 'ask' route on 'approve'"):
        check_signal(only_on, start(only_on, "o1", {}, NOW), "decision", None)
    with pytest.raises(InvalidSignal, match="waits for no signals at all"):
        check_signal(LINEAR, start(LINEAR, "l1", {}, NOW), "decision", None)
    done = cancel(inst, NOW).instance
    with pytest.raises(InputError, match="is cancelled: it takes no more signals") as caught:
        check_signal(SIGNALLED, done, "decison", None)
    assert not isinstance(caught.value, InvalidSignal)


def test_the_children_a_parent_lets_go_of_say_why():
    """`released_children`: what each driver cancels, as the parent (`cancel.by` = `parent:<id>`)."""
    from dataclasses import replace
    from types import MappingProxyType

    from dsm.records import CancelInfo, ErrorInfo, evolve
    from dsm.transition import by_parent, fail, released_children

    inst = start(LINEAR, "p", {}, NOW)
    waiting = {"t1": replace(inst.tokens["t1"], child="p.c1.1", deadline=NOW + 5, state="a"),
               "t9": replace(inst.tokens["t1"], id="t9", child="p.c9.1", state="c")}
    before = evolve(inst, tokens=MappingProxyType(waiting))
    assert by_parent("p") == "parent:p"
    # the call of t1 timed out and retries (no child yet): only its child goes
    retried = evolve(before, tokens=MappingProxyType({**waiting, "t1": replace(waiting["t1"], child=None,
                                                                              attempt=2)}))
    ((cid, why),) = released_children(before, retried, NOW + 5)
    assert cid == "p.c1.1" and "gave up on it: its call state 'a' timed out" in why
    assert released_children(before, before, NOW + 5) == ()
    failed = fail(before, ErrorInfo("Boom", "no", "c", 1), NOW + 1).instance
    assert released_children(before, failed, NOW + 1) == (
        ("p.c1.1", "its parent p failed (Boom at state 'c')"), ("p.c9.1", "its parent p failed (Boom at state 'c')"))
    stopped = cancel(before, NOW + 1, reason="enough", by="ann").instance
    assert dict(released_children(before, stopped, NOW + 9))["p.c9.1"] == "its parent p was cancelled: enough"
    assert stopped.cancel == CancelInfo("enough", "ann", NOW + 1)
    assert released_children(stopped, stopped, NOW + 9) == ()  # a finished parent waits for nothing


@pytest.mark.parametrize("items, words", [
    ("['a\\\\ud800']", "gave values that are not JSON: items[0] holds a lone surrogate"),
    ("[1, 'nan' | float]", "gave values that are not JSON: items[1] is nan"),
], ids=["lone-surrogate", "nan"])
def test_map_items_that_are_not_json_fail_the_map_state(items, words):
    graph = machine(f"""
        machine: m
        start: s
        states:
          s:
            map: {{items: "{items}", branch: b}}
            join: done
          b: {{next: done}}
          done: {{terminal: true}}
    """)
    inst = step(graph, start(graph, "i", {}, NOW), "s").instance
    assert inst.status == FAILED and inst.error.type == "MapItemsError", inst.error
    assert "state 's'" in inst.error.message and words in inst.error.message
