"""The compiled machine: a frozen graph that the transition function and the workers read."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from .guards import Guard
from .records import DEFAULT_RETENTION

DEFAULT_MAX_TRANSITIONS = 10_000

EMPTY: Mapping[str, Any] = MappingProxyType({})


class Kind(str, Enum):
    """How a state routes: the one routing key it has."""

    NEXT = "next"
    ON = "on"
    CHOOSE = "choose"
    FORK = "fork"
    MAP = "map"
    TERMINAL = "terminal"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a failed tick is tried again; the waits are kept in the store."""

    max_attempts: int = 1
    backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = 300.0
    jitter: bool = True
    non_retryable: tuple[str, ...] = ()

    def delay(self, failed_attempt: int, seed: str) -> float:
        """Wait before the attempt after `failed_attempt` (1-based).

        Jitter spreads the wait over [d/2, d] with a fraction derived from `seed` (instance,
        token and attempt), so the transition stays a pure function and replays identically.
        """
        base = self.backoff * (self.multiplier ** (failed_attempt - 1))
        wait = min(base, self.max_backoff)
        if self.jitter and wait > 0:
            digest = hashlib.blake2b(seed.encode(), digest_size=8).digest()
            fraction = int.from_bytes(digest, "big") / 2**64
            wait = wait * (0.5 + 0.5 * fraction)
        return wait

    def retries(self, error_type: str, error_mro: tuple[str, ...] = ()) -> bool:
        """Whether an error of this type may be retried under this policy."""
        names = {error_type, *error_mro}
        return not names.intersection(self.non_retryable)


@dataclass(frozen=True, slots=True)
class Handler:
    """A tick handler by dotted path; `func` is None when the definition was compiled without imports."""

    ref: str
    module: str
    function: str
    func: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    is_async: bool = False


@dataclass(frozen=True, slots=True)
class Choice:
    """One entry of a `choose` list; `guard` is None for the default entry."""

    next: str
    guard: Guard | None = None

    @property
    def when(self) -> str | None:
        return self.guard.source if self.guard else None


@dataclass(frozen=True, slots=True)
class Wait:
    """A durable timer: `seconds` after the state is entered, or at the time `until` gives."""

    seconds: float | None = None
    until: Guard | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """A child machine, by the path the definition gives (relative to it) and compiled with it."""

    path: str
    graph: Graph | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class MapSpec:
    """A dynamic fan-out: one run of `branch` per item of the list `items` gives."""

    items: Guard
    branch: str
    max_concurrency: int | None = None
    with_keys: tuple[str, ...] = ()
    collect: str = "results"


@dataclass(frozen=True, slots=True)
class State:
    name: str
    kind: Kind
    line: int = 0
    col: int = 0
    description: str = ""
    tick: Handler | None = None
    next: str | None = None
    on: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    choose: tuple[Choice, ...] = ()
    fork: tuple[str, ...] = ()
    join: str | None = None
    merge: str = "keys"
    status: str = "succeeded"
    timeout: float | None = None
    retry: RetryPolicy = RetryPolicy()
    catch: str | None = None
    wait: Wait | None = None  # these three replace the tick: the state waits, holding no worker
    signal: str | None = None
    call: Call | None = None
    map: MapSpec | None = None

    @property
    def terminal(self) -> bool:
        return self.kind is Kind.TERMINAL

    @property
    def waits(self) -> str | None:
        """What the state waits for, if it does: "timer", "signal" or "child"."""
        if self.wait is not None:
            return "timer"
        if self.signal is not None:
            return "signal"
        if self.call is not None:
            return "child"
        return None

    def targets(self) -> tuple[str, ...]:
        """States this one can route to directly (fork branches, not the join; catch included)."""
        if self.kind is Kind.NEXT:
            out: tuple[str, ...] = (self.next,)  # type: ignore[assignment]
        elif self.kind is Kind.ON:
            out = tuple(dict.fromkeys(self.on.values()))
        elif self.kind is Kind.CHOOSE:
            out = tuple(dict.fromkeys(c.next for c in self.choose))
        elif self.kind is Kind.FORK:
            out = self.fork
        elif self.kind is Kind.MAP:
            out = (self.map.branch,) if self.map is not None else ()
        else:
            out = ()
        if self.catch and self.catch not in out:
            out = out + (self.catch,)
        return out


@dataclass(frozen=True, slots=True)
class Fork:
    """A fork state's structure: its branches (by first state), their members, and the join. A map
    state has one too (`map` set), with its one branch, run once per item."""

    state: str
    branches: tuple[str, ...]
    join: str
    merge: str
    members: Mapping[str, frozenset[str]]
    map: MapSpec | None = None


Frame = tuple[str, str]  # (fork state, branch name)


@dataclass(frozen=True, slots=True)
class SignalRoutes:
    """What a machine takes of one signal name: the states that wait for it, the outcome labels
    those that route with `on` route on (in declaration order), and whether one of them takes it
    without a label (it routes with `next` or `choose`, where a label would route nothing)."""

    name: str
    states: tuple[str, ...]
    outcomes: tuple[str, ...]
    bare: bool

    def as_dict(self) -> dict[str, Any]:
        """As the API offers it (a form that sends signals offers these)."""
        return {"name": self.name, "states": list(self.states), "outcomes": list(self.outcomes),
                "outcome_required": not self.bare}


@dataclass(frozen=True, slots=True)
class Graph:
    machine: str
    start: str
    states: Mapping[str, State]
    forks: Mapping[str, Fork] = field(default_factory=lambda: EMPTY)
    # state -> enclosing (fork, branch) pairs, outermost first
    frames: Mapping[str, tuple[Frame, ...]] = field(default_factory=lambda: EMPTY)
    join_of: Mapping[str, str] = field(default_factory=lambda: EMPTY)  # join state -> its fork state
    version: int | str | None = None
    description: str = ""
    max_transitions: int = DEFAULT_MAX_TRANSITIONS
    digest: str = ""
    file: str = ""
    source: str = field(default="", repr=False, compare=False)
    retention: float = DEFAULT_RETENTION
    # search attributes: name -> expression over the payload (`search.py`), in the file's order
    search: Mapping[str, Guard] = field(default_factory=lambda: EMPTY)

    def state(self, name: str) -> State:
        return self.states[name]

    def signals(self) -> dict[str, SignalRoutes]:
        """The signals this machine's own states wait for (not those of the machines it calls),
        by name, in the order the states are declared."""
        states: dict[str, list[str]] = {}
        outcomes: dict[str, dict[str, None]] = {}
        bare: dict[str, bool] = {}
        for st in self.states.values():
            if st.signal is None:
                continue
            states.setdefault(st.signal, []).append(st.name)
            labels = outcomes.setdefault(st.signal, {})
            if st.kind is Kind.ON:
                labels.update(dict.fromkeys(st.on))
            else:
                bare[st.signal] = True
        return {name: SignalRoutes(name, tuple(names), tuple(outcomes[name]), bare.get(name, False))
                for name, names in states.items()}

    def modules(self) -> tuple[str, ...]:
        """Handler modules this machine needs, in order of first use, then those of the machines it
        calls (a worker runs those too)."""
        machines = [self, *self.children().values()]
        return tuple(dict.fromkeys(s.tick.module for g in machines for s in g.states.values() if s.tick))

    def has_guards(self) -> bool:
        """Whether routing this machine evaluates guard expressions (definition code, budgeted)."""
        return any(c.guard is not None for s in self.states.values() for c in s.choose) or any(
            s.map is not None or (s.wait is not None and s.wait.until is not None) for s in self.states.values())

    def children(self) -> dict[str, Graph]:
        """Every machine this one calls, directly or through its children, by digest."""
        out: dict[str, Graph] = {}
        stack = [self]
        while stack:
            for st in stack.pop().states.values():
                child = st.call.graph if st.call is not None else None
                if child is not None and child.digest not in out:
                    out[child.digest] = child
                    stack.append(child)
        return out


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # what digest_of gives


def digest_of(source: str, calls: Mapping[str, str] | None = None) -> str:
    """Content digest that pins an instance to the exact definition text it started with, and to
    the digests of the machines it calls (by call path), so that a child's YAML moving on does not
    change running parents either."""
    text = source
    if calls:
        text += "".join(f"\n#call {path} {digest}" for path, digest in sorted(calls.items()))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
