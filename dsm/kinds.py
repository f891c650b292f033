"""The kinds of state as data: the keys each kind takes, needs and excludes, and how it is built.

A state routes one way (next, on, choose, fork, map or terminal: exactly one) and, when it is
entered, does at most one thing (a tick, or instead of it a wait, a signal or a call). Each of
these kinds is one row of ROUTES or ACTIVITIES. `check` reads the rows to find every misuse of a
state's keys, with the messages `dsm validate` prints; `build` checks the states a row's keys
name and builds the state from the rows its keys select. A new construct is a new row (and its
builder), not edits across the compiler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from .graph import Call, Choice, Handler, Kind, MapSpec, RetryPolicy, State, Wait
from .guards import Guard, GuardError, compile_guard
from .loader import dotted

Key = tuple[str | int, ...]  # a path into the document
Body = Mapping[str, Any]  # a state as written
Finding = tuple[Key, str]  # a misused key (under the state) and what is wrong with it
Edge = tuple[Key, Any, str]  # a key that names a state, the name as written, and how messages call it
Fields = dict[str, Any]  # the fields of State a row fills in


class Compiling(Protocol):
    """What building a state asks of the compiler of its file."""

    def report(self, path: Key, message: str, *, key: bool = False) -> None: ...

    def check_ref(self, path: Key, target: Any, what: str) -> bool: ...

    def handler(self, path: Key, ref: Any) -> Handler | None: ...

    def duration(self, path: Key, value: Any) -> float | None: ...

    def retry_policy(self, path: Key, raw: dict[str, Any] | None) -> RetryPolicy: ...

    def call(self, path: Key, target: Any) -> Call | None: ...

    def where(self, path: Key) -> tuple[int, int]: ...


Targets = Callable[[str, Body], Iterator[Edge]]
Builder = Callable[[Compiling, Key, str, Body], Fields | None]


def _no_targets(name: str, body: Body) -> Iterator[Edge]:
    return iter(())


@dataclass(frozen=True, slots=True)
class StateKind:
    """One kind of state: the key that makes it, what it asks of the state's other keys, and how
    a state of this kind is built (`targets`: the keys that name other states; `build`: the
    fields of State it fills in, or None after reporting what is wrong)."""

    key: str
    build: Builder
    kind: Kind | None = None  # for a way to route: the graph's name for it
    switch: bool = False  # a boolean key: the state is of this kind only when it is true
    takes: tuple[str, ...] = ()  # keys that only some kinds take: join, merge, status; timeout, retry, catch
    needs: tuple[str, ...] = ()  # keys it cannot do without ...
    missing: str = ""  # ... and what is said when one is missing
    excludes: tuple[str, ...] = ()  # keys it cannot be with ...
    excluded: str = ""  # ... and what is said of each
    label_from: tuple[str, ...] = ()  # the activities that give it a label (it needs one of them) ...
    unlabelled: str = ""  # ... and what is said without
    instead_of_tick: bool = False  # an activity that replaces the tick
    routes_with: tuple[str, ...] = ()  # an activity that goes with these ways to route only
    defaults: bool = False  # an activity that takes the machine's default timeout and retry
    targets: Targets = _no_targets


# -- building, kind by kind ----------------------------------------------------------------------

def _next_targets(name: str, body: Body) -> Iterator[Edge]:
    yield ("next",), body.get("next"), f"state {name!r}: next"


def _on_targets(name: str, body: Body) -> Iterator[Edge]:
    on = body.get("on")
    if not isinstance(on, dict):
        yield ("on",), None, ""  # the schema said what is wrong
        return
    for label, target in on.items():
        yield ("on", label), target, f"state {name!r}: on {label!r}"


def _fork_targets(name: str, body: Body) -> Iterator[Edge]:
    fork = body.get("fork")
    if isinstance(fork, list):
        for i, target in enumerate(fork):
            yield ("fork", i), target, f"state {name!r}: fork branch"
    else:
        yield ("fork",), None, ""
    yield from _join_target(name, body)


def _map_targets(name: str, body: Body) -> Iterator[Edge]:
    spec = body.get("map")
    branch = spec.get("branch") if isinstance(spec, dict) else None
    yield ("map", "branch"), branch, f"state {name!r}: map branch"
    yield from _join_target(name, body)


def _join_target(name: str, body: Body) -> Iterator[Edge]:
    if "join" in body:
        yield ("join",), body.get("join"), f"state {name!r}: join"


def _build_next(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    return {"next": body.get("next")}


def _build_on(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    on = body.get("on")
    return {"on": MappingProxyType(dict(on))} if isinstance(on, dict) else None


def _build_choose(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    """Each entry's target is checked as the entry is built, its guard compiled; a default entry
    (no `when`) comes last and once."""
    entries = body.get("choose")
    if not isinstance(entries, list):
        return None
    ok = True
    choices: list[Choice] = []
    default_at = None
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            ok = False
            continue
        ok &= c.check_ref(path + ("choose", i, "next"), entry.get("next"), f"state {name!r}: choose[{i}].next")
        when = entry.get("when")
        guard = None
        if "when" not in entry:
            if default_at is not None:
                c.report(path + ("choose", i), f"state {name!r}: choose has a second default entry (the first is "
                         f"choose[{default_at}])")
                ok = False
            default_at = i
        elif isinstance(when, str):
            try:
                guard = compile_guard(when)
            except GuardError as exc:
                c.report(path + ("choose", i, "when"), f"state {name!r}: {exc}")
                ok = False
        if default_at is not None and default_at < i and "when" in entry:
            c.report(path + ("choose", i), f"state {name!r}: choose[{i}] follows the default entry "
                     f"choose[{default_at}] and can never be chosen")
            ok = False
        if isinstance(entry.get("next"), str):
            choices.append(Choice(next=entry["next"], guard=guard))
    return {"choose": tuple(choices)} if ok else None


def _build_fork(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    fork = body.get("fork")
    if not isinstance(fork, list):
        return None
    return {"fork": tuple(fork), "join": body.get("join"), "merge": body.get("merge", "keys")}


def _build_map(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    spec = _map_spec(c, path + ("map",), body.get("map"))
    return {"map": spec, "join": body.get("join")} if spec is not None else None


def _build_terminal(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    return {"status": body.get("status", "succeeded")}


def _build_tick(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    tick = c.handler(path + ("tick",), body.get("tick"))
    return {"tick": tick} if tick is not None else None


def _build_wait(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    path += ("wait",)
    raw = body["wait"]
    if isinstance(raw, dict):
        until = _expression(c, path + ("until",), raw.get("until"), f"{dotted(path)}.until")
        return {"wait": Wait(until=until)} if until is not None else None
    seconds = c.duration(path, raw)
    return {"wait": Wait(seconds=seconds)} if seconds is not None else None


def _build_signal(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    return {"signal": body.get("signal")}


def _build_call(c: Compiling, path: Key, name: str, body: Body) -> Fields | None:
    call = c.call(path + ("call",), body["call"])
    return {"call": call} if call is not None else None


def _map_spec(c: Compiling, path: Key, raw: Any) -> MapSpec | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("branch"), str):
        return None
    items = _expression(c, path + ("items",), raw.get("items"), f"{dotted(path)}.items")
    if items is None:
        return None
    limit = raw.get("max_concurrency")
    keys = raw.get("with")
    collect = raw.get("collect")
    return MapSpec(items=items, branch=raw["branch"],
                   max_concurrency=limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
                   else None,
                   with_keys=tuple(k for k in keys if isinstance(k, str)) if isinstance(keys, list) else (),
                   collect=collect if isinstance(collect, str) and collect else "results")


def _expression(c: Compiling, path: Key, source: Any, what: str) -> Guard | None:
    if not isinstance(source, str):
        return None  # the schema reported it
    try:
        return compile_guard(source)
    except GuardError as exc:
        c.report(path, f"{what}: {exc}")
        return None


# -- the table -----------------------------------------------------------------------------------

ROUTES = (  # exactly one per state, in this order in messages
    StateKind("next", _build_next, Kind.NEXT, targets=_next_targets),
    StateKind("on", _build_on, Kind.ON, targets=_on_targets, label_from=("tick", "signal"),
              unlabelled="state {name!r} routes with 'on' but has no tick (or signal) to give a label"),
    StateKind("choose", _build_choose, Kind.CHOOSE),  # its targets are checked entry by entry, as it is built
    StateKind("fork", _build_fork, Kind.FORK, targets=_fork_targets, takes=("join", "merge"), needs=("join",),
              missing="malformed fork in state {name!r}: missing join"),
    StateKind("map", _build_map, Kind.MAP, targets=_map_targets, takes=("join",), needs=("join",),
              missing="malformed map in state {name!r}: missing join (where the machine continues once every item "
                      "has finished)"),
    StateKind("terminal", _build_terminal, Kind.TERMINAL, switch=True, takes=("status",),
              excludes=("tick", "timeout", "retry", "catch", "wait", "signal", "call"),
              excluded="terminal state {name!r} cannot have {what}"),
)
WAITING = ("next", "on", "choose")  # how a state that waits may route
ACTIVITIES = (  # at most one per state
    StateKind("tick", _build_tick, takes=("timeout", "retry", "catch"), defaults=True),
    StateKind("wait", _build_wait, instead_of_tick=True, routes_with=WAITING),
    StateKind("signal", _build_signal, takes=("timeout", "catch"), instead_of_tick=True, routes_with=WAITING),
    StateKind("call", _build_call, takes=("timeout", "retry", "catch"), instead_of_tick=True, routes_with=WAITING),
)
KINDS = ROUTES + ACTIVITIES
TICK = ACTIVITIES[0]
INSTEAD_OF_TICK = tuple(row for row in ACTIVITIES if row.instead_of_tick)
OPTIONS = tuple(dict.fromkeys(key for row in ACTIVITIES for key in row.takes))  # timeout, retry, catch
# Keys that only some ways to route take, and what is said of one found with another: a key some
# kind needs (a join) is looked for among the keys, before the state's kind is known; the others
# against the kind.
STRAYS = {
    "join": "state {name!r} has a join but no {owners}",
    "status": "state {name!r} is not terminal: 'status' applies to terminal states only",
    "merge": "state {name!r} has 'merge' but is not a fork",
}
NEEDED = {key: tuple(row.key for row in ROUTES if key in row.needs) for key in STRAYS
          if any(key in row.needs for row in ROUTES)}
NO_ROUTE = "give it one of next, on, choose, fork + join, or terminal: true"


@dataclass(frozen=True, slots=True)
class Shape:
    """What a state's keys make it: its way to route (None when it has none or several), the
    activities to build (its tick, the first that replaces a tick), and every misuse found."""

    route: StateKind | None
    activities: tuple[StateKind, ...]
    findings: tuple[Finding, ...]


def check(name: str, body: Body) -> Shape:
    """Every misuse of the state's keys the rows forbid, each at the key misused."""
    found: list[Finding] = []
    for key, owners in NEEDED.items():
        if key in body and not any(owner in body for owner in owners):
            found.append(((key,), STRAYS[key].format(name=name, owners=" or ".join(owners))))
    for row in ROUTES:
        if row.key in body:
            found += [((row.key,), row.missing.format(name=name)) for key in row.needs if key not in body]
    instead = [row for row in INSTEAD_OF_TICK if row.key in body]
    if len(instead) > 1:
        first, second = instead[0].key, instead[1].key
        found.append(((second,), f"state {name!r} has both {first!r} and {second!r}: a state waits for one thing"))
    if instead and TICK.key in body:
        what = instead[0].key
        found.append(((what,), f"state {name!r} has a tick and {what!r}: a {what} state replaces the tick; move "
                               "the tick to a state before it"))
    routes = [row for row in ROUTES if row.key in body and (not row.switch or body[row.key] is True)]
    if len(routes) != 1:
        if not routes:
            hint = "terminal: false is not a route" if "terminal" in body else "no routing key"
            found.append(((), f"state {name!r} has {hint}: {NO_ROUTE}"))
        else:
            found.append(((routes[1].key,), f"state {name!r} has several routing keys "
                                            f"({', '.join(row.key for row in routes)}): keep exactly one"))
        return Shape(None, (), tuple(found))
    activities = ((TICK,) if TICK.key in body else ()) + tuple(instead[:1])
    found += _misfits(name, body, routes[0], activities)
    return Shape(routes[0], activities, tuple(found))


def _misfits(name: str, body: Body, route: StateKind, activities: tuple[StateKind, ...]) -> list[Finding]:
    """What the state's way to route and its activity make of its other keys. A key the way to
    route excludes is reported once, as excluded."""
    found: list[Finding] = []
    for key in route.excludes:
        if key in body:
            found.append(((key,), route.excluded.format(name=name, what="a tick" if key == "tick" else repr(key))))
    for key, message in STRAYS.items():
        if key in body and key not in NEEDED and key not in route.takes:
            found.append(((key,), message.format(name=name)))
    activity = activities[-1] if activities else None  # a wait, signal or call rules over a tick
    for key in OPTIONS:
        if key not in body or key in route.excludes or (activity is not None and key in activity.takes):
            continue
        if activity is None:
            found.append(((key,), f"state {name!r} has {key!r} but no tick to apply it to"))
        else:
            what = activity.key
            takes = ", ".join(activity.takes) or f"none of {', '.join(OPTIONS)}"
            found.append(((key,), f"state {name!r} is a {what} state and cannot have {key!r} (a {what} state "
                                  f"takes {takes})"))
    if route.label_from and not any(row.key in route.label_from for row in activities):
        found.append(((route.key,), route.unlabelled.format(name=name)))
    if activity is not None and activity.routes_with and route.key not in activity.routes_with \
            and activity.key not in route.excludes:
        ways = ", ".join(activity.routes_with[:-1]) + " or " + activity.routes_with[-1]
        found.append(((activity.key,), f"state {name!r}: {activity.key!r} routes with {ways}, not with "
                                       f"{route.key}"))
    return found


def build(c: Compiling, name: str, body: Body, defaults: tuple[float | None, dict[str, Any] | None]
          ) -> State | None:
    """The state, or None once every problem it has is reported: its misused keys, the states its
    keys name, and the parts its rows build."""
    path: Key = ("states", name)
    shape = check(name, body)
    for where, message in shape.findings:
        c.report(path + where, message, key=True)
    route = shape.route
    if route is None:
        return None
    ok = not shape.findings
    for where, target, what in route.targets(name, body):
        ok &= c.check_ref(path + where, target, what)
    if "catch" in body:
        ok &= c.check_ref(path + ("catch",), body.get("catch"), f"state {name!r}: catch")
    fields: Fields = {}
    for row in (route, *shape.activities):
        part = row.build(c, path, name, body)
        if part is None:
            ok = False
        else:
            fields.update(part)
    if not ok:
        return None
    return _state(c, path, name, body, route, shape.activities, fields, defaults)


def _state(c: Compiling, path: Key, name: str, body: Body, route: StateKind, activities: tuple[StateKind, ...],
           fields: Fields, defaults: tuple[float | None, dict[str, Any] | None]) -> State:
    """The state with what every kind has: timeout and retry (the machine's defaults for a tick),
    catch, description and where it is written."""
    activity = activities[0] if activities else None  # one at most: two were reported
    default_timeout, default_retry = defaults
    timeout = c.duration(path + ("timeout",), body.get("timeout")) if "timeout" in body else None
    if timeout is None and activity is not None and activity.defaults:
        timeout = default_timeout
    retry = RetryPolicy()
    if activity is not None and "retry" in activity.takes:
        own = body.get("retry") if isinstance(body.get("retry"), dict) else None
        retry = c.retry_policy(path + ("retry",), own if own is not None
                               else default_retry if activity.defaults else None)
    line, col = c.where(path)
    description = body.get("description")
    assert route.kind is not None
    return State(name=name, kind=route.kind, line=line, col=col, timeout=timeout, retry=retry,
                 description=description if isinstance(description, str) else "", catch=body.get("catch"),
                 **fields)
