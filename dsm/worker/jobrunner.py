"""Running ticks: a job on each claimed token, its attempts, and the claim given back on every path
that does not hand it on.

A job runs its token's tick on the executor, commits the outcome (`committing.py`) and, while
the token moves along a line and stays ours, runs the next tick without another claim. Along a
line it runs ahead of its commits: up to `run_ahead` ticks go in one commit, applied in order (a
transaction and its round trip per run instead of per tick), and no outcome waits for its commit
longer than RUN_AHEAD_TIME (a slow tick has those before it committed while it runs). A worker
that dies meanwhile loses the run's ticks, which run again, as any tick whose commit did not
apply (docs/worker.md, "Running ahead along a line"). A token
claimed for this worker by a commit (a fork's branches) starts at once if a slot is free, or
waits for one (`hand_on`). A job that ends, however it ends, gives its slot back, and the slot
goes first to a claimed token waiting for one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .. import logs
from ..commits import step_on_line
from ..definitions import Registry
from ..errors import NotFound, StoreError
from ..executors import Executor
from ..graph import Graph
from ..keys import Keys, TokenRef
from ..markers import work_info
from ..records import Instance, Token
from ..step import Arrival, tick_call
from ..store import Compare, Get, Put, Store, Txn
from ..ticks import report_failure
from ..transition import Failure, Outcome
from .admission import Admission
from .cache import RecordCache
from .claims import Claims
from .committing import Committer, HandOn
from .defaults import RUN_AHEAD_TIME
from .jobs import Job, JobTable
from .meter import Meter
from .queue import CandidateQueue
from .slots import Slots
from .stats import WorkerStats

log = logging.getLogger("dsm.worker")


class JobRunner:
    """Owns the worker's jobs (`jobs`) and the committer they commit through (`committer`)."""

    def __init__(self, store: Store, keys: Keys, registry: Registry, executor: Executor, claims: Claims, *,
                 name: str, commits: Callable[[HandOn], Committer], jobs: JobTable, admission: Admission,
                 records: RecordCache, slots: Slots[TokenRef], queue: CandidateQueue[TokenRef], wake: asyncio.Event,
                 meter: Meter, stats: WorkerStats, payload_limit: int, run_ahead: int = 1,
                 offload_guards: bool = True, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic):
        """`commits(hand_on)`: the committer, given how to run the tokens its commits claim.
        `wake`: set when a slot frees (the dispatcher fills it). `run_ahead`: ticks along a line
        in one commit (1: a commit each); not for machines with guards when `offload_guards` (their
        routing runs on a thread, in the commit, off the loop)."""
        self.store = store
        self.keys = keys
        self.registry = registry
        self.executor = executor
        self.claims = claims
        self.name = name
        self.jobs = jobs
        self.admission = admission
        self.records = records
        self.slots = slots
        self.queue = queue
        self.wake = wake
        self.meter = meter
        self.stats = stats
        self.payload_limit = payload_limit
        self.run_ahead = run_ahead
        self.offload_guards = offload_guards
        self._limits: dict[str, int] = {}  # definition digest -> ticks along a line in one commit
        self.wall = wall
        self.clock = clock
        self.committer = commits(self.hand_on)
        self._stopping = False

    def stop(self) -> None:
        """The worker stops: no job starts any more, and commits claim no new tokens."""
        self._stopping = True
        self.committer.stop()

    def busy(self, ref: TokenRef) -> bool:
        """Whether a job, a commit or a wait for a slot of ours uses `ref`."""
        return ref in self.jobs or self.committer.committing(ref.instance) or self.slots.holds(ref)

    def lose_all(self) -> None:
        """The lease is gone, and every claim with it."""
        for waiting in self.slots.drop_waiting():
            self.records.release(waiting.ref.instance)
        self.jobs.abandon_all("the worker's lease expired")

    def cancel_all(self) -> None:
        """The worker stops now: whatever still runs no longer counts (its claims go with the lease)."""
        for job in self.jobs:
            job.abandon("worker is shutting down")
            if job.task is not None:
                job.task.cancel()

    def free(self, n: int) -> None:
        """`n` slots are free again: tokens waiting for one go first, then the dispatcher fills them."""
        self.slots.give(n)
        while not self._stopping:
            waiting = self.slots.next_ready()
            if waiting is None:
                break
            self.start(waiting.ref, waiting.claim_rev, waiting.lease, held=True)
        self.wake.set()

    def hand_on(self, ref: TokenRef, claim_rev: int, lease: int | None) -> None:
        """A token this worker claimed in a commit (under `lease`): run it now if a slot is free,
        else queue it."""
        if self.slots.busy < self.slots.capacity and not self._stopping:
            self.slots.take()
            self.start(ref, claim_rev, lease)
        else:
            self.records.hold(ref.instance)
            self.slots.park(ref, claim_rev, lease)

    def start(self, ref: TokenRef, claim_rev: int, lease: int | None, *, held: bool = False,
              woken: bool = False) -> None:
        """Start a job on a token claimed at `claim_rev` under `lease`; its slot is taken. `held`:
        the record is already held for it (it waited for a slot). `woken`: its marker said due now."""
        job = Job(ref, claim_rev, lease, woken=woken)
        self.jobs.add(job)
        if not held:
            self.records.hold(ref.instance)
        job.task = asyncio.get_running_loop().create_task(self._run_job(job))

    async def _run_job(self, job: Job) -> None:
        iid, tok, _ = job.ref
        try:
            await self._work_on(job)
        except asyncio.CancelledError:
            pass  # shutting down: the lease's revocation frees the claim
        except Exception:
            log.exception("worker %s: internal error on token %s; giving its claim back", self.name, tok,
                          extra=self.claims.about(iid, tok))
            await self.claims.release(job.ref, job.claim_rev)
        finally:
            self.jobs.remove(job.ref)
            self.queue.requeue(job.ref)
            self.records.release(iid)
            self.free(1)

    async def _work_on(self, job: Job) -> None:
        """Run the job's token, and keep running it while it moves along a line and stays ours."""
        iid, tok, place = job.ref
        while True:
            inst, _ = self.records.get(iid)
            token = inst.tokens.get(tok)
            if token is None or inst.finished or place != self.keys.place_of(inst):
                # the SYNC marker, or one the record no longer lists (its removal was deferred), or
                # one away from the instance's place (no commit could compare it): reconcile
                await self.claims.reconcile(job.ref)
                return
            if job.woken and token.not_before > 0.0 and token.child is None:
                await self._stale_wake(job)
                return
            job.woken = False
            try:
                graph = await self.registry.get(inst.digest)
            except NotFound as exc:
                # Said once per definition, by the registry; here, for each instance, only in debug.
                log.debug("worker %s: %s; leaving it to other workers", self.name, exc,
                          extra=logs.about(iid, inst.machine, token.state, token.attempt, self.name))
                self.admission.unservable(iid, inst.digest)
                await self.claims.release(job.ref, job.claim_rev)
                return
            arrivals = await self._run_line(graph, inst, token, job)
            if arrivals is None or not await self.committer.commit(graph, job, arrivals):
                return
            job.attempt = None

    async def _run_line(self, graph: Graph, inst: Instance, token: Token, job: Job) -> list[Arrival] | None:
        """Run the token's tick and, while its outcome moves it along a line (`step_on_line`), the
        next ones: the outcomes for one commit, each with the token as its attempt saw it and the
        step it makes (which the commit applies as it is while the record is unchanged). At most
        `run_ahead` of them, and an outcome waits for its commit RUN_AHEAD_TIME at most: a tick
        that runs past that has the outcomes before it committed meanwhile. None when such a
        commit found the token no longer ours (the job is done with it)."""
        limit = self._limits.get(graph.digest)
        if limit is None:
            limit = self._limits[graph.digest] = 1 if self.offload_guards and graph.has_guards() else self.run_ahead
        if limit == 1:
            return [Arrival(token, job.claim_rev, await self._attempt(graph, inst, token, job))]
        arrivals: list[Arrival] = []
        meanwhile: asyncio.Task[bool] | None = None  # the commit of those made while a tick ran too long
        timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()

        def overdue() -> None:  # a tick runs past the time the outcomes before it may wait
            nonlocal timer, meanwhile
            timer = None
            self.records.hold(job.ref.instance)  # for the commit, however the job ends meanwhile
            meanwhile = loop.create_task(self.committer.commit(graph, job, arrivals[:]))
            meanwhile.add_done_callback(lambda done: self._committed_meanwhile(done, job))
            arrivals.clear()

        try:
            while True:
                outcome = await self._attempt(graph, inst, token, job)
                if meanwhile is not None:
                    kept, meanwhile = await meanwhile, None
                    if not kept:
                        return None
                step, ahead = step_on_line(graph, inst, token, outcome, now=self.wall(), worker=self.name)
                arrivals.append(Arrival(token, job.claim_rev, outcome, inst, step))
                if (ahead is None or step is None or len(arrivals) >= limit or self._stopping or job.abandoned
                        or (timer is not None and timer.when() <= loop.time())):
                    return arrivals
                if timer is None:
                    timer = loop.call_later(RUN_AHEAD_TIME, overdue)
                inst, token = step.instance, ahead
        finally:
            if timer is not None:
                timer.cancel()

    def _committed_meanwhile(self, commit: asyncio.Task[bool], job: Job) -> None:
        """A commit made while the job's next tick ran is done: if it did not keep the token for
        this worker, that tick no longer counts."""
        self.records.release(job.ref.instance)
        if commit.cancelled() or commit.exception() is not None or not commit.result():
            job.abandon("its token is no longer this worker's")

    async def _attempt(self, graph: Graph, inst: Instance, token: Token, job: Job) -> Outcome:
        state = graph.states[token.state]
        if state.tick is None:
            return Outcome()
        handler = state.tick
        if handler.func is None:
            return Outcome(failure=Failure("HandlerUnavailable", f"state {state.name!r}: handler {handler.ref!r} "
                                           "was not imported by this worker", retryable=True))
        call = tick_call(inst, token, state, wall=self.wall, payload_limit=self.payload_limit, worker=self.name)
        self.stats.ticks += 1
        started_at, started = self.wall(), self.clock()
        self.meter.tick_started(inst.machine)
        failed: str | None = "AttemptAbandoned"  # unless it ends (shutting down cancels the wait)
        try:
            job.attempt = self.executor.start(call)
            outcome = (await job.attempt.outcome()).timed(started_at, self.clock() - started)
            failed = outcome.failure.type if outcome.failure is not None else None
        finally:
            self.meter.tick_ended(inst.machine, failed, self.clock() - started)
        if report_failure(log, call, outcome):
            self.stats.failures += 1
        return outcome

    async def _stale_wake(self, job: Job) -> None:
        """The marker said due now, the record says the token waits for a time and for no child:
        the last commit of a child woke it (it rewrites its parent's marker without reading the
        parent) after the parent had stopped waiting for that child (the call timed out, and the
        token retries after a backoff or went on by `catch`, to a timer say). Running it would cut
        that wait short: put its marker back as the record has it, and give the claim back."""
        iid, tok, _ = job.ref
        for _ in range(3):
            inst, rev = self.records.get(iid)
            current = inst.tokens.get(tok)
            if current is None:
                break
            # the marker as the record has it, claimed by nobody: the claim is given back with it
            txn = Txn([Compare.mod(self.keys.instance(iid), "==", rev),
                       Compare.mod(job.ref.key, "==", job.claim_rev)],
                      [Put(job.ref.key, work_info(inst, current, self.wall()).dump())])
            try:
                result = await self.store.txn(txn.compare, txn.success, [Get(self.keys.instance(iid))])
            except StoreError:
                break
            if result.succeeded:
                log.debug("worker %s: %s/%s was woken by a stale marker; put back", self.name, iid, tok)
                return
            record = result.get(0).first
            if record is None:  # the instance is gone: so goes its marker (and our claim)
                await self.claims.remove_stray(job.ref, job.claim_rev)
                return
            self.records.remember(record)
        await self.claims.release(job.ref, job.claim_rev)
