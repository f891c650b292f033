"""The worker's lease: granted, kept alive, replaced when lost.

Every claim a worker takes is bound to its lease, so the lease is the worker's life as other
workers see it. The keeper refreshes it at a third of its TTL; when the store says it is gone,
the keeper calls `on_lost` (the worker abandons what it held) and takes a new one. `ready` is set
while a lease is believed alive; claims wait on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..errors import LeaseLost, StoreError, StoreUnavailable
from ..store import Store

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, store: Store, ttl: float, *, name: str, on_lost: Callable[[], None] = lambda: None):
        self.store = store
        self.ttl = ttl
        self.name = name
        self.on_lost = on_lost
        self.id: int | None = None
        self.ready = asyncio.Event()
        self.stopping = False

    async def grant(self) -> int:
        """Take a new lease, retrying while the store is unavailable."""
        self.ready.clear()
        delay = 0.2
        while True:
            try:
                self.id = await self.store.lease_grant(self.ttl)
            except StoreUnavailable as exc:
                if self.stopping:
                    raise
                log.warning("worker %s: store unavailable (%s); retrying", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.ready.set()
            log.debug("worker %s: lease %x granted (ttl %.0fs)", self.name, self.id, self.ttl)
            return self.id

    async def keep(self) -> None:
        """Refresh the lease until cancelled."""
        interval = max(self.ttl / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.lease_keepalive(self.id or 0)
            except LeaseLost:
                self.lost()
                await self.grant()
            except StoreError as exc:  # unavailable, or refused for now: the lease may still be alive
                log.warning("worker %s: keep-alive failed (%s)", self.name, exc)

    async def verify(self) -> None:
        """Something said the lease is gone: ask the store now, and take a new one if so."""
        try:
            await self.store.lease_keepalive(self.id or 0)
        except LeaseLost:
            self.lost()
            await self.grant()
        except StoreError as exc:
            log.warning("worker %s: cannot check the lease (%s)", self.name, exc)

    def lost(self) -> None:
        """The lease is gone (the keep-alive or a commit said so): every claim under it went too."""
        if not self.ready.is_set():
            return
        log.warning("worker %s: lease %x lost; its claims are gone, taking a new lease", self.name, self.id or 0)
        self.ready.clear()
        self.on_lost()

    async def revoke(self) -> None:
        if self.id is None:
            return
        try:
            await self.store.lease_revoke(self.id)  # every claim still held goes at once
        except StoreError as exc:
            log.warning("worker %s: could not revoke lease (%s); claims expire in %.0fs", self.name, exc, self.ttl)
