"""A commit along a line (one token moving on, nothing else changing) is planned without the
general planning: on every machine of the repository, driven through random outcomes, that plan
and its transaction are the general planning's, whatever the commit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dsm import compiler
from dsm.commits import commit_txn, plan_commit
from dsm.graph import Kind
from dsm.keys import Keys
from dsm.step import Arrival
from dsm.transition import ChildResult, Failure, Outcome, start

ROOT = Path(__file__).resolve().parent.parent
MACHINES = sorted(p for folder in ("definitions", "tests/machines", "bench") for p in (ROOT / folder).glob("*.yaml")
                  if not p.name.endswith(".test.yaml"))
KEYS = Keys()


def outcome_for(rng: random.Random, graph, inst, token, now: float) -> Outcome:
    state = graph.states[token.state]
    if rng.random() < 0.15:
        return Outcome(failure=Failure("Boom", "it broke", retryable=rng.random() < 0.5), started_at=now - 0.1,
                       duration=0.1)
    if token.child is not None:
        status = rng.choice(["succeeded", "succeeded", "running", "failed", None])
        return Outcome(child=ChildResult(token.child, status, {"done": True} if status == "succeeded" else None))
    label = None
    if state.kind is Kind.ON:
        label = rng.choice([*state.on, "no-such-label"] if rng.random() < 0.1 else list(state.on))
    before = inst.payload_of(token)
    payload = {**before, "n": before.get("n", 0) + 1, "ok": rng.random() < 0.5}  # a loop counts to its end
    return Outcome(payload=payload, label=label, started_at=now - 0.01, duration=0.01)


@pytest.mark.parametrize("path", MACHINES, ids=[p.stem for p in MACHINES])
def test_a_commit_along_a_line_is_planned_as_the_general_planning_plans_it(path):
    graph = compiler.load(path, import_handlers=False)
    rng = random.Random(path.stem)
    now, compared = 1_000.0, 0
    for run in range(20):
        inst = start(graph, f"i{run}", {"n": 0, "items": [1, 2, 3], "until": 25, "at": now}, now)
        for _ in range(40):
            if inst.finished or not inst.tokens:
                break
            now += rng.choice([0.001, 1.0, 100.0])
            tokens = sorted(inst.tokens.values(), key=lambda t: t.id)
            chosen = rng.sample(tokens, 2) if len(tokens) > 1 and rng.random() < 0.2 else [rng.choice(tokens)]
            arrivals = [Arrival(t, 5, outcome_for(rng, graph, inst, t, now)) for t in chosen]
            kw = dict(now=now, worker="w", slots=rng.choice([0, 1, 8]),
                      max_record_bytes=700 if rng.random() < 0.1 else 10**6)  # 700: the entries spill early
            plan = plan_commit(graph, inst, arrivals, **kw)
            general = plan_commit(graph, inst, arrivals, **kw, shortcut=False)
            assert plan == general
            claims = {a.token.id: 5 for a in arrivals}
            assert (commit_txn(KEYS, plan, 3, claims, worker="w", lease=9, now=now)
                    == commit_txn(KEYS, general, 3, claims, worker="w", lease=9, now=now))
            compared += 1
            inst = plan.after
    assert compared >= 20


def test_each_step_of_the_linear_machine_is_a_commit_along_a_line():
    """The benchmark's machine: its middle steps keep the token, leave its marker alone, write the
    record alone."""
    graph = compiler.load(ROOT / "bench" / "linear.yaml", import_handlers=False)
    inst = start(graph, "i", {}, 1.0)
    for step in range(1, 4):
        token = inst.tokens["t1"]
        plan = plan_commit(graph, inst, [Arrival(token, 5, Outcome(payload={"step": step}))], now=1.0 + step,
                           worker="w", slots=8, max_record_bytes=10**6)
        assert plan.keep == plan.changed == (plan.after.tokens["t1"],) and not plan.removed and not plan.sync
        txn = commit_txn(KEYS, plan, 3, {"t1": 5}, worker="w", lease=9, now=1.0 + step)
        assert [op.key for op in txn.success] == [KEYS.instance("i")]
        inst = plan.after
    assert inst.state is None and inst.tokens["t1"].state == "s4" and inst.transitions == 3
