"""The checks of a machine as a graph, run once every state is built: forks and maps (their joins,
their branches and how branches nest), reachability from the start, and a terminal state within
reach of every state. Each problem is reported where the user fixes it.

Every check walks the graph a bounded number of times (a backwards map of who routes to whom is
built once), so that checking stays linear in the states; nested forks cost states x depth, since
every state records the branches around it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .graph import Fork, Frame, Kind, State

Report = Callable[..., None]  # report(path, message, *, key=False), as the compiler reports


@dataclass(frozen=True, slots=True)
class Structure:
    """What the checks find out on the way, which the Graph keeps."""

    forks: dict[str, Fork]
    frames: dict[str, tuple[Frame, ...]]  # state -> enclosing (fork, branch) pairs, outermost first
    join_of: dict[str, str]  # join state -> its fork (or map) state


def check(states: Mapping[str, State], start: str, report: Report) -> Structure:
    """Check the graph of compiled states, reporting every problem; `start` is one of them."""
    checker = _GraphCheck(states, report)
    structure = checker.structure()
    checker.reachability(start)
    return structure


def _at(name: str) -> tuple[str, str]:
    return ("states", name)


def edges(st: State) -> tuple[str, ...]:
    """Routing edges plus a virtual fork->join (or map->join) edge, for reachability questions."""
    out = st.targets()
    if st.kind in (Kind.FORK, Kind.MAP) and st.join:
        out = out + (st.join,)
    return out


def routes(st: State) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Each key of a state that names another state (under the state), with the state it names."""
    if st.next is not None:
        yield ("next",), st.next
    for label, target in st.on.items():
        yield ("on", label), target
    for i, choice in enumerate(st.choose):
        yield ("choose", i, "next"), choice.next
    for i, target in enumerate(st.fork):
        yield ("fork", i), target
    if st.map is not None:
        yield ("map", "branch"), st.map.branch
    if st.join is not None:
        yield ("join",), st.join
    if st.catch:
        yield ("catch",), st.catch


def backwards(predecessors: Mapping[str, Collection[str]], ends: Iterable[str], within: Any = None) -> set[str]:
    """The states from which one of `ends` can be reached (staying inside `within` when given)."""
    seen = set(ends)
    queue = deque(seen)
    while queue:
        for p in predecessors.get(queue.popleft(), ()):
            if p not in seen and (within is None or p in within):
                seen.add(p)
                queue.append(p)
    return seen


class _GraphCheck:
    def __init__(self, states: Mapping[str, State], report: Report):
        self.states = states
        self.report = report
        # who routes to whom, backwards: every check walks it instead of iterating to a fixpoint
        self.predecessors: dict[str, set[str]] = {n: set() for n in states}
        for name, st in states.items():
            for target in edges(st):
                self.predecessors.setdefault(target, set()).add(name)

    # -- forks and maps ------------------------------------------------------------------------
    def structure(self) -> Structure:
        forks: dict[str, Fork] = {}
        join_of: dict[str, str] = {}
        for st in self.states.values():
            if st.kind is Kind.MAP and st.map is not None:
                forks.update(self.map_structure(st, join_of))
            elif st.kind is Kind.FORK:
                forks.update(self.fork_structure(st, join_of))
        for fk in forks.values():
            self.check_branches(fk)
        frames = self.frames(forks)
        for name, fk in forks.items():
            # a nested fork's join must sit in the same branch as the fork itself
            if frames.get(fk.join, ()) != frames.get(name, ()):
                what = "map" if fk.map is not None else "fork"
                self.report(_at(name) + ("join",), f"malformed {what} in state {name!r}: its join {fk.join!r} is "
                            f"not in the same branch as the {what}")
        return Structure(forks, frames, join_of)

    def fork_structure(self, st: State, join_of: dict[str, str]) -> dict[str, Fork]:
        """A fork state's branches and their members, once its join and branches are sound."""
        name, join, path = st.name, st.join, _at(st.name)
        assert join is not None
        broken = False
        if len(st.fork) < 2:
            self.report(path + ("fork",), f"malformed fork in state {name!r}: a fork needs at least two branches, "
                        f"got {len(st.fork)}")
            broken = True
        dupes = sorted(b for b, n in Counter(st.fork).items() if n > 1)
        if dupes:
            self.report(path + ("fork",), f"malformed fork in state {name!r}: branch {dupes[0]!r} is listed twice")
            broken = True
        if join == name or join in st.fork:
            self.report(path + ("join",), f"malformed fork in state {name!r}: the join {join!r} cannot be the fork "
                        "state or one of its branches")
            broken = True
        if name in st.fork:
            self.report(path + ("fork",), f"malformed fork in state {name!r}: a branch cannot start at the fork "
                        "state itself")
            broken = True
        if join in join_of:
            self.report(path + ("join",), f"state {join!r} is the join of two forks, {join_of[join]!r} and "
                        f"{name!r}; give each fork its own join")
            broken = True
        else:
            join_of[join] = name
        if broken:
            return {}
        members = {b: frozenset(self.branch_members(b, join)) for b in st.fork}
        return {name: Fork(state=name, branches=st.fork, join=join, merge=st.merge,
                           members=MappingProxyType(members))}

    def map_structure(self, st: State, join_of: dict[str, str]) -> dict[str, Fork]:
        """A map state's one branch, as a fork's: members, and its join (checked like a fork's)."""
        name, join, spec = st.name, st.join, st.map
        assert join is not None and spec is not None
        path = _at(name)
        if join in (name, spec.branch):
            self.report(path + ("join",), f"malformed map in state {name!r}: the join {join!r} cannot be the map "
                        "state or its branch")
            return {}
        if spec.branch == name:
            self.report(path + ("map", "branch"), f"malformed map in state {name!r}: the branch cannot start at "
                        "the map state itself")
            return {}
        if join in join_of:
            self.report(path + ("join",), f"state {join!r} is the join of two forks or maps, {join_of[join]!r} and "
                        f"{name!r}; give each its own join")
            return {}
        join_of[join] = name
        members = self.branch_members(spec.branch, join)
        members -= self.outside_terminals(members, spec.branch)
        return {name: Fork(state=name, branches=(spec.branch,), join=join, merge="map",
                           members=MappingProxyType({spec.branch: frozenset(members)}), map=spec)}

    def branch_members(self, first: str, join: str) -> set[str]:
        """Every state reachable from `first` before the join."""
        seen = {first}
        queue = deque([first])
        while queue:
            current = self.states.get(queue.popleft())
            if current is None:
                continue
            for target in edges(current):
                if target != join and target not in seen and target in self.states:
                    seen.add(target)
                    queue.append(target)
        return seen

    def outside_terminals(self, members: set[str], first: str) -> set[str]:
        """The terminal states a branch routes to that the rest of the machine enters too: not in
        the branch, which escapes there (reported at the keys that lead out, not at the state)."""
        return {m for m in members if m != first and self.states[m].terminal and not self.predecessors[m] <= members}

    def frames(self, forks: Mapping[str, Fork]) -> dict[str, tuple[Frame, ...]]:
        """Each state's enclosing branches, outermost (largest) first: one pass over every branch."""
        enclosing: dict[str, list[tuple[str, str, int]]] = {}
        for fk in forks.values():
            for b, m in fk.members.items():
                for member in m:
                    enclosing.setdefault(member, []).append((fk.state, b, len(m)))
        frames: dict[str, tuple[Frame, ...]] = {}
        for name in self.states:
            around = sorted(enclosing.get(name, ()), key=lambda item: -item[2])
            frames[name] = tuple((f, b) for f, b, _ in around)
        return frames

    # -- branches ------------------------------------------------------------------------------
    @staticmethod
    def overlaps(fk: Fork) -> tuple[dict[str, list[int]], dict[int, dict[int, str]]]:
        """Who owns each state (branch indexes), and for each branch the first state it shares
        with each later one: found through the owners rather than by comparing every pair."""
        owners: dict[str, list[int]] = {}
        for i, b in enumerate(fk.branches):
            for m in fk.members[b]:
                owners.setdefault(m, []).append(i)
        overlaps: dict[int, dict[int, str]] = {}  # branch index -> later branch index -> first shared state
        for m, held in owners.items():
            for x, i in enumerate(held):
                for j in held[x + 1:]:
                    shared = overlaps.setdefault(i, {})
                    if j not in shared or m < shared[j]:
                        shared[j] = m
        return owners, overlaps

    def check_branches(self, fk: Fork) -> None:
        name = fk.state
        path = _at(name) + (("map", "branch") if fk.map is not None else ())
        what = "map" if fk.map is not None else "fork"
        owners, overlaps = self.overlaps(fk)
        # every state of a branch must be able to reach the join: one walk back from it for the whole fork
        reach = backwards(self.predecessors, (fk.join,), within=owners)
        for i, b in enumerate(fk.branches):
            members = fk.members[b]
            where = f"branch {b!r} of {what} {name!r}"
            at = path if fk.map is not None else path + ("fork", i)
            if fk.map is not None:
                self.check_escapes(fk, members, where)
            if name in members:
                self.report(at, f"malformed {what}: {where} leads back to the fork state {name!r} without passing "
                            f"the join {fk.join!r}")
            for j, state in sorted(overlaps.get(i, {}).items()):
                self.report(at, f"malformed fork: branches {b!r} and {fk.branches[j]!r} of fork {name!r} overlap at "
                            f"state {state!r}")
            for m in sorted(members):
                if self.states[m].terminal:
                    self.report(_at(m), f"malformed {what}: terminal state {m!r} is inside {where}; branches must "
                                f"end at the join {fk.join!r}", key=True)
                outside = sorted(p for p in self.predecessors.get(m, ())
                                 if p not in members and not (m == b and p == name))
                if outside and name not in members:
                    self.report(_at(m), f"malformed {what}: state {m!r} in {where} is also entered from "
                                f"{outside[0]!r}, outside the branch", key=True)
            for m in sorted(members - reach):
                if not self.states[m].terminal:
                    self.report(_at(m), f"malformed {what}: state {m!r} in {where} never reaches the join "
                                f"{fk.join!r}", key=True)

    def check_escapes(self, fk: Fork, members: frozenset[str], where: str) -> None:
        """A map's branch that routes to a terminal state outside it, reported at each key that
        does (the states outside the branch are left out of it when it is built)."""
        for m in sorted(members):
            for key, target in routes(self.states[m]):
                end = self.states.get(target)
                if end is not None and end.terminal and target not in members and target != fk.join:
                    self.report(_at(m) + key, f"malformed map: state {m!r} in {where} routes to terminal state "
                                f"{target!r} outside the branch; branches must end at the join {fk.join!r}")

    # -- the whole machine ---------------------------------------------------------------------
    def reachability(self, start: str) -> None:
        states = self.states
        seen = {start}
        queue = deque([start])
        while queue:
            for target in edges(states[queue.popleft()]):
                if target in states and target not in seen:
                    seen.add(target)
                    queue.append(target)
        for name in states:
            if name not in seen:
                self.report(_at(name), f"state {name!r} is unreachable from start {start!r}", key=True)
        terminals = [n for n, st in states.items() if st.terminal]
        if not terminals:
            self.report(("states",), "the machine has no terminal state (add one with terminal: true)", key=True)
            return
        finishing = backwards(self.predecessors, terminals, within=states)
        for name in states:
            if name in seen and name not in finishing:
                self.report(_at(name), f"no terminal state can be reached from state {name!r}", key=True)
