"""The history audit that the end-to-end and chaos tests rely on: it passes a real run of a nested
fork/join, and names each kind of broken history."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from helpers import run_instances

from dsm import compiler
from dsm.audit import audit
from dsm.records import SUCCEEDED
from dsm.store.memory import MemoryStore

DOCUMENT = compiler.load("definitions/document.yaml")


@pytest.fixture(scope="module")
def run():
    done, histories, _ = asyncio.run(run_instances(MemoryStore(), DOCUMENT, [{"text": "helo wrold", "images": 2}]))
    assert done[0].status == SUCCEEDED
    return done[0], histories[0]


def renumber(history):
    return [dataclasses.replace(h, seq=i) for i, h in enumerate(history, 1)]


def at(history, state, branch=None):
    return next(i for i, h in enumerate(history) if h.state == state and (branch is None or h.branch == branch))


def test_a_real_nested_fork_join_run_passes(run):
    inst, history = run
    assert len(history) == inst.transitions and audit(DOCUMENT, inst, history) == []


def test_a_transition_committed_twice_is_found(run):
    inst, history = run
    i = at(history, "spellcheck")
    doubled = renumber(history[:i + 1] + [history[i]] + history[i + 1:])
    inst = dataclasses.replace(inst, transitions=len(doubled))
    problems = audit(DOCUMENT, inst, doubled)
    assert any("spellcheck" in p and ("without a pending token" in p or "arrived twice" in p) for p in problems)


def test_a_join_before_every_branch_arrived_is_found(run):
    inst, history = run
    missing = renumber([h for h in history if h.state != "images"])
    inst = dataclasses.replace(inst, transitions=len(missing))
    problems = audit(DOCUMENT, inst, missing)
    assert any("publish" in p and "without a pending token" in p for p in problems)


def test_a_route_the_graph_does_not_have_is_found(run):
    inst, history = run
    i = at(history, "ingest")
    wrong = list(history)
    wrong[i] = dataclasses.replace(history[i], next=("publish",))
    assert any("ingest cannot route to ['publish']" in p for p in audit(DOCUMENT, inst, wrong))


def test_counts_and_sequence_numbers_are_checked(run):
    inst, history = run
    assert any("record counts" in p for p in audit(DOCUMENT, dataclasses.replace(inst, transitions=1), history))
    gap = history[:2] + [dataclasses.replace(h, seq=h.seq + 1) for h in history[2:]]
    assert any("seqs are not" in p for p in audit(DOCUMENT, inst, gap))


def test_a_run_whose_join_is_its_terminal_state_passes(write):
    graph = compiler.load(write("joinend.yaml", """
        machine: joinend
        start: split
        states:
          split: {fork: [a, b], join: end}
          a: {next: end}
          b: {next: end}
          end: {terminal: true}
        """))
    done, histories, _ = asyncio.run(run_instances(MemoryStore(), graph, [{}], timeout=20))
    assert done[0].status == SUCCEEDED and done[0].state == "end"
    assert audit(graph, done[0], histories[0]) == []
