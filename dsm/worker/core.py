"""The worker: claim runnable tokens under a lease, tick, commit, repeat.

It orchestrates parts that each own one thing: the lease (`lease.py`), the work feed and its
candidate queue (`feed.py`, `queue.py`), slots (`slots.py`), the record cache (`cache.py`), the
executor that runs handlers (`dsm.executors`, `isolation/`), the commit planner (`dsm.commits`,
pure), its entry and heartbeat among live workers (`presence.py`) and the watch on the other
workers' heartbeats (`peers.py`). Whether it works (`health()`) is judged from what its parts say
of themselves (`health.py`, pure). What it keeps is the life of a job: a claim, attempts, commits,
and the claim given back on every path that does not hand it on.

Every commit is one transaction (batched with other instances' commits) that compares the
record's mod revision and the claims' create revisions, so a worker that lost its lease, paused
past it, or was overtaken never commits. When a claim or commit's answer is lost, the worker
re-reads and never blindly repeats; a claim applied after that re-read, with no job here, is
found by the claim audit (the keys under our lease) and given back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from .. import logs, payloads, transition
from ..batching import Batcher
from ..commits import MAX_ARRIVALS, CommitPlan, commit_txn, plan_commit
from ..definitions import Registry
from ..errors import LeaseLost, NoSpace, NotFound, PartFailed, StoreError, StoreUnavailable
from ..executors import Attempt, Executor, ThreadExecutor
from ..graph import Graph
from ..housekeeping import Housekeeper
from ..keys import Keys, WorkInfo
from ..markers import MAX_TXN_OPS, SYNC, reconcile, work_info
from ..operations import Operations
from ..records import RUNNING, Instance, Token, load_instance
from ..step import Arrival, tick_call
from ..store import Compare, Delete, Get, KeyValue, Put, Store, Txn, TxnRejected
from ..ticks import report_failure
from ..transition import ChildResult, Failure, Outcome, Step
from .cache import RecordCache
from .feed import TokenRef, WorkFeed
from .health import Health, Signs, judge
from .lease import LeaseKeeper, keys_under, release
from .meter import Meter
from .nospace import WriteGate
from .peers import Peers
from .presence import Presence
from .queue import CandidateQueue
from .slots import Slots

log = logging.getLogger("dsm.worker")
STOP_WAIT = 5.0  # seconds a stopping worker waits for its parts' tasks to end

UNSERVABLE_KEPT = 100_000  # instances remembered as unservable here, so their claims given back are not retaken


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _Job:
    """One claimed token being worked on by this worker."""

    ref: TokenRef
    claim_rev: int
    attempt: Attempt | None = None
    task: asyncio.Task | None = None
    woken: bool = False  # claimed through a marker that said "due now" (`_stale_wake`)


@dataclass
class _Pending:
    """An attempt's outcome waiting for its instance's next commit."""

    job: _Job
    token: Token
    outcome: Outcome
    future: asyncio.Future = field(repr=False)


@dataclass
class WorkerStats:
    claimed: int = 0
    committed: int = 0
    transitions: int = 0
    conflicts: int = 0
    lost: int = 0
    ticks: int = 0
    failures: int = 0
    given_back: int = 0  # claims under our lease found with no job and released
    started_at: float = field(default_factory=time.monotonic)


# the worker's long-lived tasks, by name, as a line about one that stopped names them
PARTS = {"dsm-keepalive": "lease keeper", "dsm-feed": "watch feed", "dsm-dispatch": "dispatcher",
         "dsm-audit": "claim audit", "dsm-presence": "heartbeat", "dsm-peers": "peer watch"}


class Worker:
    """Runs ticks for every instance in a namespace that its registry can serve."""

    def __init__(self, store: Store, registry: Registry, *, keys: Keys | None = None, concurrency: int = 8,
                 lease_ttl: float = 10.0, worker_id: str | None = None, payload_limit: int | None = None,
                 max_record_bytes: int = 1_400_000, candidate_cap: int = 10_000, page_size: int = 1000,
                 sweep_interval: float = 30.0, batch_ops: int = 64, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic, on_commit: Callable[[Step], None] | None = None,
                 prefetch: int | None = None, executor: Executor | None = None,
                 audit_interval: float | None = None, max_txn_ops: int = MAX_TXN_OPS,
                 offload_guards: bool = True, serves: Callable[[str], bool] | None = None,
                 presence_interval: float = 5.0, dead_after: float | None = None):
        """`dead_after`: seconds this worker's heartbeat may go unwritten before the other workers
        take it for dead, whatever its lease says (default twice `lease_ttl`; 0: never, trust the
        lease alone). It is rewritten every third of `lease_ttl` (`presence.py`, `peers.py`)."""
        self.store = store
        self.registry = registry
        self.keys = keys or registry.keys
        self.id = worker_id or default_worker_id()
        self.concurrency = concurrency
        self.payload_limit = payload_limit if payload_limit is not None else payloads.default_limit()
        self.max_record_bytes = max_record_bytes
        self.max_txn_ops = max_txn_ops
        # Guards are definition code: each evaluation is budgeted (dsm.guards), but a commit may
        # evaluate many, so commits of machines with guards are planned on a thread, off the loop
        # that keeps the lease. Embedded runs, whose definitions are the user's own, skip the hop.
        self.offload_guards = offload_guards
        self.serves = serves  # which instances this worker may run (None: every one of the namespace)
        self._guarded: dict[str, bool] = {}
        self.sweep_interval = sweep_interval
        self.audit_interval = audit_interval if audit_interval is not None else lease_ttl
        self.wall = wall
        self.clock = clock
        self.on_commit = on_commit
        self.stats = WorkerStats()
        self.meter = Meter()  # by machine, for `dsm.metrics`
        self.slots: Slots[TokenRef] = Slots(concurrency, concurrency if prefetch is None else prefetch)
        self.lease = LeaseKeeper(store, lease_ttl, name=self.id, on_lost=self._lose_all,
                                 release=functools.partial(release, store, self.keys), clock=clock)
        self.queue: CandidateQueue[TokenRef] = CandidateQueue(clock, candidate_cap)
        self.feed = WorkFeed(store, self.keys, self.queue, name=self.id, admits=self._admits, held=self._held,
                             wall=wall, page_size=page_size)
        self.records = RecordCache()
        self.executor: Executor = executor or ThreadExecutor(concurrency)
        self._wake = self.feed.changed
        self._jobs: dict[TokenRef, _Job] = {}
        self._claiming: set[TokenRef] = set()  # claims sent, not yet answered
        self._pending: dict[str, list[_Pending]] = {}
        self._committing: set[str] = set()  # instances with a commit in flight
        self._commits = Batcher(store, max_ops=batch_ops)
        self._claims = Batcher(store, max_ops=batch_ops)
        self._tasks: list[asyncio.Task] = []
        self.stopping = False
        self._unservable: dict[str, str] = {}  # instance -> digest this worker cannot run (oldest first)
        dead_after = 2 * lease_ttl if dead_after is None else dead_after
        self.presence = Presence(store, self.keys, self.lease, registry, worker_id=self.id, concurrency=concurrency,
                                 in_flight=lambda: len(self._jobs), interval=presence_interval,
                                 heartbeat=lease_ttl / 3, stale_after=dead_after or None, wall=wall, clock=clock)
        self.lease.attach = self.presence.attach  # a new lease carries the worker's entry before any claim
        self.peers = Peers(store, self.keys, name=self.id, own_key=self.presence.key, own_lease=lambda: self.lease.id,
                           healthy=self.presence.healthy, interval=lease_ttl / 2, clock=clock)
        self.housekeeper: Housekeeper | None = None  # when it stands in the housekeeping election (`running`)
        self.gate = WriteGate(store, name=self.id)  # closed while etcd refuses writes (NOSPACE)

    @property
    def lease_id(self) -> int | None:
        return self.lease.id

    def health(self) -> Health:
        """Whether this worker works: its lease, its watch for work and its heartbeat are current
        (`health.py`). Only reads its parts, so any thread may ask (`dsm.healthz`)."""
        signs = Signs(lease_ready=self.lease.ready.is_set(), lease_renewed_at=self.lease.renewed_at,
                      lease_ttl=self.lease.ttl, watching=self.feed.watching,
                      heartbeat_at=self.presence.written_at,
                      heartbeat_window=self.presence.stale_after or self.lease.ttl, stopping=self.stopping)
        return judge(signs, self.clock())

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None, *, grace: float = 30.0) -> None:
        """Work until `stop` is set, then finish or release what is held and revoke the lease."""
        stop = stop or asyncio.Event()
        await self.lease.grant()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.lease.keep(), name="dsm-keepalive"),
                       loop.create_task(self.feed.run(), name="dsm-feed"),
                       loop.create_task(self._dispatch(), name="dsm-dispatch"),
                       loop.create_task(self._audit(), name="dsm-audit"),
                       loop.create_task(self.presence.run(), name="dsm-presence"),
                       loop.create_task(self.peers.run(), name="dsm-peers")]
        stopper = loop.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            ended = [task for task in self._tasks if task in done]
            if ended and not stop.is_set():  # a part ended by itself: the worker cannot go on without it
                task = ended[0]
                cause = asyncio.CancelledError() if task.cancelled() else task.exception()
                raise PartFailed(f"worker {self.id}", PARTS.get(task.get_name(), task.get_name()), cause) from cause
        finally:
            stopper.cancel()
            await self._shutdown(grace)

    async def _shutdown(self, grace: float) -> None:
        self.stopping = True
        self.lease.stopping = True
        for task in self._tasks:
            if task.get_name() not in ("dsm-keepalive", "dsm-presence"):  # alive, and seen so, while ticks finish
                task.cancel()
        if self._jobs:
            log.info("worker %s: stopping, finishing %d tick(s) (up to %.0fs)", self.id, len(self._jobs), grace)
            try:
                await asyncio.wait_for(self.slots.idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("worker %s: %d tick(s) still running after %.0fs; releasing their claims",
                            self.id, len(self._jobs), grace)
        for job in list(self._jobs.values()):
            if job.attempt is not None:
                job.attempt.abandon("worker is shutting down")
            if job.task is not None:
                job.task.cancel()
        await self.feed.close()  # a gRPC read may not pass a cancellation on: its stream is closed first
        for task in self._tasks:
            task.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=STOP_WAIT)
        if stuck:  # never let one part hold up the end of the worker (and the revoke of its lease)
            log.warning("worker %s: %s did not stop within %.0fs; going on", self.id,
                        ", ".join(sorted(t.get_name() for t in stuck)), STOP_WAIT)
        self.gate.close()
        await self.lease.revoke()
        self.executor.close()

    def _lose_all(self) -> None:
        """The lease is gone, and every claim with it."""
        while self.slots.ready:
            self.records.release(self.slots.ready.popleft()[0][0])
        for job in self._jobs.values():
            if job.attempt is not None:
                job.attempt.abandon("the worker's lease expired")

    # -- what the feed asks ------------------------------------------------------------------
    def _admits(self, ref: TokenRef, info: WorkInfo | None) -> bool:
        """Whether to take this work: not an instance this worker does not serve (`serves`), nor one
        whose definition it cannot run. A claim given back says nothing of the definition, so
        instances met with one are remembered."""
        if self.serves is not None and not self.serves(ref[0]):
            return False
        digest = info.digest if info is not None else self._unservable.get(ref[0])
        if digest is None or not self.registry.refusal(digest):
            if info is None and digest is not None:
                del self._unservable[ref[0]]  # the definition may run now (its content was repaired)
            return True
        return False

    def _held(self, ref: TokenRef, revision: int, why: str) -> None:
        """The token changed under a job of ours (if one holds it): its attempt no longer counts."""
        job = self._jobs.get(ref)
        if job is not None and job.claim_rev < revision and job.attempt is not None:
            job.attempt.abandon(why)

    # -- dispatch ----------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        last_sweep = self.clock()
        while not self.stopping:
            if self.gate.closed:  # claims would be refused: claim nothing until etcd takes writes again
                await self.gate.wait()
                continue
            free = self.slots.free
            picked = self.queue.take(free, busy=self._jobs) if free else []
            if picked:
                self.slots.take(len(picked))
                # the markers they were offered on, as they are now: by the time the claims go out
                # the feed may have heard that another worker claimed one
                seen = {ref: self.feed.revisions.get(ref) for ref in picked}
                asyncio.get_running_loop().create_task(self._claim(picked, seen))
                continue
            if free and self.feed.behind and not self.queue.has_due():
                try:
                    await self.feed.page()
                except StoreUnavailable as exc:
                    log.warning("worker %s: cannot page work (%s)", self.id, exc)
                    await asyncio.sleep(0.5)
                continue
            if free and not len(self.queue) and self.clock() - last_sweep > self.sweep_interval:
                last_sweep = self.clock()  # a safety net: look over the whole prefix when idle
                self.feed.rescan = True
                continue
            self._wake.clear()
            delay = self.queue.next_delay()
            timeout = min(delay if delay is not None else self.sweep_interval, self.sweep_interval)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.001))
            except asyncio.TimeoutError:
                pass

    # -- claiming ----------------------------------------------------------------------------
    async def _claim(self, refs: list[TokenRef], seen: dict[TokenRef, int | None]) -> None:
        """Claim `refs` (their slots are taken) as their markers were at `seen` revisions; start a
        job on each claim won."""
        await self.lease.ready.wait()
        lease = self.lease.id
        started = 0
        self._claiming.update(refs)
        try:
            results = await asyncio.gather(*(self._claims.submit(self._claim_txn(ref, lease, seen.get(ref)))
                                             for ref in refs),
                                           return_exceptions=True)
            for ref, result in zip(refs, results):
                if isinstance(result, BaseException):
                    if isinstance(result, NoSpace):  # refused, not applied: it waits for room
                        self.gate.refused(result)
                        self.queue.add(ref, first=True)
                    elif isinstance(result, (StoreUnavailable, asyncio.TimeoutError)):
                        # It may have been applied: run it if the claim is ours. If it applies
                        # later still, the claim audit gives it back.
                        if await self._adopt(ref, lease, requeue=True):
                            started += 1
                    elif isinstance(result, LeaseLost):
                        await self.lease.verify()
                        self.queue.add(ref, first=True)
                    else:
                        log.error("worker %s: claim of token %s failed: %s", self.id, ref[1], result,
                                  extra=self._about(ref[0]))
                    continue
                if not result.succeeded:
                    continue
                record, work = result.get(1).first, result.get(2).first
                if record is None and work is not None:
                    await self._remove_stray(ref, result.revision)
                    continue
                if record is None or work is None:
                    await self._release(ref, result.revision)
                    continue
                self.meter.claims[self.records.remember(record).machine] += 1
                self.stats.claimed += 1
                self._start(ref, result.revision, woken=_says_due_now(work))
                started += 1
        finally:
            self._claiming.difference_update(refs)
            if len(refs) > started:
                self._free(len(refs) - started)

    def _claim_txn(self, ref: TokenRef, lease: int | None, revision: int | None = None) -> Txn:
        """Claim a candidate as its marker was at `revision` (any marker, when that is unknown)."""
        iid, tok = ref
        work, claim = self.keys.work(iid, tok), self.keys.claim(iid, tok)
        seen = Compare.mod(work, "==", revision) if revision is not None else Compare.version(work, ">", 0)
        return Txn([seen, Compare.create(claim, "==", 0)],
                   [Put(claim, self.id.encode(), lease or 0), Get(self.keys.instance(iid)), Get(work)])

    async def _adopt(self, ref: TokenRef, lease: int | None, *, reserved: bool = True, requeue: bool = False) -> bool:
        """After an ambiguous claim or commit: if the claim on `ref` is ours, run it; else let it be.
        `reserved`: a slot is already counted for it (else it queues for one). `requeue`: when nobody
        holds it, it is a candidate again, due when its marker says: meanwhile another worker may
        have run it and moved it on, under the same id, to a timer (not due now)."""
        iid, tok = ref
        while True:
            try:
                result = await self.store.txn([], [Get(self.keys.claim(iid, tok)), Get(self.keys.instance(iid)),
                                                   Get(self.keys.work(iid, tok))])
                break
            except StoreUnavailable:
                if self.stopping:
                    return False
                await asyncio.sleep(0.5)
        claim, record, work = result.get(0).first, result.get(1).first, result.get(2).first
        if record is None and work is not None and claim is not None and claim.lease == lease \
                and ref not in self._jobs:  # our claim on a marker without a record
            await self._remove_stray(ref, claim.create_revision)
            return False
        if claim is None or record is None or lease is None or claim.lease != lease or ref in self._jobs:
            if requeue and claim is None and work is not None:
                info = _marker(work)
                if self.queue.add(ref, info.delay(self.wall(), fresh=False) if info is not None else 0.0, first=True):
                    self.feed.revisions[ref] = work.mod_revision
            return False
        self.records.remember(record)
        if reserved:
            self._start(ref, claim.create_revision)
        else:
            self._enqueue(ref, claim.create_revision)
        return True

    async def _remove_stray(self, ref: TokenRef, claim_rev: int) -> None:
        """We claimed a marker whose instance has no record (a writer that did not know it was
        gone, or a version of dsm that left one): nothing will ever run it, and given back it would
        be claimed again at once, by every worker, for ever. Whoever meets one removes it, with the
        instance's other markers and their claims, fenced by the record's absence."""
        try:
            await self._reconcile(ref[0])
            log.info("worker %s: removed work marker %s of instance %s, which has no record", self.id, ref[1],
                     ref[0], extra=self._about(ref[0]))
        except StoreError as exc:
            log.warning("worker %s: could not remove marker %s of an instance without a record (%s)", self.id,
                        ref[1], exc, extra=self._about(ref[0]))
            await self._release(ref, claim_rev)

    async def _release(self, ref: TokenRef, claim_rev: int) -> None:
        claim = self.keys.claim(*ref)
        try:
            await self.store.txn([Compare.create(claim, "==", claim_rev)], [Delete(claim)])
        except StoreError as exc:
            log.warning("worker %s: could not release token %s (%s); it frees when the lease ends", self.id,
                        ref[1], exc, extra=self._about(*ref))

    async def _audit(self) -> None:
        """Every claim under our lease has a job here, or is given back.

        A claim or commit applied after its answer was lost (a slow fsync, a leader change) can
        leave a claim of ours with no job: nothing else would ever free it while we live. A claim
        seen idle by two audits in a row is released (fenced by its create revision).
        """
        suspects: dict[TokenRef, int] = {}
        while True:
            await asyncio.sleep(self.audit_interval)
            if not self.lease.ready.is_set() or self.lease.id is None:
                suspects.clear()
                continue
            lease = self.lease.id
            try:
                held = await self._idle_claims(lease)
            except LeaseLost:
                self.lease.lost(lease)
                continue
            except StoreError as exc:
                log.debug("worker %s: claim audit skipped (%s)", self.id, exc)
                continue
            for ref, rev in held.items():
                if suspects.get(ref) == rev and not self._busy(ref):
                    log.warning("worker %s: claim on token %s has no job here; giving it back", self.id, ref[1],
                                extra=self._about(ref[0]))
                    self.stats.given_back += 1
                    await self._release(ref, rev)
            suspects = held

    async def _idle_claims(self, lease: int) -> dict[TokenRef, int]:
        """Claims under `lease` that no job, claim or commit of ours is using: ref -> create revision."""
        refs = []
        for key in await keys_under(self.store, self.keys, lease):
            parsed = self.keys.parse_work(key)
            if parsed is not None and parsed[2] and not self._busy((parsed[0], parsed[1])):
                refs.append((parsed[0], parsed[1]))
        if not refs:
            return {}
        result = await self.store.txn([], [Get(self.keys.claim(*ref)) for ref in refs[:MAX_TXN_OPS]])
        claims = (got.first for got in result.gets())
        return {ref: kv.create_revision for ref, kv in zip(refs, claims) if kv is not None and kv.lease == lease}

    def _about(self, iid: str, tok: str | None = None) -> dict[str, Any]:
        """The `extra=` of a log line about instance `iid` (`dsm.logs`), with what this worker knows of
        it: its machine, if its record is cached, and the state and attempt of its token `tok`."""
        machine = state = attempt = None
        if iid in self.records:
            inst = self.records.get(iid)[0]
            machine = inst.machine
            token = inst.tokens.get(tok) if tok is not None else None
            if token is not None:
                state, attempt = token.state, token.attempt
        return logs.about(iid, machine, state, attempt, self.id)

    def _busy(self, ref: TokenRef) -> bool:
        return (ref in self._jobs or ref in self._claiming or ref[0] in self._committing
                or any(r == ref for r, _ in self.slots.ready))

    # -- jobs --------------------------------------------------------------------------------
    def _free(self, n: int) -> None:
        self.slots.give(n)
        while not self.stopping:
            item = self.slots.next_ready()
            if item is None:
                break
            self._start(*item, held=True)
        self._wake.set()

    def _enqueue(self, ref: TokenRef, claim_rev: int) -> None:
        """A token this worker claimed in a commit: run it now if a slot is free, else queue it."""
        if self.slots.busy < self.slots.capacity and not self.stopping:
            self.slots.take()
            self._start(ref, claim_rev)
        else:
            self.records.hold(ref[0])
            self.slots.ready.append((ref, claim_rev))

    def _start(self, ref: TokenRef, claim_rev: int, *, held: bool = False, woken: bool = False) -> None:
        """Start a job on a claimed token; its slot is taken. `held`: the record is already held
        for it (it waited in `ready`). `woken`: its marker said due now."""
        job = _Job(ref, claim_rev, woken=woken)
        self._jobs[ref] = job
        if not held:
            self.records.hold(ref[0])
        job.task = asyncio.get_running_loop().create_task(self._run_job(job))

    async def _run_job(self, job: _Job) -> None:
        iid, tok = job.ref
        try:
            await self._work_on(job)
        except asyncio.CancelledError:
            pass  # shutting down: the lease's revocation frees the claim
        except Exception:
            log.exception("worker %s: internal error on token %s; giving its claim back", self.id, tok,
                          extra=self._about(iid, tok))
            await self._release(job.ref, job.claim_rev)
        finally:
            self._jobs.pop(job.ref, None)
            self.queue.requeue(job.ref)
            self.records.release(iid)
            self._free(1)

    async def _work_on(self, job: _Job) -> None:
        """Run the job's token, and keep running it while it moves along a line and stays ours."""
        iid, tok = job.ref
        while True:
            inst, _ = self.records.get(iid)
            token = inst.tokens.get(tok)
            if token is None or inst.finished:
                # the SYNC marker, or one the record no longer lists (its removal was deferred)
                await self._reconcile(iid)
                return
            if job.woken and token.not_before > 0.0 and token.child is None:
                await self._stale_wake(job)
                return
            job.woken = False
            try:
                graph = await self.registry.get(inst.digest)
            except NotFound as exc:
                # Said once per definition, by the registry; here, for each instance, only in debug.
                log.debug("worker %s: %s; leaving it to other workers", self.id, exc,
                          extra=logs.about(iid, inst.machine, token.state, token.attempt, self.id))
                self._unservable[iid] = inst.digest
                while len(self._unservable) > UNSERVABLE_KEPT:
                    del self._unservable[next(iter(self._unservable))]
                await self._release(job.ref, job.claim_rev)
                return
            outcome = await self._attempt(graph, inst, token, job)
            if not await self._commit(graph, job, token, outcome):
                return
            job.attempt = None

    async def _attempt(self, graph: Graph, inst: Instance, token: Token, job: _Job) -> Outcome:
        state = graph.states[token.state]
        if state.tick is None:
            return Outcome()
        handler = state.tick
        if handler.func is None:
            return Outcome(failure=Failure("HandlerUnavailable", f"state {state.name!r}: handler {handler.ref!r} "
                                           "was not imported by this worker", retryable=True))
        call = tick_call(inst, token, state, wall=self.wall, payload_limit=self.payload_limit, worker=self.id)
        self.stats.ticks += 1
        started_at, started = self.wall(), self.clock()
        self.meter.tick_started(inst.machine)
        failed: str | None = "AttemptAbandoned"  # unless it ends (shutting down cancels the wait)
        try:
            job.attempt = self.executor.start(call)
            outcome = replace(await job.attempt.outcome(), started_at=started_at, duration=self.clock() - started)
            failed = outcome.failure.type if outcome.failure is not None else None
        finally:
            self.meter.tick_ended(inst.machine, failed, self.clock() - started)
        if report_failure(log, call, outcome):
            self.stats.failures += 1
        return outcome

    async def _stale_wake(self, job: _Job) -> None:
        """The marker said due now, the record says the token waits for a time and for no child:
        the last commit of a child woke it (it rewrites its parent's marker without reading the
        parent) after the parent had stopped waiting for that child (the call timed out, and the
        token retries after a backoff or went on by `catch`, to a timer say). Running it would cut
        that wait short: put its marker back as the record has it, and give the claim back."""
        iid, tok = job.ref
        for _ in range(3):
            inst, rev = self.records.get(iid)
            current = inst.tokens.get(tok)
            if current is None:
                break
            txn = Txn([Compare.mod(self.keys.instance(iid), "==", rev),
                       Compare.create(self.keys.claim(iid, tok), "==", job.claim_rev)],
                      [Put(self.keys.work(iid, tok), work_info(inst, current, self.wall()).dump()),
                       Delete(self.keys.claim(iid, tok))])
            try:
                result = await self.store.txn(txn.compare, txn.success, [Get(self.keys.instance(iid))])
            except StoreError:
                break
            if result.succeeded:
                log.debug("worker %s: %s/%s was woken by a stale marker; put back", self.id, iid, tok)
                return
            record = result.get(0).first
            if record is None:  # the instance is gone: so goes its marker (and our claim)
                await self._remove_stray(job.ref, job.claim_rev)
                return
            self.records.remember(record)
        await self._release(job.ref, job.claim_rev)

    async def _reconcile(self, iid: str) -> None:
        """Make the instance's work markers match its record (deferred marker changes, stale markers)."""
        await reconcile(self.store, self.keys, iid, now=self.wall(), max_ops=self.max_txn_ops)

    # -- committing --------------------------------------------------------------------------
    async def _commit(self, graph: Graph, job: _Job, token: Token, outcome: Outcome) -> bool:
        """Commit one attempt's outcome, folded with whatever else of this instance is ready.

        True when the job's own token moved on and is still ours to run (the caller continues it
        without another claim); False when the job is done with it.
        """
        iid = job.ref[0]
        pending = _Pending(job, token, outcome, asyncio.get_running_loop().create_future())
        self._pending.setdefault(iid, []).append(pending)
        if iid not in self._committing:  # nobody commits for this instance: this job does, inline
            self._committing.add(iid)
            await self._commit_loop(iid, graph)
        return await pending.future

    async def _commit_loop(self, iid: str, graph: Graph) -> None:
        """One committer per instance: outcomes that arrive while a commit is in flight go together
        in the next one (branches arriving at a join cost one round trip, not one each)."""
        try:
            while self._pending.get(iid):
                waiting = self._pending[iid]
                batch, rest = waiting[:MAX_ARRIVALS], waiting[MAX_ARRIVALS:]
                if rest:
                    self._pending[iid] = rest
                else:
                    del self._pending[iid]
                try:
                    await self._commit_batch(iid, graph, batch)
                except Exception:
                    log.exception("worker %s: internal error committing", self.id,
                                  extra=_about_batch(iid, graph, batch, self.id))
                    for p in batch:
                        if not p.future.done():
                            await self._release(p.job.ref, p.job.claim_rev)
                finally:
                    for p in batch:
                        _settle(p.future, False)
        finally:
            self._committing.discard(iid)

    async def _plan(self, graph: Graph, iid: str, batch: list[_Pending], now: float) -> tuple[CommitPlan, int]:
        inst, rev = self.records.get(iid)
        arrivals = [Arrival(p.token, p.job.claim_rev, p.outcome) for p in batch]
        plan = functools.partial(plan_commit, graph, inst, arrivals, now=now, worker=self.id,
                                 slots=0 if self.stopping else self.slots.spare,
                                 max_record_bytes=self.max_record_bytes, max_ops=self.max_txn_ops)
        guarded = self._guarded.get(graph.digest)
        if guarded is None:
            guarded = self._guarded[graph.digest] = graph.has_guards()
        if guarded and self.offload_guards:
            return await asyncio.to_thread(plan), rev
        return plan(), rev

    async def _commit_batch(self, iid: str, graph: Graph, batch: list[_Pending]) -> None:
        rejected = 0
        while batch:
            try:
                batch, fences = await self._children(graph, batch)
            except StoreUnavailable:
                await asyncio.sleep(0.2)
                continue
            now = self.wall()
            plan, rev = await self._plan(graph, iid, batch, now)
            claims = {p.job.ref[1]: p.job.claim_rev for p in batch}
            txn = commit_txn(self.keys, plan, rev, claims, worker=self.id, lease=self.lease.id or 0, now=now,
                             fences=fences)
            sent = self.clock()
            try:
                result = await self._commits.submit(txn)
            except NoSpace as exc:  # refused, not applied: the claims hold while it waits for room
                self.gate.refused(exc)
                await self.gate.wait()
                continue
            except (StoreUnavailable, asyncio.TimeoutError, LeaseLost) as exc:
                if isinstance(exc, LeaseLost):
                    await self.lease.verify()
                log.warning("worker %s: commit in doubt (%s); re-reading", self.id, exc,
                            extra=_about_batch(iid, graph, batch, self.id))
                batch = await self._settle_doubt(iid, batch, plan, now)
                continue
            except TxnRejected as exc:
                rejected += 1
                log.error("worker %s: the store refused the commit: %s", self.id, exc,
                          extra=_about_batch(iid, graph, batch, self.id))
                if rejected > 1:
                    for p in batch:
                        await self._release(p.job.ref, p.job.claim_rev)
                    return
                failure = Failure("StoreRejected", f"the store refused the commit: {exc}", retryable=False)
                batch = [_Pending(p.job, p.token, Outcome(failure=failure), p.future) for p in batch]
                continue
            self.meter.commit_answered(graph.machine, self.clock() - sent, result.succeeded)
            if result.succeeded:
                # the outcomes that did not fit in this transaction go in the next one
                self._committed(plan, result.revision, batch[:plan.applied])
                batch = batch[plan.applied:]
                continue
            try:
                record_kv, claim_kvs = await self._read(iid, batch)
            except StoreUnavailable:
                await asyncio.sleep(0.2)
                continue
            still: list[_Pending] = []
            for p, claim in zip(batch, claim_kvs):
                if claim is not None and claim.create_revision == p.job.claim_rev:
                    still.append(p)
                else:
                    self.stats.lost += 1
                    self.meter.lost[graph.machine] += 1
                    log.info("worker %s: claim on token %s lost before commit; another worker takes over",
                             self.id, p.job.ref[1],
                             extra=logs.about(iid, graph.machine, p.token.state, p.token.attempt, self.id))
                    _settle(p.future, False)
            if record_kv is None:
                return
            self.stats.conflicts += 1
            self.records.remember(record_kv)
            batch = still

    async def _children(self, graph: Graph, batch: list[_Pending]) -> tuple[list[_Pending], tuple[Compare, ...]]:
        """Read the children that call states of the batch wait for, as they are now: their results
        go into the outcomes, and their revisions fence the commit (a child that finishes after
        this read fails the commit, which then reads again, so its wake-up is never lost)."""
        waiting = [p for p in batch if p.token.child is not None and p.outcome.failure is None
                   and graph.states[p.token.state].call is not None]
        if not waiting:
            return batch, ()
        result = await self.store.txn([], [Get(self.keys.instance(p.token.child)) for p in waiting])  # type: ignore[arg-type]
        fences: list[Compare] = []
        results: dict[int, ChildResult] = {}
        for p, got in zip(waiting, result.gets()):
            cid = p.token.child
            assert cid is not None
            kv = got.first
            if kv is None:
                fences.append(Compare.version(self.keys.instance(cid), "==", 0))
                results[id(p)] = ChildResult.of(cid, None)
                continue
            fences.append(Compare.mod(self.keys.instance(cid), "==", kv.mod_revision))
            results[id(p)] = ChildResult.of(cid, load_instance(kv.value))
        out = [replace(p, outcome=Outcome(child=results[id(p)])) if id(p) in results else p for p in batch]
        return out, tuple(fences)

    async def _read(self, iid: str, batch: list[_Pending]) -> tuple[KeyValue | None, list[KeyValue | None]]:
        """The record and the claims of a batch, in one round trip."""
        ops: list = [Get(self.keys.instance(iid))] + [Get(self.keys.claim(iid, p.job.ref[1])) for p in batch]
        result = await self.store.txn([], ops)
        record, *claims = (got.first for got in result.gets())
        return record, claims

    def _committed(self, plan: CommitPlan, revision: int, batch: list[_Pending]) -> None:
        inst = plan.after
        self.records.put(inst, revision)
        self.stats.committed += 1
        self.stats.transitions += len(plan.history)
        first = plan.before.transitions == 0 and any(p.token.attempt == 1 for p in batch)  # its first commit
        self.meter.committed(inst.machine, len(plan.history), first, inst.status if inst.finished else None)
        if log.isEnabledFor(logging.DEBUG):
            for entry in plan.history:
                log.debug("%s -> %s (branch %s)", entry.state, ",".join(entry.next), "/".join(entry.branch) or "-",
                          extra=logs.about(inst.id, inst.machine, entry.state, entry.attempt, self.id))
        if inst.finished:
            last = plan.history[-1] if plan.history else None
            log.info("%s%s", inst.status, f" at {inst.state}" if inst.state else
                     f": {inst.error.type}: {inst.error.message}" if inst.error else "",
                     extra=logs.about(inst.id, inst.machine, inst.state or (inst.error.state if inst.error else None),
                                      last.attempt if last is not None else None, self.id))
        self._let_go(plan.before, inst, batch)
        if self.on_commit is not None:
            self.on_commit(Step(inst, plan.removed, plan.changed, plan.history))
        kept = {t.id for t in plan.keep}
        for p in batch:
            _settle(p.future, p.job.ref[1] in kept)
        for token in plan.keep:
            if token.id not in plan.own:
                self._enqueue((inst.id, token.id), revision)

    def _let_go(self, before: Instance, after: Instance, batch: list[_Pending]) -> None:
        """A commit whose instance let go of children it waited for (a call timed out, the instance
        ended): cancel those still running, as their parent, beside the work (best effort: one
        left running when this worker dies right now is cancelled by an operator)."""
        if not any(t.child is not None for t in before.tokens.values()):
            return
        ended = {p.outcome.child.id for p in batch
                 if p.outcome.child is not None and p.outcome.child.status not in (None, RUNNING)}
        if all(cid in ended for cid, _ in transition.released_children(before, after, self.wall())):
            return
        _background(Operations(self.store, self.keys, wall=self.wall).cancel_released(before, after, ended=ended),
                    "cancelling the children it let go of", logs.about(after.id, after.machine, worker=self.id))

    async def _settle_doubt(self, iid: str, batch: list[_Pending], plan: CommitPlan,
                            now: float) -> list[_Pending]:
        """A commit's answer was lost: find out what applied, never blindly repeat it.

        Only this worker touches a token it holds a claim on, so: a claim gone means our commit
        released it (or our lease ended); a claim still ours on a token that moved on means our
        commit applied and kept it; a claim still ours on an unmoved token means nothing applied
        (yet: if it applies later, the claims it took are given back by the claim audit).
        Returns the outcomes still to commit.
        """
        while True:
            try:
                record, claims = await self._read(iid, batch)
                break
            except StoreUnavailable:
                if self.stopping:
                    return []
                await asyncio.sleep(0.5)
        if record is None:
            return []
        inst = self.records.remember(record)
        self._let_go(plan.before, inst, batch)  # if it applied, or whoever moved the instance on
        retry: list[_Pending] = []
        for p, claim in zip(batch, claims):
            if claim is None or claim.create_revision != p.job.claim_rev:
                _settle(p.future, False)
                continue
            current = inst.tokens.get(p.job.ref[1])
            if current is not None and (current.visit, current.attempt) != (p.token.visit, p.token.attempt):
                _settle(p.future, current.not_before <= now and current.attempt == 1)
            else:
                retry.append(p)
        await self.lease.ready.wait()
        for token in plan.keep:  # new tokens the commit claimed, if it applied: run them
            if token.id not in plan.own:
                await self._adopt((iid, token.id), self.lease.id, reserved=False)
        return retry


def _about_batch(iid: str, graph: Graph, batch: list[_Pending], worker: str) -> dict[str, Any]:
    """The `extra=` of a log line about a commit: the states of its outcomes, and the attempt of a lone one."""
    states = ",".join(dict.fromkeys(p.token.state for p in batch)) or None
    return logs.about(iid, graph.machine, states, batch[0].token.attempt if len(batch) == 1 else None, worker)


_BACKGROUND: set[asyncio.Task] = set()


def _background(work: Coroutine[Any, Any, None], what: str, about: dict[str, Any] | None = None) -> None:
    """Run `work` on its own; its failure is logged (`about`: the instance it is about, `dsm.logs`),
    never raised into the caller."""
    async def run() -> None:
        try:
            await work
        except Exception as exc:  # best effort: a child left running is cancelled by an operator
            log.warning("%s failed: %s", what, exc, extra=about)

    task = asyncio.get_running_loop().create_task(run())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _marker(kv: KeyValue) -> WorkInfo | None:
    try:
        return WorkInfo.load(kv.value)
    except (ValueError, KeyError, TypeError):
        return None


def _says_due_now(marker: KeyValue) -> bool:
    """Whether a work marker says its token is due now (not after a time)."""
    info = _marker(marker)
    return info is not None and info.not_before == 0.0


def _settle(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


__all__ = ["Worker", "WorkerStats", "default_worker_id", "SYNC"]
