"""The worker loop: claim runnable tokens under a lease, tick, commit, repeat.

This is the one module that sleeps, retries I/O and talks to a lease. Everything it decides about
an instance comes from `transition.advance`; everything it writes is one transaction per commit
(batched with other instances' commits) that compares the record's mod revision and the claim's
create revision, so a worker that lost its lease, paused past it, or was overtaken never commits.

Work discovery is push, not poll: one watch on the work prefix. A work marker put without its
claim is new work; a claim deleted without its marker is work orphaned by a dead or departing
worker. Candidates are kept in a bounded set; when more work waits than fits, the worker pages
through the store for the rest once the set drains, so memory stays flat however long the queue.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import payloads, transition
from .batching import Batcher
from .context import Context, make_context
from .definitions import Registry
from .errors import AttemptAbandoned, Compacted, HandlerError, LeaseLost, NotFound, StoreError, StoreUnavailable
from .graph import Graph, State
from .keys import Keys, WorkInfo
from .records import ErrorInfo, Instance, Token, dump_history, dump_instance, load_instance
from .store import DELETE, Compare, Delete, Event, Get, KeyValue, Put, Store, Txn, TxnRejected, prefix_end
from .ticks import TickRunner
from .transition import Failure, Outcome, Step

log = logging.getLogger(__name__)

TokenRef = tuple[str, str]  # (instance id, token id)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _Job:
    """One claimed token being worked on by this worker."""

    ref: TokenRef
    claim_rev: int
    ctx: Context | None = None
    task: asyncio.Task | None = None


@dataclass
class WorkerStats:
    claimed: int = 0
    committed: int = 0
    transitions: int = 0
    conflicts: int = 0
    lost: int = 0
    ticks: int = 0
    failures: int = 0
    started_at: float = field(default_factory=time.monotonic)


class _HandlerLoop:
    """A private event loop thread for `async def` handlers, so user code never stalls the
    worker's own loop (lease keep-alives, watches and commits)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dsm-async-handlers", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def _call_sync(func: Callable[..., Any], payload: dict, ctx: Context) -> Any:
    return func(payload, ctx)


def _failure_of(exc: BaseException) -> Failure:
    if isinstance(exc, HandlerError):
        return Failure(exc.type_name, str(exc), retryable=exc.retryable)
    bases = tuple(c.__name__ for c in type(exc).__mro__[1:] if c not in (object, BaseException))
    message = str(exc) or repr(exc)
    return Failure(type(exc).__name__, message, retryable=True, bases=bases)


class Worker:
    """Runs ticks for every instance in a namespace that its registry can serve."""

    def __init__(self, store: Store, registry: Registry, *, keys: Keys | None = None, concurrency: int = 8,
                 lease_ttl: float = 10.0, worker_id: str | None = None, payload_limit: int | None = None,
                 max_record_bytes: int = 1_400_000, candidate_cap: int = 10_000, page_size: int = 1000,
                 sweep_interval: float = 30.0, batch_ops: int = 64, wall: Callable[[], float] = time.time,
                 on_commit: Callable[[Step], None] | None = None, prefetch: int | None = None):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.store = store
        self.registry = registry
        self.keys = keys or registry.keys
        self.concurrency = concurrency
        # Tokens a commit of ours creates (fork branches) may be claimed in that same commit and
        # wait here for a slot, up to `prefetch` of them, instead of going back to the queue.
        self.prefetch = concurrency if prefetch is None else prefetch
        self._ready: collections.deque[tuple[TokenRef, int]] = collections.deque()
        self.lease_ttl = lease_ttl
        self.id = worker_id or default_worker_id()
        self.payload_limit = payload_limit if payload_limit is not None else payloads.default_limit()
        self.max_record_bytes = max_record_bytes
        self.candidate_cap = candidate_cap
        self.page_size = page_size
        self.sweep_interval = sweep_interval
        self.wall = wall
        self.on_commit = on_commit
        self.stats = WorkerStats()
        self.lease: int | None = None
        self._lease_ready = asyncio.Event()
        self._candidates: dict[TokenRef, WorkInfo | None] = {}
        self._order: collections.deque[TokenRef] = collections.deque()  # due candidates, oldest first
        self._delayed: list[tuple[float, TokenRef]] = []
        self._overflow = False
        self._cursor: str | None = None
        self._jobs: dict[TokenRef, _Job] = {}
        self._busy = 0
        self._records: dict[str, tuple[Instance, int]] = {}
        self._pending: dict[str, list[_Pending]] = {}
        self._committing: set[str] = set()
        self._users: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._commits = Batcher(store, max_ops=batch_ops)
        self._claims = Batcher(store, max_ops=batch_ops)
        self._ticks: TickRunner | None = None
        self._handler_loop: _HandlerLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None, *, grace: float = 30.0) -> None:
        """Work until `stop` is set, then finish or release what is held and revoke the lease."""
        stop = stop or asyncio.Event()
        await self._grant()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keepalive(), name="dsm-keepalive"),
                       loop.create_task(self._watch(), name="dsm-watch"),
                       loop.create_task(self._dispatch(), name="dsm-dispatch")]
        stopper = loop.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            await self._shutdown(grace)

    async def _shutdown(self, grace: float) -> None:
        self._stopping = True
        for task in self._tasks:
            if task.get_name() != "dsm-keepalive":
                task.cancel()
        if self._jobs:
            log.info("worker %s: stopping, finishing %d tick(s) (up to %.0fs)", self.id, len(self._jobs), grace)
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("worker %s: %d tick(s) still running after %.0fs; releasing their claims",
                            self.id, len(self._jobs), grace)
        for job in list(self._jobs.values()):
            if job.ctx is not None:
                job.ctx.abandon("worker is shutting down")
            if job.task is not None:
                job.task.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.lease is not None:
            try:
                await self.store.lease_revoke(self.lease)  # every claim still held goes at once
            except StoreError as exc:
                log.warning("worker %s: could not revoke lease (%s); claims expire in %.0fs", self.id, exc,
                            self.lease_ttl)
        if self._ticks is not None:
            self._ticks.shutdown()
        if self._handler_loop is not None:
            self._handler_loop.stop()

    async def _grant(self) -> None:
        self._lease_ready.clear()
        delay = 0.2
        while True:
            try:
                self.lease = await self.store.lease_grant(self.lease_ttl)
                self._lease_ready.set()
                log.debug("worker %s: lease %x granted (ttl %.0fs)", self.id, self.lease, self.lease_ttl)
                return
            except StoreUnavailable as exc:
                if self._stopping:
                    raise
                log.warning("worker %s: store unavailable (%s); retrying", self.id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _keepalive(self) -> None:
        interval = max(self.lease_ttl / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.lease_keepalive(self.lease)  # type: ignore[arg-type]
            except LeaseLost:
                log.warning("worker %s: lease %x lost; its claims are gone, taking a new lease", self.id,
                            self.lease or 0)
                self._lose_all("the worker's lease expired")
                await self._grant()
            except StoreError as exc:  # unavailable, or refused for now: the lease may still be alive
                log.warning("worker %s: keep-alive failed (%s)", self.id, exc)

    def _lose_all(self, reason: str) -> None:
        while self._ready:  # their claims went with the lease
            self._unhold(self._ready.popleft()[0][0])
        for job in self._jobs.values():
            if job.ctx is not None:
                job.ctx.abandon(reason)

    # -- discovering work --------------------------------------------------------------------
    async def _watch(self) -> None:
        revision = await self._resync()
        delay = 0.2
        while True:
            try:
                watch = await self.store.watch(self.keys.work_prefix, prefix_end(self.keys.work_prefix),
                                               start_revision=revision + 1)
                delay = 0.2
                async for batch in watch:
                    if batch.events:
                        self._apply_events(batch.events)
                        revision = max(revision, batch.events[-1].kv.mod_revision)
                raise StoreUnavailable("watch ended")
            except Compacted as exc:
                log.info("worker %s: watch revision %d compacted (%s); resyncing", self.id, revision + 1, exc)
                revision = await self._resync()
            except StoreUnavailable as exc:
                log.warning("worker %s: watch interrupted (%s); resuming from revision %d", self.id, exc,
                            revision + 1)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except asyncio.CancelledError:
                raise

    async def _resync(self) -> int:
        """Rebuild the candidate set from the store; return the revision it reflects."""
        delay = 0.2
        while True:
            try:
                self._candidates.clear()
                self._order.clear()
                self._delayed.clear()
                self._overflow = False
                self._cursor = self.keys.work_prefix
                return await self._scan()
            except StoreUnavailable as exc:
                log.warning("worker %s: cannot read work (%s); retrying", self.id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _scan(self) -> int:
        """Page through work markers from the cursor, adding unclaimed ones until the set is full."""
        end = prefix_end(self.keys.work_prefix)
        revision = 0
        cursor = self._cursor or self.keys.work_prefix
        pending: tuple[TokenRef, WorkInfo] | None = None
        while True:
            page = await self.store.range(cursor, end, limit=self.page_size)
            revision = page.revision
            for kv in page.kvs:
                parsed = self.keys.parse_work(kv.key)
                if parsed is None:
                    continue
                iid, tok, is_claim = parsed
                if is_claim:
                    if pending is not None and pending[0] == (iid, tok):
                        pending = None
                    continue
                if pending is not None:
                    self._add(*pending)
                pending = ((iid, tok), _load_info(kv.value))
                if self._full():
                    self._cursor = kv.key
                    self._overflow = True
                    return revision
            if not page.more or not page.kvs:
                break
            cursor = page.kvs[-1].key + "\0"
        if pending is not None:
            self._add(*pending)
        self._cursor = None
        self._overflow = False
        self._wake.set()
        return revision

    def _full(self) -> bool:
        return len(self._candidates) >= self.candidate_cap

    def _add(self, ref: TokenRef, info: WorkInfo | None, *, first: bool = False) -> None:
        """A candidate; `first` puts it ahead of the queue (work orphaned mid-flight goes before new
        work, so a dead worker's instances do not wait behind a backlog)."""
        if info is not None and self.registry.refusal(info.digest):
            return
        known = ref in self._candidates
        if not known and self._full():
            self._overflow = True
            return
        self._candidates[ref] = info
        if info is not None and info.not_before > self.wall():
            heapq.heappush(self._delayed, (info.not_before, ref))
        elif first:
            self._order.appendleft(ref)
        elif not known:
            self._order.append(ref)
        self._wake.set()

    def _apply_events(self, events: list[Event]) -> None:
        for _, group in itertools.groupby(events, key=lambda e: e.kv.mod_revision):
            works: dict[TokenRef, WorkInfo | None] = {}
            gone: set[TokenRef] = set()
            claimed: set[TokenRef] = set()
            released: set[TokenRef] = set()
            for event in group:
                parsed = self.keys.parse_work(event.kv.key)
                if parsed is None:
                    continue
                ref = (parsed[0], parsed[1])
                if parsed[2]:
                    (released if event.type == DELETE else claimed).add(ref)
                elif event.type == DELETE:
                    gone.add(ref)
                else:
                    works[ref] = _load_info(event.kv.value)
            for ref in gone:
                self._candidates.pop(ref, None)
                job = self._jobs.get(ref)
                if job is not None and job.ctx is not None:
                    # Our own commit removes the token too, but by then its tick has returned and
                    # abandoning it changes nothing; otherwise it was cancelled or failed elsewhere.
                    job.ctx.abandon("the token was removed (instance cancelled or failed elsewhere)")
            for ref in claimed:
                self._candidates.pop(ref, None)
            for ref, info in works.items():
                if ref in claimed or ref in gone or (info is not None and info.owner is not None):
                    self._candidates.pop(ref, None)
                else:
                    self._add(ref, info)
            for ref in released - gone - claimed:
                job = self._jobs.get(ref)
                if job is not None:
                    if job.ctx is not None:
                        job.ctx.abandon("the claim was lost (lease expired)")
                    continue
                self._add(ref, works.get(ref), first=ref not in works)

    # -- claiming ----------------------------------------------------------------------------
    def _requeue(self, ref: TokenRef) -> None:
        """A job ended: if its token became a candidate meanwhile (it gave the token back, for a
        retry or for lack of a slot), queue it now; the queues skipped it while the job ran."""
        if ref not in self._candidates:
            return
        info = self._candidates[ref]
        if info is not None and info.not_before > self.wall():
            heapq.heappush(self._delayed, (info.not_before, ref))
        else:
            self._order.append(ref)
        self._wake.set()

    def _promote(self) -> None:
        """Delayed candidates whose time has come join the queue of due ones."""
        now = self.wall()
        while self._delayed and self._delayed[0][0] <= now:
            at, ref = heapq.heappop(self._delayed)
            info = self._candidates.get(ref)
            if info is not None and info.not_before == at:
                self._order.append(ref)

    def _clean_front(self) -> None:
        while self._order and (self._order[0] not in self._candidates or self._order[0] in self._jobs):
            self._order.popleft()

    def _has_due(self) -> bool:
        self._promote()
        self._clean_front()
        return bool(self._order)

    def _due(self, limit: int) -> list[TokenRef]:
        """Take up to `limit` due candidates, oldest first (O(limit), however many wait)."""
        self._promote()
        picked: list[TokenRef] = []
        while self._order and len(picked) < limit:
            ref = self._order.popleft()
            if ref in self._candidates and ref not in self._jobs:
                picked.append(ref)
        return picked

    def _next_delay(self) -> float | None:
        now = self.wall()
        while self._delayed:
            at, ref = self._delayed[0]
            info = self._candidates.get(ref)
            if info is None or info.not_before != at or ref in self._jobs:
                heapq.heappop(self._delayed)
                continue
            return max(0.0, at - now)
        return None

    async def _dispatch(self) -> None:
        last_sweep = time.monotonic()
        while not self._stopping:
            free = self.concurrency - self._busy if not self._ready else 0  # local work goes first
            picked = self._due(free) if free > 0 and not self._stopping else []
            if not picked:
                if free > 0 and self._overflow and not self._has_due():
                    try:
                        await self._scan()
                    except StoreUnavailable as exc:
                        log.warning("worker %s: cannot page work (%s)", self.id, exc)
                        await asyncio.sleep(0.5)
                    continue
                if free > 0 and not self._candidates and time.monotonic() - last_sweep > self.sweep_interval:
                    last_sweep = time.monotonic()
                    self._cursor = self.keys.work_prefix
                    try:
                        await self._scan()
                    except StoreUnavailable:
                        pass
                    continue
                self._wake.clear()
                delay = self._next_delay()
                timeout = min(delay if delay is not None else self.sweep_interval, self.sweep_interval)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.001))
                except asyncio.TimeoutError:
                    pass
                continue
            for ref in picked:
                self._candidates.pop(ref, None)
            self._busy += len(picked)
            self._idle.clear()
            asyncio.get_running_loop().create_task(self._claim(picked))

    async def _claim(self, refs: list[TokenRef]) -> None:
        await self._lease_ready.wait()
        lease = self.lease
        started: set[TokenRef] = set()
        try:
            results = await asyncio.gather(*(self._claims.submit(self._claim_txn(ref, lease)) for ref in refs),
                                           return_exceptions=True)
            for ref, result in zip(refs, results):
                if isinstance(result, BaseException):
                    if isinstance(result, (StoreUnavailable, asyncio.TimeoutError)):
                        # It may have been applied: adopt the claim if it is ours, never leave it held.
                        if await self._adopt(ref, lease):
                            started.add(ref)
                    elif isinstance(result, LeaseLost):
                        self._wake.set()
                    else:
                        log.error("worker %s: claim of %s/%s failed: %s", self.id, ref[0], ref[1], result)
                    continue
                if not result.succeeded:
                    continue
                _, inst_kvs, work_kvs = result.responses
                if not inst_kvs or not work_kvs:
                    await self._release(ref, result.revision)
                    continue
                self._remember(inst_kvs[0])
                self.stats.claimed += 1
                self._start(ref, result.revision)
                started.add(ref)
        finally:
            unused = len(refs) - len(started)
            if unused:
                self._free(unused)

    def _claim_txn(self, ref: TokenRef, lease: int | None) -> Txn:
        iid, tok = ref
        work, claim = self.keys.work(iid, tok), self.keys.claim(iid, tok)
        return Txn([Compare.version(work, ">", 0), Compare.create(claim, "==", 0)],
                   [Put(claim, self.id.encode(), lease or 0), Get(self.keys.instance(iid)), Get(work)])

    async def _adopt(self, ref: TokenRef, lease: int | None, *, reserved: bool = True) -> bool:
        """After an ambiguous claim or commit: if the claim on `ref` is ours, run it; else let it be.
        `reserved`: a slot is already counted for it (else it queues for one)."""
        iid, tok = ref
        while True:
            try:
                claim = await self.store.get(self.keys.claim(iid, tok))
                record = await self.store.get(self.keys.instance(iid))
                break
            except StoreUnavailable:
                if self._stopping:
                    return False
                await asyncio.sleep(0.5)
        if claim is None or lease is None or claim.lease != lease or record is None:
            return False
        self._remember(record)
        if reserved:
            self._start(ref, claim.create_revision)
        else:
            self._enqueue(ref, claim.create_revision)
        return True

    async def _release(self, ref: TokenRef, claim_rev: int) -> None:
        claim = self.keys.claim(*ref)
        try:
            await self.store.txn([Compare.create(claim, "==", claim_rev)], [Delete(claim)])
        except StoreError as exc:
            log.warning("worker %s: could not release %s/%s (%s); it frees when the lease ends", self.id,
                        ref[0], ref[1], exc)

    def _free(self, slots: int) -> None:
        self._busy = max(0, self._busy - slots)
        while self._ready and self._busy < self.concurrency and not self._stopping:
            ref, claim_rev = self._ready.popleft()
            self._busy += 1
            self._start(ref, claim_rev, held=True)
        if self._busy == 0:
            self._idle.set()
        self._wake.set()

    def _enqueue(self, ref: TokenRef, claim_rev: int) -> None:
        """A token this worker claimed in a commit: run it now if a slot is free, else queue it."""
        if self._busy < self.concurrency and not self._stopping:
            self._busy += 1
            self._idle.clear()
            self._start(ref, claim_rev)
        else:
            self._hold(ref[0])
            self._ready.append((ref, claim_rev))

    def _remember(self, kv: KeyValue) -> None:
        inst = load_instance(kv.value)
        cached = self._records.get(inst.id)
        if cached is None or cached[1] < kv.mod_revision:
            self._records[inst.id] = (inst, kv.mod_revision)

    def _start(self, ref: TokenRef, claim_rev: int, *, held: bool = False) -> None:
        """Start a job on a claimed token; its slot is already counted in _busy. `held`: the token
        already holds its instance's cached record (it waited in the ready queue)."""
        job = _Job(ref, claim_rev)
        self._jobs[ref] = job
        if not held:
            self._hold(ref[0])
        job.task = asyncio.get_running_loop().create_task(self._run_job(job))

    def _hold(self, iid: str) -> None:
        """Keep the instance's record cached while a claimed token of it is queued or running."""
        self._users[iid] = self._users.get(iid, 0) + 1

    def _unhold(self, iid: str) -> None:
        users = self._users.get(iid, 1) - 1
        if users <= 0:
            self._users.pop(iid, None)
            self._records.pop(iid, None)
        else:
            self._users[iid] = users

    # -- running -----------------------------------------------------------------------------
    async def _run_job(self, job: _Job) -> None:
        iid, tok = job.ref
        try:
            await self._work_on(job)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("worker %s: internal error on instance %s token %s", self.id, iid, tok)
        finally:
            self._jobs.pop(job.ref, None)
            self._requeue(job.ref)
            self._unhold(iid)
            self._free(1)

    async def _work_on(self, job: _Job) -> None:
        """Run the job's token, and keep running it while it moves along a line and stays ours."""
        iid, tok = job.ref
        while True:
            inst, _ = self._records[iid]
            token = inst.tokens.get(tok)
            if token is None or inst.finished:
                await self._release(job.ref, job.claim_rev)
                return
            try:
                graph = await self.registry.get(inst.digest)
            except NotFound as exc:
                log.error("worker %s: instance %s: %s; leaving it to other workers", self.id, iid, exc)
                await self._release(job.ref, job.claim_rev)
                return
            wait = token.not_before - self.wall()
            if wait > 0:
                await asyncio.sleep(wait)
            outcome = await self._attempt(graph, inst, token, job)
            if not await self._commit(graph, job, token, outcome):
                return
            job.ctx = None

    async def _attempt(self, graph: Graph, inst: Instance, token: Token, job: _Job) -> Outcome:
        state = graph.states[token.state]
        if state.tick is None:
            return Outcome()
        handler = state.tick
        if handler.func is None:
            return Outcome(failure=Failure("HandlerUnavailable", f"state {state.name!r}: handler {handler.ref!r} "
                                           "was not imported by this worker", retryable=True))
        payload = payloads.copy(inst.payload_of(token))
        timeout = state.timeout
        ctx = make_context(instance_id=inst.id, machine=inst.machine, state=state.name, attempt=token.attempt,
                           branch=token.branch, visit=token.visit,
                           deadline=self.wall() + timeout if timeout else None)
        job.ctx = ctx
        self.stats.ticks += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future
        concurrent = None
        if handler.is_async:
            if self._handler_loop is None:
                self._handler_loop = _HandlerLoop()
            concurrent = asyncio.run_coroutine_threadsafe(handler.func(payload, ctx), self._handler_loop.loop)
            future = asyncio.wrap_future(concurrent)
        else:
            if self._ticks is None:
                self._ticks = TickRunner(loop, self.concurrency + 4)
            future = self._ticks.submit(_call_sync, handler.func, payload, ctx)
        try:
            result = await asyncio.wait_for(future, timeout) if timeout else await future
        except asyncio.TimeoutError:
            ctx.abandon(f"attempt timed out after {timeout:g}s")
            if concurrent is not None:
                concurrent.cancel()
            failure = Failure("TimeoutError", f"state {state.name!r}: attempt {token.attempt} timed out after "
                              f"{timeout:g}s", retryable=True, bases=("Exception",))
            self._log_failure(inst, state, token, failure)
            return Outcome(failure=failure)
        except AttemptAbandoned as exc:
            failure = Failure("AttemptAbandoned", str(exc), retryable=True)
            return Outcome(failure=failure)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            failure = _failure_of(exc)
            self._log_failure(inst, state, token, failure, exc)
            return Outcome(failure=failure)
        return self._outcome(result, payload, state)

    def _log_failure(self, inst: Instance, state: State, token: Token, failure: Failure,
                     exc: BaseException | None = None) -> None:
        self.stats.failures += 1
        log.warning("instance %s state %s attempt %d failed: %s: %s", inst.id, state.name, token.attempt,
                    failure.type, failure.message, exc_info=exc if log.isEnabledFor(logging.DEBUG) else None)

    def _outcome(self, result: Any, payload: dict, state: State) -> Outcome:
        label: str | None = None
        new: Any
        if result is None:
            new = payload
        elif isinstance(result, dict):
            new = result
        elif isinstance(result, str):
            label, new = result, payload
        elif (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)
              and isinstance(result[1], dict)):
            label, new = result
        else:
            return Outcome(failure=Failure("InvalidResult", f"state {state.name!r}: the handler returned "
                                           f"{type(result).__name__}; expected None, a dict, an outcome label "
                                           "(str) or a (label, dict) pair", retryable=False))
        try:
            checked, _ = payloads.check(new, limit=self.payload_limit)
        except payloads.PayloadError as exc:
            return Outcome(failure=Failure(exc.kind, f"state {state.name!r}: {exc}", retryable=False))
        return Outcome(payload=checked, label=label)

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
                batch = self._pending.pop(iid)
                try:
                    await self._commit_batch(iid, graph, batch)
                except Exception:
                    log.exception("worker %s: internal error committing instance %s", self.id, iid)
                finally:
                    for p in batch:
                        _settle(p.future, False)
        finally:
            self._committing.discard(iid)

    async def _commit_batch(self, iid: str, graph: Graph, batch: list[_Pending]) -> None:
        rejected = 0
        while batch:
            inst, rev = self._records[iid]
            now = self.wall()
            after, history = inst, []
            for p in batch:
                tok = p.job.ref[1]
                current = after.tokens.get(tok)
                if current is None or current.visit != p.token.visit or current.attempt != p.token.attempt:
                    continue  # stale: the token moved on or went away; its claim is released below
                step = transition.advance(graph, after, tok, p.outcome, now=now, worker=self.id)
                after = step.instance
                history.extend(step.history)
            own = {p.job.ref[1] for p in batch}
            keep, after = self._plan(graph, inst, after, own, history, now)
            record = dump_instance(after)
            if len(record) > self.max_record_bytes:
                after, history, keep = self._oversized(inst, batch[0].token, len(record)), [], []
                record = dump_instance(after)
            removed, changed = transition.changes(inst, after)
            try:
                result = await self._commits.submit(
                    self._commit_txn(inst, rev, batch, record, history, removed, changed, keep))
            except (StoreUnavailable, asyncio.TimeoutError) as exc:
                log.warning("worker %s: commit of instance %s in doubt (%s); re-reading", self.id, iid, exc)
                batch = await self._settle_doubt(iid, batch, keep, now)
                continue
            except LeaseLost:
                self.stats.lost += len(batch)
                log.warning("worker %s: lease lost before committing instance %s", self.id, iid)
                return
            except TxnRejected as exc:
                rejected += 1
                log.error("worker %s: the store refused the commit of instance %s: %s", self.id, iid, exc)
                if rejected > 1:
                    for p in batch:
                        await self._release(p.job.ref, p.job.claim_rev)
                    return
                failure = Failure("StoreRejected", f"the store refused the commit: {exc}", retryable=False)
                batch = [_Pending(p.job, p.token, Outcome(failure=failure), p.future) for p in batch]
                continue
            if result.succeeded:
                self._committed(transition.Step(after, removed, changed, tuple(history)), result.revision, keep,
                                batch)
                return
            try:
                record_kv, claims = await self._read(iid, batch)
            except StoreUnavailable:
                await asyncio.sleep(0.2)
                continue
            still: list[_Pending] = []
            for p, claim in zip(batch, claims):
                if claim is not None and claim.create_revision == p.job.claim_rev:
                    still.append(p)
                else:
                    self.stats.lost += 1
                    log.info("worker %s: claim on %s/%s lost before commit; another worker takes over",
                             self.id, iid, p.job.ref[1])
                    _settle(p.future, False)
            if record_kv is None:
                return
            self.stats.conflicts += 1
            self._remember(record_kv)
            batch = still

    async def _read(self, iid: str, batch: list[_Pending]) -> tuple[KeyValue | None, list[KeyValue | None]]:
        """The record and the claims of a batch, in one round trip."""
        ops = [Get(self.keys.instance(iid))] + [Get(self.keys.claim(iid, p.job.ref[1])) for p in batch]
        result = await self.store.txn([], ops)
        record, *claims = (kvs[0] if kvs else None for kvs in result.responses)
        return record, claims

    def _plan(self, graph: Graph, before: Instance, after: Instance, own: set[str], history: list,
              now: float) -> tuple[list[Token], Instance]:
        """Choose the tokens this worker runs next (claimed in the commit itself): its own tokens
        that moved on keep their slots, new ones take free slots. Tick-less states among them are
        run right here, folded into the same commit."""
        if self._stopping:
            return [], after
        free = max(0, self.concurrency - self._busy) + max(0, self.prefetch - len(self._ready))
        for _ in range(256):
            if after.finished:
                return [], after
            # free slots, plus those of our own tokens this commit consumes (a fork hands its token's
            # slot to a branch)
            budget = free + sum(1 for tid in own if tid not in after.tokens)
            mine = [t for tid, t in after.tokens.items() if t.not_before <= now and t.attempt == 1 and (
                (tid in own and before.tokens.get(tid) != t) or tid not in before.tokens)]
            mine.sort(key=lambda t: t.id not in own)
            keep = [t for t in mine if t.id in own] + [t for t in mine if t.id not in own][:budget]
            tickless = next((t for t in keep if graph.states[t.state].tick is None), None)
            if tickless is None:
                return keep, after
            step = transition.advance(graph, after, tickless.id, Outcome(), now=now, worker=self.id)
            after = step.instance
            history.extend(step.history)
        return keep, after

    def _oversized(self, inst: Instance, token: Token, size: int) -> Instance:
        error = ErrorInfo(type="PayloadTooLarge", message=f"state {token.state!r}: the instance record would be "
                          f"{size} bytes (its live payloads together); the store accepts {self.max_record_bytes}",
                          state=token.state, attempts=token.attempt)
        return transition.fail(inst, error, self.wall()).instance

    def _commit_txn(self, inst: Instance, rev: int, batch: list[_Pending], record: bytes, history: list,
                    removed: tuple[str, ...], changed: tuple[Token, ...], keep: list[Token]) -> Txn:
        iid = inst.id
        keys = self.keys
        own = {p.job.ref[1] for p in batch}
        ops: list = [Put(keys.instance(iid), record)]
        for entry in history:
            ops.append(Put(keys.history(iid, entry.seq), dump_history(entry)))
        for gone in removed:
            ops.append(Delete(keys.work(iid, gone)))
            ops.append(Delete(keys.claim(iid, gone)))
        kept = {t.id for t in keep}
        touched = set(removed)
        for token in changed:
            touched.add(token.id)
            owner = self.id if token.id in kept else None
            ops.append(Put(keys.work(iid, token.id), WorkInfo(inst.machine, inst.digest, token.state,
                                                              token.not_before, owner).dump()))
            if token.id in own:
                if owner is None:  # a retry waiting, or no slot for it here: give it back
                    ops.append(Delete(keys.claim(iid, token.id)))
            elif owner is not None:
                ops.append(Put(keys.claim(iid, token.id), self.id.encode(), self.lease or 0))
        for tok in own - touched:  # stale outcomes: let their claims go
            ops.append(Delete(keys.claim(iid, tok)))
        compare = [Compare.mod(keys.instance(iid), "==", rev)]
        for p in batch:
            compare.append(Compare.create(keys.claim(iid, p.job.ref[1]), "==", p.job.claim_rev))
        return Txn(compare, ops)  # on failure (rare) the caller reads what changed

    def _committed(self, step: Step, revision: int, keep: list[Token], batch: list[_Pending]) -> None:
        inst = step.instance
        self._records[inst.id] = (inst, revision)
        self.stats.committed += 1
        self.stats.transitions += len(step.history)
        if log.isEnabledFor(logging.DEBUG):
            for entry in step.history:
                log.debug("instance %s: %s -> %s (branch %s)", inst.id, entry.state, ",".join(entry.next),
                          "/".join(entry.branch) or "-")
        if inst.finished:
            log.info("instance %s %s%s", inst.id, inst.status,
                     f" at {inst.state}" if inst.state else f": {inst.error.type}: {inst.error.message}"
                     if inst.error else "")
        if self.on_commit is not None:
            self.on_commit(step)
        kept = {t.id for t in keep}
        own = {p.job.ref[1] for p in batch}
        for p in batch:
            _settle(p.future, p.job.ref[1] in kept)
        for token in keep:
            if token.id not in own:
                self._enqueue((inst.id, token.id), revision)

    async def _settle_doubt(self, iid: str, batch: list[_Pending], keep: list[Token], now: float) -> list[_Pending]:
        """A commit's answer was lost: find out what applied, never blindly repeat it.

        Only this worker touches a token it holds a claim on, so: a claim gone means our commit
        released it (or our lease ended); a claim still ours on a token that moved on means our
        commit applied and kept it; a claim still ours on an unmoved token means nothing applied.
        Returns the outcomes still to commit.
        """
        while True:
            try:
                record, claims = await self._read(iid, batch)
                break
            except StoreUnavailable:
                if self._stopping:
                    return []
                await asyncio.sleep(0.5)
        if record is None:
            return []
        self._remember(record)
        inst = self._records[iid][0]
        retry: list[_Pending] = []
        own = {p.job.ref[1] for p in batch}
        for p, claim in zip(batch, claims):
            if claim is None or claim.create_revision != p.job.claim_rev:
                _settle(p.future, False)
                continue
            current = inst.tokens.get(p.job.ref[1])
            if current is not None and (current.visit, current.attempt) != (p.token.visit, p.token.attempt):
                _settle(p.future, current.not_before <= now and current.attempt == 1)
            else:
                retry.append(p)
        for token in keep:  # new tokens the commit claimed, if it applied: run them
            if token.id not in own:
                await self._adopt((iid, token.id), self.lease, reserved=False)
        return retry


def _settle(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


@dataclass
class _Pending:
    """An attempt's outcome waiting for its instance's next commit."""

    job: _Job
    token: Token
    outcome: Outcome
    future: asyncio.Future = field(repr=False)


def _load_info(raw: bytes) -> WorkInfo | None:
    try:
        return WorkInfo.load(raw)
    except (ValueError, KeyError, TypeError):
        return None
