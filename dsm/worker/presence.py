"""The worker's entry in the namespace's list of live workers (`dsm.membership`): who it is, what it
serves, and its heartbeat.

The entry is written under the worker's lease: first when a lease is new (`attach`, before the
lease is used for anything), then whenever what it says changed (a definition compiled or
refused, the number of ticks in flight), looked at every `interval` seconds, and at least every
`heartbeat` seconds even when nothing changed. The other workers take a worker whose entry went
unwritten for `stale_after` seconds for dead, whatever its lease says (`peers.py`): the entry
says how long that is, so each worker chooses its own. `stopping` ends nothing here: the
heartbeat goes on while a stopping worker finishes its ticks.

`healthy()` is the span of this worker's monotonic clock over which its own heartbeat went
through, without a failure or a gap longer than two beats: a worker whose own writes fail (etcd
unreachable, or refusing writes for lack of space) or that was itself stalled (a long pause of
the process or the machine) takes nobody else's silence for death.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

from ..definitions import Registry
from ..errors import AccessDenied, LeaseLost, StoreError
from ..keys import LAYOUT, Keys
from ..membership import Served, WorkerInfo, key
from ..store import Put, Store
from .lease import LeaseKeeper

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, store: Store, keys: Keys, lease: LeaseKeeper, registry: Registry, *, worker_id: str,
                 concurrency: int, in_flight: Callable[[], int], interval: float = 5.0, heartbeat: float = 3.0,
                 stale_after: float | None = None, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.keys = keys
        self.lease = lease
        self.registry = registry
        self.worker_id = worker_id
        self.key = key(keys, worker_id)
        self.concurrency = concurrency
        self.in_flight = in_flight
        self.interval = interval
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.wall = wall
        self.clock = clock
        self.started_at = wall()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._healthy: tuple[float, float] | None = None  # (since, last write that went through)
        self._written: tuple[int | None, WorkerInfo | None, float] = (None, None, 0.0)  # lease, entry, when

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
            updated_at=self.wall(), stale_after=self.stale_after, layout=LAYOUT)

    async def attach(self, lease: int) -> None:
        """Write the entry under a new lease, before the lease is used: a plain put, which etcd
        refuses (AccessDenied) under a lease that holds a key of another user, and fails
        (LeaseLost) under one revoked already."""
        info, started = self.info(), self.clock()
        await self._write(lease, info, started, self.store.put(self.key, info.dump(), lease))

    async def update(self) -> None:
        """Write the entry if the lease or anything in it changed, or a heartbeat is due."""
        await self.lease.ready.wait()
        lease = self.lease.id
        info, started = self.info(), self.clock()
        written_lease, written, at = self._written
        if lease == written_lease and info.same_as(written) and started - at < self.heartbeat:
            return
        # A transaction, not a plain put: etcd refuses a plain put under a lease that holds another
        # user's key, and any user can attach one; the heartbeat must not stop for that.
        await self._write(lease, info, started, self.store.txn([], [Put(self.key, info.dump(), lease or 0)]))

    @property
    def written_at(self) -> float | None:
        """When (on `clock`) the last write of the entry that went through was sent; None before
        the first. The other workers judge this worker by how long ago that was (`stale_after`)."""
        _, written, at = self._written
        return at if written is not None else None

    def healthy(self) -> tuple[float, float] | None:
        """(since, until): the span over which every heartbeat of ours went through; None while
        they fail or are late."""
        if self._healthy is None or self.clock() - self._healthy[1] > 2 * self.heartbeat:
            return None
        return self._healthy

    async def _write(self, lease: int | None, info: WorkerInfo, started: float, write: Awaitable[object]) -> None:
        try:
            await write
        except StoreError:
            self._healthy = None
            raise
        self._written = (lease, info, started)
        if self._healthy is None or started - self._healthy[1] > 2 * self.heartbeat:
            self._healthy = (started, started)
        else:
            self._healthy = (self._healthy[0], started)

    async def run(self) -> None:
        """Keep the entry current until cancelled."""
        while True:
            await self.lease.ready.wait()
            lease = self.lease.id
            try:
                await self.update()
            except LeaseLost:
                self.lease.lost(lease)
            except AccessDenied as exc:
                log.warning("worker %s: etcd refused to write its entry among live workers (%s)", self.worker_id,
                            exc)
                self.lease.lost(lease, abandon=True)
            except StoreError as exc:
                log.debug("worker %s: could not update its entry among live workers (%s)", self.worker_id, exc)
            await asyncio.sleep(min(self.interval, self.heartbeat))
