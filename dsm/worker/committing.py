"""Committing: the outcomes of attempts become one transaction per instance, folded together.

One committer per instance at a time: outcomes that arrive while a commit of their instance is in
flight go together in the next one (branches arriving at a join cost one round trip, not one
each). What to commit is decided by `dsm.commits` (pure); this part reads the children a call
state waits for (their revisions fence the commit), sends the transaction, and settles each
outcome's waiter: whether its job's token moved on and is still ours to run. When a commit's
answer is lost, it re-reads and never blindly repeats (`settle_doubt`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from .. import logs, transition
from ..batching import Batcher
from ..commits import MAX_ARRIVALS, CommitPlan, commit_txn, plan_commit
from ..errors import LeaseLost, NoSpace, StoreUnavailable
from ..graph import Graph
from ..keys import Keys, TokenRef
from ..operations import Operations
from ..records import RUNNING, Instance, Token, load_instance
from ..step import Arrival
from ..store import Compare, Get, KeyValue, Store, Txn, TxnRejected, TxnResult
from ..transition import ChildResult, Failure, Outcome, Step
from .cache import RecordCache
from .claims import Claims
from .config import WorkerConfig
from .jobs import Job
from .lease import LeaseKeeper
from .meter import Meter
from .nospace import WriteGate
from .slots import Slots
from .stats import WorkerStats

log = logging.getLogger("dsm.worker")

# a token claimed for this worker: its claim's revision (its marker's) and the lease it was claimed under
HandOn = Callable[[TokenRef, int, int | None], None]


@dataclass
class _Pending:
    """An attempt's outcome waiting for its instance's next commit."""

    job: Job
    token: Token
    outcome: Outcome
    future: asyncio.Future = field(repr=False)
    last: bool = True  # its job's last outcome in this commit (the earlier ones of a run along a line are not)
    base: Instance | None = None  # the instance `step` was computed from, where the attempt ran
    step: Step | None = None  # the step its outcome makes from `base` (`dsm.step.Arrival`)


@dataclass(frozen=True, slots=True)
class _Read:
    """A record and the markers of a batch's tokens, as one round trip found them."""

    record: KeyValue | None
    markers: list[KeyValue | None]
    entry: KeyValue | None  # our own entry among live workers: our claims hold while it is under our lease

    def holds(self, i: int, claim_rev: int, lease: int) -> bool:
        """Whether the claim on the batch's `i`th token still holds: its marker as we claimed or
        last wrote it (`claim_rev`), and our entry under `lease`."""
        work = self.markers[i]
        return (work is not None and work.mod_revision == claim_rev and self.entry is not None
                and self.entry.lease == lease)


class Committer:
    """Commits the outcomes of attempts, one committer per instance at a time (see the module)."""

    def __init__(self, store: Store, keys: Keys, claims: Claims, *, config: WorkerConfig, name: str,
                 hand_on: HandOn, records: RecordCache, slots: Slots[TokenRef], lease: LeaseKeeper, gate: WriteGate,
                 meter: Meter, stats: WorkerStats, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic, on_commit: Callable[[Step], None] | None = None):
        """`hand_on(ref, claim revision, lease)`: run a token that a commit claimed for this worker,
        now or when a slot frees."""
        self.store = store
        self.keys = keys
        self.claims = claims
        self.name = name
        self.hand_on = hand_on
        self.records = records
        self.slots = slots
        self.lease = lease
        self.gate = gate
        self.meter = meter
        self.stats = stats
        self.wall = wall
        self.clock = clock
        self.on_commit = on_commit
        self.max_record_bytes = config.max_record_bytes
        self.max_txn_ops = config.max_txn_ops
        self.offload_guards = config.offload_guards
        self._batcher = Batcher(store, max_ops=config.batch_ops)
        self._guarded: dict[str, bool] = {}  # definition digest -> whether its machine has guards
        self._pending: dict[str, list[_Pending]] = {}
        self._committing: set[str] = set()  # instances with a commit in flight
        self._promised = 0  # new tokens that commits planned or in flight may claim for this worker
        self._stopping = False

    def stop(self) -> None:
        """The worker stops: commits claim no new tokens, and reads after a lost answer give up."""
        self._stopping = True

    def committing(self, iid: str) -> bool:
        """Whether a commit of instance `iid` is in flight."""
        return iid in self._committing

    async def commit(self, graph: Graph, job: Job, arrivals: list[Arrival]) -> bool:
        """Commit a job's attempts' outcomes: one, or its token's run along a line (in order),
        folded with whatever else of this instance is ready.

        True when the job's own token moved on and is still ours to run (the caller continues it
        without another claim); False when the job is done with it.
        """
        iid = job.ref.instance
        loop = asyncio.get_running_loop()
        last = len(arrivals) - 1
        pending = [_Pending(job, a.token, a.outcome, loop.create_future(), i == last, a.base, a.step)
                   for i, a in enumerate(arrivals)]
        self._pending.setdefault(iid, []).extend(pending)
        if iid not in self._committing:  # nobody commits for this instance: this job does, inline
            self._committing.add(iid)
            await self._loop(iid, graph)
        return await pending[-1].future

    async def _loop(self, iid: str, graph: Graph) -> None:
        """One committer per instance: outcomes that arrive while a commit is in flight go together
        in the next one."""
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
                    log.exception("worker %s: internal error committing", self.name,
                                  extra=_about_batch(iid, graph, batch, self.name))
                    for p in batch:
                        if not p.future.done():
                            await self.claims.release(p.job.ref, p.job.claim_rev)
                finally:
                    for p in batch:
                        _settle(p.future, False)
        finally:
            self._committing.discard(iid)

    async def _plan(self, graph: Graph, iid: str, batch: list[_Pending], now: float) -> tuple[CommitPlan, int]:
        inst, rev = self.records.get(iid)
        arrivals = [Arrival(p.token, p.job.claim_rev, p.outcome, p.base, p.step) for p in batch]
        spare = 0 if self._stopping else max(0, self.slots.spare - self._promised)
        plan = functools.partial(plan_commit, graph, inst, arrivals, now=now, worker=self.name, slots=spare,
                                 max_record_bytes=self.max_record_bytes, max_ops=self.max_txn_ops)
        guarded = self._guarded.get(graph.digest)
        if guarded is None:
            guarded = self._guarded[graph.digest] = graph.has_guards()
        if not (guarded and self.offload_guards):
            return plan(), rev
        # planned on a thread: the spare slots it was given are held back from the plans made
        # meanwhile, until `_send` holds back what it claimed
        self._promised += spare
        try:
            return await asyncio.to_thread(plan), rev
        finally:
            self._promised -= spare

    async def _commit_batch(self, iid: str, graph: Graph, batch: list[_Pending]) -> None:
        rejected = 0
        while batch:
            try:
                batch, fences = await self._children(graph, batch)
            except StoreUnavailable:
                await asyncio.sleep(0.2)
                continue
            # only outcomes claimed under our lease now are planned: the plan's own tokens are
            # exactly those whose claims the transaction compares
            lease = self.lease.id or 0
            batch = self._under(lease, batch, graph)
            if not batch:
                return
            now = self.wall()
            plan, rev = await self._plan(graph, iid, batch, now)
            claims = {p.job.ref.token: p.job.claim_rev for p in batch}
            txn = commit_txn(self.keys, plan, rev, claims, worker=self.name, lease=lease, now=now, fences=fences)
            sent = self.clock()
            try:
                result = await self._send(txn, sum(1 for t in plan.keep if t.id not in plan.own))
            except NoSpace as exc:  # refused, not applied: the claims hold while it waits for room
                self.gate.refused(exc)
                await self.gate.wait()
                continue
            except (StoreUnavailable, asyncio.TimeoutError, LeaseLost) as exc:
                if isinstance(exc, LeaseLost):
                    await self.lease.verify()
                log.warning("worker %s: commit in doubt (%s); re-reading", self.name, exc,
                            extra=_about_batch(iid, graph, batch, self.name))
                batch = await self._settle_doubt(iid, batch, plan, now, lease)
                continue
            except TxnRejected as exc:
                rejected += 1
                log.error("worker %s: the store refused the commit: %s", self.name, exc,
                          extra=_about_batch(iid, graph, batch, self.name))
                if rejected > 1:
                    for p in batch:
                        await self.claims.release(p.job.ref, p.job.claim_rev)
                    return
                failure = Failure("StoreRejected", f"the store refused the commit: {exc}", retryable=False)
                batch = [_Pending(p.job, p.token, Outcome(failure=failure), p.future, p.last) for p in batch]
                continue
            self.meter.commit_answered(graph.machine, self.clock() - sent, result.succeeded)
            if result.succeeded:
                # the outcomes that did not fit in this transaction go in the next one
                self._committed(plan, result.revision, batch[:plan.applied], lease)
                batch = batch[plan.applied:]
                continue
            try:
                read = await self._read(iid, batch)
            except StoreUnavailable:
                await asyncio.sleep(0.2)
                continue
            still: list[_Pending] = []
            for i, p in enumerate(batch):
                if read.holds(i, p.job.claim_rev, lease):
                    still.append(p)
                elif not p.last:  # its job's claim is counted once, with its last outcome
                    _settle(p.future, False)
                else:
                    self.stats.lost += 1
                    self.meter.lost[graph.machine] += 1
                    log.info("worker %s: claim on token %s lost before commit; another worker takes over",
                             self.name, p.job.ref.token,
                             extra=logs.about(iid, graph.machine, p.token.state, p.token.attempt, self.name))
                    _settle(p.future, False)
            if read.record is None:
                return
            self.stats.conflicts += 1
            self.records.remember(read.record)
            batch = still

    async def _send(self, txn: Txn, promised: int) -> TxnResult:
        """Send a commit that claims `promised` new tokens for this worker: while it is in flight,
        other commits plan with that many fewer spare slots (each would otherwise count the same
        free slots and waiting room, and together claim more than the worker can run soon)."""
        self._promised += promised
        try:
            return await self._batcher.submit(txn)
        finally:
            self._promised -= promised

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
        out = [replace(p, outcome=Outcome(child=results[id(p)]), step=None) if id(p) in results else p for p in batch]
        return out, tuple(fences)

    async def _read(self, iid: str, batch: list[_Pending]) -> _Read:
        """The record, the markers of a batch's tokens and our own entry, in one round trip."""
        ops: list = [Get(self.keys.instance(iid)), Get(self.keys.worker(self.name))]
        ops += [Get(p.job.ref.key) for p in batch]
        result = await self.store.txn([], ops)
        record, entry, *markers = (got.first for got in result.gets())
        return _Read(record, markers, entry)

    def _under(self, lease: int, batch: list[_Pending], graph: Graph) -> list[_Pending]:
        """The outcomes whose claims were taken under `lease`, our lease now; the others' claims
        ended with the lease they named (a worker back under a new lease commits none of them)."""
        still = []
        for p in batch:
            if p.job.lease == lease:
                still.append(p)
                continue
            _settle(p.future, False)
            if not p.last:  # its job's claim is counted once, with its last outcome
                continue
            self.stats.lost += 1
            self.meter.lost[graph.machine] += 1
            log.info("worker %s: claim on token %s ended with its lease; another worker takes over", self.name,
                     p.job.ref.token,
                     extra=logs.about(p.job.ref.instance, graph.machine, p.token.state, p.token.attempt, self.name))
        return still

    def _committed(self, plan: CommitPlan, revision: int, batch: list[_Pending], lease: int) -> None:
        inst = plan.after
        self.records.put(inst, revision)
        self.stats.committed += 1
        self.stats.transitions += len(plan.history)
        first = plan.before.transitions == 0 and any(p.token.attempt == 1 for p in batch)  # its first commit
        self.meter.committed(inst.machine, len(plan.history), first, inst.status if inst.finished else None)
        if log.isEnabledFor(logging.DEBUG):
            for entry in plan.history:
                log.debug("%s -> %s (branch %s)", entry.state, ",".join(entry.next), "/".join(entry.branch) or "-",
                          extra=logs.about(inst.id, inst.machine, entry.state, entry.attempt, self.name))
        if inst.finished:
            last = plan.history[-1] if plan.history else None
            log.info("%s%s", inst.status, f" at {inst.state}" if inst.state else
                     f": {inst.error.type}: {inst.error.message}" if inst.error else "",
                     extra=logs.about(inst.id, inst.machine, inst.state or (inst.error.state if inst.error else None),
                                      last.attempt if last is not None else None, self.name))
        self._let_go(plan.before, inst, batch)
        if self.on_commit is not None:
            self.on_commit(Step(inst, plan.removed, plan.changed, plan.history))
        kept = {t.id for t in plan.keep}
        for p in batch:
            _settle(p.future, p.job.ref.token in kept)
        for token in plan.keep:
            if token.id not in plan.own:
                self.hand_on(self.keys.ref(inst, token.id), revision, lease)

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
                    "cancelling the children it let go of", logs.about(after.id, after.machine, worker=self.name))

    async def _settle_doubt(self, iid: str, batch: list[_Pending], plan: CommitPlan,
                            now: float, lease: int) -> list[_Pending]:
        """A commit's answer was lost: find out what applied, never blindly repeat it.

        Only this worker writes a marker it holds a claim in, but for deleting it or waking it (a
        cancel, a signal, a child's end), which also ends the claim: so a marker rewritten since
        we claimed it means our commit gave it back or deleted it (or someone else ended our
        claim, or our lease ended); a marker unchanged on a token that moved on means our commit
        applied and kept it along its line; a marker unchanged on an unmoved token means nothing
        applied (yet: if it applies later, the claims it took are given back by the claim audit).
        Returns the outcomes still to commit.
        """
        while True:
            try:
                read = await self._read(iid, batch)
                break
            except StoreUnavailable:
                if self._stopping:
                    return []
                await asyncio.sleep(0.5)
        if read.record is None:
            return []
        inst = self.records.remember(read.record)
        self._let_go(plan.before, inst, batch)  # if it applied, or whoever moved the instance on
        retry: list[_Pending] = []
        for i, p in enumerate(batch):
            if not read.holds(i, p.job.claim_rev, lease):
                _settle(p.future, False)
                continue
            current = inst.tokens.get(p.job.ref.token)
            # a later step of a run along a line is ahead of a record its first step did not apply to
            if current is not None and current.visit >= p.token.visit and (
                    (current.visit, current.attempt) != (p.token.visit, p.token.attempt)):
                _settle(p.future, current.not_before <= now and current.attempt == 1)
            else:
                retry.append(p)
        await self.lease.ready.wait()
        for token in plan.keep:  # new tokens the commit claimed, if it applied: run them
            if token.id not in plan.own:
                ref = self.keys.ref(inst, token.id)
                claim_rev = await self.claims.adopt(ref, lease)
                if claim_rev is not None:
                    self.hand_on(ref, claim_rev, lease)
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


def _settle(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)
