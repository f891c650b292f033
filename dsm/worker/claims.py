"""The store's side of a worker's claims, shared by every part that meets one.

A claim is the work marker's value (`keys.py`): `owner` and `lease` name the worker and the lease
it claimed under, and the claim holds while that worker's entry lives under that lease. Here:
the claim transaction (fenced by the revision of the marker the candidate was offered on, by our
own entry, and by the previous owner's entry being gone or under another lease), giving a claim
back (the marker put again without an owner, fenced by its mod revision), finding out after a
lost answer whether a claim is ours (`adopt`), removing the markers of an instance that has no
record, and the claims of ours that nothing here uses (for the claim audit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .. import logs
from ..errors import StoreError, StoreUnavailable
from ..keys import Keys, TokenRef, WorkInfo
from ..markers import MAX_TXN_OPS, reconcile
from ..store import Compare, Get, KeyValue, Put, Store, Txn
from .cache import RecordCache
from .feed import Seen, WorkFeed
from .jobs import JobTable
from .queue import CandidateQueue

log = logging.getLogger("dsm.worker")

UNKNOWN = WorkInfo("", "", "")  # what a claim writes over a marker whose value it could not read


class Claims:
    """The store's side of the worker's claims."""

    def __init__(self, store: Store, keys: Keys, *, name: str, records: RecordCache, queue: CandidateQueue[TokenRef],
                 feed: WorkFeed, jobs: JobTable, wall: Callable[[], float] = time.time,
                 max_txn_ops: int = MAX_TXN_OPS):
        self.store = store
        self.keys = keys
        self.name = name
        self.own_key = keys.worker(name)
        self.records = records
        self.queue = queue
        self.feed = feed
        self.jobs = jobs
        self.wall = wall
        self.max_txn_ops = max_txn_ops
        self._stopping = False

    def stop(self) -> None:
        """The worker stops: reads after a lost answer give up instead of retrying."""
        self._stopping = True

    def txn(self, ref: TokenRef, lease: int | None, seen: Seen) -> Txn:
        """Claim a candidate as its marker was seen: at that mod revision, claimed by nobody or by
        a worker whose entry must now be gone or under another lease. Our own entry must live
        under `lease`: nobody may see our claim while we look dead. Answers the record and the
        marker (as claimed); when refused, our entry (so the claimer tells a lost entry from a
        lost race)."""
        work = ref.key
        compare = [Compare.mod(work, "==", seen.revision), Compare.lease_of(self.own_key, "==", lease or 0)]
        if seen.claimant is not None:
            owner, owner_lease = seen.claimant
            compare.append(Compare.lease_of(self.keys.worker(owner), "!=", owner_lease))
        info = (seen.info or UNKNOWN).claimed(self.name, lease or 0)
        return Txn(compare, [Put(work, info.dump()), Get(self.keys.instance(ref.instance)), Get(work)],
                   [Get(self.own_key)])

    def ours(self, work: KeyValue | None, lease: int | None) -> bool:
        """Whether a marker as read holds a claim of ours under `lease`."""
        info = marker(work) if work is not None else None
        return info is not None and lease is not None and info.claimant == (self.name, lease)

    async def adopt(self, ref: TokenRef, lease: int | None, *, requeue: bool = False) -> int | None:
        """After an ambiguous claim or commit: the claim's revision (its marker's mod revision)
        when the marker of `ref` says it is ours and no job holds it (its record is cached: the
        caller runs it); else None, and it is let be. `requeue`: when it is not ours, it is a
        candidate again if nobody live holds it, due when its marker says: meanwhile another
        worker may have run it and moved it on, under the same id, to a timer (not due now)."""
        while True:
            try:
                result = await self.store.txn([], [Get(self.keys.instance(ref.instance)), Get(ref.key)])
                break
            except StoreUnavailable:
                if self._stopping:
                    return None
                await asyncio.sleep(0.5)
        record, work = result.get(0).first, result.get(1).first
        ours = self.ours(work, lease)
        if record is None and work is not None and ours and ref not in self.jobs:  # our claim, no record
            await self.remove_stray(ref, work.mod_revision)
            return None
        if not ours or record is None or work is None or ref in self.jobs:
            if requeue and not ours and work is not None:
                self.feed.put_back(ref, work)
            return None
        self.records.remember(record)
        return work.mod_revision

    async def remove_stray(self, ref: TokenRef, claim_rev: int) -> None:
        """We claimed a marker whose instance has no record (a writer that did not know it was
        gone, or a version of dsm that left one): nothing will ever run it, and given back it would
        be claimed again at once, by every worker, for ever. Whoever meets one removes it, with the
        instance's other markers, fenced by the record's absence."""
        try:
            await self.reconcile(ref)
            log.info("worker %s: removed work marker %s of instance %s, which has no record", self.name, ref.token,
                     ref.instance, extra=self.about(ref.instance))
        except StoreError as exc:
            log.warning("worker %s: could not remove marker %s of an instance without a record (%s)", self.name,
                        ref.token, exc, extra=self.about(ref.instance))
            await self.release(ref, claim_rev)

    async def release(self, ref: TokenRef, claim_rev: int) -> None:
        """Give a claim back: its marker put again without an owner, if it is still as we claimed
        or last wrote it (`claim_rev`); a new marker is new work to every worker."""
        work = ref.key
        try:
            kv = await self.store.get(work)
            if kv is None or kv.mod_revision != claim_rev:
                return  # gone, or claimed by another since: not ours to give back
            info = marker(kv) or UNKNOWN
            await self.store.txn([Compare.mod(work, "==", claim_rev)], [Put(work, info.claimed(None, None).dump())])
        except StoreError as exc:
            log.warning("worker %s: could not release token %s (%s); it frees when the lease ends", self.name,
                        ref.token, exc, extra=self.about(ref.instance, ref.token))

    async def reconcile(self, ref: TokenRef) -> None:
        """Make the work markers of `ref`'s instance match its record (deferred marker changes, stale markers)."""
        await reconcile(self.store, self.keys, ref.instance, ref.place, now=self.wall(), max_ops=self.max_txn_ops)

    def idle(self, lease: int, busy: Callable[[TokenRef], bool]) -> dict[TokenRef, int]:
        """Markers claimed by us under `lease` (as the feed last heard of them) that nothing of ours
        is using (`busy`): ref -> the marker's mod revision."""
        return {ref: rev for ref, rev in self.feed.claimed_by(self.name, lease).items() if not busy(ref)}

    def about(self, iid: str, tok: str | None = None) -> dict[str, Any]:
        """The `extra=` of a log line about instance `iid` (`dsm.logs`), with what this worker knows of
        it: its machine, if its record is cached, and the state and attempt of its token `tok`."""
        machine = state = attempt = None
        if iid in self.records:
            inst = self.records.get(iid).instance
            machine = inst.machine
            token = inst.tokens.get(tok) if tok is not None else None
            if token is not None:
                state, attempt = token.state, token.attempt
        return logs.about(iid, machine, state, attempt, self.name)


def marker(kv: KeyValue) -> WorkInfo | None:
    try:
        return WorkInfo.load(kv.value)
    except (ValueError, KeyError, TypeError):
        return None


def says_due_now(kv: KeyValue) -> bool:
    """Whether a work marker says its token is due now (not after a time)."""
    info = marker(kv)
    return info is not None and info.not_before == 0.0
