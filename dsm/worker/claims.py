"""The store's side of a worker's claims, shared by every part that meets one.

The claim transaction (fenced by the revision of the marker the candidate was offered on),
giving a claim back (fenced by its create revision), finding out after a lost answer whether a
claim is ours (`adopt`), removing the markers of an instance that has no record, and the claims
under our lease that nothing here uses (for the claim audit).
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
from ..store import Compare, Delete, Get, KeyValue, Put, Store, Txn
from .cache import RecordCache
from .feed import WorkFeed
from .jobs import JobTable
from .lease import keys_under
from .queue import CandidateQueue

log = logging.getLogger("dsm.worker")


class Claims:
    """The store's side of the worker's claims."""

    def __init__(self, store: Store, keys: Keys, *, name: str, records: RecordCache, queue: CandidateQueue[TokenRef],
                 feed: WorkFeed, jobs: JobTable, wall: Callable[[], float] = time.time,
                 max_txn_ops: int = MAX_TXN_OPS):
        self.store = store
        self.keys = keys
        self.name = name
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

    def txn(self, ref: TokenRef, lease: int | None, revision: int | None = None) -> Txn:
        """Claim a candidate as its marker was at `revision` (any marker, when that is unknown)."""
        work, claim = self.keys.work(*ref), self.keys.claim(*ref)
        seen = Compare.mod(work, "==", revision) if revision is not None else Compare.version(work, ">", 0)
        return Txn([seen, Compare.create(claim, "==", 0)],
                   [Put(claim, self.name.encode(), lease or 0), Get(self.keys.instance(ref.instance)), Get(work)])

    async def adopt(self, ref: TokenRef, lease: int | None, *, requeue: bool = False) -> int | None:
        """After an ambiguous claim or commit: the claim's create revision when the claim on `ref`
        is ours and no job holds it (its record is cached: the caller runs it); else None, and it
        is let be. `requeue`: when nobody holds it, it is a candidate again, due when its marker
        says: meanwhile another worker may have run it and moved it on, under the same id, to a
        timer (not due now)."""
        while True:
            try:
                result = await self.store.txn([], [Get(self.keys.claim(*ref)), Get(self.keys.instance(ref.instance)),
                                                   Get(self.keys.work(*ref))])
                break
            except StoreUnavailable:
                if self._stopping:
                    return None
                await asyncio.sleep(0.5)
        claim, record, work = result.get(0).first, result.get(1).first, result.get(2).first
        if record is None and work is not None and claim is not None and claim.lease == lease \
                and ref not in self.jobs:  # our claim on a marker without a record
            await self.remove_stray(ref, claim.create_revision)
            return None
        if claim is None or record is None or lease is None or claim.lease != lease or ref in self.jobs:
            if requeue and claim is None and work is not None:
                info = marker(work)
                self.feed.put_back(ref, info.delay(self.wall(), fresh=False) if info is not None else 0.0,
                                   work.mod_revision)
            return None
        self.records.remember(record)
        return claim.create_revision

    async def remove_stray(self, ref: TokenRef, claim_rev: int) -> None:
        """We claimed a marker whose instance has no record (a writer that did not know it was
        gone, or a version of dsm that left one): nothing will ever run it, and given back it would
        be claimed again at once, by every worker, for ever. Whoever meets one removes it, with the
        instance's other markers and their claims, fenced by the record's absence."""
        try:
            await self.reconcile(ref.instance)
            log.info("worker %s: removed work marker %s of instance %s, which has no record", self.name, ref.token,
                     ref.instance, extra=self.about(ref.instance))
        except StoreError as exc:
            log.warning("worker %s: could not remove marker %s of an instance without a record (%s)", self.name,
                        ref.token, exc, extra=self.about(ref.instance))
            await self.release(ref, claim_rev)

    async def release(self, ref: TokenRef, claim_rev: int) -> None:
        claim = self.keys.claim(*ref)
        try:
            await self.store.txn([Compare.create(claim, "==", claim_rev)], [Delete(claim)])
        except StoreError as exc:
            log.warning("worker %s: could not release token %s (%s); it frees when the lease ends", self.name,
                        ref.token, exc, extra=self.about(*ref))

    async def reconcile(self, iid: str) -> None:
        """Make the instance's work markers match its record (deferred marker changes, stale markers)."""
        await reconcile(self.store, self.keys, iid, now=self.wall(), max_ops=self.max_txn_ops)

    async def idle(self, lease: int, busy: Callable[[TokenRef], bool]) -> dict[TokenRef, int]:
        """Claims under `lease` that nothing of ours is using (`busy`): ref -> create revision."""
        refs = []
        for key in await keys_under(self.store, self.keys, lease):
            parsed = self.keys.parse_work(key)
            if parsed is not None and parsed.is_claim and not busy(parsed.ref):
                refs.append(parsed.ref)
        if not refs:
            return {}
        result = await self.store.txn([], [Get(self.keys.claim(*ref)) for ref in refs[:MAX_TXN_OPS]])
        claims = (got.first for got in result.gets())
        return {ref: kv.create_revision for ref, kv in zip(refs, claims) if kv is not None and kv.lease == lease}

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
