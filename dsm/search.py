"""Search attributes: what an instance is about, kept in the listing index (SPEC 10).

A definition's top-level `search:` maps a name to an expression over the payload, compiled and
evaluated as guards are (`guards.py`: the same three names, the same budget). After every commit
the worker evaluates them on the new record (`indexed`); each value that is a string, a number or
a boolean is kept in the record by its *text*, and anything else (a list, null, an expression that
fails) indexes nothing. The index holds one entry per attribute with a value,
`idx/attr/<name>/<text>/<age>/<id>` (`keys.py`), written in the commit's own transaction and
only when the text changed (`index.search_ops`): a transition that changes no attribute writes no
key for them.

The text of a value is what a listing's `where` compares with, as typed: a string is itself, a
boolean `true` or `false`, a number as JSON writes it with whole numbers written without a
fraction (120 and 120.0 are both `120`). So `--where total=120` finds a total of 120, whichever
way the payload wrote it, and a customer id "120" too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from .errors import InputError
from .graph import Graph
from .guards import GuardError
from .records import NO_SEARCH as NONE
from .records import Instance, evolve

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # as the schema says of a `search:` key
MAX_ATTRIBUTES = 32  # per definition: each changed one takes two operations of a commit's transaction
MAX_TEXT = 256  # characters: a longer value indexes nothing (it would make a key of its own size)
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate (a guard's '\ud800', argv bytes that are not UTF-8)


def text(value: Any) -> str | None:
    """The text a value is indexed and compared by; None when it indexes nothing."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE.search(value):
            return None  # not text: no key (etcd's are UTF-8) and no record (JSON) can hold it
        found = value
    elif isinstance(value, int):
        found = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        found = str(int(value)) if value.is_integer() and abs(value) < 2 ** 63 else repr(value)
    else:
        return None
    return found if len(found) <= MAX_TEXT else None


def values(graph: Graph, inst: Instance) -> Mapping[str, str]:
    """The attributes of `inst` that have a value, by name, as texts."""
    if not graph.search:
        return NONE
    scope = {"id": inst.id, "machine": inst.machine}
    found: dict[str, str] = {}
    for name, expression in graph.search.items():
        try:
            value = text(expression.value(inst.payload, scope, inst.state or ""))
        except GuardError:
            continue
        if value is not None:
            found[name] = value
    return MappingProxyType(found) if found else NONE


def indexed(graph: Graph, inst: Instance) -> Instance:
    """`inst` with its attributes as its payload says now (itself when they did not change)."""
    if not graph.search and not inst.search:
        return inst
    found = values(graph, inst)
    return inst if found == inst.search else evolve(inst, search=found)


def changed(before: Mapping[str, str], after: Mapping[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(name, old text, new text) of every attribute whose text differs."""
    if before is after or before == after:
        return []
    return [(name, before.get(name), after.get(name)) for name in sorted(before.keys() | after.keys())
            if before.get(name) != after.get(name)]


def check_where(where: Mapping[str, Any] | None) -> dict[str, str]:
    """A listing's `where` as names and the texts they must equal; InputError naming what is wrong."""
    out: dict[str, str] = {}
    for name, value in (where or {}).items():
        if not isinstance(name, str) or NAME.fullmatch(name) is None:
            raise InputError(f"where: {name!r} is not an attribute's name (letters, digits and '_', starting with "
                             "a letter or '_', up to 64)")
        found = text(value)
        if found is None:
            raise InputError(f"where: {name}: a value is a string, a number or a boolean of up to {MAX_TEXT} "
                             f"characters (no lone surrogate), not {value!r}")
        out[name] = found
    return out


def parse_where(items: Iterable[str], separator: str, what: str) -> dict[str, str]:
    """`NAME<separator>VALUE` pairs (`--where customer=c7`, `?where=customer:c7`) as `check_where`
    gives them. A name given twice with two values would have to equal both, which no instance
    does: refused, as a mistake."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(separator)
        if not sep or not name:
            raise InputError(f"{what}: expected NAME{separator}VALUE (a search attribute and the value it equals), "
                             f"got {item!r}")
        pair = check_where({name: value})
        if out.get(name, value) != value:
            raise InputError(f"{what}: {name} is given twice, {out[name]!r} and {value!r}: no instance has both")
        out.update(pair)
    return out
