"""Embedded execution (`dsm run` without etcd): one instance run to its end in this process, with
no store at all; nothing outlives it.

The `Engine` drives the instance with an `InstanceDriver` (`dsm.driver`: the step, children,
signals, handler calls, shared with `dsm test`) on the wall clock. A tick-less state moves on in
the very next step, before any other tick starts, as a worker folds it into its commit.

Ticks run as on a worker: up to `workers` at once, on threads (`ThreadExecutor`), with their
timeouts, so fork branches really overlap. A state whose sync tick (without a timeout) has proved
quick, several attempts in a row under QUICK seconds, runs inline on this thread when it is the
only work at that moment: there is nothing to overlap with, so a long machine runs at the speed
of its handlers instead of a thread hand-off per tick. One slow inline attempt sends the state
back to threads, so Ctrl-C and `--timeout` are never held up for long. Retry backoff waits on
this process's clock. When the instance ends, attempts still running are abandoned
(`ctx.heartbeat()` raises), as a worker abandons them when a sibling fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import compiler, payloads, transition
from .driver import MAX_RECORD_BYTES, InstanceDriver
from .errors import NotFound
from .executors import Attempt, Executor, ThreadExecutor
from .graph import Graph, State
from .records import HistoryEntry, Instance, Token, new_id, public_record
from .step import Arrival, unavailable
from .ticks import TickCall, report_failure, timed
from .transition import Outcome

log = logging.getLogger(__name__)

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
        """Send a signal to an instance this engine runs (`InstanceDriver.signal`); NotFound when
        this engine does not run it."""
        run = self.runs.get(instance_id)
        if run is None:
            raise NotFound(f"no instance {instance_id!r} runs in this process")
        return run.signal(name, payload if payload is not None else {}, outcome, limit=self.payload_limit)

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


class _Run(InstanceDriver):
    """One instance in flight on the event loop: the driver, and the attempts running for it."""

    def __init__(self, engine: Engine, inst: Instance):
        super().__init__(engine.graph, inst, clock=engine.wall, wall=engine.wall, worker=engine.worker_id,
                         handler_worker=engine.worker_id, payload_limit=engine.payload_limit,
                         max_record_bytes=engine.max_record_bytes, on_history=engine.on_history,
                         on_update=engine.on_update)
        self.engine = engine
        self.finished: list[tuple[Token, Outcome]] = []
        self.wake = asyncio.Event()
        self.executor: Executor | None = engine.executor
        self.own_executor = False
        self.tasks: set[asyncio.Task] = set()
        self.quick: dict[str, int] = {}  # state -> its last attempts in a row that were quick

    async def run(self) -> None:
        self.engine.runs[self.inst.id] = self
        try:
            await self.drive()
        finally:
            self.stop()
            self.engine.runs.pop(self.inst.id, None)

    def woken(self) -> None:
        self.wake.set()

    def spawn(self, graph: Graph, child: Instance) -> InstanceDriver:
        return _Run(replace(self.engine, graph=graph, on_history=None, partial=None), child)  # updates: all of them

    def launch(self, child: InstanceDriver) -> None:
        assert isinstance(child, _Run)
        self.keep(child.run())

    def keep(self, work: Any) -> None:
        """A task of this run's, cancelled when it stops."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drive(self) -> None:
        engine = self.engine
        if self.on_update is not None:
            self.on_update(self.inst)
        yielded = time.perf_counter()
        while not self.inst.finished:
            if time.perf_counter() - yielded > YIELD_EVERY:
                await asyncio.sleep(0)  # let the loop see signals and deadlines between inline ticks
                yielded = time.perf_counter()
            now = self.clock()
            if self.finished:  # outcomes first: their tokens move on before anything is started again
                arrivals = [Arrival(token, 0, outcome) for token, outcome in self.finished]
                self.finished.clear()
                self.step(arrivals, now)
                continue
            arrivals = []
            due = self.due(now)
            for token in due:
                state = self.graph.states[token.state]
                if state.tick is None:
                    arrivals.append(Arrival(token, 0, self.tickless(token)))
                elif len(self.inflight) < engine.workers:
                    if (engine.inline and not self.inflight and len(due) == 1 and not arrivals
                            and self.quick.get(state.name, 0) >= PROVEN and _inline(state)):
                        arrivals.append(Arrival(token, 0, self.call_inline(token, state)))
                    else:
                        self.start(token, state)
            if arrivals:
                self.step(arrivals, now)
                continue
            wake = self.next_wake()
            if not self.inflight and wake is None and not any(t.parked for t in self.inst.tokens.values()):
                raise AssertionError(f"instance {self.inst.id}: running with nothing to do")  # the compiler's job
            self.wake.clear()
            if self.finished:
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=max(wake - now, 0.0) if wake is not None else None)
            except asyncio.TimeoutError:
                pass
            yielded = time.perf_counter()
        await asyncio.sleep(0)  # a signal that came during the last inline tick is seen before we return

    def call_inline(self, token: Token, state: State) -> Outcome:
        """A sync tick without a timeout, run here and now (the hot path of a long machine)."""
        outcome = self.call_here(token, state)
        self.timed(state, outcome.duration or 0.0)
        if outcome.failure is not None:
            report_failure(log, self.call_of(token, state), outcome)
        return outcome

    def timed(self, state: State, seconds: float) -> None:
        """Count how quick a state's attempts are, to decide where its next ones run."""
        self.quick[state.name] = self.quick.get(state.name, 0) + 1 if seconds < QUICK else 0

    def start(self, token: Token, state: State) -> None:
        if state.tick is None or state.tick.func is None:
            self.finished.append((token, unavailable(state)))
            return
        if self.executor is None:
            self.executor = ThreadExecutor(self.engine.workers, name="dsm-embedded")
            self.own_executor = True
        call = self.call_of(token, state)
        attempt = self.executor.start(call)
        self.inflight[token.id] = attempt
        self.keep(self.wait_for(token, call, state, attempt))

    async def wait_for(self, token: Token, call: TickCall, state: State, attempt: Attempt) -> None:
        started_at, started = self.clock(), time.perf_counter()
        outcome = await attempt.outcome()
        took = time.perf_counter() - started
        self.timed(state, took)
        report_failure(log, call, outcome)
        outcome = timed(outcome, started_at, took)
        if self.inflight.get(token.id) is attempt:
            del self.inflight[token.id]
            self.finished.append((token, outcome))
            self.wake.set()

    def stop(self) -> None:
        if self.parent is not None:
            self.parent.child_ended(self)
        for child in self.children.values():  # the run stopped before the instance ended (a timeout)
            child.cancel(f"the embedded run of its parent {self.inst.id} stopped", transition.by_parent(self.inst.id))
        for attempt in self.inflight.values():
            attempt.abandon(f"instance {self.inst.id} is {self.inst.status}" if self.inst.finished
                            else "the embedded run stopped")
        self.inflight.clear()
        for task in self.tasks:
            task.cancel()
        if self.own_executor and self.executor is not None:
            self.executor.close()


def _inline(state: State) -> bool:
    tick = state.tick
    return tick is not None and tick.func is not None and not tick.is_async and state.timeout is None


@dataclass
class Result:
    """A finished (or, after a timeout, unfinished) instance and its history."""

    instance: Instance
    history: list[HistoryEntry]

    @property
    def record(self) -> dict[str, Any]:
        return public_record(self.instance, self.history)


async def run_graph(graph: Graph, payload: dict[str, Any] | None = None, *, workers: int = 4,
                    timeout: float | None = None, on_history: Callable[[HistoryEntry], None] | None = None,
                    on_update: Callable[[Instance], None] | None = None,
                    on_start: Callable[[str], None] | None = None, instance_id: str | None = None) -> Result:
    """Run one instance to its end in this process (`Engine`).

    Raises asyncio.TimeoutError (with the partial Result as its only argument) when `timeout` passes.
    """
    engine = Engine(graph, workers=max(1, workers), on_history=on_history, on_update=on_update,
                    inline=timeout is None)
    try:
        inst, history = await asyncio.wait_for(engine.run(payload or {}, instance_id, on_start=on_start), timeout)
    except asyncio.TimeoutError:
        run = engine.partial
        if run is None:
            raise
        raise asyncio.TimeoutError(Result(run.inst, list(run.history))) from None
    return Result(inst, history)


def run(definition: str | Path | Graph, payload: dict[str, Any] | None = None, *, workers: int = 4,
        timeout: float | None = None) -> dict[str, Any]:
    """Run a machine embedded and return its instance record (the `dsm run --json` record)."""
    graph = definition if isinstance(definition, Graph) else compiler.load(definition)
    return asyncio.run(run_graph(graph, payload, workers=workers, timeout=timeout)).record
