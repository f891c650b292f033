"""Claiming: candidates taken from the queue become claims under the worker's lease, and every
claim under that lease either has a job here or is given back.

`Claimer` is the worker's dispatcher: it fills free slots with claims and hands each claim won
to the job runner (`jobrunner.py`); its audit gives back the claims of ours, under our lease,
that nothing here uses (a claim or a commit applied after its answer was lost): the markers
that name us, as the work feed's index of owners knows them. What a claim is in the store is
`claims.py`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..batching import Batcher
from ..errors import LeaseLost, NoSpace, StoreUnavailable
from ..keys import TokenRef
from ..store import Store
from .cache import RecordCache
from .claims import Claims, says_due_now
from .config import WorkerConfig
from .feed import Seen, WorkFeed
from .jobrunner import JobRunner
from .lease import LeaseKeeper
from .meter import Meter
from .nospace import WriteGate
from .queue import CandidateQueue
from .slots import Slots
from .stats import WorkerStats

log = logging.getLogger("dsm.worker")
ENTRY_WAIT = 1.0  # seconds a candidate waits when a claim found our own entry missing


class Claimer:
    """Fills free slots with claims (`dispatch`) and gives back claims nothing here uses (`audit`)."""

    def __init__(self, store: Store, claims: Claims, runner: JobRunner, *, config: WorkerConfig, name: str,
                 queue: CandidateQueue[TokenRef], slots: Slots[TokenRef], feed: WorkFeed, gate: WriteGate,
                 lease: LeaseKeeper, records: RecordCache, meter: Meter, stats: WorkerStats,
                 clock: Callable[[], float] = time.monotonic):
        self.claims = claims
        self.runner = runner
        self.name = name
        self.queue = queue
        self.slots = slots
        self.feed = feed
        self.gate = gate
        self.lease = lease
        self.records = records
        self.meter = meter
        self.stats = stats
        self.clock = clock
        self.sweep_interval = config.sweep_interval
        self.audit_interval = config.audit_every
        self._batcher = Batcher(store, max_ops=config.batch_ops)
        self._claiming: set[TokenRef] = set()  # claims sent, not yet answered
        self._stopping = False

    def stop(self) -> None:
        """The worker stops: no new claims."""
        self._stopping = True

    def busy(self, ref: TokenRef) -> bool:
        """Whether a claim, a job, a commit or a wait of ours uses `ref`."""
        return ref in self._claiming or self.runner.busy(ref)

    async def dispatch(self) -> None:
        last_sweep = self.clock()
        wake = self.feed.changed
        while not self._stopping:
            if self.gate.closed:  # claims would be refused: claim nothing until etcd takes writes again
                await self.gate.wait()
                continue
            free = self.slots.free
            picked = self.queue.take(free, busy=self.runner.jobs) if free else []
            if picked:
                self.slots.take(len(picked))
                # the markers they were offered on, as they are now: by the time the claims go out
                # the feed may have heard that another worker claimed one
                seen = {ref: self.feed.seen(ref) for ref in picked}
                asyncio.get_running_loop().create_task(self.claim(picked, seen))
                continue
            if free and self.feed.behind and not self.queue.has_due():
                try:
                    await self.feed.page()
                except StoreUnavailable as exc:
                    log.warning("worker %s: cannot page work (%s)", self.name, exc)
                    await asyncio.sleep(0.5)
                continue
            if free and not len(self.queue) and self.clock() - last_sweep > self.sweep_interval:
                last_sweep = self.clock()  # a safety net: look over the whole prefix when idle
                self.feed.rescan()
                continue
            wake.clear()
            delay = self.queue.next_delay()
            timeout = min(delay if delay is not None else self.sweep_interval, self.sweep_interval)
            try:
                await asyncio.wait_for(wake.wait(), timeout=max(timeout, 0.001))
            except asyncio.TimeoutError:
                pass

    async def claim(self, refs: list[TokenRef], seen: dict[TokenRef, Seen | None]) -> None:
        """Claim `refs` (their slots are taken) as their markers were `seen`; start a job on each
        claim won."""
        await self.lease.ready.wait()
        lease = self.lease.id
        started = 0
        # every candidate was offered by the feed with its marker; one it no longer knows is let be
        known = [(ref, marker) for ref, marker in seen.items() if marker is not None]
        self._claiming.update(refs)
        try:
            results = await asyncio.gather(*(self._batcher.submit(self.claims.txn(ref, lease, marker))
                                             for ref, marker in known),
                                           return_exceptions=True)
            for (ref, _), result in zip(known, results):
                if isinstance(result, BaseException):
                    if isinstance(result, NoSpace):  # refused, not applied: it waits for room
                        self.gate.refused(result)
                        self.queue.add(ref, first=True)
                    elif isinstance(result, (StoreUnavailable, asyncio.TimeoutError)):
                        # It may have been applied: run it if the claim is ours. If it applies
                        # later still, the claim audit gives it back.
                        claim_rev = await self.claims.adopt(ref, lease, requeue=True)
                        if claim_rev is not None:
                            self.runner.start(ref, claim_rev, lease)
                            started += 1
                    elif isinstance(result, LeaseLost):
                        await self.lease.verify()
                        self.queue.add(ref, first=True)
                    else:
                        log.error("worker %s: claim of token %s failed: %s", self.name, ref.token, result,
                                  extra=self.claims.about(ref.instance))
                    continue
                if not result.succeeded:
                    entry = result.get(0).first
                    if entry is None or entry.lease != lease:
                        # Not a race lost: our own entry is not under our lease (it was deleted by a
                        # worker that took us for dead, or the lease is gone). The presence puts it
                        # back, or the keeper takes a new lease; the candidate waits a moment.
                        self.queue.add(ref, ENTRY_WAIT, first=True)
                        if entry is None:
                            await self.lease.verify()
                    continue
                record, work = result.get(1).first, result.get(2).first
                if record is None and work is not None:
                    await self.claims.remove_stray(ref, result.revision)
                    continue
                if record is None or work is None:
                    await self.claims.release(ref, result.revision)
                    continue
                self.meter.claims[self.records.remember(record).machine] += 1
                self.stats.claimed += 1
                self.runner.start(ref, result.revision, lease, woken=says_due_now(work))
                started += 1
        finally:
            self._claiming.difference_update(refs)
            if len(refs) > started:
                self.runner.free(len(refs) - started)

    async def audit(self) -> None:
        """Every claim under our lease has a job here, or is given back.

        A claim or commit applied after its answer was lost (a slow fsync, a leader change) can
        leave a claim of ours with no job: nothing else would ever free it while we live. A claim
        seen idle by two audits in a row, at the same marker revision, is given back (fenced by
        that revision).
        """
        suspects: dict[TokenRef, int] = {}
        while True:
            await asyncio.sleep(self.audit_interval)
            if not self.lease.ready.is_set() or self.lease.id is None:
                suspects.clear()
                continue
            held = self.claims.idle(self.lease.id, self.busy)
            for ref, rev in held.items():
                if suspects.get(ref) == rev and not self.busy(ref):
                    log.warning("worker %s: claim on token %s has no job here; giving it back", self.name, ref.token,
                                extra=self.claims.about(ref.instance))
                    self.stats.given_back += 1
                    await self.claims.release(ref, rev)
            suspects = held
