"""The embedded engine: one instance run to its end inside this process, with no store at all.

On etcd, every transition is a transaction, claimed and fenced, because many workers share the
work and any of them may die. Inside one process none of that can happen: nothing outlives the
process, nobody else takes a token. So the embedded engine keeps the instance in memory and
drives it with the same pure parts the workers use: `transition.advance` (routing, forks and
joins, merge, retries, catch, the loop guard) applied by `dsm.step`'s `apply` and `bounded` (the
record size limit), and `dsm.ticks`'s `normalize` and `failure_of`. A tick-less state moves on
in the very next step, before any other tick starts, as a worker folds it into its commit.
What it leaves out is I/O: a transition costs a tick and a pure step, not round trips.

Ticks run as on a worker: up to `workers` at once, on threads (`ThreadExecutor`), with their
timeouts. A state whose sync tick (without a timeout) has proved quick, several attempts in a row
under QUICK seconds, runs inline on this thread when it is the only work at that moment: there
is nothing to overlap with, so a long machine runs at the speed of its handlers instead of a
thread hand-off per tick. One slow inline attempt sends the state back to threads, so Ctrl-C and
`--timeout` are never held up for long. Retry backoff waits on this process's clock. When the
instance ends, attempts still running are abandoned (`ctx.heartbeat()` raises), as a worker
abandons them when a sibling fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import payloads, transition
from .context import make_context
from .errors import NotFound
from .executors import Attempt, Executor, ThreadExecutor
from .graph import Graph, State
from .records import HistoryEntry, Instance, Token, new_id
from .step import Arrival, apply, bounded
from .ticks import TickCall, failure_of, normalize, report_failure
from .transition import ChildResult, Failure, Outcome

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 1_400_000  # as on etcd: an instance that would not fit there fails here too
QUICK = 0.002  # seconds: a tick this fast, PROVEN times in a row, may run inline
PROVEN = 3
YIELD_EVERY = 0.005  # seconds of inline work between looks at the event loop (signals, timeouts)


@dataclass
class Engine:
    """Runs instances of one graph in this process."""

    graph: Graph
    workers: int = 4
    worker_id: str = "embedded"
    wall: Callable[[], float] = time.time
    payload_limit: int = field(default_factory=payloads.default_limit)
    max_record_bytes: int = MAX_RECORD_BYTES
    on_history: Callable[[HistoryEntry], None] | None = None
    on_update: Callable[[Instance], None] | None = None
    executor: Executor | None = None
    inline: bool = True  # quick path for a lone sync tick without a timeout (off when the run has a deadline)
    partial: _Run | None = field(default=None, repr=False)  # the run in progress, also after a timeout
    runs: dict[str, _Run] = field(default_factory=dict, repr=False)  # by instance id, children included

    def signal(self, instance_id: str, name: str, payload: dict[str, Any] | None = None, *,
               outcome: str | None = None) -> Instance:
        """Send a signal to an instance this engine runs (`transition.signal`); InvalidSignal when
        its machine does not take it (`transition.check_signal`), InputError when it has finished,
        NotFound when this engine does not run it."""
        run = self.runs.get(instance_id)
        if run is None:
            raise NotFound(f"no instance {instance_id!r} runs in this process")
        transition.check_signal(run.graph, run.inst, name, outcome)
        checked, _ = payloads.check(payload if payload is not None else {}, limit=self.payload_limit)
        return run.signal(name, checked, outcome)

    async def run(self, payload: dict[str, Any], instance_id: str | None = None,
                  on_start: Callable[[str], None] | None = None) -> tuple[Instance, list[HistoryEntry]]:
        """Run one instance to its end; return it and its history. Cancelling the task stops it
        (attempts in flight are abandoned) and the partial run is in `self.partial`."""
        checked, _ = payloads.check(payload, limit=self.payload_limit)
        run = _Run(self, transition.start(self.graph, instance_id or new_id(), checked, self.wall()))
        self.partial = run
        if on_start is not None:
            on_start(run.inst.id)
        await run.run()
        return run.inst, run.history


class _Run:
    """One instance in flight: its record, its history, and the attempts running for it."""

    def __init__(self, engine: Engine, inst: Instance):
        self.engine = engine
        self.graph = engine.graph
        self.inst = inst
        self.history: list[HistoryEntry] = []
        self.inflight: dict[str, tuple[Token, Attempt]] = {}
        self.finished: list[tuple[Token, Outcome]] = []
        self.wake = asyncio.Event()
        self.executor: Executor | None = engine.executor
        self.own_executor = False
        self.tasks: set[asyncio.Task] = set()
        self.quick: dict[str, int] = {}  # state -> its last attempts in a row that were quick
        self.children: dict[str, _Run] = {}  # child instances of call states, by id
        self.parent: _Run | None = None

    async def run(self) -> None:
        self.engine.runs[self.inst.id] = self
        try:
            await self.drive()
        finally:
            self.stop()
            self.engine.runs.pop(self.inst.id, None)

    def signal(self, name: str, payload: dict[str, Any], outcome: str | None) -> Instance:
        step = transition.signal(self.inst, name, payload, outcome=outcome, now=self.engine.wall())
        self.inst = step.instance
        self.wake.set()
        return self.inst

    def start_child(self, child: Instance) -> None:
        """Run a call state's child beside this instance; its end makes the waiting token due."""
        token = self.inst.tokens.get(child.parent.token) if child.parent is not None else None
        if token is None or token.child != child.id:
            return  # the step that started it went no further (the parent failed in the same step)
        state = self.graph.states[token.state]
        assert state.call is not None and state.call.graph is not None
        engine = replace(self.engine, graph=state.call.graph, on_history=None, partial=None)  # updates: all of them
        run = _Run(engine, child)
        run.parent = self
        self.children[child.id] = run
        task = asyncio.get_running_loop().create_task(run.run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def let_go(self, before: Instance) -> None:
        """Cancel the children this instance let go of since `before` (a call timed out, the
        instance ended), as their parent (`transition.released_children`)."""
        for cid, reason in transition.released_children(before, self.inst, self.engine.wall()):
            child = self.children.get(cid)
            if child is not None:
                child.cancel(reason, transition.by_parent(self.inst.id))

    def cancel(self, reason: str, by: str) -> None:
        """Cancel this instance (its parent let go of it): its run stops, and so do its children."""
        if self.inst.finished:
            return
        before = self.inst
        self.inst = transition.cancel(before, self.engine.wall(), reason=reason, by=by).instance
        self.let_go(before)
        if self.engine.on_update is not None:
            self.engine.on_update(self.inst)
        self.wake.set()  # its drive sees it finished and ends; stop() abandons its attempts

    def child_ended(self, child: _Run) -> None:
        after = transition.child_ended(self.inst, child.inst)
        if after is not self.inst:
            self.inst = after
            self.wake.set()

    def child_result(self, token: Token) -> ChildResult | None:
        if token.child is None:
            return None
        run = self.children.get(token.child)
        return ChildResult.of(token.child, run.inst if run is not None else None)

    @property
    def snapshot(self) -> tuple[Instance, list[HistoryEntry]]:
        return self.inst, self.history

    async def drive(self) -> None:
        engine = self.engine
        if engine.on_update is not None:
            engine.on_update(self.inst)
        yielded = time.perf_counter()
        while not self.inst.finished:
            if time.perf_counter() - yielded > YIELD_EVERY:
                await asyncio.sleep(0)  # let the loop see signals and deadlines between inline ticks
                yielded = time.perf_counter()
            now = engine.wall()
            if self.finished:  # outcomes first: their tokens move on before anything is started again
                arrivals = [Arrival(token, 0, outcome) for token, outcome in self.finished]
                self.finished.clear()
                self.step(arrivals, now)
                continue
            arrivals = []
            due = [t for t in self.inst.tokens.values() if t.id not in self.inflight and t.not_before <= now]
            for token in due:
                state = self.graph.states[token.state]
                if state.tick is None:
                    arrivals.append(Arrival(token, 0, Outcome(child=self.child_result(token))))
                elif len(self.inflight) < engine.workers:
                    if (engine.inline and not self.inflight and len(due) == 1 and not arrivals
                            and self.quick.get(state.name, 0) >= PROVEN and _inline(state)):
                        arrivals.append(Arrival(token, 0, self.call(token, state)))
                    else:
                        self.start(token, state)
            if arrivals:
                self.step(arrivals, now)
                continue
            waits = [t.not_before - now for t in self.inst.tokens.values() if t.id not in self.inflight
                     and not t.parked]
            delay = min(waits) if waits else None
            if not self.inflight and delay is None and not any(t.parked for t in self.inst.tokens.values()):
                raise AssertionError(f"instance {self.inst.id}: running with nothing to do")  # the compiler's job
            self.wake.clear()
            if self.finished:
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=max(delay, 0.0) if delay is not None else None)
            except asyncio.TimeoutError:
                pass
            yielded = time.perf_counter()
        await asyncio.sleep(0)  # a signal that came during the last inline tick is seen before we return

    def step(self, arrivals: list[Arrival], now: float) -> None:
        engine = self.engine
        started: list[Instance] = []
        after, history = apply(self.graph, self.inst, arrivals, now=now, worker=engine.worker_id, started=started)
        after, _, too_large = bounded(self.inst, after, arrivals, now=now, max_record_bytes=engine.max_record_bytes,
                                      serialize=False)
        if too_large:
            history, started = [], []
        before, self.inst = self.inst, after
        self.let_go(before)
        for child in started:
            self.start_child(child)
        self.history.extend(history)
        if engine.on_history is not None:
            for entry in history:
                engine.on_history(entry)
        if engine.on_update is not None:
            engine.on_update(self.inst)

    def call_of(self, token: Token, state: State) -> TickCall:
        timeout = state.timeout
        return TickCall(handler=state.tick, payload=payloads.copy(self.inst.payload_of(token)),  # type: ignore[arg-type]
                        instance_id=self.inst.id, machine=self.inst.machine, state=state.name,
                        attempt=token.attempt, branch=token.branch, visit=token.visit, timeout=timeout,
                        deadline=self.engine.wall() + timeout if timeout else None,
                        payload_limit=self.engine.payload_limit, worker=self.engine.worker_id)

    def call(self, token: Token, state: State) -> Outcome:
        """A sync tick without a timeout, run here and now (the hot path of a long machine)."""
        func = state.tick.func if state.tick is not None else None
        if func is None:
            return _unavailable(state)
        inst = self.inst
        payload = payloads.copy(inst.payload_of(token))
        ctx = make_context(instance_id=inst.id, machine=inst.machine, state=state.name, attempt=token.attempt,
                           branch=token.branch, visit=token.visit, deadline=None, worker=self.engine.worker_id)
        started_at, started = self.engine.wall(), time.perf_counter()
        try:
            result = func(payload, ctx)
        except (Exception, SystemExit) as exc:
            outcome = Outcome(failure=failure_of(exc))
        else:
            outcome = normalize(result, payload, state.name, self.engine.payload_limit)
        took = time.perf_counter() - started
        self.timed(state, took)
        if outcome.failure is not None:
            report_failure(log, self.call_of(token, state), outcome)
        return _timed(outcome, started_at, took)

    def timed(self, state: State, seconds: float) -> None:
        """Count how quick a state's attempts are, to decide where its next ones run."""
        self.quick[state.name] = self.quick.get(state.name, 0) + 1 if seconds < QUICK else 0

    def start(self, token: Token, state: State) -> None:
        if state.tick is None or state.tick.func is None:
            self.finished.append((token, _unavailable(state)))
            return
        if self.executor is None:
            self.executor = ThreadExecutor(self.engine.workers, name="dsm-embedded")
            self.own_executor = True
        call = self.call_of(token, state)
        attempt = self.executor.start(call)
        self.inflight[token.id] = (token, attempt)
        task = asyncio.get_running_loop().create_task(self.wait_for(token, call, state, attempt))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait_for(self, token: Token, call: TickCall, state: State, attempt: Attempt) -> None:
        started_at, started = self.engine.wall(), time.perf_counter()
        outcome = await attempt.outcome()
        took = time.perf_counter() - started
        self.timed(state, took)
        report_failure(log, call, outcome)
        outcome = _timed(outcome, started_at, took)
        if self.inflight.get(token.id, (None, None))[1] is attempt:
            del self.inflight[token.id]
            self.finished.append((token, outcome))
            self.wake.set()

    def stop(self) -> None:
        if self.parent is not None:
            self.parent.child_ended(self)
        for child in self.children.values():  # the run stopped before the instance ended (a timeout)
            child.cancel(f"the embedded run of its parent {self.inst.id} stopped", transition.by_parent(self.inst.id))
        for _, attempt in self.inflight.values():
            attempt.abandon(f"instance {self.inst.id} is {self.inst.status}" if self.inst.finished
                            else "the embedded run stopped")
        self.inflight.clear()
        for task in self.tasks:
            task.cancel()
        if self.own_executor and self.executor is not None:
            self.executor.close()


def _timed(outcome: Outcome, started_at: float, duration: float) -> Outcome:
    """The outcome with when its attempt began and how long it ran (for the history)."""
    return Outcome(outcome.payload, outcome.label, outcome.failure, started_at, duration)


def _inline(state: State) -> bool:
    tick = state.tick
    return tick is not None and tick.func is not None and not tick.is_async and state.timeout is None


def _unavailable(state: State) -> Outcome:
    ref = state.tick.ref if state.tick else "?"
    return Outcome(failure=Failure("HandlerUnavailable", f"state {state.name!r}: handler {ref!r} was not imported",
                                   retryable=True))
