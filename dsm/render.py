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
from collections.abc import Callable
from dataclasses import dataclass

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
