"""The worker's entry in the namespace's list of live workers (`dsm.workers`), kept under its lease.

Written when the worker has a lease, and again whenever what it says changed (a new lease, a
definition compiled or refused, the number of ticks in flight), looked at every `interval`
seconds: a key per worker, not a write per tick. Its lease takes it away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

from ..definitions import Registry
from ..errors import LeaseLost, StoreError
from ..keys import Keys
from ..store import Store
from ..workers import Served, WorkerInfo, key
from .lease import LeaseKeeper

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, store: Store, keys: Keys, lease: LeaseKeeper, registry: Registry, *, worker_id: str,
                 concurrency: int, in_flight: Callable[[], int], interval: float = 5.0,
                 wall: Callable[[], float] = time.time):
        self.store = store
        self.keys = keys
        self.lease = lease
        self.registry = registry
        self.worker_id = worker_id
        self.concurrency = concurrency
        self.in_flight = in_flight
        self.interval = interval
        self.wall = wall
        self.started_at = wall()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._written: tuple[int | None, WorkerInfo | None] = (None, None)

    def info(self) -> WorkerInfo:
        allow = self.registry.allow
        known = sorted(self.registry.known(), key=lambda g: (g.machine, g.digest))
        refused = self.registry.refused()
        return WorkerInfo(
            id=self.worker_id, host=self.host, pid=self.pid,
            definitions=tuple(Served(g.machine, g.version, g.digest) for g in known),
            allow=allow.prefixes, functions=allow.functions,
            refused=tuple(Served(machine or "?", None, digest) for digest, machine in sorted(refused.items())),
            concurrency=self.concurrency, in_flight=self.in_flight(), started_at=self.started_at,
            updated_at=self.wall())

    async def update(self) -> None:
        """Write the entry if the lease or anything in it changed since it was last written."""
        await self.lease.ready.wait()
        lease = self.lease.id
        info = self.info()
        written_lease, written = self._written
        if lease == written_lease and info.same_as(written):
            return
        await self.store.put(key(self.keys, self.worker_id), info.dump(), lease or 0)
        self._written = (lease, info)

    async def run(self) -> None:
        """Keep the entry current until cancelled."""
        while True:
            try:
                await self.update()
            except LeaseLost:
                self.lease.lost()
            except StoreError as exc:
                log.debug("worker %s: could not update its entry among live workers (%s)", self.worker_id, exc)
            await asyncio.sleep(self.interval)

