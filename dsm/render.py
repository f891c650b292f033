"""Draw a compiled machine: Mermaid stateDiagram-v2 or Graphviz DOT.

Forks and joins are drawn as pseudo-states (<<fork>> / <<join>> bars) between the fork state and
its branches and between the branches and the join state. Terminal states lead to [*]; failure
terminals are drawn in red. `catch` edges are dashed (DOT) or labelled "catch".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .graph import Graph, Kind

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    label: str = ""
    catch: bool = False


def _fork_node(state: str) -> str:
    return f"{state}__fork"


def _join_node(join: str) -> str:
    return f"{join}__join"


def edges(graph: Graph) -> list[Edge]:
    """Every drawn edge, with forks and joins as their own pseudo-nodes."""
    out: list[Edge] = []
    for name, st in graph.states.items():
        frames = graph.frames.get(name, ())

        def to(target: str) -> str:
            fork = graph.join_of.get(target)
            if fork is not None and any(f == fork for f, _ in frames):
                return _join_node(target)
            return target

        if st.kind is Kind.NEXT:
            out.append(Edge(name, to(st.next)))  # type: ignore[arg-type]
        elif st.kind is Kind.ON:
            out += [Edge(name, to(t), label) for label, t in st.on.items()]
        elif st.kind is Kind.CHOOSE:
            out += [Edge(name, to(c.next), c.when or "otherwise") for c in st.choose]
        elif st.kind is Kind.FORK:
            out.append(Edge(name, _fork_node(name)))
            out += [Edge(_fork_node(name), b) for b in st.fork]
        if st.catch:
            out.append(Edge(name, to(st.catch), "catch", catch=True))
    for join, fork in graph.join_of.items():
        if fork in graph.forks:
            out.append(Edge(_join_node(join), join))
    return out


def pseudo_nodes(graph: Graph) -> list[tuple[str, str]]:
    """(node, "fork" | "join") for every fork bar and join bar drawn."""
    out = [(_fork_node(name), "fork") for name in graph.forks]
    out += [(_join_node(join), "join") for join, fork in graph.join_of.items() if fork in graph.forks]
    return out


def _mermaid_id(name: str) -> str:
    return name if not _UNSAFE.search(name) else _UNSAFE.sub("_", name) + "_"


def _mermaid_label(text: str) -> str:
    return text.replace(";", ",").replace("#", "").replace("\n", " ").replace('"', "'")


def mermaid(graph: Graph) -> str:
    lines = ["stateDiagram-v2"]
    if graph.description:
        lines.append(f"    %% {graph.machine}: {_mermaid_label(graph.description)}")
    for name in graph.states:
        if _mermaid_id(name) != name:
            lines.append(f'    state "{name}" as {_mermaid_id(name)}')
    for node, kind in pseudo_nodes(graph):
        lines.append(f"    state {_mermaid_id(node)} <<{kind}>>")
    lines.append(f"    [*] --> {_mermaid_id(graph.start)}")
    for e in edges(graph):
        label = f": {_mermaid_label(e.label)}" if e.label else ""
        lines.append(f"    {_mermaid_id(e.source)} --> {_mermaid_id(e.target)}{label}")
    failed = []
    for name, st in graph.states.items():
        if st.terminal:
            lines.append(f"    {_mermaid_id(name)} --> [*]")
            if st.status == "failed":
                failed.append(_mermaid_id(name))
    if failed:
        lines.append("    classDef failed fill:#fdd,stroke:#c00,color:#900")
        lines.append(f"    class {','.join(failed)} failed")
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot(graph: Graph) -> str:
    q = _dot_quote
    lines = [f"digraph {q(graph.machine)} {{", "    rankdir=TB;",
             '    node [shape=box, style="rounded", fontname="Helvetica"];',
             '    edge [fontname="Helvetica", fontsize=10];',
             '    "__start" [shape=point, width=0.2, label=""];']
    for name, st in graph.states.items():
        if st.terminal:
            colour = ', color="#cc0000", fontcolor="#990000"' if st.status == "failed" else ""
            lines.append(f"    {q(name)} [shape=doublecircle{colour}];")
    bar = 'shape=box, style=filled, fillcolor=black, label="", height=0.06, width=1.6'
    for node, _ in pseudo_nodes(graph):
        lines.append(f"    {q(node)} [{bar}];")
    lines.append(f'    "__start" -> {q(graph.start)};')
    for e in edges(graph):
        attrs = []
        if e.label:
            attrs.append(f"label={q(e.label)}")
        if e.catch:
            attrs.append('style=dashed, color="#cc0000"')
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        lines.append(f"    {q(e.source)} -> {q(e.target)}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


RENDERERS = {"mermaid": mermaid, "dot": dot}
