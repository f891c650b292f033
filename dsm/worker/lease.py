"""The worker's lease: granted, marked as ours, kept alive, replaced when lost.

Every claim a worker takes is bound to its lease: a claim names the lease, and holds while the
worker's entry lives under it (`dsm.keys`). The keeper refreshes it at a third of its TTL;
when the store says it is gone (the keep-alive, a commit, anything else that used it), `lost()`
calls `on_lost` (the worker abandons what it held) and the keeper takes a new one at once.
`ready` is set while a lease is believed alive; claims wait on it. `renewed_at` says when the
last grant or keep-alive that went through was sent (the lease lives at least a TTL from then).

On an etcd shared with other users a lease is not the worker's alone: etcd's permissions cover
keys, not leases. Any user can keep any lease alive, revoke one that holds no key, and attach a
key of its own to one, after which only a user who may write that key can revoke it. So:
- a new lease is first marked as ours (`attach` writes the worker's entry among live workers
  under it, with a plain put, which etcd refuses under a lease that holds a key of another user)
  and used only then: a lease revoked or taken before that is dropped for another, and a lease in
  use holds the worker's entry, which is how the other workers find it (`peers.py`);
- a lease kept alive is not taken for a life: the other workers judge by the entry's heartbeat
  (`presence.py`, `peers.py`);
- `release()` ends a lease by revoking it or, where etcd refuses, by deleting what of the
  namespace it holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..errors import AccessDenied, LeaseLost, StoreError, StoreUnavailable
from ..keys import Keys
from ..membership import prefix as workers_prefix
from ..store import Compare, Delete, Store, Txn, prefix_end

log = logging.getLogger(__name__)

NESTED = 64  # keys deleted per request by `release` (one nested transaction each)


class LeaseKeeper:
    def __init__(self, store: Store, ttl: float, *, name: str, on_lost: Callable[[], None] = lambda: None,
                 attach: Callable[[int], Awaitable[None]] | None = None,
                 release: Callable[[int], Awaitable[object]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """`attach(lease)`: mark a new lease as ours before it is used (LeaseLost or AccessDenied:
        it is not ours to use). `release(lease)`: end a lease and what it holds (default: revoke)."""
        self.store = store
        self.ttl = ttl
        self.name = name
        self.on_lost = on_lost
        self.attach = attach
        self.release = release
        self.id: int | None = None
        self.ready = asyncio.Event()
        self.clock = clock
        self._renewed_at: float | None = None  # when the last grant or keep-alive that went through was sent
        self._stopping = False  # the worker stops: a grant that cannot reach the store gives up
        self._renew = asyncio.Event()  # set by `lost()`: the keeper takes a new lease now
        self._abandoned: list[int] = []  # leases given up alive (taken by another user): to release
        self.renewals = 0  # keep-alives that went through
        self.losses = 0  # leases found gone (or given up) and replaced

    @property
    def renewed_at(self) -> float | None:
        """When (on `clock`) the last grant or keep-alive that went through was sent: etcd keeps
        the lease alive for at least its TTL from then. None before the first grant."""
        return self._renewed_at

    async def grant(self) -> int:
        """Take a new lease and mark it as ours, retrying while the store is unavailable."""
        self.ready.clear()
        delay = 0.2
        while True:
            sent = self.clock()
            try:
                lease = await self.store.lease_grant(self.ttl)
                if self.attach is not None:
                    await self.attach(lease)
            except LeaseLost:
                log.warning("worker %s: a new lease was revoked before it held anything (by another etcd user?); "
                            "taking another", self.name)
            except AccessDenied as exc:
                log.warning("worker %s: etcd refused to write under a new lease (%s): another etcd user may have "
                            "attached a key to it; taking another", self.name, exc)
            except StoreUnavailable as exc:
                if self._stopping:
                    raise
                log.warning("worker %s: store unavailable (%s); retrying", self.name, exc)
            else:
                self.id = lease
                self._renewed_at = sent
                self._renew.clear()
                self.ready.set()
                log.debug("worker %s: lease %x granted (ttl %.0fs)", self.name, lease, self.ttl)
                return lease
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def keep(self) -> None:
        """Refresh the lease until cancelled; take a new one as soon as it is lost."""
        interval = max(self.ttl / 3, 0.05)
        while True:
            try:
                await asyncio.wait_for(self._renew.wait(), interval)
            except asyncio.TimeoutError:
                pass
            if not self._renew.is_set():
                try:
                    sent = self.clock()
                    await self.store.lease_keepalive(self.id or 0)
                    self._renewed_at = sent
                    self.renewals += 1
                    continue
                except LeaseLost:
                    self.lost(self.id)
                except StoreError as exc:  # unavailable, or refused for now: the lease may still be alive
                    log.warning("worker %s: keep-alive failed (%s)", self.name, exc)
                    continue
            await self.grant()
            while self._abandoned:
                await self._release(self._abandoned.pop())

    async def verify(self) -> None:
        """Something said the lease is gone: ask the store now (the keeper takes a new one if so)."""
        lease = self.id
        sent = self.clock()
        try:
            await self.store.lease_keepalive(lease or 0)
            if lease == self.id:
                self._renewed_at = sent
        except LeaseLost:
            self.lost(lease)
        except StoreError as exc:
            log.warning("worker %s: cannot check the lease (%s)", self.name, exc)

    def lost(self, lease: int | None, *, abandon: bool = False) -> None:
        """`lease` is gone (the keep-alive, a write under it or a commit said so), and every claim
        under it; or, with `abandon`, it lives but is no longer ours to use (another etcd user
        attached a key to it): the worker leaves it, and it is released. A lease this keeper has
        already replaced is not news."""
        if lease is None or lease != self.id or not self.ready.is_set():
            return
        if abandon:
            log.warning("worker %s: lease %x holds a key of another etcd user; leaving it and what it held",
                        self.name, lease)
            self._abandoned.append(lease)
        else:
            log.warning("worker %s: lease %x lost; its claims are gone, taking a new lease", self.name, lease)
        self.losses += 1
        self.ready.clear()
        self._renew.set()
        self.on_lost()

    def stop(self) -> None:
        """The worker stops: from now on a grant gives up when the store is unavailable."""
        self._stopping = True

    async def revoke(self) -> None:
        """The worker stops: every claim still held goes at once."""
        if self.id is not None:
            await self._release(self.id)

    async def _release(self, lease: int) -> None:
        try:
            if self.release is not None:
                await self.release(lease)
            else:
                await self.store.lease_revoke(lease)
        except StoreError as exc:
            log.warning("worker %s: could not release lease %x (%s); its claims go when it expires", self.name,
                        lease, exc)


async def release(store: Store, keys: Keys, lease: int) -> int:
    """End `lease` and every key of the namespace bound to it: revoke it, or, where etcd refuses
    (another user attached a key of its own to it), delete those keys, each only while it is still
    bound to the lease. The worker's entry deleted so ends its claims: its markers are work
    orphaned, which workers take up. Returns how many
    keys were deleted one by one (0 when the lease was revoked)."""
    try:
        await store.lease_revoke(lease)
        return 0
    except AccessDenied:
        pass
    try:
        held = await keys_under(store, keys, lease)
    except LeaseLost:
        return 0
    deleted = 0
    for start in range(0, len(held), NESTED):
        chunk = held[start:start + NESTED]
        result = await store.txn([], [Txn([Compare.lease_of(key, "==", lease)], [Delete(key)]) for key in chunk])
        deleted += sum(1 for i in range(len(chunk)) if result.nested(i).succeeded)
    return deleted


async def keys_under(store: Store, keys: Keys, lease: int) -> list[str]:
    """The namespace's keys bound to `lease`; LeaseLost when etcd says it is gone.

    etcd lists a lease's keys; from 3.5.9 only to a user who may read all of them, so a lease that
    another user attached a key to has its keys looked for instead, where dsm puts keys under a
    lease: workers' entries and the housekeeping election (a claim is no key of its own: it holds
    while its worker's entry does; release 0.1's claim keys go with their lease)."""
    try:
        return [key for key in await store.lease_keys(lease) if key.startswith(keys.root)]
    except AccessDenied:
        pass
    found: list[str] = []
    for prefix in (workers_prefix(keys), keys.housekeeper):
        start, end = prefix, prefix_end(prefix)
        while True:
            page = await store.range(start, end, limit=1000, keys_only=True)
            found.extend(kv.key for kv in page.kvs if kv.lease == lease)
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + "\0"
    return found
