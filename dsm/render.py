"""Draw a compiled machine: Mermaid stateDiagram-v2 or Graphviz DOT.

Forks and joins are drawn as pseudo-states (<<fork>> / <<join>> bars) between the fork state and
its branches and between the branches and the join state. A map is a fork bar too, with one
dashed edge to its branch labelled with its items and concurrency. States that wait say so: a
timer (dashed, its duration), a signal (its name and timeout), a call (a double-bordered
sub-process box naming the machine it calls). Terminal states lead to [*]; failure
terminals are drawn in red. `catch` edges are dashed (DOT) or labelled "catch". Edges join
nodes, not names: a node is a state or a pseudo-node, and `node_ids` gives each its own id in
the drawing, so no bar can take the place of a state whatever the states are called.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from .durations import format_duration
from .graph import Graph, Kind, State

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")

Node = tuple[str, str]  # ("state" | "fork" | "join" | "start", state name)


@dataclass(frozen=True, slots=True)
class Edge:
    source: Node
    target: Node
    label: str = ""
    catch: bool = False
    dashed: bool = False  # a map's fan-out


def waits(st: State) -> str:
    """What a waiting state waits for, in a few words ("" for a state that does not wait)."""
    if st.wait is not None:
        if st.wait.seconds is not None:
            return f"wait {format_duration(st.wait.seconds)}"
        return f"wait until {st.wait.until.source}" if st.wait.until is not None else "wait"
    timeout = f" (timeout {format_duration(st.timeout)})" if st.timeout is not None else ""
    if st.signal is not None:
        return f"signal {st.signal}{timeout}"
    if st.call is not None:
        return f"call {st.call.path}{timeout}"
    return ""


def map_label(st: State) -> str:
    spec = st.map
    if spec is None:
        return ""
    limit = f", {spec.max_concurrency} at a time" if spec.max_concurrency else ""
    return f"each of {spec.items.source}{limit}"


def _state(name: str) -> Node:
    return ("state", name)


def edges(graph: Graph) -> list[Edge]:
    """Every drawn edge, with forks and joins as their own pseudo-nodes."""
    out: list[Edge] = []
    for name, st in graph.states.items():
        source = _state(name)

        def to(target: str, frames: tuple = graph.frames.get(name, ())) -> Node:
            """A join reached from inside its fork's branches is drawn as the join bar."""
            fork = graph.join_of.get(target)
            if fork is not None and any(f == fork for f, _ in frames):
                return ("join", target)
            return _state(target)

        if st.kind is Kind.NEXT:
            out.append(Edge(source, to(st.next)))  # type: ignore[arg-type]
        elif st.kind is Kind.ON:
            out += [Edge(source, to(t), label) for label, t in st.on.items()]
        elif st.kind is Kind.CHOOSE:
            out += [Edge(source, to(c.next), c.when or "otherwise") for c in st.choose]
        elif st.kind is Kind.FORK:
            out.append(Edge(source, ("fork", name)))
            out += [Edge(("fork", name), _state(b)) for b in st.fork]
        elif st.kind is Kind.MAP and st.map is not None:
            out.append(Edge(source, ("fork", name)))
            out.append(Edge(("fork", name), _state(st.map.branch), map_label(st), dashed=True))
        if st.catch:
            out.append(Edge(source, to(st.catch), "catch", catch=True))
    for join, fork in graph.join_of.items():
        if fork in graph.forks:
            out.append(Edge(("join", join), _state(join)))
    return out


def pseudo_nodes(graph: Graph) -> list[Node]:
    """Every fork bar and join bar drawn: ("fork", fork state) and ("join", join state)."""
    out: list[Node] = [("fork", name) for name in graph.forks]
    out += [("join", join) for join, fork in graph.join_of.items() if fork in graph.forks]
    return out


def node_ids(graph: Graph, safe: Callable[[str], str] = lambda name: name) -> dict[Node, str]:
    """A distinct id for every drawn node, never one a state has.

    States keep their own name where the format allows it (`safe(name) == name`), so diagrams stay
    readable and stable; then come states whose names the format cannot take as they are, and
    last the pseudo-nodes: `X__fork`, `X__join`, `__start`, or with `_2`, `_3` ... appended when a
    state already holds that id (a state may well be named `go__fork`).
    """
    ids: dict[Node, str] = {}
    taken: set[str] = set()

    def claim(node: Node, wanted: str) -> None:
        ident, n = wanted, 2
        while ident in taken:
            ident, n = f"{wanted}_{n}", n + 1
        taken.add(ident)
        ids[node] = ident

    plain = [name for name in graph.states if safe(name) == name]
    for name in plain:
        claim(_state(name), name)
    for name in graph.states:
        if _state(name) not in ids:
            claim(_state(name), safe(name))
    for kind, name in pseudo_nodes(graph):
        claim((kind, name), safe(f"{name}__{kind}"))
    claim(("start", ""), "__start")
    return ids


def _mermaid_id(name: str) -> str:
    return name if not _UNSAFE.search(name) else _UNSAFE.sub("_", name) + "_"


def _mermaid_label(text: str) -> str:
    return text.replace(";", ",").replace("#", "").replace("\n", " ").replace('"', "'")


def mermaid(graph: Graph) -> str:
    ids = node_ids(graph, _mermaid_id)
    lines = ["stateDiagram-v2"]
    if graph.description:
        lines.append(f"    %% {graph.machine}: {_mermaid_label(graph.description)}")
    for name in graph.states:
        if ids[_state(name)] != name:
            lines.append(f'    state "{name}" as {ids[_state(name)]}')
    for node in pseudo_nodes(graph):
        lines.append(f"    state {ids[node]} <<{node[0]}>>")
    styled: dict[str, list[str]] = {}
    for name, st in graph.states.items():
        what = waits(st)
        if what:
            lines.append(f"    {ids[_state(name)]} : {_mermaid_label(what)}")
            styled.setdefault(st.waits or "", []).append(ids[_state(name)])
    lines.append(f"    [*] --> {ids[_state(graph.start)]}")
    for e in edges(graph):
        label = f": {_mermaid_label(e.label)}" if e.label else ""
        lines.append(f"    {ids[e.source]} --> {ids[e.target]}{label}")
    failed = []
    for name, st in graph.states.items():
        if st.terminal:
            lines.append(f"    {ids[_state(name)]} --> [*]")
            if st.status == "failed":
                failed.append(ids[_state(name)])
    if failed:
        lines.append("    classDef failed fill:#fdd,stroke:#c00,color:#900")
        lines.append(f"    class {','.join(failed)} failed")
    for kind, members in styled.items():
        lines.append(f"    classDef {kind} {_MERMAID_STYLES[kind]}")
        lines.append(f"    class {','.join(members)} {kind}")
    return "\n".join(lines) + "\n"


_MERMAID_STYLES = {"timer": "stroke-dasharray:4 3,fill:#f4f8ff",
                   "signal": "fill:#fff7e0,stroke:#b7791f",
                   "child": "stroke-width:3px,fill:#f0fff4,stroke:#2f855a"}
_DOT_STYLES = {"timer": 'style="rounded,dashed", color="#2b6cb0"',
               "signal": 'shape=cds, style="", color="#b7791f"',
               "child": 'peripheries=2, style="", color="#2f855a"'}


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot(graph: Graph) -> str:
    ids = node_ids(graph)
    q = _dot_quote

    def node(n: Node) -> str:
        return q(ids[n])

    lines = [f"digraph {q(graph.machine)} {{", "    rankdir=TB;",
             '    node [shape=box, style="rounded", fontname="Helvetica"];',
             '    edge [fontname="Helvetica", fontsize=10];',
             f'    {node(("start", ""))} [shape=point, width=0.2, label=""];']
    for name, st in graph.states.items():
        if st.terminal:
            colour = ', color="#cc0000", fontcolor="#990000"' if st.status == "failed" else ""
            lines.append(f"    {node(_state(name))} [shape=doublecircle{colour}];")
        elif st.waits:
            label = q(name)[:-1] + "\\n" + q(waits(st))[1:]  # a DOT line break between the two
            lines.append(f"    {node(_state(name))} [label={label}, {_DOT_STYLES[st.waits]}];")
    bar = 'shape=box, style=filled, fillcolor=black, label="", height=0.06, width=1.6'
    for n in pseudo_nodes(graph):
        lines.append(f"    {node(n)} [{bar}];")
    lines.append(f"    {node(('start', ''))} -> {node(_state(graph.start))};")
    for e in edges(graph):
        attrs = []
        if e.label:
            attrs.append(f"label={q(e.label)}")
        if e.catch:
            attrs.append('style=dashed, color="#cc0000"')
        elif e.dashed:
            attrs.append("style=dashed")
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        lines.append(f"    {node(e.source)} -> {node(e.target)}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


RENDERERS = {"mermaid": mermaid, "dot": dot}


# -- an instance's path on its machine (the HTTP API's drawing) ----------------------------------

@dataclass(frozen=True, slots=True)
class Trace:
    """Where an instance has been and is: the states it visited, in order (`path`), the
    transitions it took (state -> each next state), the states with work pending (`active`), and
    the state it failed at, if it did."""

    path: tuple[str, ...]
    taken: frozenset[tuple[str, str]]
    active: frozenset[str]
    failed_at: str | None = None

    @staticmethod
    def of(history: Iterable[tuple[str, Iterable[str]]], *, active: Collection[str], final: str | None,
           failed_at: str | None) -> Trace:
        """From history entries as (state, next states), in commit order, and the record's
        `active`, `state` (the terminal reached) and error state."""
        path: list[str] = []
        taken: set[tuple[str, str]] = set()
        for state, targets in history:
            path.append(state)
            taken.update((state, t) for t in targets)
        if final is not None:
            path.append(final)
        return Trace(tuple(path), frozenset(taken), frozenset(active), failed_at)

    @property
    def visited(self) -> frozenset[str]:
        return frozenset(self.path) | self.active


def _edge_taken(e: Edge, trace: Trace) -> bool:
    (skind, source), (tkind, target) = e.source, e.target
    if skind == "start":
        return bool(trace.path or trace.active)
    if tkind == "fork":  # the fork state's own step fans out
        return any(s == source for s, _ in trace.taken)
    if skind == "join":
        return target in trace.visited
    return (source, target) in trace.taken


def as_json(graph: Graph, trace: Trace | None = None) -> dict[str, Any]:
    """The drawing as data: nodes (states, fork and join bars, the start) and edges, with the ids
    the Mermaid text uses. With a trace, nodes say whether the instance visited them (and how
    often), which are active and where it failed; edges say whether it took them."""
    ids = node_ids(graph, _mermaid_id)
    visits: dict[str, int] = {}
    for name in trace.path if trace else ():
        visits[name] = visits.get(name, 0) + 1
    nodes: list[dict[str, Any]] = [{"id": ids[("start", "")], "kind": "start", "state": None}]
    for name, st in graph.states.items():
        node: dict[str, Any] = {"id": ids[_state(name)], "kind": "state", "state": name, "routing": st.kind.value,
                                "terminal": st.terminal, "status": st.status if st.terminal else None,
                                "waits": st.waits, "label": waits(st) or map_label(st) or None,
                                "tick": st.tick.ref if st.tick else None, "description": st.description or None}
        if trace is not None:
            node.update(visited=name in trace.visited, visits=visits.get(name, 0), active=name in trace.active,
                        failed=name == trace.failed_at)
        nodes.append(node)
    for kind, name in pseudo_nodes(graph):
        nodes.append({"id": ids[(kind, name)], "kind": kind, "state": name})
    start = Edge(("start", ""), _state(graph.start))
    out_edges: list[dict[str, Any]] = []
    for e in [start, *edges(graph)]:
        edge: dict[str, Any] = {"source": ids[e.source], "target": ids[e.target], "label": e.label or None,
                                "catch": e.catch, "dashed": e.dashed}
        if trace is not None:
            edge["taken"] = _edge_taken(e, trace)
        out_edges.append(edge)
    doc: dict[str, Any] = {"machine": graph.machine, "version": graph.version, "digest": graph.digest,
                           "start": graph.start, "nodes": nodes, "edges": out_edges}
    if trace is not None:
        doc.update(path=list(trace.path), active=sorted(trace.active), failed_at=trace.failed_at)
    return doc


_MERMAID_MARKS = {"visited": "fill:#e6f4ea,stroke:#2f855a",
                  "active": "fill:#fff3bf,stroke:#d97706,stroke-width:3px",
                  "errored": "fill:#fdd,stroke:#c00,stroke-width:3px"}


def mermaid_marked(graph: Graph, trace: Trace) -> str:
    """The Mermaid drawing with the instance's visited states, active states and the state it
    failed at given classes of their own (`visited`, `active`, `errored`)."""
    ids = node_ids(graph, _mermaid_id)
    failed_terminals = {name for name, st in graph.states.items() if st.terminal and st.status == "failed"}
    marks = {
        "visited": [n for n in graph.states if n in trace.visited and n not in trace.active
                    and n != trace.failed_at and n not in failed_terminals],
        "active": [n for n in graph.states if n in trace.active],
        "errored": [n for n in graph.states if n == trace.failed_at],
    }
    lines = [mermaid(graph).rstrip("\n")]
    for mark, names in marks.items():
        if names:
            lines.append(f"    classDef {mark} {_MERMAID_MARKS[mark]}")
            lines.append(f"    class {','.join(ids[_state(n)] for n in names)} {mark}")
    return "\n".join(lines) + "\n"
