"""One instance driven in memory: its step, children, signals and handler calls, written once.

On etcd, every transition is a transaction, claimed and fenced, because many workers share the
work and any of them may die. Inside one process none of that can happen: nothing outlives the
process, nobody else takes a token. So `dsm run` (`dsm.embedded`) and `dsm test`
(`dsm.testing.runner`) keep the instance in memory and move it with an `InstanceDriver`, built on
the same pure parts a worker's commit uses: `transition.advance` (routing, forks and joins, merge,
retries, catch, the loop guard) applied by `dsm.step`'s `apply` and `bounded` (the record size
limit), and a tick called as `dsm.step.tick_call` says, its result or exception made an outcome
by `dsm.ticks`. What it leaves out is I/O: a transition costs a tick and a pure step, not round
trips.

The driver owns the instance record and its history, the step, the children its call states
start (each driven by a driver of its own; a child's end makes its parent's token due) and those
it lets go of, the signals it is sent, which of its tokens are due and when the next one will be,
and a tick's handler called on this thread. What differs between its users is given to it:

- The clock. `clock` is the instance's time: the wall clock for `dsm run`, the test's virtual
  clock that jumps over waits for `dsm test`. `wall` is the real time a handler's `ctx.deadline`
  is in.
- How attempts run and how the drive loops: a subclass's. The embedded engine's drive is async
  and runs ticks on executor threads (or inline, when quick); the test runner's is sync, one step
  at a time, and calls mocks or handlers directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from . import payloads, search, transition
from .context import Context
from .executors import Attempt
from .graph import Graph, Handler, State
from .records import HistoryEntry, Instance, Token
from .step import Arrival, apply, bounded, tick_call, tick_context, unavailable
from .ticks import TickCall, failure_of, normalize, timed
from .transition import ChildResult, Outcome

MAX_RECORD_BYTES = 1_400_000  # as on etcd: an instance that would not fit there fails here too


class InstanceDriver:
    """One instance in memory: its record, its history, its children; subclasses drive it."""

    def __init__(self, graph: Graph, inst: Instance, *, clock: Callable[[], float], worker: str,
                 payload_limit: int, wall: Callable[[], float] = time.time, handler_worker: str | None = None,
                 max_record_bytes: int = MAX_RECORD_BYTES, on_history: Callable[[HistoryEntry], None] | None = None,
                 on_update: Callable[[Instance], None] | None = None):
        self.graph = graph
        self.inst = inst
        self.history: list[HistoryEntry] = []
        self.clock = clock
        self.wall = wall
        self.worker = worker  # the worker of its history entries
        self.handler_worker = handler_worker  # the worker its handlers' ctx.logger names
        self.payload_limit = payload_limit
        self.max_record_bytes = max_record_bytes
        self.on_history = on_history
        self.on_update = on_update
        self.inflight: dict[str, Attempt] = {}  # token id -> its attempt running elsewhere (a thread)
        self.children: dict[str, InstanceDriver] = {}  # child instances of call states, by id
        self.parent: InstanceDriver | None = None

    # -- hooks of a driver's user ----------------------------------------------------------------
    def spawn(self, graph: Graph, child: Instance) -> InstanceDriver:
        """A driver, of the user's kind, for a child instance a call state started."""
        raise NotImplementedError

    def launch(self, child: InstanceDriver) -> None:
        """Start driving a child; `child_ended` is called when it has gone as far as it goes."""
        raise NotImplementedError

    def woken(self) -> None:
        """The record changed from outside the drive (a signal, a child's end, a cancel)."""

    # -- the step --------------------------------------------------------------------------------
    def step(self, arrivals: list[Arrival], now: float) -> None:
        """Apply the arrivals' outcomes, as a worker's commit does, and start the children they start."""
        started: list[Instance] = []
        after, history = apply(self.graph, self.inst, arrivals, now=now, worker=self.worker, started=started)
        after = search.indexed(self.graph, after)
        after, _, too_large = bounded(self.inst, after, arrivals, now=now, max_record_bytes=self.max_record_bytes,
                                      serialize=False)
        if too_large:
            history, started = [], []
        before, self.inst = self.inst, after
        self.let_go(before)
        self.history.extend(history)
        if self.on_history is not None:
            for entry in history:
                self.on_history(entry)
        for child in started:
            self.start_child(child)
        if self.on_update is not None:
            self.on_update(self.inst)

    def due(self, now: float) -> list[Token]:
        """The tokens due at `now` that are not running already, in the record's order."""
        return [t for t in self.inst.tokens.values() if t.id not in self.inflight and t.not_before <= now]

    def next_due(self, now: float) -> Token | None:
        """Of the tokens due, the one to move first when they go one at a time: a tick-less state
        (as a worker folds it into its commit), then the token that has waited longest, by its
        visit number, so that fork branches and map items take turns in declaration order."""
        due = self.due(now)
        if not due:
            return None
        return min(due, key=lambda t: (self.graph.states[t.state].tick is not None, t.visit, _number(t.id)))

    def next_wake(self) -> float | None:
        """When the earliest token that is not running and not parked (for a signal or a child) is due."""
        waits = [t.not_before for t in self.inst.tokens.values() if t.id not in self.inflight and not t.parked]
        return min(waits) if waits else None

    def tickless(self, token: Token) -> Outcome:
        """The outcome of a token whose state has no tick: it moves on, a call state's with its
        child as it is now (none yet: the step starts one)."""
        if token.child is None:
            return Outcome()
        child = self.children.get(token.child)
        return Outcome(child=ChildResult.of(token.child, child.inst if child is not None else None))

    # -- a tick ----------------------------------------------------------------------------------
    def call_of(self, token: Token, state: State) -> TickCall:
        return tick_call(self.inst, token, state, wall=self.wall, payload_limit=self.payload_limit,
                         worker=self.handler_worker)

    def call_here(self, token: Token, state: State) -> Outcome:
        """The tick's handler, run on this thread now; the outcome says when it began (on the
        driver's clock) and how long it ran."""
        tick = state.tick
        if tick is None or tick.func is None:
            return unavailable(state)
        payload = payloads.copy(self.inst.payload_of(token))
        ctx = tick_context(self.inst, token, state, wall=self.wall, worker=self.handler_worker)
        started_at, started = self.clock(), time.perf_counter()
        try:
            result = self.invoke(tick, payload, ctx)
        except (Exception, SystemExit, asyncio.CancelledError) as exc:
            outcome = Outcome(failure=failure_of(exc))
        else:
            outcome = normalize(result, payload, state.name, self.payload_limit)
        return timed(outcome, started_at, time.perf_counter() - started)

    def invoke(self, tick: Handler, payload: dict[str, Any], ctx: Context) -> Any:
        """Call the handler (a sync one: an async one is awaited by a user that runs them here)."""
        return tick.func(payload, ctx)  # type: ignore[misc]

    # -- children --------------------------------------------------------------------------------
    def start_child(self, child: Instance) -> None:
        """Drive a call state's child beside this instance; its end makes the waiting token due."""
        token = self.inst.tokens.get(child.parent.token) if child.parent is not None else None
        if token is None or token.child != child.id:
            return  # the step that started it went no further (the parent failed in the same step)
        state = self.graph.states[token.state]
        assert state.call is not None and state.call.graph is not None
        driver = self.spawn(state.call.graph, child)
        driver.parent = self
        self.children[child.id] = driver
        self.launch(driver)

    def child_ended(self, child: InstanceDriver) -> None:
        after = transition.child_ended(self.inst, child.inst)
        if after is not self.inst:
            self.inst = after
            self.woken()

    def let_go(self, before: Instance) -> None:
        """Cancel the children this instance let go of since `before` (a call timed out, the
        instance ended), as their parent (`transition.released_children`)."""
        for cid, reason in transition.released_children(before, self.inst, self.clock()):
            child = self.children.get(cid)
            if child is not None:
                child.cancel(reason, transition.by_parent(self.inst.id))

    def cancel(self, reason: str, by: str) -> None:
        """Cancel this instance (its parent let go of it), and its children with it."""
        if self.inst.finished:
            return
        before = self.inst
        self.inst = transition.cancel(before, self.clock(), reason=reason, by=by).instance
        self.let_go(before)
        if self.on_update is not None:
            self.on_update(self.inst)
        self.woken()

    def descendants(self) -> list[Instance]:
        """The children this instance's call states started, and theirs, in the order they started."""
        return [i for child in self.children.values() for i in (child.inst, *child.descendants())]

    # -- signals ---------------------------------------------------------------------------------
    def signal(self, name: str, payload: dict[str, Any], outcome: str | None = None, *,
               limit: int | None = None) -> Instance:
        """Send a signal (`transition.signal`); InvalidSignal when the machine does not take it,
        InputError when the instance has finished (`transition.check_signal`). With `limit`, the
        payload is checked as a store's client checks it."""
        transition.check_signal(self.graph, self.inst, name, outcome)
        if limit is not None:
            payload, _ = payloads.check(payload, limit=limit)
        self.inst = transition.signal(self.inst, name, payload, outcome=outcome, now=self.clock()).instance
        self.woken()
        return self.inst


def _number(token_id: str) -> int:
    digits = token_id.lstrip("t")
    return int(digits) if digits.isdigit() else 0
