"""Check a stored history against its graph: the proof, after the fact, of dsm's guarantees.

Replays the committed transitions of one instance: each one must consume a pending token of the
state it names (so no transition is committed twice), go where that state can route, and a join
must fire exactly once per fork activation, and only after every branch arrived. Used by the
end-to-end and chaos tests and by anyone who wants to verify a store.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .graph import Graph, Kind
from .records import FINISHED, SUCCEEDED, HistoryEntry, Instance


def allowed_targets(graph: Graph, state: str) -> set[tuple[str, ...]]:
    """Every `next` list a committed transition out of `state` may carry."""
    st = graph.states[state]
    out: set[tuple[str, ...]] = set()
    if st.kind is Kind.NEXT:
        out.add((st.next,))  # type: ignore[arg-type]
    elif st.kind is Kind.ON:
        out.update((t,) for t in st.on.values())
    elif st.kind is Kind.CHOOSE:
        out.update((c.next,) for c in st.choose)
    elif st.kind is Kind.FORK:
        out.add(st.fork)
    elif st.kind is Kind.MAP and st.map is not None and st.join is not None:
        out.add((st.map.branch,))
        out.add((st.join,))  # an empty list joins at once
    if st.catch:
        out.add((st.catch,))
    return out


def audit(graph: Graph, inst: Instance, history: list[HistoryEntry]) -> list[str]:
    """Problems found in one instance's history (an empty list when it is a valid run)."""
    problems: list[str] = []
    say = problems.append
    seqs = [h.seq for h in history]
    if seqs != list(range(1, len(history) + 1)):
        say(f"history seqs are not 1..{len(history)}: {seqs[:10]}...")
    if inst.transitions != len(history):
        say(f"record counts {inst.transitions} transitions, history has {len(history)}")
    pending: Counter[tuple[str, tuple[str, ...]]] = Counter({(graph.start, ()): 1})
    arrivals: dict[tuple[str, tuple[str, ...]], Counter[str]] = {}
    # map activations open: (map state, outer branch) -> (items started, items arrived); a map's
    # item count is not in the history, so its join must come after every item started so far arrived
    maps: dict[tuple[str, tuple[str, ...]], tuple[set[str], set[str]]] = {}
    for h in history:
        key = (h.state, tuple(h.branch))
        if pending[key] <= 0:
            _map_step(graph, h, key, maps, pending, say)
        if pending[key] <= 0:
            say(f"seq {h.seq}: {h.state} {list(h.branch)} committed without a pending token "
                "(a transition committed twice, or out of order)")
            continue
        pending[key] -= 1
        targets = tuple(h.next)
        if targets not in allowed_targets(graph, h.state):
            say(f"seq {h.seq}: {h.state} cannot route to {list(targets)}")
            continue
        st = graph.states[h.state]
        if st.kind is Kind.FORK and targets == st.fork:
            for b in st.fork:
                pending[(b, tuple(h.branch) + (b,))] += 1
            continue
        if st.kind is Kind.MAP and st.map is not None and targets == (st.map.branch,):
            maps[(h.state, tuple(h.branch))] = (set(), set())
            continue
        (target,) = targets
        fork = graph.join_of.get(target)
        spec = graph.forks[fork].map if fork is not None and fork in graph.forks else None
        if fork is not None and spec is not None and h.branch and h.branch[-1].startswith(f"{fork}["):
            opened = maps.get((fork, tuple(h.branch[:-1])))
            if opened is None or h.branch[-1] not in opened[0]:
                say(f"seq {h.seq}: item {h.branch[-1]} arrived at {target} outside a map activation")
            elif h.branch[-1] in opened[1]:
                say(f"seq {h.seq}: item {h.branch[-1]} of map {fork} arrived twice")
            else:
                opened[1].add(h.branch[-1])
                if graph.states[target].terminal:
                    say(f"seq {h.seq}: map {fork} joins at a terminal state")
            continue
        if fork is not None and h.branch and graph.frames.get(h.state) and any(
                f == fork for f, _ in graph.frames[h.state][-1:]):
            outer = tuple(h.branch[:-1])
            counter = arrivals.setdefault((fork, outer), Counter())
            counter[h.branch[-1]] += 1
            if counter[h.branch[-1]] > 1:
                say(f"seq {h.seq}: branch {h.branch[-1]} of fork {fork} arrived twice in one activation")
            if all(counter[b] >= 1 for b in graph.forks[fork].branches):
                del arrivals[(fork, outer)]
                if not graph.states[target].terminal:  # else the join ended the instance
                    pending[(target, outer)] += 1
            continue
        if graph.states[target].terminal:
            if h is not history[-1]:
                say(f"seq {h.seq}: reached terminal {target} before the end of the history")
            continue
        pending[(target, tuple(h.branch))] += 1
    if inst.status in FINISHED:
        left = +pending
        if inst.state is not None and history:  # ended at a terminal state, not by an error
            if left:
                say(f"instance ended at {inst.state} with tokens still pending: {dict(left)}")
            if tuple(history[-1].next) != (inst.state,):
                say(f"last transition goes to {history[-1].next}, the record ends at {inst.state}")
        if arrivals and inst.status == SUCCEEDED:
            say(f"joins never fired: {sorted(arrivals)}")
    return problems


def _map_step(graph: Graph, h: HistoryEntry, key: tuple[str, tuple[str, ...]],
              maps: dict[tuple[str, tuple[str, ...]], tuple[set[str], set[str]]],
              pending: Counter[tuple[str, tuple[str, ...]]], say: Any) -> None:
    """A transition no pending token explains may be a map's doing: the first state of an item
    (one more item started), or the join of a map whose started items have all arrived (the join
    fires, once: the activation closes)."""
    state, branch = key
    if branch:
        name, _, index = branch[-1].partition("[")
        opened = maps.get((name, branch[:-1]))
        fk = graph.forks.get(name)
        if opened is not None and fk is not None and fk.map is not None and index.endswith("]") \
                and state == fk.map.branch and branch[-1] not in opened[0]:
            opened[0].add(branch[-1])
            pending[key] += 1
            return
    fork = graph.join_of.get(state)
    opened = maps.get((fork, branch)) if fork is not None else None
    if fork is not None and opened is not None and opened[0] == opened[1]:
        if not opened[0]:
            say(f"seq {h.seq}: map {fork} joined with no item arrived (an empty list joins at the map state)")
        del maps[(fork, branch)]
        pending[key] += 1


def summary(problems_by_instance: dict[str, list[str]]) -> dict[str, Any]:
    bad = {iid: p for iid, p in problems_by_instance.items() if p}
    return {"instances": len(problems_by_instance), "invalid": len(bad), "problems": bad}
